//! Options of the passthrough filesystem, as the command line sets them.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::xattr_map::XattrMap;

/// How much the FUSE client may cache; the same four modes as virtiofsd's `--cache`.
#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub enum CachePolicy {
    /// No caching of data or metadata: every access reaches the host.
    Never,
    /// Metadata is cached for the usual timeout, file data is not.
    Metadata,
    /// Close-to-open consistency: data cached while a file is open, metadata for one second.
    #[default]
    Auto,
    /// The guest keeps data and metadata as long as it likes (exclusive access assumed).
    Always,
}

impl FromStr for CachePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" | "none" => Ok(CachePolicy::Never),
            "metadata" => Ok(CachePolicy::Metadata),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            other => Err(format!(
                "unknown cache mode '{other}'; expected never, metadata, auto or always"
            )),
        }
    }
}

impl CachePolicy {
    /// Entry and attribute timeouts that go with this mode, as virtiofsd 1.14 sets them:
    /// nothing cached with `never`, one second with `auto`, a day when metadata may be cached.
    pub fn timeouts(self) -> (Duration, Duration) {
        let timeout = match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Metadata | CachePolicy::Always => Duration::from_secs(86400),
        };
        (timeout, timeout)
    }
}

/// How hard to insist on a feature the guest kernel must support too (virtiofsd's
/// `never|auto|always` for `--posix-acl` and `--security-label`).
#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub enum Negotiation {
    /// Never offer it.
    #[default]
    Never,
    /// Use it when the guest supports it, carry on without it otherwise.
    Auto,
    /// Use it; a guest that does not support it fails FUSE_INIT.
    Always,
}

impl Negotiation {
    /// Whether the feature is wanted at all.
    pub fn wanted(self) -> bool {
        self != Negotiation::Never
    }
}

/// The host extended attribute that marks a file for DAX under `--dax-policy xattr`: the
/// file is mapped through the window when its value is `1`.
pub const DAX_XATTR: &std::ffi::CStr = c"user.berth.dax";

/// Which regular files the guest is told to map through the DAX window (FUSE_ATTR_DAX in each
/// reply's attributes). Only a guest mounted with `-o dax=inode` asks for (and honours) the
/// per-file flag; `dax=always` maps every file whatever it says.
#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub enum DaxPolicy {
    /// No file carries the flag (and FUSE_HAS_INODE_DAX is not negotiated).
    #[default]
    Never,
    /// Every regular file.
    Always,
    /// Regular files of at least this many bytes (small files gain little from a 2 MiB
    /// mapping and cost a window range each).
    MinSize(u64),
    /// Regular files whose host attribute [`DAX_XATTR`] reads `1`.
    Xattr,
}

/// Why a `--dax-policy` value was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DaxPolicyError {
    /// Not one of the four forms.
    #[error("unknown DAX policy '{0}'; expected never, always, size:N (e.g. size:1M) or xattr")]
    Unknown(String),
    /// `size:` without a usable size.
    #[error(
        "the DAX policy '{0}' needs a size in bytes with an optional K, M or G suffix \
         (e.g. size:4096, size:1M)"
    )]
    BadSize(String),
}

impl FromStr for DaxPolicy {
    type Err = DaxPolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => return Ok(DaxPolicy::Never),
            "always" => return Ok(DaxPolicy::Always),
            "xattr" => return Ok(DaxPolicy::Xattr),
            _ => {}
        }
        let Some(size) = s.strip_prefix("size:") else {
            return Err(DaxPolicyError::Unknown(s.to_owned()));
        };
        let bad = || DaxPolicyError::BadSize(s.to_owned());
        let (digits, shift) = match size.as_bytes().last() {
            Some(b'k' | b'K') => (&size[..size.len() - 1], 10),
            Some(b'm' | b'M') => (&size[..size.len() - 1], 20),
            Some(b'g' | b'G') => (&size[..size.len() - 1], 30),
            _ => (size, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift)
            .map(DaxPolicy::MinSize)
            .ok_or_else(bad)
    }
}

/// Whether inodes are held by file handle (`name_to_handle_at`) instead of an `O_PATH` fd.
#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub enum InodeFileHandles {
    /// Always hold an `O_PATH` descriptor per inode.
    Never,
    /// Use file handles where the host filesystem supports them, fds elsewhere.
    #[default]
    Prefer,
    /// Use file handles; a lookup that cannot produce one fails.
    Mandatory,
}

