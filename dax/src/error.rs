//! Why a SETUPMAPPING or REMOVEMAPPING was refused or failed, and the errno the guest gets.

use std::io;

/// A refused or failed window request.
#[derive(Debug, thiserror::Error)]
pub enum DaxError {
    #[error("The window size {size:#x} is not a non-zero multiple of the {granule:#x}-byte mapping granularity.")]
    BadWindowSize { size: u64, granule: u64 },
    #[error("The range {offset:#x}+{len:#x} does not fit in the {size:#x}-byte window.")]
    OutOfWindow { offset: u64, len: u64, size: u64 },
    #[error("The range {offset:#x}+{len:#x} is empty or not a multiple of the {granule:#x}-byte mapping granularity.")]
    Granularity { offset: u64, len: u64, granule: u64 },
    #[error(
        "The file offset {offset:#x} is not page-aligned, or the file range it starts overflows."
    )]
    FileOffset { offset: u64 },
    #[error("The mapping flags {flags:#x} ask for no access or for unknown access.")]
    BadFlags { flags: u64 },
    #[error("The share is read-only: no writable mapping.")]
    ReadOnlyShare,
    #[error("The file was not opened for writing: no writable mapping.")]
    NotWritable,
    #[error("The file cannot be mapped: {0}.")]
    File(#[source] io::Error),
    #[error("The VMM has no channel for mapping requests (no backend request channel, or no shared memory support).")]
    NoChannel,
    #[error("The placeholder for ranges past their file's end cannot be created: {0}.")]
    Placeholder(#[source] io::Error),
    #[error("The VMM failed to carry out the mapping request: {0}.")]
    Frontend(#[source] io::Error),
}

impl DaxError {
    /// The errno the FUSE request is answered with.
    pub fn errno(&self) -> i32 {
        match self {
            DaxError::BadWindowSize { .. }
            | DaxError::OutOfWindow { .. }
            | DaxError::Granularity { .. }
            | DaxError::FileOffset { .. }
            | DaxError::BadFlags { .. } => libc::EINVAL,
            DaxError::ReadOnlyShare => libc::EROFS,
            DaxError::NotWritable => libc::EACCES,
            DaxError::File(e) => e.raw_os_error().unwrap_or(libc::EIO),
            DaxError::NoChannel => libc::ENODEV,
            DaxError::Placeholder(e) => e.raw_os_error().unwrap_or(libc::EIO),
            DaxError::Frontend(_) => libc::EIO,
        }
    }

    /// Short reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DaxError::BadWindowSize { .. } => "window-size",
            DaxError::OutOfWindow { .. } => "out-of-window",
            DaxError::Granularity { .. } => "granularity",
            DaxError::FileOffset { .. } => "file-offset",
            DaxError::BadFlags { .. } => "flags",
            DaxError::ReadOnlyShare => "read-only-share",
            DaxError::NotWritable => "not-writable",
            DaxError::File(_) => "file",
            DaxError::NoChannel => "no-channel",
            DaxError::Placeholder(_) => "placeholder",
            DaxError::Frontend(_) => "frontend",
        }
    }
}

impl From<DaxError> for io::Error {
    fn from(e: DaxError) -> Self {
        io::Error::from_raw_os_error(e.errno())
    }
}
