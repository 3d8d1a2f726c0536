//! Error type of the cache engine, its backends and the blob writer.

use std::io;

/// Everything that can go wrong in `berth_cache`.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("The backend failed to {operation} `{name}`: {message}")]
    Backend {
        operation: &'static str,
        name: String,
        message: String,
        /// Whether retrying the same request may succeed.
        transient: bool,
    },
    #[error("The backend does not support {0}.")]
    Unsupported(&'static str),
    #[error("The blob {object} in {backend} holds {stored} bytes, but the manifest describes {expected}.")]
    BlobSize {
        object: String,
        backend: String,
        stored: u64,
        expected: u64,
    },
    #[error("Chunk {chunk} of blob {blob} failed verification: expected digest {expected}, got {actual}.")]
    Verification {
        blob: String,
        chunk: u64,
        expected: String,
        actual: String,
    },
    #[error("Chunk {chunk} of blob {blob} could not be decompressed: {message}")]
    Decompression {
        blob: String,
        chunk: u64,
        message: String,
    },
    #[error("Fetching chunk {chunk} of blob {blob} failed: {message}")]
    FetchFailed {
        blob: String,
        chunk: u64,
        message: String,
    },
    #[error("The blob {0} is not open in the cache.")]
    UnknownBlob(String),
    #[error("The blob {0} is delivered to its consumer as it is fetched; the engine keeps no copy of it to read.")]
    NoLocalCopy(String),
    #[error("The cache of blob {blob} ({}) is in use by another process (another `berth mount` on the same cache directory?).", path.display())]
    BlobBusy {
        blob: String,
        path: std::path::PathBuf,
    },
    #[error("The manifest is invalid: {0}")]
    InvalidManifest(String),
    #[error("The backend location `{0}` is not understood.")]
    InvalidBackend(String),
    #[error("Cannot set up the HTTP client for {backend}: {message}.")]
    BackendSetup { backend: String, message: String },
    #[error("The engine is shutting down.")]
    ShuttingDown,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CacheError>;

/// Attaches a description of what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| CacheError::Io {
            context: context(),
            source,
        })
    }
}

impl CacheError {
    /// Whether a retry of the operation that produced this error may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Backend { transient, .. } => *transient,
            CacheError::Io { .. } => true,
            _ => false,
        }
    }
}
