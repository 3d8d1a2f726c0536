//! Error type of the volume engine.

use std::io;

/// Everything that can go wrong in `berth_volume`.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("I/O error while {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("The bucket request failed")]
    Store(#[source] Box<berth_cache::CacheError>),
    #[error(
        "The bucket failed to {operation} `{object}` after {attempts} attempts over {seconds} s"
    )]
    StoreGaveUp {
        operation: &'static str,
        object: String,
        attempts: u32,
        seconds: u64,
        #[source]
        source: Box<berth_cache::CacheError>,
    },
    #[error("The object `{object}` is corrupt: {problem}")]
    Corrupt { object: String, problem: String },
    #[error("There is no volume at {0} (no volume.json).")]
    NoVolume(String),
    #[error("A volume already exists at {0}.")]
    VolumeExists(String),
    #[error("The volume at {location} is in use by {holder}; its lease runs until {until}. If that host is gone for good, wait for the lease to expire or run `berth volume break-lease {location}`.")]
    Leased {
        location: String,
        holder: String,
        until: String,
    },
    #[error("The volume was taken over by another writer ({0}); this host no longer writes to it. Its writes not yet in the bucket are kept in the local cache directory.")]
    Fenced(String),
    #[error("The local state in {path} does not belong to this volume: {problem}")]
    ForeignLocalState { path: String, problem: String },
    #[error("The local state in {0} is in use by another process.")]
    LocalBusy(String),
    #[error("The write-ahead log is damaged: {0}")]
    Wal(String),
    #[error("The volume stopped after an error: {0}")]
    Failed(String),
    #[error("A flush did not reach the bucket within {0} s (uploads keep being retried).")]
    FlushTimeout(u64),
    #[error("The snapshot `{0}` does not exist.")]
    NoSnapshot(String),
    #[error("The snapshot `{0}` already exists.")]
    SnapshotExists(String),
    #[error("The snapshot `{0}` of manifest version {1} was not kept: its command was stopped for so long that garbage collection took its intent for a dead one and deleted packs that version needs; take the snapshot again.")]
    SnapshotLost(String, u64),
    #[error("The snapshot `{snapshot}` is the source of clones ({clones}); delete them first.")]
    SnapshotInUse { snapshot: String, clones: String },
    #[error("Invalid argument: {0}")]
    Invalid(String),
    #[error("The volume is shutting down.")]
    ShuttingDown,
}

/// Result alias of this crate.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Attaches a description of what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| VolumeError::Io {
            context: what(),
            source,
        })
    }
}

impl VolumeError {
    /// A failed bucket request (boxed: the backend's error is large, and results of this
    /// crate are on every request's path).
    pub fn store(err: berth_cache::CacheError) -> Self {
        Self::Store(Box::new(err))
    }

    /// Whether this is the local disk running out of space (ENOSPC, EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            VolumeError::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        )
    }

    /// The message with every cause after it (`what: why: why`), for logs.
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }

    /// The errno a request failing with this error completes with.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
            VolumeError::Invalid(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }

    /// The same error as a block-engine error, for a transport to complete a request with.
    pub fn into_block(self) -> berth_blockdev::BlockError {
        berth_blockdev::BlockError::Target {
            target: "volume",
            errno: self.errno(),
            source: Box::new(self),
        }
    }
}
