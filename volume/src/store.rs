//! A volume's bucket: object names, retries with backoff, conditional writes that survive
//! a lost response, and loading manifest versions.
//!
//! Requests go through [`berth_cache::BlobBackend`] opened at the bucket's root, so that a
//! clone can read the packs of its source under another prefix. Transient failures
//! (connection refused, timeouts, 5xx) are retried with exponential backoff for as long as
//! the caller's [`Patience`] allows; anything else is returned at once.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_cache::{open_backend, BlobBackend, CacheError, ListedObject, ObjectVersion};

use crate::error::{Result, VolumeError};
use crate::format::{Manifest, VolumeConfig};
use crate::mapping::BlockMap;

/// Where a volume lives: `s3://BUCKET/PREFIX` or `file:///DIR/NAME` (the directory's
/// parent stands for the bucket, so volumes beside each other can share packs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// What `open_backend` opens: the bucket's root.
    pub root: String,
    /// The volume's prefix inside it (no leading or trailing `/`).
    pub prefix: String,
}

impl Location {
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.strip_prefix("volume:").unwrap_or(spec);
        let invalid = |why: &str| VolumeError::Invalid(format!("volume location `{spec}`: {why}"));
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                return Err(invalid("no bucket"));
            }
            if prefix.is_empty() {
                return Err(invalid("give a prefix for the volume: s3://BUCKET/PREFIX"));
            }
            check_prefix(prefix).map_err(|why| invalid(&why))?;
            return Ok(Self {
                root: format!("s3://{bucket}"),
                prefix: prefix.to_string(),
            });
        }
        if let Some(path) = spec.strip_prefix("file://") {
            let path = path.trim_end_matches('/');
            let (root, name) = path
                .rsplit_once('/')
                .ok_or_else(|| invalid("use file:///DIR/NAME"))?;
            if name.is_empty() || !path.starts_with('/') {
                return Err(invalid("use an absolute path: file:///DIR/NAME"));
            }
            check_prefix(name).map_err(|why| invalid(&why))?;
            return Ok(Self {
                root: format!("file://{}", if root.is_empty() { "/" } else { root }),
                prefix: name.to_string(),
            });
        }
        Err(invalid("use s3://BUCKET/PREFIX or file:///DIR/NAME"))
    }

    /// The same bucket, another prefix.
    pub fn sibling(&self, prefix: &str) -> Self {
        Self {
            root: self.root.clone(),
            prefix: prefix.to_string(),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(root) = self.root.strip_prefix("file://") {
            write!(f, "file://{}/{}", root.trim_end_matches('/'), self.prefix)
        } else {
            write!(f, "{}/{}", self.root, self.prefix)
        }
    }
}

fn check_prefix(prefix: &str) -> std::result::Result<(), String> {
    for part in prefix.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!("`{prefix}` has an empty, `.` or `..` component"));
        }
    }
    Ok(())
}

/// How long a request is retried.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// Until it succeeds or the store is stopped (background uploads).
    Forever,
    /// At most this long (commands, opening, reads for a waiting request).
    For(Duration),
}

/// Request counters of a store.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// What a conditional create found.
#[derive(Debug)]
pub enum Created {
    /// Ours is there (written now, or by an earlier attempt whose answer was lost).
    Written,
    /// Another object with this name was there first.
    Taken(Vec<u8>),
}

/// A volume's bucket.
pub struct Store {
    backend: Arc<dyn BlobBackend>,
    pub location: Location,
    stopped: AtomicBool,
    pub counters: StoreCounters,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.location)
    }
}

