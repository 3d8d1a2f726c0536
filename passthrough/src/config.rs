//! Options of the passthrough filesystem, as the command line sets them.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

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
    /// Entry and attribute timeouts that go with this mode (as virtiofsd sets them).
    pub fn timeouts(self) -> (Duration, Duration) {
        match self {
            CachePolicy::Never => (Duration::ZERO, Duration::ZERO),
            CachePolicy::Metadata | CachePolicy::Auto => {
                (Duration::from_secs(1), Duration::from_secs(1))
            }
            CachePolicy::Always => (Duration::from_secs(86400), Duration::from_secs(86400)),
        }
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
    /// Serve POSIX ACLs (needs `xattr`).
    pub posix_acl: bool,
    /// Pass the guest's security label on create (FUSE_SECURITY_CTX).
    pub security_label: bool,
    /// Honour O_DIRECT from the guest instead of stripping it.
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
            posix_acl: false,
            security_label: false,
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
        }
    }
}
