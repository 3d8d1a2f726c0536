//! Helpers shared by the integration tests.
// Each test binary uses a different part of these helpers and re-exports.
#![allow(dead_code, unused_imports)]

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use berth_testkit::{
    free_port, http_request, pseudo_random, skip, CountingProxy, FaultAction, FaultRule, Moto,
    SeenRequest,
};

use berth_cache::manifest::{compress_chunk, ChunkEntry, MANIFEST_VERSION};
use berth_cache::{BlobBackend, Compression, Manifest, Result};

/// Chunks `data`, uploads it as one object through `backend` and returns its manifest.
pub fn publish(
    data: &[u8],
    chunk_size: u32,
    compression: Compression,
    backend: &dyn BlobBackend,
) -> Manifest {
    let mut stored = Vec::new();
    let mut chunks = Vec::new();
    for chunk in data.chunks(chunk_size as usize) {
        let packed = compress_chunk(compression, chunk).unwrap();
        chunks.push(ChunkEntry {
            digest: blake3::hash(chunk).to_hex().to_string(),
            offset: stored.len() as u64,
            stored_size: packed.len() as u64,
        });
        stored.extend_from_slice(&packed);
    }
    let blob_id = blake3::hash(data).to_hex().to_string();
    let object = format!("blobs/{blob_id}");
    backend.put_bytes(&object, &stored).unwrap();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        blob_id,
        blob_size: data.len() as u64,
        chunk_size,
        compression,
        object,
        bootstrap: "boot.img".into(),
        bootstrap_digest: None,
        chunks,
        prefetch: Vec::new(),
    };
    manifest.validate().unwrap();
    manifest
}

/// A backend wrapper that records every range read and can slow reads down.
/// It forwards to a real backend: nothing is simulated. It asks for no merge limit of
/// its own unless made with [`Recording::limited`] (so the engine's bound alone decides
/// the reads of the tests that count them).
#[derive(Debug)]
pub struct Recording {
    pub inner: Arc<dyn BlobBackend>,
    pub reads: Mutex<Vec<Range<u64>>>,
    pub delay: Duration,
    pub merge_limit: Option<u64>,
}

impl Recording {
    pub fn new(inner: Arc<dyn BlobBackend>, delay: Duration) -> Arc<Self> {
        Self::limited(inner, delay, None)
    }
    /// As [`Recording::new`], asking the engine for reads of at most `merge_limit`.
    pub fn limited(
        inner: Arc<dyn BlobBackend>,
        delay: Duration,
        merge_limit: Option<u64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            reads: Mutex::new(Vec::new()),
            delay,
            merge_limit,
        })
    }
    pub fn reads(&self) -> Vec<Range<u64>> {
        self.reads.lock().unwrap().clone()
    }
}

impl BlobBackend for Recording {
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        self.reads.lock().unwrap().push(range.clone());
        std::thread::sleep(self.delay);
        self.inner.read_range(name, range)
    }
    fn merge_limit(&self, _name: &str) -> Option<u64> {
        self.merge_limit
    }
    fn size(&self, name: &str) -> Result<u64> {
        self.inner.size(name)
    }
    fn put_file(&self, name: &str, path: &Path) -> Result<()> {
        self.inner.put_file(name, path)
    }
    fn put_bytes(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_bytes(name, data)
    }
    fn describe(&self) -> String {
        format!("recording {}", self.inner.describe())
    }
}

/// `moto`'s settings as the cache's S3 configuration.
pub fn s3_config(moto: &Moto, bucket: &str) -> berth_cache::S3Config {
    to_s3_config(&moto.s3_config(bucket))
}

/// Test server settings as the cache's S3 configuration.
pub fn to_s3_config(settings: &berth_testkit::S3Settings) -> berth_cache::S3Config {
    berth_cache::S3Config {
        bucket: settings.bucket.clone(),
        prefix: settings.prefix.clone(),
        endpoint: Some(settings.endpoint.clone()),
        region: Some(settings.region.clone()),
        access_key_id: Some(settings.access_key_id.clone()),
        secret_access_key: Some(settings.secret_access_key.clone()),
        allow_http: true,
    }
}