const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Store {
    pub fn open(location: &Location) -> Result<Arc<Self>> {
        let backend = open_backend(&location.root).map_err(VolumeError::store)?;
        Ok(Self::with_backend(location, backend))
    }

    /// A store on a backend opened at the bucket's root by the caller.
    pub fn with_backend(location: &Location, backend: Arc<dyn BlobBackend>) -> Arc<Self> {
        Arc::new(Self {
            backend,
            location: location.clone(),
            stopped: AtomicBool::new(false),
            counters: StoreCounters::default(),
        })
    }

    /// The store of another volume in the same bucket.
    pub fn sibling(&self, prefix: &str) -> Arc<Self> {
        Self::with_backend(&self.location.sibling(prefix), self.backend.clone())
    }

    /// Makes requests retried "forever" give up (shutdown).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// The bucket-relative name of this volume's object `relative`.
    pub fn key(&self, relative: &str) -> String {
        format!("{}/{relative}", self.location.prefix)
    }

    pub fn manifest_key(&self, version: u64) -> String {
        self.key(&format!("manifests/{version:020}"))
    }

    pub fn snapshot_key(&self, name: &str) -> String {
        self.key(&format!("snapshots/{name}"))
    }

    /// Runs `op` until it succeeds, fails for good, or `patience` runs out.
    pub fn retry<T>(
        &self,
        operation: &'static str,
        object: &str,
        patience: Patience,
        mut op: impl FnMut() -> std::result::Result<T, CacheError>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut wait = BACKOFF_FIRST;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match op() {
                Ok(value) => return Ok(value),
                Err(err) if err.is_transient() => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    let give_up = match patience {
                        Patience::Forever => self.is_stopped(),
                        Patience::For(limit) => started.elapsed() + wait > limit,
                    };
                    if give_up {
                        return Err(VolumeError::StoreGaveUp {
                            operation,
                            object: object.to_string(),
                            attempts,
                            seconds: started.elapsed().as_secs(),
                            source: Box::new(err),
                        });
                    }
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        tracing::warn!(
                            object,
                            attempts,
                            "{operation} failed, retrying in {} ms: {err}",
                            wait.as_millis()
                        );
                    }
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
                Err(err) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    return Err(VolumeError::store(err));
                }
            }
        }
    }

    pub fn get(&self, key: &str, patience: Patience) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        let got = self.retry("read", key, patience, || self.backend.get_versioned(key))?;
        if let Some((data, _)) = &got {
            self.counters
                .bytes_down
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(got)
    }

    pub fn read_range(&self, key: &str, range: Range<u64>, patience: Patience) -> Result<Vec<u8>> {
        let data = self.retry("read", key, patience, || {
            self.backend.read_range(key, range.clone())
        })?;
        self.counters
            .bytes_down
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Plain overwrite (packs: immutable names, so a retry rewrites the same bytes), sending
    /// `data` without copying it (each retry sends it again).
    pub fn put(&self, key: &str, data: bytes::Bytes, patience: Patience) -> Result<()> {
        let len = data.len() as u64;
        self.retry("upload", key, patience, || {
            self.backend.put_shared(key, data.clone())
        })?;
        self.counters.bytes_up.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Creates `key` with `data` unless it exists. A retry after a lost answer finds its
    /// own bytes there, which counts as written.
    pub fn create(&self, key: &str, data: &[u8], patience: Patience) -> Result<Created> {
        let outcome = self.retry("create", key, patience, || {
            self.backend.put_if_absent(key, data)
        })?;
        self.counters
            .bytes_up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if outcome.is_some() {
            return Ok(Created::Written);
        }
        match self.get(key, patience)? {
            Some((existing, _)) if existing == data => Ok(Created::Written),
            Some((existing, _)) => Ok(Created::Taken(existing)),
            // Created and deleted in between: try once more.
            None => match self
                .backend
                .put_if_absent(key, data)
                .map_err(VolumeError::store)?
            {
                Some(_) => Ok(Created::Written),
                None => Ok(Created::Taken(Vec::new())),
            },
        }
    }

    /// Replaces `key` if it is still at `expected`: the new version, or `None` when it
    /// changed (the caller reads it again to tell a lost answer from a rival).
    pub fn replace(
        &self,
        key: &str,
        data: &[u8],
        expected: &ObjectVersion,
        patience: Patience,
    ) -> Result<Option<ObjectVersion>> {
        self.retry("replace", key, patience, || {
            self.backend.put_if_version(key, data, expected)
        })
    }

    pub fn delete(&self, key: &str, patience: Patience) -> Result<()> {
        self.retry("delete", key, patience, || self.backend.delete(key))
    }

    /// Objects under this volume's `relative` directory.
    pub fn list(&self, relative: &str, patience: Patience) -> Result<Vec<ListedObject>> {
        let prefix = self.key(relative);
        self.retry("list", &prefix, patience, || self.backend.list(&prefix))
    }

    pub fn load_config(&self, patience: Patience) -> Result<VolumeConfig> {
        let key = self.key("volume.json");
        let (data, _) = self
            .get(&key, patience)?
            .ok_or_else(|| VolumeError::NoVolume(self.location.to_string()))?;
        VolumeConfig::parse(&key, &data)
    }

    /// The manifest versions in the bucket, ascending.
    pub fn manifest_versions(&self, patience: Patience) -> Result<Vec<u64>> {
        let mut versions: Vec<u64> = self
            .list("manifests", patience)?
            .iter()
            .filter_map(|o| o.name.rsplit('/').next()?.parse().ok())
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    pub fn load_manifest(&self, version: u64, patience: Patience) -> Result<Manifest> {
        let key = self.manifest_key(version);
        let (data, _) = self
            .get(&key, patience)?
            .ok_or_else(|| VolumeError::Corrupt {
                object: key.clone(),
                problem: "it is missing (deleted while in use?)".into(),
            })?;
        let manifest = Manifest::decode(&key, &data)?;
        if manifest.version != version {
            return Err(VolumeError::Corrupt {
                object: key,
                problem: format!("it says it is version {}", manifest.version),
            });
        }
        Ok(manifest)
    }

    /// The state at `version`: back to the last full manifest, then every delta after it.
    /// Returns it and the version of that full manifest.
    pub fn load_state(
        &self,
        config: &VolumeConfig,
        version: u64,
        patience: Patience,
    ) -> Result<(BlockMap, u64)> {
        let mut chain = Vec::new();
        let mut at = version;
        loop {
            let manifest = self.load_manifest(at, patience)?;
            let key = self.manifest_key(at);
            self.check_identity(config, &key, &manifest)?;
            let full = manifest.kind == crate::format::ManifestKind::Full;
            let base = manifest.base_version;
            chain.push(manifest);
            if full {
                break;
            }
            if base + 1 != at {
                return Err(VolumeError::Corrupt {
                    object: key,
                    problem: format!("a delta at version {at} over version {base}"),
                });
            }
            at = base;
        }
        let full_version = chain.last().map_or(0, |m| m.version);
        let mut state = BlockMap::default();
        for manifest in chain.iter().rev() {
            state.apply(&self.manifest_key(manifest.version), manifest)?;
        }
        Ok((state, full_version))
    }

    /// Refuses a manifest of another volume or geometry.
    pub fn check_identity(
        &self,
        config: &VolumeConfig,
        key: &str,
        manifest: &Manifest,
    ) -> Result<()> {
        if manifest.volume_id != config.id_bytes()
            || manifest.size != config.size
            || manifest.block_size != config.block_size
        {
            return Err(VolumeError::Corrupt {
                object: key.to_string(),
                problem:
                    "it belongs to another volume (id, size or block size differ from volume.json)"
                        .into(),
            });
        }
        Ok(())
    }

    /// A snapshot's full manifest.
    pub fn load_snapshot(
        &self,
        config: &VolumeConfig,
        name: &str,
        patience: Patience,
    ) -> Result<Manifest> {
        let key = self.snapshot_key(name);
        let (data, _) = self
            .get(&key, patience)?
            .ok_or_else(|| VolumeError::NoSnapshot(name.to_string()))?;
        let manifest = Manifest::decode(&key, &data)?;
        self.check_identity(config, &key, &manifest)?;
        Ok(manifest)
    }
}
