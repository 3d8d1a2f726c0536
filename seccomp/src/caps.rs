//! Capabilities: keep only what serving the shared directory needs, adjusted by `--modcaps`.

use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};

use crate::Error;

/// What a passthrough server needs as root: changing ownership and modes on behalf of guest
/// users, switching to their uid/gid, creating device nodes and setting file capabilities.
const DEFAULT_CAPS: [Capability; 8] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
];

/// A parsed `--modcaps` value: capabilities to add to and remove from the default set.
///
/// The syntax is virtiofsd's: `+name` or `-name` items joined by `:`, names case-insensitive,
/// with or without the `cap_` prefix (`+sys_admin:-chown`). A later item wins over an earlier
/// one naming the same capability.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModCaps {
    /// Capabilities to keep in addition to the defaults.
    pub add: CapsHashSet,
    /// Capabilities to drop even if the defaults include them.
    pub remove: CapsHashSet,
}

impl FromStr for ModCaps {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| Error::InvalidValue {
            what: "--modcaps",
            value: spec.to_owned(),
            reason,
        };
        let mut modcaps = ModCaps::default();
        for item in spec.split(':') {
            let mut chars = item.chars();
            let action = chars.next().ok_or_else(|| {
                invalid("empty item; expected (+|-)capability[:(+|-)capability...]".to_owned())
            })?;
            if action != '+' && action != '-' {
                return Err(invalid(format!(
                    "item '{item}' starts with '{action}'; expected '+' or '-'"
                )));
            }
            let name = chars.as_str().to_ascii_uppercase();
            let canonical = if name.starts_with("CAP_") {
                name
            } else {
                format!("CAP_{name}")
            };
            let capability = Capability::from_str(&canonical)
                .map_err(|_| invalid(format!("unknown capability '{}'", chars.as_str())))?;
            match action {
                '+' => {
                    modcaps.remove.remove(&capability);
                    modcaps.add.insert(capability);
                }
                _ => {
                    modcaps.add.remove(&capability);
                    modcaps.remove.insert(capability);
                }
            }
        }
        Ok(modcaps)
    }
}

/// What the daemon's options require of its capabilities.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CapsNeeded {
    /// `--inode-file-handles` is not `never`: `open_by_handle_at` needs CAP_DAC_READ_SEARCH.
    pub file_handles: bool,
    /// The `--modcaps` adjustments.
    pub modcaps: ModCaps,
}

impl CapsNeeded {
    /// The capabilities to keep: the defaults, plus what the options need, adjusted by
    /// `--modcaps`; removing one that an option needs is an error.
    pub fn resolve(&self) -> Result<CapsHashSet, Error> {
        let mut keep: CapsHashSet = DEFAULT_CAPS.into_iter().collect();
        keep.extend(self.modcaps.add.iter().copied());
        for capability in &self.modcaps.remove {
            keep.remove(capability);
        }
        if self.file_handles {
            let needed = Capability::CAP_DAC_READ_SEARCH;
            if self.modcaps.remove.contains(&needed) {
                return Err(Error::CapabilityRequired {
                    capability: "DAC_READ_SEARCH".to_owned(),
                    needed_by: "--inode-file-handles",
                });
            }
            keep.insert(needed);
        }
        Ok(keep)
    }
}

fn caps_error(step: &'static str) -> impl Fn(caps::errors::CapsError) -> Error {
    move |e| Error::Capabilities {
        step,
        reason: e.to_string(),
    }
}

