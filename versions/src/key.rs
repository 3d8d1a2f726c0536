//! [`SlotKey`]: what names an inode in the table, the same way in every process.
//!
//! Mount ids differ between mount namespaces (each berth sandbox has its own), so keys never
//! contain one. A file handle carries the inode's generation, so a deleted file's reused inode
//! number gets another key; filesystems without handles fall back to (device, inode number),
//! where a reused number shares the old file's slot: that costs an extra refetch, never a
//! missed change. The key is stored as its 64-bit hash: two inodes whose hashes collide share
//! a slot, with the same harmless effect.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use xxhash_rust::xxh3::xxh3_64;

/// `name_to_handle_at` flag (Linux 6.5): encode the handle fanotify reports, which works on
/// filesystems that cannot be exported too.
const AT_HANDLE_FID: libc::c_int = 0x200;
const MAX_HANDLE_SIZE: usize = 128;

/// An inode's identity for the version table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlotKey {
    /// A file handle (type and bytes), as `name_to_handle_at` or fanotify give it.
    Handle { handle_type: i32, bytes: Vec<u8> },
    /// Device and inode number, where the filesystem has no handles.
    Inode { dev: u64, ino: u64 },
}

impl SlotKey {
    /// The key of a file handle.
    pub fn handle(handle_type: i32, bytes: &[u8]) -> SlotKey {
        SlotKey::Handle {
            handle_type,
            bytes: bytes.to_vec(),
        }
    }

    /// The key of the inode `fd` refers to (an `O_PATH` descriptor is fine), or of `name`
    /// inside the directory `fd` when `name` is not empty. Falls back to (device, inode) when
    /// the filesystem gives no handle.
    pub fn of(fd: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<SlotKey> {
        #[repr(C)]
        struct RawHandle {
            handle_bytes: u32,
            handle_type: i32,
            f_handle: [u8; MAX_HANDLE_SIZE],
        }
        let mut raw = RawHandle {
            handle_bytes: MAX_HANDLE_SIZE as u32,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SIZE],
        };
        let mut mount_id: libc::c_int = 0;
        let empty = name.to_bytes().is_empty();
        let flags = AT_HANDLE_FID | if empty { libc::AT_EMPTY_PATH } else { 0 };
        // SAFETY: `raw` has room for MAX_HANDLE_SIZE bytes as handle_bytes says, `name` is
        // NUL-terminated; the result is checked. Without AT_SYMLINK_FOLLOW a final symlink is
        // not followed.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                fd.as_raw_fd(),
                name.as_ptr(),
                &mut raw as *mut RawHandle,
                &mut mount_id as *mut libc::c_int,
                flags,
            )
        };
        if ret == 0 {
            let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SIZE);
            return Ok(SlotKey::handle(raw.handle_type, &raw.f_handle[..len]));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::EOVERFLOW) => {}
            _ => return Err(err),
        }
        // SAFETY: stat is plain data, filled by fstatat below before use.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let flags = libc::AT_SYMLINK_NOFOLLOW | if empty { libc::AT_EMPTY_PATH } else { 0 };
        // SAFETY: a valid descriptor, a NUL-terminated name and a stat buffer; checked.
        if unsafe { libc::fstatat(fd.as_raw_fd(), name.as_ptr(), &mut st, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SlotKey::Inode {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// The key's hash as stored in the index: never 0, which marks a free slot.
    pub fn hash(&self) -> u64 {
        let h = match self {
            SlotKey::Handle { handle_type, bytes } => {
                let mut buf = Vec::with_capacity(5 + bytes.len());
                buf.push(b'h');
                buf.extend_from_slice(&handle_type.to_le_bytes());
                buf.extend_from_slice(bytes);
                xxh3_64(&buf)
            }
            SlotKey::Inode { dev, ino } => {
                let mut buf = [0u8; 17];
                buf[0] = b'i';
                buf[1..9].copy_from_slice(&dev.to_le_bytes());
                buf[9..].copy_from_slice(&ino.to_le_bytes());
                xxh3_64(&buf)
            }
        };
        if h == 0 {
            1
        } else {
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_file_has_one_key_through_any_descriptor_and_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        let f = std::fs::File::open(dir.path().join("f")).unwrap();
        let by_fd = SlotKey::of(f.as_fd(), c"").unwrap();
        let by_name = SlotKey::of(d.as_fd(), c"f").unwrap();
        assert_eq!(by_fd, by_name);
        assert_ne!(by_fd, SlotKey::of(d.as_fd(), c"").unwrap());
    }

    #[test]
    fn a_recreated_file_gets_another_key_where_handles_carry_a_generation() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::File::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let first = SlotKey::of(d.as_fd(), c"f").unwrap();
        std::fs::remove_file(dir.path().join("f")).unwrap();
        std::fs::write(dir.path().join("f"), b"y").unwrap();
        let second = SlotKey::of(d.as_fd(), c"f").unwrap();
        if matches!(first, SlotKey::Handle { .. }) {
            assert_ne!(first, second);
        }
    }

    #[test]
    fn hashes_are_stable_and_never_zero() {
        let k = SlotKey::Inode { dev: 1, ino: 2 };
        assert_eq!(k.hash(), k.hash());
        assert_ne!(k.hash(), 0);
        assert_ne!(k.hash(), SlotKey::Inode { dev: 2, ino: 1 }.hash());
        assert_ne!(
            SlotKey::handle(1, &[1, 2, 3]).hash(),
            SlotKey::handle(2, &[1, 2, 3]).hash()
        );
    }
}
