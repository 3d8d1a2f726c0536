//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_cache::manifest::{compress_chunk, ChunkEntry, MANIFEST_VERSION};
use berth_cache::{BlobBackend, Compression, Manifest, Result};

/// Deterministic pseudo-random bytes (xorshift), so sources can be regenerated.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

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
/// It forwards to a real backend: nothing is simulated.
#[derive(Debug)]
pub struct Recording {
    pub inner: Arc<dyn BlobBackend>,
    pub reads: Mutex<Vec<Range<u64>>>,
    pub delay: Duration,
}

impl Recording {
    pub fn new(inner: Arc<dyn BlobBackend>, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            reads: Mutex::new(Vec::new()),
            delay,
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

/// A moto S3 server on loopback, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

/// `moto_server` in the virtual environment the project's scripts install into.
fn cached_moto_server() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(cache.join("berth/venv/bin/moto_server"))
}

fn moto_command() -> Option<Command> {
    let candidates = std::iter::once(PathBuf::from("moto_server")).chain(cached_moto_server());
    for program in candidates {
        let has_server = Command::new(&program)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if has_server.map(|s| s.success()).unwrap_or(false) {
            return Some(Command::new(program));
        }
    }
    let module = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stderr(Stdio::null())
        .status();
    if module.map(|s| s.success()).unwrap_or(false) {
        let mut command = Command::new("python3");
        command.args(["-m", "moto.server"]);
        return Some(command);
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one plain HTTP request to the server and returns the status line.
pub fn http_request(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    Ok(response.lines().next().unwrap_or_default().to_string())
}

impl Moto {
    /// Starts moto on `port` (a free one if `None`); `Err` says why it cannot.
    pub fn start(port: Option<u16>) -> std::result::Result<Self, String> {
        let mut command =
            moto_command().ok_or("moto is not installed (pip install 'moto[server]')")?;
        let port = port.unwrap_or_else(free_port);
        let child = command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start moto: {e}"))?;
        let mut moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_request(port, "GET", "/").is_ok_and(|s| s.contains("200")) {
                return Ok(moto);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = moto.child.kill();
        Err("moto did not start within 30 s".into())
    }

    pub fn create_bucket(&self, bucket: &str) {
        let status = http_request(self.port, "PUT", &format!("/{bucket}")).unwrap();
        assert!(status.contains("200"), "creating bucket: {status}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn s3_config(&self, bucket: &str) -> berth_cache::S3Config {
        berth_cache::S3Config {
            bucket: bucket.into(),
            prefix: "images".into(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            allow_http: true,
        }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reports why a test cannot run here. Returns normally (the test then returns early
/// and counts as passed) unless `BERTH_TESTS_NO_SKIP=1` is set, as CI sets it: then a
/// missing prerequisite is a failure.
pub fn skip(reason: &str) {
    if std::env::var_os("BERTH_TESTS_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("BERTH_TESTS_NO_SKIP=1, but this test would skip: {reason}");
    }
    eprintln!("skipping: {reason}");
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
