//! FUSE message constants and reply parsers built on the frontend's own wire structs
//! ([`crate::abi`]).

use vm_memory::ByteValued;

use crate::Error;

pub use crate::abi::{
    AccessIn, Attr, AttrOut, BatchForgetIn, CopyFileRangeIn, CreateIn, Dirent, EntryOut,
    FallocateIn, FileLock, FlushIn, ForgetIn, ForgetOne, FsyncIn, GetattrIn, GetxattrIn,
    GetxattrOut, InHeader, InitIn, InitIn2, InitOut, Kstatfs, LinkIn, LkIn, LkOut, LseekIn,
    LseekOut, MkdirIn, MknodIn, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, Rename2In, RenameIn,
    SetattrIn, SetxattrIn, WriteIn, WriteOut, ROOT_ID,
};

/// FUSE protocol major version spoken by this frontend.
pub const FUSE_KERNEL_VERSION: u32 = 7;
/// FUSE protocol minor version announced in FUSE_INIT (that of Linux 6.x guests).
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 38;

/// FUSE opcodes used by this crate (numbers from the FUSE protocol).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
}

/// FOPEN_* bits of an OPEN, OPENDIR or CREATE reply's `open_flags`.
pub mod open_flags {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
}

/// `fuse_setattr_in.valid` bits (FATTR_*).
pub mod setattr_valid {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// Flags a guest kernel puts in `fuse_write_in.write_flags` / `fuse_open_in.open_flags`.
pub mod kill_priv {
    /// FUSE_WRITE_KILL_SUIDGID: the writer is unprivileged (HANDLE_KILLPRIV_V2).
    pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
    /// FUSE_OPEN_KILL_SUIDGID: an O_TRUNC open by an unprivileged caller.
    pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;
}

/// FUSE_INIT flag bits a Linux virtio-fs guest commonly requests.
pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const POSIX_LOCKS: u64 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const EXPORT_SUPPORT: u64 = 1 << 4;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DONT_MASK: u64 = 1 << 6;
    pub const FLOCK_LOCKS: u64 = 1 << 10;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const SUBMOUNTS: u64 = 1 << 27;
    pub const SETXATTR_EXT: u64 = 1 << 29;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const SECURITY_CTX: u64 = 1 << 32;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;

    /// What this frontend asks for by default.
    pub const DEFAULT: u64 = ASYNC_READ
        | ATOMIC_O_TRUNC
        | EXPORT_SUPPORT
        | BIG_WRITES
        | DONT_MASK
        | DO_READDIRPLUS
        | READDIRPLUS_AUTO
        | ASYNC_DIO
        | PARALLEL_DIROPS
        | MAX_PAGES
        | SUBMOUNTS
        | INIT_EXT;
}

/// Size of the FUSE request header.
pub const IN_HEADER_SIZE: usize = std::mem::size_of::<InHeader>();
/// Size of the FUSE reply header.
pub const OUT_HEADER_SIZE: usize = std::mem::size_of::<OutHeader>();

/// Human-readable opcode name for error messages.
pub fn opcode_name(op: u32) -> &'static str {
    match op {
        opcode::LOOKUP => "LOOKUP",
        opcode::FORGET => "FORGET",
        opcode::GETATTR => "GETATTR",
        opcode::SETATTR => "SETATTR",
        opcode::READLINK => "READLINK",
        opcode::SYMLINK => "SYMLINK",
        opcode::MKNOD => "MKNOD",
        opcode::MKDIR => "MKDIR",
        opcode::UNLINK => "UNLINK",
        opcode::RMDIR => "RMDIR",
        opcode::RENAME => "RENAME",
        opcode::LINK => "LINK",
        opcode::OPEN => "OPEN",
        opcode::READ => "READ",
        opcode::WRITE => "WRITE",
        opcode::STATFS => "STATFS",
        opcode::RELEASE => "RELEASE",
        opcode::FLUSH => "FLUSH",
        opcode::INIT => "INIT",
        opcode::OPENDIR => "OPENDIR",
        opcode::READDIR => "READDIR",
        opcode::RELEASEDIR => "RELEASEDIR",
        opcode::CREATE => "CREATE",
        opcode::DESTROY => "DESTROY",
        opcode::BATCH_FORGET => "BATCH_FORGET",
        opcode::READDIRPLUS => "READDIRPLUS",
        opcode::FSYNC => "FSYNC",
        opcode::SETXATTR => "SETXATTR",
        opcode::GETXATTR => "GETXATTR",
        opcode::LISTXATTR => "LISTXATTR",
        opcode::FSYNCDIR => "FSYNCDIR",
        opcode::GETLK => "GETLK",
        opcode::SETLK => "SETLK",
        opcode::SETLKW => "SETLKW",
        opcode::FALLOCATE => "FALLOCATE",
        opcode::RENAME2 => "RENAME2",
        opcode::LSEEK => "LSEEK",
        opcode::COPY_FILE_RANGE => "COPY_FILE_RANGE",
        opcode::SETUPMAPPING => "SETUPMAPPING",
        opcode::REMOVEMAPPING => "REMOVEMAPPING",
        opcode::SYNCFS => "SYNCFS",
        opcode::TMPFILE => "TMPFILE",
        _ => "UNKNOWN",
    }
}

