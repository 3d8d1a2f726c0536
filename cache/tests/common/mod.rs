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

/// One request a [`CountingProxy`] forwarded.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The `Range: bytes=a-b` header as `a..b+1`.
    pub range: Option<Range<u64>>,
}

/// A plain HTTP proxy in front of the S3 server that records every request the server
/// is sent and can delay each one: what the backend really saw, not what the engine
/// thinks it asked for. One upstream connection per request (`Connection: close`).
pub struct CountingProxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

fn parse_range(value: &str) -> Option<Range<u64>> {
    let (start, end) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    Some(start.parse().ok()?..end.parse::<u64>().ok()? + 1)
}

fn proxy_one(
    mut client: TcpStream,
    upstream: u16,
    seen: &Mutex<Vec<SeenRequest>>,
    delay_ms: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut length = 0usize;
    let mut range = None;
    let mut forwarded = format!("{request_line}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "range" => range = parse_range(value),
            "connection" => continue,
            _ => {}
        }
        forwarded.push_str(line);
        forwarded.push_str("\r\n");
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0u8; length];
    client.read_exact(&mut body)?;
    seen.lock().unwrap().push(SeenRequest {
        method,
        path,
        range,
    });
    let delay = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(forwarded.as_bytes())?;
    server.write_all(&body)?;
    std::io::copy(&mut server, &mut client)?;
    Ok(())
}

impl CountingProxy {
    pub fn start(upstream: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
        let delay_ms: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (log, delay) = (seen.clone(), delay_ms.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (log, delay) = (log.clone(), delay.clone());
                std::thread::spawn(move || {
                    // A dead upstream shows as a dropped connection, as it would.
                    let _ = proxy_one(client, upstream, &log, &delay);
                });
            }
        });
        Self {
            port,
            seen,
            delay_ms,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Delays every later request by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Ranged GETs of objects whose key ends with `object`, from index `from` of the log.
    pub fn range_reads(&self, object: &str, from: usize) -> Vec<Range<u64>> {
        self.seen.lock().unwrap()[from..]
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(object))
            .filter_map(|r| r.range.clone())
            .collect()
    }

    /// Requests seen so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}