/// Reduces the calling thread's capabilities to `needed` (permitted and effective), empties the
/// inheritable and ambient sets and the bounding set, and returns the set kept.
///
/// Capabilities are per thread and inherited by threads created afterwards: call this on the
/// main thread before spawning workers. Capabilities the process does not have (an unprivileged
/// run) are left out rather than failing; an unprivileged process ends with an empty set.
pub fn drop_capabilities(needed: &CapsNeeded) -> Result<CapsHashSet, Error> {
    let wanted = needed.resolve()?;
    let permitted = caps::read(None, CapSet::Permitted)
        .map_err(caps_error("read the permitted capabilities"))?;
    let keep: CapsHashSet = wanted
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    for missing in wanted.iter().filter(|c| !permitted.contains(c)) {
        tracing::debug!("not keeping {missing}: the process does not have it");
    }

    // The bounding set can only shrink while CAP_SETPCAP is effective, so it goes first.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(caps_error("read the effective capabilities"))?
    {
        let bounding =
            caps::read(None, CapSet::Bounding).map_err(caps_error("read the bounding set"))?;
        for capability in bounding {
            caps::drop(None, CapSet::Bounding, capability)
                .map_err(caps_error("shrink the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_error("clear the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("clear the inheritable set"))?;
    // Effective must stay a subset of permitted at every step: shrink it first.
    caps::set(None, CapSet::Effective, &keep)
        .map_err(caps_error("set the effective capabilities"))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(caps_error("set the permitted capabilities"))?;
    Ok(keep)
}

/// Empties the calling thread's effective, permitted, inheritable and ambient sets (other
/// threads keep theirs: capabilities are per thread). For threads that only move data
/// between descriptors they were handed, such as ublk queue threads.
pub fn drop_thread_capabilities() -> Result<(), Error> {
    caps::clear(None, CapSet::Ambient).map_err(caps_error("clear the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("clear the inheritable set"))?;
    caps::clear(None, CapSet::Effective).map_err(caps_error("clear the effective set"))?;
    caps::clear(None, CapSet::Permitted).map_err(caps_error("clear the permitted set"))?;
    Ok(())
}

/// Whether this process may register FUSE passthrough backing files: the kernel asks for
/// CAP_SYS_ADMIN in the initial user namespace, so the capability must be effective and the
/// process must not be in a user namespace of its own (its uid map is the identity over
/// every id).
pub fn can_register_fuse_backing_files() -> bool {
    let admin = caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false);
    let initial_namespace = std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| {
        let fields: Vec<&str> = map.split_whitespace().collect();
        fields == ["0", "0", "4294967295"]
    });
    admin && initial_namespace
}

/// Reduces the calling thread's capabilities to `keep` alone (effective and permitted; the
/// inheritable, ambient and bounding sets emptied): for a thread that does one privileged
/// thing, such as registering FUSE passthrough backing files with CAP_SYS_ADMIN. Other
/// threads keep theirs.
pub fn keep_only_thread_capabilities(keep: &[Capability]) -> Result<(), Error> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)
        .map_err(caps_error("read the effective capabilities"))?
    {
        let bounding =
            caps::read(None, CapSet::Bounding).map_err(caps_error("read the bounding set"))?;
        for capability in bounding {
            caps::drop(None, CapSet::Bounding, capability)
                .map_err(caps_error("shrink the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_error("clear the ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("clear the inheritable set"))?;
    caps::set(None, CapSet::Effective, &keep)
        .map_err(caps_error("set the effective capabilities"))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(caps_error("set the permitted capabilities"))?;
    Ok(())
}

/// Parses a `--modcaps` value and drops capabilities as [`drop_capabilities`] does.
pub fn apply_modcaps(spec: &str, file_handles: bool) -> Result<CapsHashSet, Error> {
    drop_capabilities(&CapsNeeded {
        file_handles,
        modcaps: spec.parse()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[Capability]) -> CapsHashSet {
        items.iter().copied().collect()
    }

    #[test]
    fn modcaps_syntax_of_virtiofsd() {
        let m: ModCaps = "+sys_admin:-chown".parse().unwrap();
        assert_eq!(m.add, set(&[Capability::CAP_SYS_ADMIN]));
        assert_eq!(m.remove, set(&[Capability::CAP_CHOWN]));
        // Case and the cap_ prefix do not matter.
        let m: ModCaps = "+CAP_Sys_Admin".parse().unwrap();
        assert_eq!(m.add, set(&[Capability::CAP_SYS_ADMIN]));
        // The last word on a capability wins.
        let m: ModCaps = "+mknod:-mknod".parse().unwrap();
        assert!(m.add.is_empty());
        assert_eq!(m.remove, set(&[Capability::CAP_MKNOD]));
        let m: ModCaps = "-mknod:+mknod".parse().unwrap();
        assert_eq!(m.add, set(&[Capability::CAP_MKNOD]));
        assert!(m.remove.is_empty());
    }

    #[test]
    fn modcaps_rejects_malformed_items() {
        for (spec, fragment) in [
            ("", "empty item"),
            ("+chown:", "empty item"),
            ("chown", "expected '+' or '-'"),
            ("=+sys_admin", "expected '+' or '-'"),
            ("+no_such_cap", "unknown capability 'no_such_cap'"),
            ("+", "unknown capability ''"),
            ("-é", "unknown capability"),
        ] {
            let err = spec.parse::<ModCaps>().unwrap_err().to_string();
            assert!(err.contains(fragment), "{spec:?}: {err}");
            assert!(err.starts_with("invalid --modcaps"), "{err}");
        }
    }

    #[test]
    fn resolve_combines_defaults_options_and_modcaps() {
        let plain = CapsNeeded::default().resolve().unwrap();
        assert_eq!(plain, DEFAULT_CAPS.into_iter().collect());
        assert!(!plain.contains(&Capability::CAP_SYS_ADMIN));

        let needed = CapsNeeded {
            file_handles: true,
            modcaps: "+sys_admin:-chown:-mknod".parse().unwrap(),
        };
        let keep = needed.resolve().unwrap();
        assert!(keep.contains(&Capability::CAP_SYS_ADMIN));
        assert!(keep.contains(&Capability::CAP_DAC_READ_SEARCH));
        assert!(!keep.contains(&Capability::CAP_CHOWN));
        assert!(!keep.contains(&Capability::CAP_MKNOD));
        assert_eq!(keep.len(), DEFAULT_CAPS.len() - 2 + 2);
    }

    #[test]
    fn file_handles_cannot_lose_dac_read_search() {
        let needed = CapsNeeded {
            file_handles: true,
            modcaps: "-dac_read_search".parse().unwrap(),
        };
        let err = needed.resolve().unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot drop DAC_READ_SEARCH: --inode-file-handles needs it"
        );
        // Without file handles, removing it is fine (it is not a default).
        let needed = CapsNeeded {
            file_handles: false,
            modcaps: "-dac_read_search".parse().unwrap(),
        };
        assert!(!needed
            .resolve()
            .unwrap()
            .contains(&Capability::CAP_DAC_READ_SEARCH));
    }
}
