//! The shared directory's flags, common to the vhost-user daemon and `berth fuse`, and
//! virtiofsd's legacy `-o key=value` options they are merged with.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use berth_passthrough::{
    CachePolicy, Config, DaxPolicy, InodeFileHandles, Negotiation as FsNegotiation, XattrMap,
};
use clap::{ArgAction, Args, ValueEnum};

use super::{CliError, LogLevel};

/// virtiofsd's three-way switch for features the guest must also support: `auto` carries on
/// without the feature when the guest lacks it, `always` fails FUSE_INIT then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Negotiation {
    Never,
    Auto,
    Always,
}

impl From<Negotiation> for FsNegotiation {
    fn from(mode: Negotiation) -> Self {
        match mode {
            Negotiation::Never => FsNegotiation::Never,
            Negotiation::Auto => FsNegotiation::Auto,
            Negotiation::Always => FsNegotiation::Always,
        }
    }
}

/// A `never|auto|always` flag merged with its `-o name` / `-o no_name` counterpart (which mean
/// `always` and `never`, as in virtiofsd); the two disagreeing on whether the feature is on
/// is a conflict.
fn merge_negotiation(
    what: &str,
    flag: Option<Negotiation>,
    compat: Option<bool>,
) -> Result<FsNegotiation, CliError> {
    let compat = compat.map(|on| {
        if on {
            FsNegotiation::Always
        } else {
            FsNegotiation::Never
        }
    });
    match (flag.map(FsNegotiation::from), compat) {
        (Some(f), Some(c)) if f.wanted() != c.wanted() => Err(CliError::Conflict(format!(
            "{what} is set to {f:?} by a flag and to {c:?} by -o"
        ))),
        (Some(f), _) => Ok(f),
        (None, c) => Ok(c.unwrap_or_default()),
    }
}

/// `--inode-file-handles` values, including virtiofsd's deprecated `fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InodeFileHandlesArg {
    mode: InodeFileHandles,
    deprecated_fallback: bool,
}

impl FromStr for InodeFileHandlesArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "fallback" {
            return Ok(InodeFileHandlesArg {
                mode: InodeFileHandles::Prefer,
                deprecated_fallback: true,
            });
        }
        Ok(InodeFileHandlesArg {
            mode: s.parse()?,
            deprecated_fallback: false,
        })
    }
}

fn parse_cache(s: &str) -> Result<CachePolicy, String> {
    s.parse()
}

pub(super) fn parse_dax_policy(s: &str) -> Result<DaxPolicy, String> {
    s.parse()
        .map_err(|e: berth_passthrough::DaxPolicyError| e.to_string())
}

/// Flags that shape the filesystem, shared by both modes.
#[derive(Debug, Args)]
pub struct FsArgs {
    /// The host directory to share.
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Option<PathBuf>,

    /// Caching mode: never, metadata, auto or always [default: auto].
    #[arg(long, value_name = "never|metadata|auto|always", value_parser = parse_cache)]
    pub cache: Option<CachePolicy>,

    /// Serve extended attributes.
    #[arg(long)]
    pub xattr: bool,

