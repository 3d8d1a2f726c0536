//! Test support shared by berth's crates (a dev-dependency only): a real S3-compatible
//! server ([`Moto`]) on loopback, a plain HTTP proxy in front of it ([`CountingProxy`])
//! that records every request the server is sent and can inject faults (an outage, slow
//! requests, server errors, corrupted bodies, a response lost after the request took
//! effect), deterministic test data, and the skip rule CI turns into a failure; and for
//! benchmarks, free page reporting paused and free memory touched ([`memory`]).

pub mod memory;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Held while a test forks a helper process and while it opens something whose "in use"
/// check rests on a lock (a version table's OFD lock, a volume's or blob's `flock`). Between
/// fork and exec the child shares every open file description of the test process, locks
/// included, so a test opening a file at that moment on another thread would find it still
/// held by a handle it has already dropped. [`spawn_guarded`] returns only after the exec.
pub fn fork_guard() -> MutexGuard<'static, ()> {
    static FORK_GUARD: Mutex<()> = Mutex::new(());
    FORK_GUARD
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `command` under [`fork_guard`]; `Command::spawn` returns once the child has exec'd
/// (or failed to), so no descriptor of this process outlives the guard in the child.
pub fn spawn_guarded(command: &mut Command) -> std::io::Result<Child> {
    let _guard = fork_guard();
    command.spawn()
}

/// Deterministic pseudo-random bytes (xorshift), so sources can be regenerated.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&xorshift(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How long a bounded soak runs: `BERTH_VOLUME_SOAK_SECONDS` (`--soak-seconds` of the test
/// script), or `default` seconds.
pub fn soak_seconds(default: u64) -> u64 {
    std::env::var("BERTH_VOLUME_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The next number of a xorshift64 sequence (`state` must not be 0): the tests' fixed-seed
/// streams of offsets and sizes.
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
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

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
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
    pub fn start(port: Option<u16>) -> Result<Self, String> {
        Self::start_on("127.0.0.1", port)
    }

    /// Starts moto listening on `host` (e.g. `0.0.0.0` for a guest to reach it).
    pub fn start_on(host: &str, port: Option<u16>) -> Result<Self, String> {
        let mut command =
            moto_command().ok_or("moto is not installed (pip install 'moto[server]')")?;
        let port = port.unwrap_or_else(free_port);
        let child = command
            .args(["-H", host, "-p", &port.to_string()])
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

    /// Settings for bucket `bucket` under the prefix `images`.
    pub fn s3_config(&self, bucket: &str) -> S3Settings {
        S3Settings::new(&self.endpoint(), bucket, "images")
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

/// How to reach a bucket of the test server (kept free of berth's own types so that
/// every crate can use it; they convert it to theirs).
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl S3Settings {
    pub fn new(endpoint: &str, bucket: &str, prefix: &str) -> Self {
        Self {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: "us-east-1".into(),
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        }
    }

    /// The `AWS_*` environment a child process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ]
    }
}

/// One request a [`CountingProxy`] was sent.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The `Range: bytes=a-b` header as `a..b+1`.
    pub range: Option<Range<u64>>,
    /// Request body length.
    pub body_len: usize,
    /// The status the client was given (0: none, the connection was dropped).
    pub status: u16,
}

/// What a fault rule does to a request it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Close the client's connection without forwarding: the server is unreachable.
    Drop,
    /// Answer this status (e.g. 503) with an S3-style error body, without forwarding.
    Status(u16),
    /// Forward, wait for the server's answer, then close the client's connection without
    /// it: the request took effect but the client does not know.
    LoseResponse,
    /// Forward and flip bytes in the middle of the response body.
    CorruptBody,
    /// Wait this long before forwarding.
    Delay(Duration),
}

/// A fault injected into the requests matching `method` (any when `None`) whose path
/// contains `path_contains`, for the next `times` of them (every one when `None`).
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub method: Option<String>,
    pub path_contains: String,
    pub action: FaultAction,
    pub times: Option<u32>,
}

impl FaultRule {
    /// Every request, from now on.
    pub fn all(action: FaultAction) -> Self {
        Self {
            method: None,
            path_contains: String::new(),
            action,
            times: None,
        }
    }

