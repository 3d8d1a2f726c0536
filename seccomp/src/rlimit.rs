//! `--rlimit-nofile`: every inode and open file the guest holds costs the daemon a descriptor.

use std::io;

use crate::Error;

/// Where the soft limit is raised to by default (as virtiofsd does), capped by `fs.nr_open`.
const DEFAULT_NOFILE: u64 = 1_000_000;

/// What to ask of setrlimit, derived from the request and the current limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NofilePlan {
    /// Leave the limits as they are; the soft limit is the value.
    Keep(u64),
    /// Set soft and hard limits to the value; failing is an error.
    Exact(u64),
    /// Try soft = hard = the first value; if not permitted, soft = the (lower) hard limit.
    Raise { target: u64, hard: u64 },
}

fn plan(requested: Option<u64>, soft: u64, hard: u64, nr_open: u64) -> Result<NofilePlan, Error> {
    match requested {
        Some(0) => Ok(NofilePlan::Keep(soft)),
        Some(n) if n > nr_open => Err(Error::InvalidValue {
            what: "--rlimit-nofile",
            value: n.to_string(),
            reason: format!("the kernel allows at most {nr_open} (fs.nr_open)"),
        }),
        Some(n) => Ok(NofilePlan::Exact(n)),
        None if soft >= DEFAULT_NOFILE => Ok(NofilePlan::Keep(soft)),
        None => Ok(NofilePlan::Raise {
            target: DEFAULT_NOFILE.min(nr_open).max(soft),
            hard,
        }),
    }
}

fn get_nofile() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` is a valid, initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn nr_open(fallback: u64) -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(fallback)
}

/// Applies `--rlimit-nofile` and returns the resulting soft limit.
///
/// `Some(0)` leaves the limits alone; `Some(n)` sets soft and hard limits to `n` and fails if
/// that is not permitted; `None` raises the limits to min(1,000,000, fs.nr_open), settling for
/// soft = hard when raising the hard limit is not permitted.
pub fn set_rlimit_nofile(requested: Option<u64>) -> Result<u64, Error> {
    let (soft, hard) = get_nofile().map_err(|source| Error::Rlimit {
        step: "read",
        source,
    })?;
    match plan(requested, soft, hard, nr_open(hard))? {
        NofilePlan::Keep(value) => Ok(value),
        NofilePlan::Exact(value) => {
            set_nofile(value, value).map_err(|source| Error::Rlimit {
                step: "set",
                source,
            })?;
            Ok(value)
        }
        NofilePlan::Raise { target, hard } => {
            if set_nofile(target, target.max(hard)).is_ok() {
                return Ok(target);
            }
            // Expected wherever the hard limit is below the target and berth may not raise it
            // (unprivileged, or a container): nothing for the user to act on.
            tracing::debug!(
                "cannot raise RLIMIT_NOFILE to {target}; using the hard limit {hard} instead"
            );
            if soft < hard {
                set_nofile(hard, hard).map_err(|source| Error::Rlimit {
                    step: "raise the soft limit to the hard limit of",
                    source,
                })?;
            }
            Ok(hard.max(soft))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_keeps_the_current_soft_limit() {
        assert_eq!(
            plan(Some(0), 1024, 4096, 1 << 20).unwrap(),
            NofilePlan::Keep(1024)
        );
    }

    #[test]
    fn explicit_value_sets_both_limits_and_is_bounded_by_nr_open() {
        assert_eq!(
            plan(Some(5000), 1024, 4096, 1 << 20).unwrap(),
            NofilePlan::Exact(5000)
        );
        let err = plan(Some(2_000_000), 1024, 4096, 1_048_576).unwrap_err();
        assert!(err.to_string().contains("at most 1048576"), "{err}");
    }

    #[test]
    fn default_raises_towards_a_million_capped_by_nr_open() {
        assert_eq!(
            plan(None, 1024, 4096, 1 << 20).unwrap(),
            NofilePlan::Raise {
                target: 1_000_000,
                hard: 4096
            }
        );
        assert_eq!(
            plan(None, 1024, 4096, 65536).unwrap(),
            NofilePlan::Raise {
                target: 65536,
                hard: 4096
            }
        );
        // Already high enough: untouched.
        assert_eq!(
            plan(None, 2_000_000, 2_000_000, 1 << 30).unwrap(),
            NofilePlan::Keep(2_000_000)
        );
    }

    #[test]
    fn applying_the_default_reaches_at_least_the_hard_limit() {
        let (_, hard_before) = get_nofile().unwrap();
        let result = set_rlimit_nofile(None).unwrap();
        let (soft_after, _) = get_nofile().unwrap();
        assert_eq!(result, soft_after);
        assert!(
            soft_after >= hard_before.min(DEFAULT_NOFILE),
            "{soft_after} < {hard_before}"
        );
        // Leaving alone reports the same value.
        assert_eq!(set_rlimit_nofile(Some(0)).unwrap(), soft_after);
    }
}