impl FromStr for InodeFileHandles {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(InodeFileHandles::Never),
            "prefer" => Ok(InodeFileHandles::Prefer),
            "mandatory" => Ok(InodeFileHandles::Mandatory),
            other => Err(format!(
                "unknown inode-file-handles mode '{other}'; expected never, prefer or mandatory"
            )),
        }
    }
}

/// How the source describes each inode to the destination of a migration (virtiofsd's
/// `--migration-mode`).
#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub enum MigrationMode {
    /// By its path relative to the shared directory, found through /proc/self/fd: works
    /// wherever the destination sees the same tree under its shared directory.
    #[default]
    FindPaths,
    /// By its file handle: needs the destination on the same host filesystem, survives
    /// renames.
    FileHandles,
}

impl FromStr for MigrationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "find-paths" => Ok(MigrationMode::FindPaths),
            "file-handles" => Ok(MigrationMode::FileHandles),
            other => Err(format!(
                "unknown migration mode '{other}'; expected find-paths or file-handles"
            )),
        }
    }
}

/// What to do with an inode that cannot be described (source) or found again (destination)
/// during a migration (virtiofsd's `--migration-on-error`).
#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub enum MigrationOnError {
    /// Fail the transfer: the VMM keeps the guest running on the source.
    #[default]
    Abort,
    /// Carry on; the guest gets EIO for that inode on the destination.
    GuestError,
}

impl FromStr for MigrationOnError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "abort" => Ok(MigrationOnError::Abort),
            "guest-error" => Ok(MigrationOnError::GuestError),
            other => Err(format!(
                "unknown migration error mode '{other}'; expected abort or guest-error"
            )),
        }
    }
}

/// Live-migration settings.
#[derive(Debug, Default, Clone)]
pub struct MigrationConfig {
    pub mode: MigrationMode,
    pub on_error: MigrationOnError,
    /// Find-paths mode: send each inode's file handle too, and have the destination check
    /// that the path leads to the very same inode (same host filesystem only).
    pub verify_handles: bool,
    /// Find-paths mode: re-open each path on the source before sending it and check that it
    /// still leads to the inode, catching a rename racing with the lookup of the path.
    pub confirm_paths: bool,
    /// The shared directory as the host names it (before any sandbox changes the root): the
    /// destination refuses state saved from another share.
    pub share_path: Option<PathBuf>,
    /// How long the destination keeps trying to take a migrated lock that another
    /// description still holds (the source's own copy, until it exits); `None`: 30 s.
    pub lock_reacquire_timeout: Option<Duration>,
}

/// Everything that shapes the filesystem's behaviour.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared host directory: the root the guest sees.
    pub root_dir: PathBuf,
    /// Caching mode told to the client.
    pub cache: CachePolicy,
    /// Overrides the cache mode's entry timeout.
    pub entry_timeout: Option<Duration>,
    /// Overrides the cache mode's attribute timeout.
    pub attr_timeout: Option<Duration>,
    /// Let the guest use writeback caching (FUSE_WRITEBACK_CACHE).
    pub writeback: bool,
    /// Serve extended attributes.
    pub xattr: bool,
    /// Serve POSIX ACLs (implies `xattr`; needs the guest's POSIX_ACL, DONT_MASK and
    /// SETXATTR_EXT).
    pub posix_acl: Negotiation,
    /// Store the security label the guest sends with each new node (FUSE_SECURITY_CTX;
    /// implies `xattr`).
    pub security_label: Negotiation,
    /// Renames extended attributes between guest and host (virtiofsd's `--xattrmap`; implies
    /// `xattr`).
    pub xattrmap: Option<XattrMap>,
    /// Let the guest mmap files opened with DIRECT_IO (FUSE_DIRECT_IO_ALLOW_MMAP), as
    /// virtiofsd's `--allow-mmap`; only safe when nothing else changes the shared files.
    pub allow_mmap: bool,
    /// Honour O_DIRECT from the guest instead of stripping it (the host file is opened with
    /// O_DIRECT too).
    pub allow_direct_io: bool,
    /// Tell the guest about host submounts so it gives them their own st_dev.
    pub announce_submounts: bool,
    /// Refuse every change to the shared directory with EROFS.
    pub readonly: bool,
    /// Offer READDIRPLUS.
    pub readdirplus: bool,
    /// How inodes are held.
    pub inode_file_handles: InodeFileHandles,
    /// Offer FUSE_HANDLE_KILLPRIV_V2.
    pub killpriv_v2: bool,
    /// Keep O_NOATIME on files opened with it (otherwise dropped where not permitted).
    pub preserve_noatime: bool,
    /// Serve POSIX record locks on the host (otherwise the guest keeps them locally).
    pub posix_lock: bool,
    /// Serve flock(2) locks on the host (otherwise the guest keeps them locally).
    pub flock: bool,
    /// Let mknod create device nodes (character and block); fifos and sockets are always allowed.
    pub allow_device_nodes: bool,
    /// Most inodes the client may hold (looked up and not forgotten); beyond it, ENFILE.
    pub max_inodes: usize,
    /// Most open file and directory handles; beyond it, EMFILE.
    pub max_handles: usize,
    /// An open /proc/self/fd, for sandboxes where /proc is not reachable by path.
    pub proc_self_fd: Option<Arc<OwnedFd>>,
    /// An open /proc/self/fdinfo (where the kernel lists each descriptor's locks, for live
    /// migration), for sandboxes where /proc is not reachable by path.
    pub proc_self_fdinfo: Option<Arc<OwnedFd>>,
    /// Shared caching through a version table (`--shared-cache`).
    pub shared_cache: Option<crate::coherence::SharedCache>,
    /// Live-migration settings.
    pub migration: MigrationConfig,
    /// Which files the guest maps through the DAX window; `Never` when there is no window.
    pub dax_policy: DaxPolicy,
}