    /// Serve POSIX ACLs (implies --xattr); the bare flag means `always`.
    #[arg(long, value_name = "never|auto|always", require_equals = true, num_args = 0..=1,
          default_missing_value = "always")]
    pub posix_acl: Option<Negotiation>,

    /// Store the security label the guest passes on create (implies --xattr).
    #[arg(long, value_name = "never|auto|always", require_equals = true, num_args = 0..=1,
          default_missing_value = "always")]
    pub security_label: Option<Negotiation>,

    /// Let the guest use writeback caching.
    #[arg(long)]
    pub writeback: bool,

    /// Honour O_DIRECT from the guest.
    #[arg(long)]
    pub allow_direct_io: bool,

    /// Tell the guest which directories are mount points [default].
    #[arg(long, conflicts_with = "no_announce_submounts")]
    pub announce_submounts: bool,

    /// Do not tell the guest which directories are mount points.
    #[arg(long)]
    pub no_announce_submounts: bool,

    /// Refuse every modification of the shared directory.
    #[arg(long)]
    pub readonly: bool,

    /// Do not offer READDIRPLUS (never offered with --cache never).
    #[arg(long)]
    pub no_readdirplus: bool,

    /// Hold inodes by file handle: never, prefer or mandatory [default: prefer].
    #[arg(long, value_name = "never|prefer|mandatory")]
    pub inode_file_handles: Option<InodeFileHandlesArg>,

    /// Offer FUSE_HANDLE_KILLPRIV_V2.
    #[arg(long, conflicts_with = "no_killpriv_v2")]
    pub killpriv_v2: bool,

    /// Do not offer FUSE_HANDLE_KILLPRIV_V2 [default].
    #[arg(long)]
    pub no_killpriv_v2: bool,

    /// Keep O_NOATIME on opens instead of dropping it where it is not permitted.
    #[arg(long)]
    pub preserve_noatime: bool,

    /// Take POSIX record locks on the host (otherwise the guest keeps them locally).
    #[arg(long)]
    pub posix_lock: bool,

    /// Take flock(2) locks on the host (otherwise the guest keeps them locally).
    #[arg(long)]
    pub flock: bool,

    /// Legacy comma-separated options, e.g. `-o source=/dir,cache=auto,xattr`.
    #[arg(short = 'o', value_name = "OPTIONS", action = ArgAction::Append)]
    pub compat_options: Vec<String>,

    /// With --cache never or metadata, still let the guest mmap files (only safe when the
    /// guest has the shared directory to itself).
    #[arg(long)]
    pub allow_mmap: bool,

    /// Rename extended attributes between guest and host with virtiofsd's rules
    /// (`:type:scope:key:prepend:` or `:map:key:prepend:`); implies --xattr.
    // Appended rather than overridden: a repeat with other rules is a conflict, not a pick.
    #[arg(long, value_name = "RULES", action = ArgAction::Append)]
    pub xattrmap: Vec<String>,

    /// virtiofsd flags berth does not implement; refused with a message.
    #[arg(long, value_name = "MAP", hide = true)]
    pub translate_uid: Vec<String>,
    #[arg(long, value_name = "MAP", hide = true)]
    pub translate_gid: Vec<String>,
}

/// Options given through `-o`, kept apart so they can be checked against the flags.
#[derive(Debug, Default)]
struct CompatOptions {
    source: Option<PathBuf>,
    cache: Option<CachePolicy>,
    log_level: Option<LogLevel>,
    timeout: Option<Duration>,
    xattr: Option<bool>,
    readdirplus: Option<bool>,
    writeback: Option<bool>,
    allow_direct_io: Option<bool>,
    announce_submounts: Option<bool>,
    killpriv_v2: Option<bool>,
    posix_acl: Option<bool>,
    security_label: Option<bool>,
    posix_lock: Option<bool>,
    flock: Option<bool>,
    xattrmap: Option<XattrMap>,
}

impl CompatOptions {
    fn parse(lines: &[String]) -> Result<CompatOptions, CliError> {
        let mut opts = CompatOptions::default();
        for option in lines.iter().flat_map(|line| line.split(',')) {
            if option.is_empty() {
                continue;
            }
            match option.split_once('=') {
                Some((key, value)) => opts.parse_pair(key, value)?,
                None => opts.parse_switch(option)?,
            }
        }
        Ok(opts)
    }

