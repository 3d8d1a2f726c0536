//! Errors raised while setting up the filesystem (request errors are plain errnos).

use std::io;
use std::path::PathBuf;

/// Why the passthrough filesystem could not be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared directory could not be opened.
    #[error("cannot open the shared directory {path}")]
    OpenSharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The shared directory is not a directory.
    #[error("the shared directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// /proc/self/fd is needed to reopen inodes for I/O.
    #[error("cannot open /proc/self/fd (is /proc mounted?)")]
    OpenProcSelfFd(#[source] io::Error),
    /// `--inode-file-handles=mandatory` on a filesystem without file handle support.
    #[error("the shared directory's filesystem does not support file handles, which --inode-file-handles=mandatory requires")]
    FileHandlesUnsupported(#[source] io::Error),
    /// Inspecting the shared directory failed.
    #[error("cannot stat the shared directory")]
    StatSharedDir(#[source] io::Error),
}
