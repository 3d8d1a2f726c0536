//! Error type of the image builder and of the fanotify and cachefiles servers.

use std::io;

use berth_cache::CacheError;

/// Everything that can go wrong in `berth_ondemand`.
#[derive(Debug, thiserror::Error)]
pub enum OndemandError {
    /// The cache engine, a backend or the manifest failed; its message says how.
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("The erofs image is invalid or unsupported: {0}")]
    InvalidImage(String),
    #[error("The prefetch list {path}, line {line}: {message}")]
    PrefetchList {
        path: std::path::PathBuf,
        line: usize,
        message: String,
    },
    #[error("The command `{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("The kernel refused {operation}: {source}")]
    Kernel {
        operation: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, OndemandError>;

/// Attaches a description of what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| OndemandError::Io {
            context: context(),
            source,
        })
    }
}