    fn parse_pair(&mut self, key: &str, value: &str) -> Result<(), CliError> {
        let bad = |reason: &str| CliError::BadCompatValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        match key {
            "source" => {
                if value.is_empty() {
                    return Err(bad("the source directory may not be empty"));
                }
                self.source = Some(PathBuf::from(value));
            }
            "cache" => self.cache = Some(value.parse::<CachePolicy>().map_err(|e| bad(&e))?),
            "log_level" | "loglevel" => {
                self.log_level = Some(
                    LogLevel::from_compat(value)
                        .ok_or_else(|| bad("expected error, warn, info, debug or trace"))?,
                )
            }
            "timeout" => {
                let seconds: f64 = value
                    .parse()
                    .map_err(|_| bad("expected a number of seconds"))?;
                let timeout = Duration::try_from_secs_f64(seconds)
                    .map_err(|_| bad("expected a non-negative number of seconds"))?;
                self.timeout = Some(timeout);
            }
            // Resolved with the isolation flags (IsolationArgs).
            "sandbox" | "modcaps" => {}
            "xattrmap" => {
                let map = value.parse::<XattrMap>().map_err(|e| bad(&e.to_string()))?;
                if self
                    .xattrmap
                    .as_ref()
                    .is_some_and(|earlier| *earlier != map)
                {
                    return Err(CliError::Conflict(
                        "-o xattrmap is given twice with different rules".into(),
                    ));
                }
                self.xattrmap = Some(map);
            }
            _ => return Err(CliError::UnknownCompatOption(format!("{key}={value}"))),
        }
        Ok(())
    }

    fn parse_switch(&mut self, option: &str) -> Result<(), CliError> {
        let (name, on) = match option.strip_prefix("no_") {
            Some(name) => (name, false),
            None => (option, true),
        };
        let slot = match name {
            "xattr" => &mut self.xattr,
            "readdirplus" => &mut self.readdirplus,
            "writeback" => &mut self.writeback,
            "allow_direct_io" => &mut self.allow_direct_io,
            "announce_submounts" => &mut self.announce_submounts,
            "killpriv_v2" => &mut self.killpriv_v2,
            "posix_acl" => &mut self.posix_acl,
            "security_label" => &mut self.security_label,
            "posix_lock" => &mut self.posix_lock,
            "flock" => &mut self.flock,
            _ => return Err(CliError::UnknownCompatOption(option.to_owned())),
        };
        *slot = Some(on);
        Ok(())
    }
}

/// Combines a flag (None when not given) with its `-o` counterpart; both given and different
/// is a conflict rather than a silent pick.
pub(super) fn merge<T: PartialEq + std::fmt::Debug>(
    what: &str,
    flag: Option<T>,
    compat: Option<T>,
) -> Result<Option<T>, CliError> {
    match (flag, compat) {
        (Some(f), Some(c)) if f != c => Err(CliError::Conflict(format!(
            "{what} is set to {f:?} by a flag and to {c:?} by -o"
        ))),
        (Some(f), _) => Ok(Some(f)),
        (None, c) => Ok(c),
    }
}

/// `true` from a switch flag means "given"; `false` means "not given".
pub(super) fn given(flag: bool) -> Option<bool> {
    flag.then_some(true)
}

fn merge_switch(what: &str, flag: Option<bool>, compat: Option<bool>) -> Result<bool, CliError> {
    Ok(merge(what, flag, compat)?.unwrap_or(false))
}

