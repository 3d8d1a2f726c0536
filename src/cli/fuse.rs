//! `berth fuse`: serving the shared directory on a host mount point through /dev/fuse.

use std::path::PathBuf;

use berth_passthrough::Config;
use berth_seccomp::{IdMap, SandboxMode};
use clap::Args;

use super::{CliError, CommonArgs, FsArgs, IsolationArgs, IsolationSettings, ProcessSettings};

/// `berth fuse --io-uring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoUringMode {
    /// io_uring where the kernel allows it, /dev/fuse read and write otherwise.
    Auto,
    /// io_uring or refuse to start.
    Always,
    /// /dev/fuse read and write only.
    Never,
}

/// `berth fuse` flags.
#[derive(Debug, Args)]
pub struct FuseArgs {
    /// Where to mount the filesystem on the host.
    #[arg(long, value_name = "DIR", required = true)]
    pub mountpoint: Option<PathBuf>,

    /// Worker threads reading /dev/fuse; with FUSE over io_uring also the ring threads,
    /// spread over the CPUs' queues (at least two per queue).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// FUSE passthrough: the kernel reads, writes and maps open files straight from the host
    /// file (Linux 6.9+, CONFIG_FUSE_PASSTHROUGH, CAP_SYS_ADMIN). `auto` uses it where the
    /// kernel and berth's privileges allow, `always` fails to start otherwise.
    #[arg(long, value_name = "auto|always|never", default_value = "auto")]
    pub passthrough: berth_passthrough::PassthroughMode,

    /// FUSE over io_uring: requests and replies move through a ring per CPU instead of
    /// read and write on /dev/fuse (Linux 6.14+, CONFIG_FUSE_IO_URING, the fuse module's
    /// enable_uring parameter set to Y). `auto` uses it where the kernel allows, `always`
    /// fails to start otherwise.
    #[arg(
        long = "io-uring",
        value_name = "auto|always|never",
        default_value = "auto"
    )]
    pub io_uring: IoUringMode,

    #[command(flatten)]
    pub shared_cache: crate::shared_cache::SharedCacheArgs,

    #[command(flatten)]
    pub isolation: IsolationArgs,

    #[command(flatten)]
    pub fs: FsArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug)]
pub struct FuseSettings {
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub passthrough: berth_passthrough::PassthroughMode,
    pub io_uring: IoUringMode,
    pub shared_cache: crate::shared_cache::SharedCacheArgs,
    pub isolation: IsolationSettings,
    pub fs: Config,
    pub process: ProcessSettings,
}

impl FuseArgs {
    pub(super) fn resolve(&self) -> Result<FuseSettings, CliError> {
        let mut warnings = Vec::new();
        let (fs, compat_level) = self.fs.resolve(&mut warnings)?;
        let mut isolation = self.isolation.resolve(&self.fs.compat_options)?;
        // SAFETY: geteuid and getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        fuse_id_maps(&mut isolation, euid, egid)?;
        Ok(FuseSettings {
            // clap enforces `required`; the Option only lets the struct be flattened.
            mountpoint: self.mountpoint.clone().unwrap_or_default(),
            threads: usize::from(self.threads),
            passthrough: self.passthrough,
            io_uring: self.io_uring,
            shared_cache: self.shared_cache.clone(),
            isolation,
            fs,
            process: self.common.resolve(compat_level, warnings)?,
        })
    }
}

/// The kernel hands a FUSE server the callers' host ids (and takes the ids in its replies as
/// host ids), which berth's user namespace would read as its own. So an unprivileged `berth
/// fuse` maps only its own ids, each to itself: inside the namespace it is then the same user
/// as outside, creates files as itself and reports host ids unchanged (as it does without a
/// sandbox). A range, another id, or its own id under another number would put files under
/// the wrong owners and show root-owned files as the caller's or the reverse. Ranges are for the
/// vhost-user daemon, whose ids come from the guest. (Root gets maps refused by the sandbox,
/// with its own reason.)
pub(super) fn fuse_id_maps(
    isolation: &mut IsolationSettings,
    euid: u32,
    egid: u32,
) -> Result<(), CliError> {
    if euid == 0 {
        return Ok(());
    }
    for (maps, own, option) in [
        (&mut isolation.uid_map, euid, "--uid-map"),
        (&mut isolation.gid_map, egid, "--gid-map"),
    ] {
        let identity = IdMap {
            inside: own,
            outside: own,
            count: 1,
        };
        if maps.is_empty() {
            if isolation.sandbox == SandboxMode::Namespace {
                maps.push(identity);
            }
            continue;
        }
        if maps.as_slice() != [identity] {
            let given: Vec<String> = maps.iter().map(ToString::to_string).collect();
            return Err(CliError::BadIdMaps(format!(
                "berth fuse cannot use {option} {}: FUSE requests carry the callers' host ids, \
                 which a user namespace mapping ranges, other ids or your own id under another \
                 number would read as other users, so files would land under the wrong owners; \
                 leave it out (berth fuse maps your own id {own} to itself) or serve the ranges \
                 through vhost-user",
                given.join(" ")
            )));
        }
    }
    Ok(())
}
