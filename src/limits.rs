//! RLIMIT_NOFILE setup: the guest can keep many files open, each costing the daemon a descriptor.

use std::io;

use anyhow::Context;

/// Where virtiofsd aims by default, and berth with it.
const DEFAULT_NOFILE: u64 = 1_000_000;
const NR_OPEN: &str = "/proc/sys/fs/nr_open";

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
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

/// Applies `--rlimit-nofile`: `Some(0)` leaves the limit alone, `Some(n)` sets soft and hard
/// limits to `n` (failing loudly), `None` raises the limits towards one million, settling for
/// soft = hard when raising the hard limit is not permitted. Returns the resulting soft limit.
pub fn setup_nofile(requested: Option<u64>) -> anyhow::Result<u64> {
    let current = get_nofile().context("cannot read RLIMIT_NOFILE")?;
    match requested {
        Some(0) => Ok(current.rlim_cur),
        Some(n) => {
            set_nofile(n, n).with_context(|| {
                format!("cannot set the open file limit (RLIMIT_NOFILE) to {n}")
            })?;
            Ok(n)
        }
        None => {
            if current.rlim_cur >= DEFAULT_NOFILE {
                return Ok(current.rlim_cur);
            }
            let nr_open = std::fs::read_to_string(NR_OPEN)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(current.rlim_max);
            let target = DEFAULT_NOFILE.min(nr_open).max(current.rlim_cur);
            if set_nofile(target, target.max(current.rlim_max)).is_ok() {
                return Ok(target);
            }
            if current.rlim_cur < current.rlim_max {
                set_nofile(current.rlim_max, current.rlim_max)
                    .context("cannot raise the open file soft limit to the hard limit")?;
            }
            Ok(current.rlim_max)
        }
    }
}