impl FsArgs {
    /// Builds the filesystem configuration; also returns the `-o` log level, if any.
    pub(super) fn resolve(
        &self,
        warnings: &mut Vec<String>,
    ) -> Result<(Config, Option<LogLevel>), CliError> {
        self.reject_unsupported()?;
        let compat = CompatOptions::parse(&self.compat_options)?;
        if !self.compat_options.is_empty() {
            warnings.push(
                "the -o option format is deprecated; prefer the separate flags \
                 (e.g. --cache auto instead of -o cache=auto)"
                    .to_owned(),
            );
        }

        let root_dir = merge(
            "the shared directory",
            self.shared_dir.clone(),
            compat.source,
        )?
        .ok_or(CliError::MissingSharedDir)?;
        let cache = merge("the cache mode", self.cache, compat.cache)?.unwrap_or_default();

        let posix_acl = merge_negotiation("posix ACL support", self.posix_acl, compat.posix_acl)?;
        let security_label = merge_negotiation(
            "security label support",
            self.security_label,
            compat.security_label,
        )?;
        let mut xattrmap_flag: Option<XattrMap> = None;
        for rules in &self.xattrmap {
            let map = XattrMap::parse(rules).map_err(CliError::BadXattrMap)?;
            if xattrmap_flag
                .as_ref()
                .is_some_and(|earlier| *earlier != map)
            {
                return Err(CliError::Conflict(
                    "--xattrmap is given twice with different rules".into(),
                ));
            }
            xattrmap_flag = Some(map);
        }
        if let (Some(flag), Some(compat)) = (&xattrmap_flag, &compat.xattrmap) {
            if flag != compat {
                return Err(CliError::Conflict(
                    "--xattrmap and -o xattrmap give different rules".into(),
                ));
            }
        }
        let xattrmap = xattrmap_flag.or(compat.xattrmap);
        let xattr = merge_switch("xattr support", given(self.xattr), compat.xattr)?;
        if compat.xattr == Some(false)
            && (posix_acl.wanted() || security_label.wanted() || xattrmap.is_some())
        {
            return Err(CliError::Conflict(
                "-o no_xattr turns off xattrs, which posix ACLs, security labels and \
                 --xattrmap need"
                    .into(),
            ));
        }

        let announce_flag = if self.no_announce_submounts {
            Some(false)
        } else {
            given(self.announce_submounts)
        };
        let announce_submounts = merge(
            "submount announcement",
            announce_flag,
            compat.announce_submounts,
        )?
        .unwrap_or(true);
        let killpriv_flag = if self.no_killpriv_v2 {
            Some(false)
        } else {
            given(self.killpriv_v2)
        };
        let killpriv_v2 = merge("KILLPRIV_V2", killpriv_flag, compat.killpriv_v2)?.unwrap_or(false);
        let readdirplus_flag = self.no_readdirplus.then_some(false);
        let readdirplus =
            merge("READDIRPLUS", readdirplus_flag, compat.readdirplus)?.unwrap_or(true);

        let inode_file_handles = match self.inode_file_handles {
            Some(arg) => {
                if arg.deprecated_fallback {
                    warnings
                        .push("--inode-file-handles=fallback is deprecated; use prefer".to_owned());
                }
                arg.mode
            }
            None => InodeFileHandles::Prefer,
        };

        let cfg = Config {
            root_dir,
            cache,
            entry_timeout: compat.timeout,
            attr_timeout: compat.timeout,
            writeback: merge_switch("writeback caching", given(self.writeback), compat.writeback)?,
            xattr: xattr || posix_acl.wanted() || security_label.wanted() || xattrmap.is_some(),
            posix_acl,
            security_label,
            xattrmap,
            allow_mmap: self.allow_mmap,
            allow_direct_io: merge_switch(
                "direct I/O",
                given(self.allow_direct_io),
                compat.allow_direct_io,
            )?,
            announce_submounts,
            readonly: self.readonly,
            // As virtiofsd: with nothing cached, READDIRPLUS only costs lookups.
            readdirplus: readdirplus && cache != CachePolicy::Never,
            inode_file_handles,
            killpriv_v2,
            preserve_noatime: self.preserve_noatime,
            posix_lock: merge_switch("POSIX locks", given(self.posix_lock), compat.posix_lock)?,
            flock: merge_switch("flock locks", given(self.flock), compat.flock)?,
            ..Config::default()
        };
        Ok((cfg, compat.log_level))
    }

    fn reject_unsupported(&self) -> Result<(), CliError> {
        let unsupported = [
            (!self.translate_uid.is_empty(), "--translate-uid"),
            (!self.translate_gid.is_empty(), "--translate-gid"),
        ];
        match unsupported.iter().find(|(present, _)| *present) {
            Some((_, flag)) => Err(CliError::UnsupportedFlag(flag)),
            None => Ok(()),
        }
    }
}

/// The last value of `key` among `-o key=value,...` options.
pub(super) fn compat_value(options: &[String], key: &str) -> Option<String> {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .filter_map(|item| item.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .next_back()
}
