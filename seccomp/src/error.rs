//! Errors of the confinement steps.

use std::io;
use std::path::PathBuf;

/// Why a confinement step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value did not parse.
    #[error("invalid {what} '{value}': {reason}")]
    InvalidValue {
        /// Which option or field.
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The sandbox mode and the identity of the process do not go together.
    #[error("{0}")]
    SandboxNotPermitted(&'static str),
    /// A system call made while building the sandbox failed.
    #[error("sandbox: {step} failed: {source}")]
    Sandbox {
        /// What was being done.
        step: &'static str,
        /// The system error.
        source: io::Error,
    },
    /// The id maps of the new user namespace could not be written (the message names the
    /// option, and the helper with its exit status and complaint where one ran).
    #[error("sandbox: cannot write the user namespace's id maps: {0}")]
    UserNamespaceMaps(String),
    /// The shared directory cannot be used as the sandbox root.
    #[error("sandbox: cannot use shared directory {path}: {source}")]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The seccomp filter could not be compiled.
    #[error("cannot build the seccomp filter for the {role} thread: {reason}")]
    BuildFilter {
        /// The thread role.
        role: &'static str,
        /// The compiler's complaint.
        reason: String,
    },
    /// The kernel refused the seccomp filter.
    #[error("cannot install the seccomp filter for the {role} thread: {reason}")]
    InstallFilter {
        /// The thread role.
        role: &'static str,
        /// The kernel's complaint.
        reason: String,
    },
    /// A capability set could not be read or changed.
    #[error("cannot {step}: {reason}")]
    Capabilities {
        /// What was being done.
        step: &'static str,
        /// The underlying error.
        reason: String,
    },
    /// `--modcaps` removed a capability the other options require.
    #[error("cannot drop {capability}: {needed_by} needs it")]
    CapabilityRequired {
        /// The capability, in upper case without the CAP_ prefix.
        capability: String,
        /// The option that needs it.
        needed_by: &'static str,
    },
    /// The descriptor limit could not be read or changed.
    #[error("cannot {step} RLIMIT_NOFILE: {source}")]
    Rlimit {
        /// What was being done.
        step: &'static str,
        /// The system error.
        source: io::Error,
    },
}
