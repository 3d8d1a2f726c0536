//! Why a version table could not be opened, built or watched.

use std::io;
use std::path::PathBuf;

/// Errors of the version table and the host-change watchers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The table's directory could not be created.
    #[error("cannot create the directory {path} for the version table")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Opening, locking, sizing or mapping the table file failed.
    #[error("cannot use the version table {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The path names something that is not a berth version table; berth never overwrites it.
    #[error(
        "{path} is not a berth version table ({reason}); berth leaves it alone: choose another \
         --version-table path or remove the file"
    )]
    Foreign { path: PathBuf, reason: String },
    /// The file is a version table, but damaged (and other berth processes use it, so it
    /// cannot be rebuilt now).
    #[error(
        "the version table {path} is damaged ({reason}) and other berth processes have it \
         open, so it cannot be rebuilt now; stop them or choose another --version-table path"
    )]
    Corrupt { path: PathBuf, reason: String },
    /// The table serves another shared directory, which other berth processes still serve.
    #[error(
        "the version table {path} belongs to another shared directory (device {dev:#x}, inode \
         {ino}) that other berth processes still serve; give each shared directory its own \
         --version-table"
    )]
    OtherDirectory { path: PathBuf, dev: u64, ino: u64 },
    /// The file belongs to another user: sharing it would let that user forge versions.
    #[error("the version table {path} belongs to uid {owner}, not to this user (uid {uid})")]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    /// `--version-slots` out of range.
    #[error("a version table holds between {min} and {max} slots, not {requested}")]
    SlotCount { requested: u64, min: u64, max: u64 },
    /// Neither fanotify nor inotify could watch the shared directory.
    #[error("cannot watch the shared directory for changes made by host processes: {what}")]
    Watch {
        what: String,
        #[source]
        source: io::Error,
    },
}
