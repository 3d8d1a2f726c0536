//! The FUSE wire structs (include/uapi/linux/fuse.h), as the frontend writes requests and
//! reads replies in guest memory.
//!
//! The frontend has its own definitions rather than the daemon's: a test driver that shares
//! the daemon's view of the protocol could not catch the daemon getting the protocol wrong.
//! Field names follow the kernel's, as fuse-backend-rs's do.

use vm_memory::ByteValued;

/// The node id of the filesystem root.
pub const ROOT_ID: u64 = 1;

/// Declares `#[repr(C)]` plain-old-data structs that can be read from and written to guest
/// memory as they are.
macro_rules! wire_structs {
    ($($(#[$meta:meta])* pub struct $name:ident { $(pub $field:ident: $ty:ty,)* })*) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
            pub struct $name {
                $(pub $field: $ty,)*
            }
            // SAFETY: `repr(C)`, integer (or array of integer, or such struct) fields only,
            // laid out without padding as in the kernel's header: every bit pattern is valid.
            unsafe impl ByteValued for $name {}
        )*
    };
}

wire_structs! {
    /// `fuse_attr`.
    pub struct Attr {
        pub ino: u64,
        pub size: u64,
        pub blocks: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub nlink: u32,
        pub uid: u32,
        pub gid: u32,
        pub rdev: u32,
        pub blksize: u32,
        pub flags: u32,
    }

    /// `fuse_in_header`.
    pub struct InHeader {
        pub len: u32,
        pub opcode: u32,
        pub unique: u64,
        pub nodeid: u64,
        pub uid: u32,
        pub gid: u32,
        pub pid: u32,
        pub padding: u32,
    }

    /// `fuse_out_header`.
    pub struct OutHeader {
        pub len: u32,
        pub error: i32,
        pub unique: u64,
    }

    /// `fuse_entry_out`.
    pub struct EntryOut {
        pub nodeid: u64,
        pub generation: u64,
        pub entry_valid: u64,
        pub attr_valid: u64,
        pub entry_valid_nsec: u32,
        pub attr_valid_nsec: u32,
        pub attr: Attr,
    }

    /// `fuse_attr_out`.
    pub struct AttrOut {
        pub attr_valid: u64,
        pub attr_valid_nsec: u32,
        pub dummy: u32,
        pub attr: Attr,
    }

    /// `fuse_dirent` (the name follows).
    pub struct Dirent {
        pub ino: u64,
        pub off: u64,
        pub namelen: u32,
        pub type_: u32,
    }

    /// `fuse_init_in`.
    pub struct InitIn {
        pub major: u32,
        pub minor: u32,
        pub max_readahead: u32,
        pub flags: u32,
    }

    /// The rest of `fuse_init_in` after `flags`, sent with FUSE_INIT_EXT.
    pub struct InitIn2 {
        pub flags2: u32,
        pub unused: [u32; 11],
    }

    /// `fuse_init_out`.
    pub struct InitOut {
        pub major: u32,
        pub minor: u32,
        pub max_readahead: u32,
        pub flags: u32,
        pub max_background: u16,
        pub congestion_threshold: u16,
        pub max_write: u32,
        pub time_gran: u32,
        pub max_pages: u16,
        pub map_alignment: u16,
        pub flags2: u32,
        pub unused: [u32; 7],
    }

    /// `fuse_file_lock`.
    pub struct FileLock {
        pub start: u64,
        pub end: u64,
        pub type_: u32,
        pub pid: u32,
    }

    /// `fuse_forget_in`.
    pub struct ForgetIn {
        pub nlookup: u64,
    }

    /// `fuse_forget_one`.
    pub struct ForgetOne {
        pub nodeid: u64,
        pub nlookup: u64,
    }

    /// `fuse_batch_forget_in` (the `fuse_forget_one`s follow).
    pub struct BatchForgetIn {
        pub count: u32,
        pub dummy: u32,
    }

    /// `fuse_getattr_in`.
    pub struct GetattrIn {
        pub flags: u32,
        pub dummy: u32,
        pub fh: u64,
    }

    /// `fuse_setattr_in`.
    pub struct SetattrIn {
        pub valid: u32,
        pub padding: u32,
        pub fh: u64,
        pub size: u64,
        pub lock_owner: u64,
        pub atime: u64,
        pub mtime: u64,
        pub ctime: u64,
        pub atimensec: u32,
        pub mtimensec: u32,
        pub ctimensec: u32,
        pub mode: u32,
        pub unused4: u32,
        pub uid: u32,
        pub gid: u32,
        pub unused5: u32,
    }

    /// `fuse_mknod_in` (the name follows).
    pub struct MknodIn {
        pub mode: u32,
        pub rdev: u32,
        pub umask: u32,
        pub padding: u32,
    }

    /// `fuse_mkdir_in` (the name follows).
    pub struct MkdirIn {
        pub mode: u32,
        pub umask: u32,
    }

    /// `fuse_rename_in` (both names follow).
    pub struct RenameIn {
        pub newdir: u64,
    }

    /// `fuse_rename2_in` (both names follow).
    pub struct Rename2In {
        pub newdir: u64,
        pub flags: u32,
        pub padding: u32,
    }

    /// `fuse_link_in` (the new name follows).
    pub struct LinkIn {
        pub oldnodeid: u64,
    }

    /// `fuse_open_in`.
    pub struct OpenIn {
        pub flags: u32,
        pub fuse_flags: u32,
    }

    /// `fuse_create_in` (the name follows).
    pub struct CreateIn {
        pub flags: u32,
        pub mode: u32,
        pub umask: u32,
        pub fuse_flags: u32,
    }

    /// `fuse_open_out`.
    pub struct OpenOut {
        pub fh: u64,
        pub open_flags: u32,
        pub passthrough: u32,
    }

    /// `fuse_release_in`.
    pub struct ReleaseIn {
        pub fh: u64,
        pub flags: u32,
        pub release_flags: u32,
        pub lock_owner: u64,
    }

    /// `fuse_flush_in`.
    pub struct FlushIn {
        pub fh: u64,
        pub unused: u32,
        pub padding: u32,
        pub lock_owner: u64,
    }

    /// `fuse_read_in`.
    pub struct ReadIn {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub read_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }

    /// `fuse_write_in` (the data follows).
    pub struct WriteIn {
        pub fh: u64,
        pub offset: u64,
        pub size: u32,
        pub fuse_flags: u32,
        pub lock_owner: u64,
        pub flags: u32,
        pub padding: u32,
    }

    /// `fuse_write_out`.
    pub struct WriteOut {
        pub size: u32,
        pub padding: u32,
    }

    /// `fuse_kstatfs`.
    pub struct Kstatfs {
        pub blocks: u64,
        pub bfree: u64,
        pub bavail: u64,
        pub files: u64,
        pub ffree: u64,
        pub bsize: u32,
        pub namelen: u32,
        pub frsize: u32,
        pub padding: u32,
        pub spare: [u32; 6],
    }

    /// `fuse_fsync_in`.
    pub struct FsyncIn {
        pub fh: u64,
        pub fsync_flags: u32,
        pub padding: u32,
    }

    /// `fuse_setxattr_in` without FUSE_SETXATTR_EXT (the name and value follow).
    pub struct SetxattrIn {
        pub size: u32,
        pub flags: u32,
    }

    /// `fuse_getxattr_in` (the name follows; LISTXATTR sends it alone).
    pub struct GetxattrIn {
        pub size: u32,
        pub padding: u32,
    }

    /// `fuse_getxattr_out`.
    pub struct GetxattrOut {
        pub size: u32,
        pub padding: u32,
    }

    /// `fuse_lk_in`.
    pub struct LkIn {
        pub fh: u64,
        pub owner: u64,
        pub lk: FileLock,
        pub lk_flags: u32,
        pub padding: u32,
    }

    /// `fuse_lk_out`.
    pub struct LkOut {
        pub lk: FileLock,
    }

    /// `fuse_access_in`.
    pub struct AccessIn {
        pub mask: u32,
        pub padding: u32,
    }

    /// `fuse_fallocate_in`.
    pub struct FallocateIn {
        pub fh: u64,
        pub offset: u64,
        pub length: u64,
        pub mode: u32,
        pub padding: u32,
    }

    /// `fuse_lseek_in`.
    pub struct LseekIn {
        pub fh: u64,
        pub offset: u64,
        pub whence: u32,
        pub padding: u32,
    }

    /// `fuse_lseek_out`.
    pub struct LseekOut {
        pub offset: u64,
    }

    /// `fuse_copy_file_range_in`.
    pub struct CopyFileRangeIn {
        pub fh_in: u64,
        pub offset_in: u64,
        pub nodeid_out: u64,
        pub fh_out: u64,
        pub offset_out: u64,
        pub len: u64,
        pub flags: u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn sizes_match_the_kernel_header() {
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<Dirent>(), 24);
        assert_eq!(size_of::<InitIn>() + size_of::<InitIn2>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<Kstatfs>(), 80);
        assert_eq!(size_of::<LkIn>(), 48);
        assert_eq!(size_of::<CopyFileRangeIn>(), 56);
    }
}