    /// Requests of `method` on paths containing `path_contains`, every time.
    pub fn on(method: &str, path_contains: &str, action: FaultAction) -> Self {
        Self {
            method: Some(method.to_string()),
            path_contains: path_contains.to_string(),
            action,
            times: None,
        }
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
}

#[derive(Default)]
struct ProxyState {
    seen: Mutex<Vec<SeenRequest>>,
    faults: Mutex<Vec<FaultRule>>,
    delay_ms: AtomicU64,
    upstream: AtomicU64,
}

/// A plain HTTP proxy in front of the S3 server that records every request the server is
/// sent and injects faults: what the backend really saw, not what the client thinks it
/// asked for. One upstream connection per request (`Connection: close`).
pub struct CountingProxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

fn parse_range(value: &str) -> Option<Range<u64>> {
    let (start, end) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    Some(start.parse().ok()?..end.parse::<u64>().ok()? + 1)
}

fn status_of(response: &[u8]) -> u16 {
    String::from_utf8_lossy(response.get(..response.len().min(32)).unwrap_or_default())
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn proxy_one(mut client: TcpStream, state: &ProxyState) -> std::io::Result<()> {
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
    let action = {
        let mut faults = state.faults.lock().unwrap();
        let index = faults.iter().position(|rule| {
            rule.method.as_deref().is_none_or(|m| m == method)
                && path.contains(&rule.path_contains)
                && rule.times != Some(0)
        });
        index.map(|i| {
            if let Some(n) = faults[i].times.as_mut() {
                *n -= 1;
            }
            faults[i].action.clone()
        })
    };
    let record = |status: u16| {
        state.seen.lock().unwrap().push(SeenRequest {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            body_len: body.len(),
            status,
        });
    };
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    match &action {
        Some(FaultAction::Drop) => {
            record(0);
            return Ok(());
        }
        Some(FaultAction::Status(code)) => {
            record(*code);
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InjectedFault</Code><Message>injected by the test proxy</Message></Error>";
            write!(
                client,
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        Some(FaultAction::Delay(wait)) => std::thread::sleep(*wait),
        _ => {}
    }
    let upstream = state.upstream.load(Ordering::SeqCst) as u16;
    let mut server = match TcpStream::connect(("127.0.0.1", upstream)) {
        Ok(server) => server,
        Err(err) => {
            // A dead upstream shows as a dropped connection, as it would.
            record(0);
            return Err(err);
        }
    };
    server.write_all(forwarded.as_bytes())?;
    server.write_all(&body)?;
    let mut response = Vec::new();
    server.read_to_end(&mut response)?;
    let status = status_of(&response);
    match action {
        Some(FaultAction::LoseResponse) => {
            record(0);
            return Ok(());
        }
        Some(FaultAction::CorruptBody) => {
            if let Some(start) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let body_start = start + 4;
                let body_len = response.len() - body_start;
                if body_len > 0 {
                    let middle = body_start + body_len / 2;
                    for b in &mut response[middle..(middle + 8).min(body_start + body_len)] {
                        *b ^= 0x5a;
                    }
                }
            }
        }
        _ => {}
    }
    record(status);
    client.write_all(&response)?;
    Ok(())
}

impl CountingProxy {
    /// A proxy on a free loopback port forwarding to `upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<ProxyState> = Arc::default();
        state.upstream.store(u64::from(upstream), Ordering::SeqCst);
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(client, &state);
                });
            }
        });
        Self { port, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Delays every later request by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Adds a fault rule (rules are tried in the order added; the first that matches
    /// applies).
    pub fn add_fault(&self, rule: FaultRule) {
        self.state.faults.lock().unwrap().push(rule);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// The server is unreachable (every request dropped) until [`Self::clear_faults`].
    pub fn outage(&self) {
        self.add_fault(FaultRule::all(FaultAction::Drop));
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Requests of `method` whose path contains `path_contains`, from index `from` on.
    pub fn matching(&self, method: &str, path_contains: &str, from: usize) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap()[from..]
            .iter()
            .filter(|r| r.method == method && r.path.contains(path_contains))
            .cloned()
            .collect()
    }

    /// Ranged GETs of objects whose key ends with `object`, from index `from` of the log.
    pub fn range_reads(&self, object: &str, from: usize) -> Vec<Range<u64>> {
        self.state.seen.lock().unwrap()[from..]
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(object))
            .filter_map(|r| r.range.clone())
            .collect()
    }

    /// Requests seen so far.
    pub fn count(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }
}
