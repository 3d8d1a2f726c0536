//! The parts of the FUSE protocol berth needs beyond fuse-backend-rs's ABI structs: opcode
//! numbers, flags it has no name for, limits, and the virtio-fs DAX requests.

use vm_memory::ByteValued;

/// FUSE opcodes (include/uapi/linux/fuse.h).
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
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BMAP: u32 = 37;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const NOTIFY_REPLY: u32 = 41;
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

    /// The opcode's name (`LOOKUP`, `READ`…), for logs and request counts.
    pub fn name(op: u32) -> Option<&'static str> {
        Some(match op {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            READLINK => "READLINK",
            SYMLINK => "SYMLINK",
            MKNOD => "MKNOD",
            MKDIR => "MKDIR",
            UNLINK => "UNLINK",
            RMDIR => "RMDIR",
            RENAME => "RENAME",
            LINK => "LINK",
            OPEN => "OPEN",
            READ => "READ",
            WRITE => "WRITE",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            FSYNC => "FSYNC",
            SETXATTR => "SETXATTR",
            GETXATTR => "GETXATTR",
            LISTXATTR => "LISTXATTR",
            REMOVEXATTR => "REMOVEXATTR",
            FLUSH => "FLUSH",
            INIT => "INIT",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            FSYNCDIR => "FSYNCDIR",
            GETLK => "GETLK",
            SETLK => "SETLK",
            SETLKW => "SETLKW",
            ACCESS => "ACCESS",
            CREATE => "CREATE",
            INTERRUPT => "INTERRUPT",
            BMAP => "BMAP",
            DESTROY => "DESTROY",
            IOCTL => "IOCTL",
            POLL => "POLL",
            NOTIFY_REPLY => "NOTIFY_REPLY",
            BATCH_FORGET => "BATCH_FORGET",
            FALLOCATE => "FALLOCATE",
            READDIRPLUS => "READDIRPLUS",
            RENAME2 => "RENAME2",
            LSEEK => "LSEEK",
            COPY_FILE_RANGE => "COPY_FILE_RANGE",
            SETUPMAPPING => "SETUPMAPPING",
            REMOVEMAPPING => "REMOVEMAPPING",
            SYNCFS => "SYNCFS",
            TMPFILE => "TMPFILE",
            _ => return None,
        })
    }
}

/// `FOPEN_PARALLEL_DIRECT_WRITES` (Linux 6.2+), which fuse-backend-rs 0.14 has no name for:
/// direct writes to one file that do not extend it may run at once. Without it the kernel
/// holds the FUSE inode's lock across each direct write's whole round trip, so two writers
/// of one file take turns.
pub(crate) const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

/// FUSE_INIT flag bits, as 64-bit values (`flags | flags2 << 32`), including those
/// fuse-backend-rs 0.14 has no name for.
pub(crate) mod init_flags {
    pub const DONT_MASK: u64 = 1 << 6;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const SETXATTR_EXT: u64 = 1 << 29;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const SECURITY_CTX: u64 = 1 << 32;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;

    /// Names of the flags among DONT_MASK, POSIX_ACL and SETXATTR_EXT set in `flags`.
    pub fn describe(flags: u64) -> String {
        let names: Vec<&str> = [
            (POSIX_ACL, "POSIX_ACL"),
            (DONT_MASK, "DONT_MASK"),
            (SETXATTR_EXT, "SETXATTR_EXT"),
        ]
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

/// Largest READ or WRITE payload, and the size the rest of a request is judged by.
pub const MAX_BUFFER_SIZE: u32 = 1 << 20;
/// Room for a request's header and arguments on top of [`MAX_BUFFER_SIZE`].
pub(crate) const BUFFER_HEADER_SIZE: u32 = 0x1000;
/// Pages per request offered in FUSE_INIT (1 MiB).
pub(crate) const MAX_REQ_PAGES: u16 = 256;
/// The kernel's smallest read buffer; `max_write` is this less the header room without
/// BIG_WRITES or MAX_PAGES.
pub(crate) const MIN_READ_BUFFER: u32 = 8192;

/// Largest extended attribute value Linux stores (`XATTR_SIZE_MAX`).
pub(crate) const XATTR_SIZE_MAX: usize = 65536;
/// Largest list of attribute names Linux returns (`XATTR_LIST_MAX`).
pub(crate) const XATTR_LIST_MAX: usize = 65536;
/// Longest attribute name (`XATTR_NAME_MAX`).
pub(crate) const XATTR_NAME_MAX: usize = 255;
/// `setxattr_flags` bit: the guest asks for setgid to be cleared along with an ACL write.
pub(crate) const SETXATTR_ACL_KILL_SGID: u32 = 1;

/// `fuse_setupmapping_in`: map `len` bytes of the open file `fh` from `foffset` at `moffset`
/// in the DAX window.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SetupMappingIn {
    pub fh: u64,
    pub foffset: u64,
    pub len: u64,
    /// `FUSE_SETUPMAPPING_FLAG_WRITE` (1) and `_READ` (2).
    pub flags: u64,
    pub moffset: u64,
}
// SAFETY: five u64s, no padding; every bit pattern is a valid value.
unsafe impl ByteValued for SetupMappingIn {}

/// `fuse_removemapping_in`: how many [`RemoveMappingOne`] follow.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RemoveMappingIn {
    pub count: u32,
}
// SAFETY: one u32; every bit pattern is a valid value.
unsafe impl ByteValued for RemoveMappingIn {}

/// `fuse_removemapping_one`: a window range to unmap.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RemoveMappingOne {
    pub moffset: u64,
    pub len: u64,
}
// SAFETY: two u64s, no padding; every bit pattern is a valid value.
unsafe impl ByteValued for RemoveMappingOne {}
