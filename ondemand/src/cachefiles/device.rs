//! `/dev/cachefiles` in on-demand mode (Linux 5.19 – 7.1, `CONFIG_CACHEFILES_ONDEMAND`;
//! see the kernel's `include/uapi/linux/cachefiles.h`).
//!
//! The daemon writes text commands, one per write (`dir`, `tag`, `bind ondemand`,
//! `copen <msg id>,<size>`, `restore`), and reads one message per `read`: a 16-byte
//! header `{msg_id, opcode, len, object_id}` and a body. OPEN installs an anonymous
//! file descriptor in the reading process for the cache file of one cookie; the daemon
//! answers with `copen`. READ asks for a byte range of a cookie's object: the daemon
//! writes the data into that descriptor and completes the request with
//! [`CACHEFILES_IOC_READ_COMPLETE`]; completing without writing fails the reader with
//! EIO. CLOSE (no reply) retires an object.
//!
//! The device can be open once per host, and erofs volumes go to the first cache bound:
//! one daemon serves every fscache-mode erofs mount of the machine.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{OndemandError, Result};

/// The character device of cachefiles.
pub const DEVICE_PATH: &str = "/dev/cachefiles";
/// Longest message the kernel sends (`CACHEFILES_MSG_MAX_SIZE`).
pub const MSG_MAX_SIZE: usize = 1024;
/// `_IOW(0x98, 1, int)`: completes READ request `msg_id` (the argument).
pub const CACHEFILES_IOC_READ_COMPLETE: libc::c_ulong = 0x4004_9801;

const OP_OPEN: u32 = 0;
const OP_CLOSE: u32 = 1;
const OP_READ: u32 = 2;
const HEADER_LEN: usize = 16;
const OPEN_LEN: usize = 16;

/// One request from the kernel.
#[derive(Debug)]
pub enum Request {
    /// A cookie's cache object was opened; `fd` is the anonymous descriptor the kernel
    /// installed in this process (owned from here on). Answer with [`Device::copen`].
    Open {
        msg_id: u32,
        object_id: u32,
        volume_key: String,
        cookie_key: String,
        fd: OwnedFd,
    },
    /// The object is retired; close its descriptor.
    Close { object_id: u32 },
    /// Fill `off..off + len` of the object, then [`complete_read`].
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// A key as the kernel sends it: NUL-terminated (volume) or not (cookie), printable
/// UTF-8 for every key erofs makes.
fn key_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Parses one message. For OPEN the anonymous descriptor is taken over by the result,
/// also when the rest of the message is malformed (it is closed then), so none leaks.
pub fn parse_request(buf: &[u8]) -> std::result::Result<Request, String> {
    let header = (
        u32_at(buf, 0),
        u32_at(buf, 4),
        u32_at(buf, 8),
        u32_at(buf, 12),
    );
    let (Some(msg_id), Some(opcode), Some(len), Some(object_id)) = header else {
        return Err(format!("a {}-byte message is too short", buf.len()));
    };
    if len as usize != buf.len() {
        return Err(format!(
            "the message says {len} bytes but {} were read",
            buf.len()
        ));
    }
    let body = &buf[HEADER_LEN..];
    match opcode {
        OP_OPEN => {
            let (Some(volume_len), Some(cookie_len), Some(raw_fd)) =
                (u32_at(body, 0), u32_at(body, 4), u32_at(body, 8))
            else {
                return Err("an OPEN message is too short".into());
            };
            // SAFETY: the kernel installed this descriptor in our table for this message;
            // nothing else refers to it. (A malformed message still carries it.)
            let fd = unsafe { OwnedFd::from_raw_fd(raw_fd as RawFd) };
            let keys = &body[OPEN_LEN..];
            let (volume_len, cookie_len) = (volume_len as usize, cookie_len as usize);
            let volume = keys.get(..volume_len);
            let cookie = keys.get(volume_len..volume_len.saturating_add(cookie_len));
            let (Some(volume), Some(cookie)) = (volume, cookie) else {
                drop(fd);
                return Err("the keys of an OPEN message overrun it".into());
            };
            Ok(Request::Open {
                msg_id,
                object_id,
                volume_key: key_text(volume),
                cookie_key: key_text(cookie),
                fd,
            })
        }
        OP_CLOSE => Ok(Request::Close { object_id }),
        OP_READ => {
            let (Some(off), Some(len)) = (u64_at(body, 0), u64_at(body, 8)) else {
                return Err("a READ message is too short".into());
            };
            Ok(Request::Read {
                msg_id,
                object_id,
                off,
                len,
            })
        }
        other => Err(format!("unknown opcode {other}")),
    }
}

/// An open `/dev/cachefiles`.
#[derive(Debug)]
pub struct Device {
    file: File,
}

fn kernel(operation: &'static str, source: io::Error) -> OndemandError {
    OndemandError::Kernel { operation, source }
}

impl Device {
    /// Opens the device (root with CAP_SYS_ADMIN; once per host).
    pub fn open() -> Result<Self> {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(DEVICE_PATH)
        {
            Ok(file) => Ok(Self { file }),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Err(kernel(
                "opening /dev/cachefiles (another cachefiles daemon, such as cachefilesd or a \
                 second `berth fscache`, has it open; the device can be open once per host)",
                err,
            )),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(kernel(
                "opening /dev/cachefiles (the kernel has no cachefiles: CONFIG_CACHEFILES, and \
                 CONFIG_CACHEFILES_ONDEMAND for erofs, Linux 5.19 to 7.1)",
                err,
            )),
            Err(err) => Err(kernel("opening /dev/cachefiles", err)),
        }
    }

