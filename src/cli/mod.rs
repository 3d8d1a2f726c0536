//! berth's command line: a drop-in for virtiofsd 1.14's flags (as QEMU, libvirt and Kata pass
//! them), berth's own additions, the `fuse` subcommand for serving on a host mount point, and
//! the `image build` and `mount` subcommands for lazily fetched erofs images.
//!
//! Parsing happens in two steps: clap turns argv into [`Cli`], then [`Cli::resolve`] merges the
//! legacy `-o key=value` options, applies virtiofsd's implications (e.g. `--posix-acl` turns on
//! xattrs) and rejects what berth does not support. Every rejection is a [`CliError`], which the
//! binary reports with exit status 2, like clap's own usage errors.
//!
//! Here: the top level (subcommands, logging and limits, the resolved [`Mode`]). The shared
//! directory's flags and the `-o` options are in `fs`, the vhost-user daemon's in
//! `vhost_user`, `berth fuse`'s in `fuse`, the sandbox's in `isolation`; the other
//! subcommands keep theirs beside their code (`block`, `volume`, `image`).

use berth_passthrough::XattrMapError;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::image::args::{
    FscacheArgs, FscacheSettings, ImageBuildSettings, ImageCheckSettings, ImageCommand,
    ImageInspectSettings, MountArgs, MountSettings,
};

mod fs;
mod fuse;
mod isolation;
#[cfg(test)]
mod tests;
mod vhost_user;

pub use fs::*;
pub use fuse::*;
pub use isolation::*;
pub use vhost_user::*;

/// A command line that parsed but cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("--shared-dir (or -o source=DIR) is required")]
    MissingSharedDir,
    #[error("one of --socket-path or --fd is required")]
    MissingSocket,
    #[error("invalid value '{value}' for --{flag}; expected one of {expected}")]
    InvalidChoice {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid --modcaps: {0}")]
    BadModcaps(String),
    #[error("{0} is not supported by berth")]
    UnsupportedFlag(&'static str),
    #[error("invalid compat option '-o {0}'")]
    UnknownCompatOption(String),
    #[error("invalid value '{value}' for '-o {key}': {reason}")]
    BadCompatValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("conflicting options: {0}")]
    Conflict(String),
    #[error("invalid --xattrmap: {0}")]
    BadXattrMap(XattrMapError),
    #[error("{0}")]
    BadIdMaps(String),
}

/// How loudly berth logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn from_compat(value: &str) -> Option<LogLevel> {
        match value {
            "off" => Some(LogLevel::Off),
            "err" | "error" => Some(LogLevel::Error),
            "warn" | "warning" => Some(LogLevel::Warn),
            "info" => Some(LogLevel::Info),
            "debug" => Some(LogLevel::Debug),
            "trace" => Some(LogLevel::Trace),
            _ => None,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "virtio-fs over vhost-user (a virtiofsd drop-in), or the same filesystem on a host FUSE mount",
    override_usage = "berth --shared-dir <DIR> (--socket-path <PATH> | --fd <FD>) [OPTIONS]\n       \
                      berth fuse --shared-dir <DIR> --mountpoint <DIR> [OPTIONS]\n       \
                      berth image build <SOURCE> --out <DIR> [OPTIONS]\n       \
                      berth mount <IMAGE> <MOUNTPOINT> [OPTIONS]\n       \
                      berth fscache [OPTIONS]",
    args_override_self = true,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: VhostUserArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the shared directory on a host mount point through /dev/fuse.
    Fuse(Box<FuseArgs>),
    /// Build images whose data is fetched lazily (see `berth mount`).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Mount an image read-only, fetching its data on first access, until SIGINT or SIGTERM.
    Mount(MountArgs),
    /// Block devices: ublk exports of images and files.
    #[command(subcommand)]
    Block(crate::block::BlockCommand),
    /// Writable volumes on object storage: create, snapshot, clone, gc, info (served with
    /// `berth block add volume:s3://BUCKET/PREFIX`).
    #[command(subcommand)]
    Volume(crate::volume::VolumeCommand),
    /// Serve erofs images over cachefiles on-demand mode (the host's one fscache daemon;
    /// `berth mount --mode fscache` starts one when none runs).
    Fscache(FscacheArgs),
}