impl Config {
    /// Whether the guest's locks are taken on the host (`--posix-lock`, `--flock`): lock
    /// requests may then wait in berth.
    pub fn holds_host_locks(&self) -> bool {
        self.posix_lock || self.flock
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_dir: PathBuf::from("/"),
            cache: CachePolicy::Auto,
            entry_timeout: None,
            attr_timeout: None,
            writeback: false,
            xattr: false,
            posix_acl: Negotiation::Never,
            security_label: Negotiation::Never,
            xattrmap: None,
            allow_mmap: false,
            allow_direct_io: false,
            announce_submounts: true,
            readonly: false,
            readdirplus: true,
            inode_file_handles: InodeFileHandles::Prefer,
            killpriv_v2: false,
            preserve_noatime: false,
            posix_lock: false,
            flock: false,
            allow_device_nodes: true,
            max_inodes: 4 << 20,
            max_handles: 1 << 20,
            proc_self_fd: None,
            proc_self_fdinfo: None,
            shared_cache: None,
            migration: MigrationConfig::default(),
            dax_policy: DaxPolicy::Never,
        }
    }
}

#[cfg(test)]
mod dax_policy_tests {
    use super::*;

    #[test]
    fn the_four_forms_parse() {
        assert_eq!("never".parse(), Ok(DaxPolicy::Never));
        assert_eq!("always".parse(), Ok(DaxPolicy::Always));
        assert_eq!("xattr".parse(), Ok(DaxPolicy::Xattr));
        assert_eq!("size:0".parse(), Ok(DaxPolicy::MinSize(0)));
        assert_eq!("size:4096".parse(), Ok(DaxPolicy::MinSize(4096)));
        assert_eq!("size:64k".parse(), Ok(DaxPolicy::MinSize(64 << 10)));
        assert_eq!("size:2M".parse(), Ok(DaxPolicy::MinSize(2 << 20)));
        assert_eq!("size:3G".parse(), Ok(DaxPolicy::MinSize(3 << 30)));
    }

    #[test]
    fn anything_else_is_refused_with_its_text() {
        for bad in ["", "Never", "sometimes", "size", "xattr:user.x", " always"] {
            assert_eq!(
                bad.parse::<DaxPolicy>(),
                Err(DaxPolicyError::Unknown(bad.to_owned())),
                "{bad:?}"
            );
        }
        for bad in [
            "size:",
            "size:M",
            "size:1T",
            "size:-1",
            "size:+1",
            "size:1.5M",
            "size: 1M",
            "size:18446744073709551616",
            "size:17179869184G",
        ] {
            let e = bad.parse::<DaxPolicy>().expect_err(bad);
            assert_eq!(e, DaxPolicyError::BadSize(bad.to_owned()));
            assert!(
                e.to_string().contains(bad),
                "the message quotes {bad:?}: {e}"
            );
        }
    }
}
