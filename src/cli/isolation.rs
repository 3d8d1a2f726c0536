//! Sandbox, seccomp and capability flags, and the identity maps of the namespace sandbox.

use berth_seccomp::{IdMap, ModCaps, SandboxMode, SeccompAction};
use clap::Args;

use super::{compat_value, CliError};

/// How the serving process confines itself, shared by both modes (virtiofsd's flags).
#[derive(Debug, Args)]
pub struct IsolationArgs {
    /// Process isolation: `namespace` (new mount, pid and net namespaces, the shared directory
    /// as root), `chroot` (chroot into the shared directory) or `none` [default: namespace].
    #[arg(long, value_name = "namespace|chroot|none")]
    pub sandbox: Option<String>,

    /// Seccomp filter action for a system call outside each thread's allow-list:
    /// `kill` the process, `log` it, raise SIGSYS (`trap`), or no filter (`none`).
    #[arg(long, value_name = "none|kill|log|trap", default_value = "kill")]
    pub seccomp: String,

    /// Capability changes, virtiofsd's syntax: a `:`-separated list of capabilities, each
    /// preceded by `+` (keep it too) or `-` (drop it), e.g. `+sys_admin:-chown:-mknod`.
    #[arg(long, value_name = "CAPS")]
    pub modcaps: Option<String>,

    /// User namespace uid mapping when not started as root (namespace sandbox), virtiofsd's
    /// syntax `:namespace_uid:host_uid:count:`; give it several times for several ranges.
    /// Anything but the user's own uid with count 1 is written by newuidmap, within the ranges
    /// /etc/subuid grants the user [default: :0:<euid>:1:].
    #[arg(long, value_name = ":NS_UID:HOST_UID:COUNT:", value_parser = parse_id_map)]
    pub uid_map: Vec<IdMap>,

    /// User namespace gid mapping, like --uid-map (newgidmap, /etc/subgid)
    /// [default: :0:<egid>:1:].
    #[arg(long, value_name = ":NS_GID:HOST_GID:COUNT:", value_parser = parse_id_map)]
    pub gid_map: Vec<IdMap>,

    /// Most inodes the guest may hold (looked up and not yet forgotten); further lookups fail
    /// with ENFILE [default: 4194304; with --inode-file-handles never, where each costs a
    /// descriptor, half of what RLIMIT_NOFILE leaves after a reserve].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    pub max_inodes: Option<u64>,

    /// Most files and directories the guest may have open at once; further opens fail with
    /// EMFILE [default: half of what RLIMIT_NOFILE leaves after a reserve].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_handles: Option<u64>,
}

fn parse_id_map(s: &str) -> Result<IdMap, String> {
    s.parse::<IdMap>().map_err(|e| e.to_string())
}

/// The resolved isolation flags.
#[derive(Debug, Clone)]
pub struct IsolationSettings {
    pub sandbox: SandboxMode,
    pub seccomp: SeccompAction,
    pub modcaps: ModCaps,
    pub uid_map: Vec<IdMap>,
    pub gid_map: Vec<IdMap>,
    /// `None`: derived from the descriptor limit at start-up.
    pub max_inodes: Option<u64>,
    pub max_handles: Option<u64>,
}

impl IsolationArgs {
    /// Merges the flags with their `-o sandbox=` / `-o modcaps=` counterparts; a flag and an
    /// option that disagree are an error, never one silently winning.
    pub(super) fn resolve(&self, compat_options: &[String]) -> Result<IsolationSettings, CliError> {
        let parse_sandbox = |value: &str| {
            value
                .parse::<SandboxMode>()
                .map_err(|_| CliError::InvalidChoice {
                    flag: "sandbox",
                    value: value.to_owned(),
                    expected: "namespace, chroot, none",
                })
        };
        let flag_sandbox = self.sandbox.as_deref().map(parse_sandbox).transpose()?;
        let compat_sandbox = compat_value(compat_options, "sandbox");
        let compat_mode = compat_sandbox.as_deref().map(parse_sandbox).transpose()?;
        let sandbox = match (flag_sandbox, compat_mode) {
            (Some(flag), Some(compat)) if flag != compat => {
                return Err(CliError::Conflict(format!(
                    "--sandbox {} contradicts -o sandbox={}",
                    self.sandbox.as_deref().unwrap_or_default(),
                    compat_sandbox.as_deref().unwrap_or_default()
                )))
            }
            (Some(mode), _) | (None, Some(mode)) => mode,
            (None, None) => SandboxMode::Namespace,
        };
        let seccomp: SeccompAction = self.seccomp.parse().map_err(|_| CliError::InvalidChoice {
            flag: "seccomp",
            value: self.seccomp.clone(),
            expected: "none, kill, log, trap",
        })?;
        let compat_modcaps = compat_value(compat_options, "modcaps");
        let modcaps_spec = match (&self.modcaps, compat_modcaps) {
            (Some(flag), Some(compat)) if *flag != compat => {
                return Err(CliError::Conflict(format!(
                    "--modcaps {flag} contradicts -o modcaps={compat}"
                )))
            }
            (Some(spec), _) => Some(spec.clone()),
            (None, compat) => compat,
        };
        let modcaps: ModCaps = match &modcaps_spec {
            Some(spec) => spec
                .parse()
                .map_err(|e: berth_seccomp::Error| CliError::BadModcaps(e.to_string()))?,
            None => ModCaps::default(),
        };
        if (!self.uid_map.is_empty() || !self.gid_map.is_empty())
            && sandbox != SandboxMode::Namespace
        {
            return Err(CliError::Conflict(
                "--uid-map and --gid-map need the namespace sandbox (--sandbox namespace)".into(),
            ));
        }
        berth_seccomp::check_id_maps(&self.uid_map, "--uid-map")
            .and_then(|()| berth_seccomp::check_id_maps(&self.gid_map, "--gid-map"))
            .map_err(|e| CliError::BadIdMaps(e.to_string()))?;
        Ok(IsolationSettings {
            sandbox,
            seccomp,
            modcaps,
            uid_map: self.uid_map.clone(),
            gid_map: self.gid_map.clone(),
            max_inodes: self.max_inodes,
            max_handles: self.max_handles,
        })
    }
}