/// Logging and process limits, shared by both modes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Log level [default: info, or RUST_LOG's filter when that is set].
    #[arg(long, value_name = "LEVEL", value_enum)]
    pub log_level: Option<LogLevel>,

    /// Log to syslog instead of stderr.
    #[arg(long)]
    pub syslog: bool,

    /// RLIMIT_NOFILE to set (0 leaves it unchanged) [default: raise towards 1000000].
    #[arg(long, value_name = "N")]
    pub rlimit_nofile: Option<u64>,

    /// Deprecated: same as --log-level debug.
    #[arg(short = 'd', hide = true)]
    pub compat_debug: bool,

    /// Deprecated no-op (berth always runs in the foreground).
    #[arg(short = 'f', hide = true)]
    pub compat_foreground: bool,
}

/// What berth was asked to do, with every option resolved.
#[derive(Debug)]
pub enum Mode {
    PrintCapabilities,
    VhostUser(VhostUserSettings),
    Fuse(FuseSettings),
    ImageBuild(ImageBuildSettings),
    ImageInspect(ImageInspectSettings),
    ImageCheck(ImageCheckSettings),
    Mount(MountSettings),
    Block(crate::block::BlockCommand, ProcessSettings),
    Volume(crate::volume::VolumeCommand, ProcessSettings),
    Fscache(FscacheSettings),
}

/// Logging and limits, plus the deprecation warnings to log once logging is up.
#[derive(Debug)]
pub struct ProcessSettings {
    /// None: not given; RUST_LOG or `info` applies.
    pub log_level: Option<LogLevel>,
    pub syslog: bool,
    pub rlimit_nofile: Option<u64>,
    pub warnings: Vec<String>,
}

impl CommonArgs {
    pub(crate) fn resolve(
        &self,
        compat_level: Option<LogLevel>,
        mut warnings: Vec<String>,
    ) -> Result<ProcessSettings, CliError> {
        if self.compat_debug {
            warnings.push("-d is deprecated; use --log-level debug".to_owned());
        }
        if self.compat_foreground {
            warnings.push("-f is deprecated and has no effect; please remove it".to_owned());
        }
        let debug_flag = self.compat_debug.then_some(LogLevel::Debug);
        let flag_level = merge("the log level", self.log_level, debug_flag)?;
        let log_level = merge("the log level", flag_level, compat_level)?;
        Ok(ProcessSettings {
            log_level,
            syslog: self.syslog,
            rlimit_nofile: self.rlimit_nofile,
            warnings,
        })
    }
}

impl Cli {
    /// Checks and completes the parsed command line.
    pub fn resolve(&self) -> Result<Mode, CliError> {
        match &self.command {
            Some(Command::Fuse(args)) => Ok(Mode::Fuse(args.resolve()?)),
            Some(Command::Image(ImageCommand::Build(args))) => {
                Ok(Mode::ImageBuild(args.resolve()?))
            }
            Some(Command::Image(ImageCommand::Inspect(args))) => {
                Ok(Mode::ImageInspect(args.resolve()?))
            }
            Some(Command::Image(ImageCommand::Check(args))) => {
                Ok(Mode::ImageCheck(args.resolve()?))
            }
            Some(Command::Mount(args)) => Ok(Mode::Mount(args.resolve()?)),
            Some(Command::Block(command)) => {
                let process = command.common().resolve(None, Vec::new())?;
                Ok(Mode::Block(command.clone(), process))
            }
            Some(Command::Volume(command)) => {
                let process = command.common().resolve(None, Vec::new())?;
                Ok(Mode::Volume(command.clone(), process))
            }
            Some(Command::Fscache(args)) => Ok(Mode::Fscache(args.resolve()?)),
            None if self.serve.print_capabilities => Ok(Mode::PrintCapabilities),
            None => Ok(Mode::VhostUser(self.serve.resolve()?)),
        }
    }
}

/// QEMU's vhost-user backend description (docs/interop/vhost-user.json) for `--print-capabilities`.
pub fn capabilities_json() -> String {
    let features = [
        "posix-acl-negotiation-mode",
        "security-label-negotiation-mode",
        "separate-options",
        "migrate-precopy",
        // berth's own: a DAX window (`--dax-window`) and per-file DAX (`--dax-policy`).
        "dax-window",
        "dax-policy",
    ];
    serde_json::json!({ "type": "fs", "features": features }).to_string()
}
