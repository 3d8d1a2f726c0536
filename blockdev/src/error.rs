//! Error type of the block engine and the ublk server.

use std::io;

/// Everything that can go wrong in `berth_blockdev`.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("I/O error while {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("The request [{offset}, +{len}) is outside the device of {size} bytes.")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("The request [{offset}, +{len}) is not aligned to the {block_size}-byte block size.")]
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error("The device is read-only.")]
    ReadOnly,
    #[error("The target does not support {0}.")]
    Unsupported(&'static str),
    #[error("Reading the image through the cache failed")]
    Cache(#[source] berth_cache::CacheError),
    #[error("The overlay file {path} is invalid: {problem}")]
    InvalidOverlay { path: String, problem: String },
    #[error("The overlay file {path} belongs to another base ({expected}), not to {actual}.")]
    OverlayBaseMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("The overlay file {path} is already in use by another process.")]
    OverlayBusy { path: String },
    #[error("The backing file {path} cannot serve as a block target: {problem}")]
    BadBacking { path: String, problem: String },
    #[error("ublk: {context}")]
    Ublk {
        context: String,
        #[source]
        source: libublk::UblkError,
    },
    #[error("ublk: {0}")]
    UblkSetup(String),
    /// A target outside this crate failed (an object-storage volume), with the errno it
    /// wants the request completed with.
    #[error("The {target} target failed")]
    Target {
        target: &'static str,
        errno: i32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result alias of this crate.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

impl BlockError {
    /// The negative errno a ublk or virtio-blk completion reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } | BlockError::Misaligned { .. } => libc::EINVAL,
            BlockError::ReadOnly => libc::EROFS,
            BlockError::Unsupported(_) => libc::EOPNOTSUPP,
            BlockError::Target { errno, .. } => *errno,
            BlockError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
            _ => libc::EIO,
        }
    }
}

/// Attaches a description of what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| BlockError::Io {
            context: what(),
            source,
        })
    }
}
