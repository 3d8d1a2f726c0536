//! The lease: at most one host writes a volume. The `lease` object in the bucket names the
//! writer's session; it is taken and renewed with conditional writes (create only if
//! absent, replace only if unchanged), so two hosts racing for it cannot both win. A
//! lease not renewed within its time to live may be taken over; `break-lease` frees it
//! at once. The lease keeps honest writers apart; the manifests' create-only versions
//! fence a writer that lost its lease anyway (it cannot write the next version).

use berth_cache::ObjectVersion;

use crate::error::{Result, VolumeError};
use crate::format::{now_ms, LeaseRecord};
use crate::store::{Patience, Store};

/// A lease this process holds.
#[derive(Debug, Clone)]
pub struct Lease {
    pub record: LeaseRecord,
    pub version: ObjectVersion,
}

/// The host's name (from the kernel: a sandboxed process may not reach /proc).
fn host_name() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `name.len()` bytes into `name`, which outlives it.
    let ret = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    if ret != 0 {
        return "unknown".into();
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    match String::from_utf8_lossy(&name[..end]).trim() {
        "" => "unknown".into(),
        host => host.to_string(),
    }
}

fn render_time(ms: i64) -> String {
    let secs = ms / 1000;
    let left = secs - now_ms() / 1000;
    format!("unix time {secs} ({left} s from now)")
}

/// What to do about the lease of another session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Only a free or expired lease.
    IfFree,
    /// Also the lease of this session (the previous process on this host, same local
    /// state: its lock proves it is gone).
    Successor,
}

/// Takes the lease for `session`. `previous` are the sessions that served, or started
/// to, from the same local state (their lease may be taken over at once).
pub fn acquire(
    store: &Store,
    session: &str,
    previous: &[&str],
    ttl_ms: i64,
    patience: Patience,
) -> Result<Lease> {
    let key = store.key("lease");
    loop {
        let mine = LeaseRecord {
            session: session.to_string(),
            host: host_name(),
            pid: std::process::id(),
            generation: 1,
            renewed_ms: now_ms(),
            ttl_ms,
            note: String::new(),
        };
        match store.get(&key, patience)? {
            None => {
                let data = mine.encode();
                match store.create(&key, &data, patience)? {
                    crate::store::Created::Written => {
                        // Read back for the version the next conditional write compares.
                        if let Some((back, version)) = store.get(&key, patience)? {
                            if back == data {
                                return Ok(Lease {
                                    record: mine,
                                    version,
                                });
                            }
                        }
                    }
                    crate::store::Created::Taken(_) => {}
                }
                // Someone else was faster, or renewed: look again.
            }
            Some((data, version)) => {
                let current = LeaseRecord::parse(&key, &data)?;
                let succeeding = previous
                    .iter()
                    .any(|p| !p.is_empty() && *p == current.session);
                let expired = current.expires_ms() < now_ms();
                if !(current.is_free() || expired || succeeding || current.session == session) {
                    return Err(VolumeError::Leased {
                        location: store.location.to_string(),
                        holder: current.holder(),
                        until: render_time(current.expires_ms()),
                    });
                }
                if expired && !current.is_free() && !succeeding {
                    tracing::warn!(
                        "taking over the expired lease of {} (last renewed {})",
                        current.holder(),
                        render_time(current.renewed_ms)
                    );
                }
                let record = LeaseRecord {
                    generation: current.generation + 1,
                    ..mine
                };
                if let Some(new_version) =
                    store.replace(&key, &record.encode(), &version, patience)?
                {
                    return Ok(Lease {
                        record,
                        version: new_version,
                    });
                }
                // Changed under us (or our own write's answer was lost): look again.
            }
        }
    }
}

/// What a renewal found.
#[derive(Debug)]
pub enum Renewal {
    Renewed,
    /// Another session holds it now.
    Lost(String),
}

/// Renews `lease` (a new generation, a fresh time).
pub fn renew(store: &Store, lease: &mut Lease, patience: Patience) -> Result<Renewal> {
    let key = store.key("lease");
    let mut record = lease.record.clone();
    record.generation += 1;
    record.renewed_ms = now_ms();
    let data = record.encode();
    if let Some(version) = store.replace(&key, &data, &lease.version, patience)? {
        lease.record = record;
        lease.version = version;
        return Ok(Renewal::Renewed);
    }
    // Not at the version we knew: our own renewal whose answer was lost, or a rival.
    match store.get(&key, patience)? {
        Some((current, version)) if current == data => {
            lease.record = record;
            lease.version = version;
            Ok(Renewal::Renewed)
        }
        Some((current, version)) => {
            let now = LeaseRecord::parse(&key, &current)?;
            if now.session == lease.record.session {
                // An earlier renewal of ours landed after all: carry on from it.
                lease.record = now;
                lease.version = version;
                return renew(store, lease, patience);
            }
            Ok(Renewal::Lost(if now.is_free() {
                format!("the lease was released ({})", now.note)
            } else {
                now.holder()
            }))
        }
        None => Ok(Renewal::Lost("the lease object was deleted".into())),
    }
}

/// Frees `lease` (clean shutdown).
pub fn release(store: &Store, lease: &Lease, patience: Patience) -> Result<()> {
    let key = store.key("lease");
    let record = LeaseRecord {
        session: String::new(),
        generation: lease.record.generation + 1,
        renewed_ms: now_ms(),
        note: format!("released by {}", lease.record.holder()),
        ..lease.record.clone()
    };
    // If it changed meanwhile it is not ours to release.
    store.replace(&key, &record.encode(), &lease.version, patience)?;
    Ok(())
}

/// Frees the lease whoever holds it (the operator's break procedure); returns what it
/// found.
pub fn break_lease(store: &Store, patience: Patience) -> Result<Option<LeaseRecord>> {
    let key = store.key("lease");
    loop {
        let Some((data, version)) = store.get(&key, patience)? else {
            return Ok(None);
        };
        let current = LeaseRecord::parse(&key, &data)?;
        let record = LeaseRecord {
            session: String::new(),
            generation: current.generation + 1,
            renewed_ms: now_ms(),
            note: format!(
                "broken by host {} pid {} (was {})",
                host_name(),
                std::process::id(),
                current.holder()
            ),
            ..current.clone()
        };
        if store
            .replace(&key, &record.encode(), &version, patience)?
            .is_some()
        {
            return Ok(Some(current));
        }
    }
}

/// The lease as it stands.
pub fn read(store: &Store, patience: Patience) -> Result<Option<LeaseRecord>> {
    let key = store.key("lease");
    store
        .get(&key, patience)?
        .map(|(data, _)| LeaseRecord::parse(&key, &data))
        .transpose()
}