/// Reads a `T` from the start of `bytes`, which may be unaligned.
///
/// Replies shorter than `T` are an error, except that a reply may be shorter when the
/// protocol allows older, smaller layouts: callers pass `allow_prefix` for those and the
/// missing tail stays zero.
pub fn parse_struct<T: ByteValued + Default>(
    bytes: &[u8],
    allow_prefix: bool,
    what: &'static str,
) -> Result<T, Error> {
    let size = std::mem::size_of::<T>();
    if bytes.len() < size && !allow_prefix {
        return Err(Error::MalformedReply(format!(
            "{what} reply has {} bytes, expected {size}",
            bytes.len()
        )));
    }
    let mut value = T::default();
    let take = bytes.len().min(size);
    value.as_mut_slice()[..take].copy_from_slice(&bytes[..take]);
    Ok(value)
}

/// One entry of a READDIRPLUS reply.
#[derive(Debug, Clone)]
pub struct DirEntryPlus {
    /// The entry's lookup result (counts as a lookup unless `entry.nodeid` is 0).
    pub entry: EntryOut,
    pub ino: u64,
    /// Offset to pass to the next READDIRPLUS to continue after this entry.
    pub offset: u64,
    /// Directory entry type (DT_* value).
    pub kind: u32,
    pub name: Vec<u8>,
}

/// One entry of a READDIR reply.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub offset: u64,
    pub kind: u32,
    pub name: Vec<u8>,
}

fn align8(len: usize) -> Option<usize> {
    len.checked_add(7).map(|v| v & !7)
}

/// Parses the packed `fuse_direntplus` records of a READDIRPLUS reply.
pub fn parse_direntplus(mut bytes: &[u8]) -> Result<Vec<DirEntryPlus>, Error> {
    let entry_size = std::mem::size_of::<EntryOut>();
    let dirent_size = std::mem::size_of::<Dirent>();
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let entry: EntryOut = parse_struct(bytes, false, "READDIRPLUS entry")?;
        let dirent: Dirent = parse_struct(&bytes[entry_size..], false, "READDIRPLUS dirent")?;
        let fixed = entry_size + dirent_size;
        let name_len = usize::try_from(dirent.namelen).unwrap_or(usize::MAX);
        let name = fixed
            .checked_add(name_len)
            .and_then(|end| bytes.get(fixed..end))
            .ok_or_else(|| {
                Error::MalformedReply(format!(
                    "READDIRPLUS name of {name_len} bytes overruns the reply"
                ))
            })?;
        entries.push(DirEntryPlus {
            entry,
            ino: dirent.ino,
            offset: dirent.off,
            kind: dirent.type_,
            name: name.to_vec(),
        });
        let record = align8(fixed + name_len).unwrap_or(usize::MAX);
        bytes = bytes.get(record..).unwrap_or(&[]);
    }
    Ok(entries)
}

/// Parses the packed `fuse_dirent` records of a READDIR reply.
pub fn parse_dirent(mut bytes: &[u8]) -> Result<Vec<DirEntry>, Error> {
    let dirent_size = std::mem::size_of::<Dirent>();
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let dirent: Dirent = parse_struct(bytes, false, "READDIR dirent")?;
        let name_len = usize::try_from(dirent.namelen).unwrap_or(usize::MAX);
        let name = dirent_size
            .checked_add(name_len)
            .and_then(|end| bytes.get(dirent_size..end))
            .ok_or_else(|| {
                Error::MalformedReply(format!(
                    "READDIR name of {name_len} bytes overruns the reply"
                ))
            })?;
        entries.push(DirEntry {
            ino: dirent.ino,
            offset: dirent.off,
            kind: dirent.type_,
            name: name.to_vec(),
        });
        let record = align8(dirent_size + name_len).unwrap_or(usize::MAX);
        bytes = bytes.get(record..).unwrap_or(&[]);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direntplus_record(ino: u64, off: u64, name: &[u8]) -> Vec<u8> {
        let mut entry = EntryOut {
            nodeid: ino + 100,
            ..Default::default()
        };
        entry.attr.ino = ino;
        let dirent = Dirent {
            ino,
            off,
            namelen: name.len() as u32,
            type_: 8,
        };
        let mut out = entry.as_slice().to_vec();
        out.extend_from_slice(dirent.as_slice());
        out.extend_from_slice(name);
        while out.len() & 7 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn parses_packed_direntplus_records() {
        let mut bytes = direntplus_record(5, 1, b"a");
        bytes.extend(direntplus_record(6, 2, b"longer-name"));
        let entries = parse_direntplus(&bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, b"a");
        assert_eq!(entries[0].entry.nodeid, 105);
        assert_eq!(entries[1].name, b"longer-name");
        assert_eq!(entries[1].offset, 2);
    }

    #[test]
    fn rejects_direntplus_name_overrun() {
        let mut bytes = direntplus_record(5, 1, b"abcdefgh");
        bytes.truncate(bytes.len() - 4);
        assert!(matches!(
            parse_direntplus(&bytes),
            Err(Error::MalformedReply(_))
        ));
    }

    #[test]
    fn short_struct_is_rejected_unless_prefix_allowed() {
        let bytes = [1u8; 8];
        assert!(parse_struct::<WriteIn>(&bytes, false, "x").is_err());
        let partial: InitOut = parse_struct(&bytes, true, "x").unwrap();
        assert_eq!(partial.major, 0x0101_0101);
        assert_eq!(partial.max_write, 0);
    }
}