/// A real backend whose replies can be bent: cut short, padded, or made to panic,
/// and which counts requests in flight. Used to prove the engine checks every reply.
#[derive(Debug)]
pub struct Faulty {
    pub inner: Arc<dyn BlobBackend>,
    pub mode: Mutex<Fault>,
    pub in_flight: std::sync::atomic::AtomicUsize,
    pub max_in_flight: std::sync::atomic::AtomicUsize,
    pub requests: std::sync::atomic::AtomicUsize,
    pub delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Short,
    Long,
    Panic,
}

impl Faulty {
    pub fn new(inner: Arc<dyn BlobBackend>, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            mode: Mutex::new(Fault::None),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            requests: Default::default(),
            delay,
        })
    }
    pub fn set(&self, fault: Fault) {
        *self.mode.lock().unwrap() = fault;
    }
}

impl BlobBackend for Faulty {
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        use std::sync::atomic::Ordering::SeqCst;
        self.requests.fetch_add(1, SeqCst);
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.max_in_flight.fetch_max(now, SeqCst);
        std::thread::sleep(self.delay);
        let result = self.inner.read_range(name, range);
        self.in_flight.fetch_sub(1, SeqCst);
        let mode = *self.mode.lock().unwrap();
        match (mode, result) {
            (Fault::Short, Ok(mut data)) => {
                data.truncate(data.len() / 2);
                Ok(data)
            }
            (Fault::Long, Ok(mut data)) => {
                data.extend_from_slice(&[0u8; 100]);
                Ok(data)
            }
            (Fault::Panic, _) => panic!("the backend wrapper panics, as a buggy backend might"),
            (_, result) => result,
        }
    }
    fn size(&self, name: &str) -> Result<u64> {
        self.inner.size(name)
    }
    fn put_file(&self, name: &str, path: &Path) -> Result<()> {
        self.inner.put_file(name, path)
    }
    fn put_bytes(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_bytes(name, data)
    }
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}

/// A real backend whose reads wait at a gate the test opens one read at a time, and
/// which records the order in which reads started. Makes priorities observable
/// without timing.
#[derive(Debug)]
pub struct Gated {
    pub inner: Arc<dyn BlobBackend>,
    state: Mutex<(Vec<Range<u64>>, usize)>,
    changed: std::sync::Condvar,
}

impl Gated {
    pub fn new(inner: Arc<dyn BlobBackend>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            state: Mutex::new((Vec::new(), 0)),
            changed: std::sync::Condvar::new(),
        })
    }
    /// Ranges of the reads started so far, in order.
    pub fn started(&self) -> Vec<Range<u64>> {
        self.state.lock().unwrap().0.clone()
    }
    /// Waits until `count` reads have started.
    pub fn wait_started(&self, count: usize) -> Vec<Range<u64>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut state = self.state.lock().unwrap();
        while state.0.len() < count {
            assert!(
                Instant::now() < deadline,
                "only {} reads started",
                state.0.len()
            );
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        state.0.clone()
    }
    /// Lets `count` more reads finish.
    pub fn release(&self, count: usize) {
        self.state.lock().unwrap().1 += count;
        self.changed.notify_all();
    }
}

/// Opens a [`Gated`] backend's gate for good when dropped. Declared after the engine, it
/// is dropped first, so the engine's workers never wait at the gate while the engine
/// joins them: a failing assertion is reported instead of hanging the test.
pub struct OpenGateOnDrop(pub Arc<Gated>);

impl Drop for OpenGateOnDrop {
    fn drop(&mut self) {
        self.0.release(1 << 30);
    }
}

impl BlobBackend for Gated {
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let mut state = self.state.lock().unwrap();
        state.0.push(range.clone());
        self.changed.notify_all();
        while state.1 == 0 {
            state = self.changed.wait(state).unwrap();
        }
        state.1 -= 1;
        drop(state);
        self.inner.read_range(name, range)
    }
    fn size(&self, name: &str) -> Result<u64> {
        self.inner.size(name)
    }
    fn put_file(&self, name: &str, path: &Path) -> Result<()> {
        self.inner.put_file(name, path)
    }
    fn put_bytes(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_bytes(name, data)
    }
    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
}