    /// Takes over a descriptor of the device (inherited from a service manager's
    /// descriptor store after a restart).
    pub fn from_fd(fd: OwnedFd) -> Self {
        crate::ipc::set_nonblocking(fd.as_raw_fd(), true);
        Self {
            file: File::from(fd),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// A duplicate of the descriptor (for the descriptor store).
    pub fn try_clone_fd(&self) -> Result<OwnedFd> {
        self.file
            .try_clone()
            .map(OwnedFd::from)
            .map_err(|e| kernel("duplicating the /dev/cachefiles descriptor", e))
    }

    fn command(&self, text: &str, operation: &'static str) -> Result<()> {
        (&self.file)
            .write_all(text.as_bytes())
            .map_err(|e| kernel(operation, e))
    }

    /// `dir`, `tag` and `bind ondemand`: binds the cache in `dir` (which must not be
    /// tmpfs: cachefiles needs a filesystem with `sync_fs`, e.g. ext4).
    pub fn bind(&self, dir: &Path, tag: &str) -> Result<()> {
        let dir = dir.to_str().ok_or_else(|| OndemandError::Io {
            context: format!("using {} as the cachefiles directory", dir.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        if dir.contains(char::is_whitespace) {
            return Err(OndemandError::Io {
                context: format!("using `{dir}` as the cachefiles directory (cachefiles takes no paths with spaces)"),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        self.command(&format!("dir {dir}"), "the cachefiles `dir` command")?;
        self.command(&format!("tag {tag}"), "the cachefiles `tag` command")?;
        self.command("bind ondemand", "`bind ondemand` (is CONFIG_CACHEFILES_ONDEMAND set, and the directory on ext4 or another filesystem with xattrs, not tmpfs?)")
    }

    /// `restore`: after a daemon restart on an inherited descriptor, hands every request
    /// the previous daemon had read but not finished out again.
    pub fn restore(&self) -> Result<()> {
        self.command("restore", "the cachefiles `restore` command")
    }

    /// Answers OPEN `msg_id` with the object's size, or a negative errno.
    pub fn copen(&self, msg_id: u32, size_or_errno: i64) -> Result<()> {
        self.command(
            &format!("copen {msg_id},{size_or_errno}"),
            "the cachefiles `copen` command",
        )
    }

    /// Reads the next request; `Ok(None)` when none is waiting.
    pub fn read_request(&self) -> Result<Option<std::result::Result<Request, String>>> {
        let mut buf = [0u8; MSG_MAX_SIZE];
        // SAFETY: reads into our own buffer of its length.
        let n = unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(kernel("reading /dev/cachefiles", err)),
            };
        }
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(parse_request(&buf[..n as usize])))
    }
}

/// Completes READ `msg_id` on the object's anonymous descriptor.
pub fn complete_read(anon_fd: RawFd, msg_id: u32) -> io::Result<()> {
    // SAFETY: an ioctl on a descriptor the caller holds, with an integer argument.
    let rc = unsafe {
        libc::ioctl(
            anon_fd,
            CACHEFILES_IOC_READ_COMPLETE as _,
            msg_id as libc::c_ulong,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether this kernel has cachefiles (the device node, or the misc driver listed).
pub fn available() -> bool {
    Path::new(DEVICE_PATH).exists()
        || std::fs::read_to_string("/proc/misc")
            .map(|misc| {
                misc.lines()
                    .any(|l| l.split_whitespace().nth(1) == Some("cachefiles"))
            })
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(msg_id: u32, opcode: u32, len: usize, object_id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [msg_id, opcode, len as u32, object_id] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out
    }

    #[test]
    fn read_close_and_open_messages_parse() {
        let mut read = header(7, OP_READ, 32, 3);
        read.extend_from_slice(&(1u64 << 20).to_ne_bytes());
        read.extend_from_slice(&131_072u64.to_ne_bytes());
        assert!(matches!(
            parse_request(&read).unwrap(),
            Request::Read {
                msg_id: 7,
                object_id: 3,
                off: 0x10_0000,
                len: 131_072
            }
        ));
        assert!(matches!(
            parse_request(&header(0, OP_CLOSE, 16, 9)).unwrap(),
            Request::Close { object_id: 9 }
        ));

        // A real descriptor stands in for the anonymous one the kernel installs.
        let file = File::open("/proc/self/exe").unwrap();
        let fd = OwnedFd::from(file);
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        let volume = b"erofs,berth\0";
        let cookie = b"0123abcd";
        let mut open = header(1, OP_OPEN, 16 + 16 + volume.len() + cookie.len(), 2);
        for v in [volume.len() as u32, cookie.len() as u32, raw as u32, 0] {
            open.extend_from_slice(&v.to_ne_bytes());
        }
        open.extend_from_slice(volume);
        open.extend_from_slice(cookie);
        match parse_request(&open).unwrap() {
            Request::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key,
                fd,
            } => {
                assert_eq!((msg_id, object_id), (1, 2));
                assert_eq!(volume_key, "erofs,berth");
                assert_eq!(cookie_key, "0123abcd");
                assert_eq!(fd.as_raw_fd(), raw);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_messages_are_refused_and_leak_no_descriptor() {
        assert!(parse_request(&[0u8; 8]).is_err());
        assert!(
            parse_request(&header(1, 9, 16, 1)).is_err(),
            "unknown opcode"
        );
        assert!(
            parse_request(&header(1, OP_READ, 16, 1)).is_err(),
            "short READ"
        );
        assert!(
            parse_request(&header(1, OP_CLOSE, 99, 1)).is_err(),
            "wrong length"
        );
        let file = File::open("/proc/self/exe").unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(OwnedFd::from(file));
        let mut open = header(1, OP_OPEN, 16 + 16 + 4, 2);
        for v in [200u32, 200, raw as u32, 0] {
            open.extend_from_slice(&v.to_ne_bytes());
        }
        open.extend_from_slice(b"abcd");
        assert!(parse_request(&open).is_err());
    }
}
