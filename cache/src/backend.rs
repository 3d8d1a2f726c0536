//! Where blobs live: a local directory, S3-compatible object storage or plain HTTP
//! range reads, all behind the synchronous [`BlobBackend`] trait.
//!
//! Besides reads and uploads, a backend may offer what a writer that shares a store with
//! others needs (object-storage volumes: leases, versioned manifests, garbage
//! collection): whole-object reads with the object's version, conditional writes (create
//! only if absent, replace only if unchanged: S3's `If-None-Match: *` and `If-Match`),
//! deletion and listing. Backends without them answer [`CacheError::Unsupported`].

use std::fs::{self, File};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig, UpdateVersion,
    WriteMultipart,
};

use crate::error::{CacheError, IoContext, Result};

/// The version of a stored object a conditional write compares against (S3's ETag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion(pub String);

/// One object a listing found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Its name, relative to the backend (as the other calls take it).
    pub name: String,
    pub size: u64,
    /// Last modification, in milliseconds since the Unix epoch (the store's clock).
    pub modified_ms: i64,
}

/// A store of named blobs that can be read by byte range.
///
/// Names are relative, `/`-separated paths (for example `blobs/<id>`).
pub trait BlobBackend: Send + Sync + std::fmt::Debug {
    /// Reads exactly `range` of blob `name`; a short object is an error.
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>>;
    /// Reads exactly `buf.len()` bytes of blob `name` from `offset` into `buf` (the
    /// engine's fetch buffers, reused from fetch to fetch). The default goes through
    /// [`Self::read_range`]; a backend that can fill `buf` directly saves a copy.
    fn read_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = range_end(name, offset, buf.len())?;
        let data = self.read_range(name, offset..end)?;
        copy_whole_range(name, offset..end, &data, buf)
    }
    /// The longest read the cache engine should make of object `name` when it merges
    /// adjacent chunks, where this backend wants shorter reads than the engine's own
    /// bound ([`crate::CacheConfig::merge_max_bytes`]); `None` (the default) leaves it
    /// to that bound. Stores reached over a network pay a round trip per request and
    /// want long reads.
    fn merge_limit(&self, name: &str) -> Option<u64> {
        let _ = name;
        None
    }
    /// The size of blob `name` in bytes.
    fn size(&self, name: &str) -> Result<u64>;
    /// Stores the contents of the local file `path` as blob `name`.
    fn put_file(&self, name: &str, path: &Path) -> Result<()>;
    /// Stores `data` as blob `name`.
    fn put_bytes(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Stores `data` as blob `name`, taking a shared buffer: a backend that sends it as it
    /// is saves the copy [`Self::put_bytes`] makes (a retry sends the same buffer again).
    fn put_shared(&self, name: &str, data: bytes::Bytes) -> Result<()> {
        self.put_bytes(name, &data)
    }
    /// A short human description, for logs.
    fn describe(&self) -> String;

    /// The whole object `name` and its version, or `None` when there is none.
    fn get_versioned(&self, name: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        let _ = name;
        Err(CacheError::Unsupported("versioned reads"))
    }

    /// Stores `data` as `name` only if no object has that name: the new version, or
    /// `None` when one exists (nothing is written then).
    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Option<ObjectVersion>> {
        let _ = (name, data);
        Err(CacheError::Unsupported("conditional writes"))
    }

    /// Replaces `name` with `data` only if its current version is `expected`: the new
    /// version, or `None` when the object changed or is gone (nothing is written then).
    fn put_if_version(
        &self,
        name: &str,
        data: &[u8],
        expected: &ObjectVersion,
    ) -> Result<Option<ObjectVersion>> {
        let _ = (name, data, expected);
        Err(CacheError::Unsupported("conditional writes"))
    }

    /// Deletes `name`; deleting what is not there succeeds.
    fn delete(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(CacheError::Unsupported("deletion"))
    }

    /// Every object whose name starts with `prefix` followed by `/` (or every object
    /// when `prefix` is empty), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        let _ = prefix;
        Err(CacheError::Unsupported("listing"))
    }
}

/// The end of a read of `len` bytes from `offset` of blob `name`.
fn range_end(name: &str, offset: u64, len: usize) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| backend_error("read", name, "the range is too large", false))
}

/// Copies a backend's answer for `range` into `buf`, refusing a short or long one.
fn copy_whole_range(name: &str, range: Range<u64>, data: &[u8], buf: &mut [u8]) -> Result<()> {
    if data.len() != buf.len() {
        return Err(backend_error(
            "read",
            name,
            format!(
                "asked for bytes {}..{} ({} bytes), received {}",
                range.start,
                range.end,
                buf.len(),
                data.len()
            ),
            true,
        ));
    }
    buf.copy_from_slice(data);
    Ok(())
}

fn backend_error(
    operation: &'static str,
    name: &str,
    err: impl std::fmt::Display,
    transient: bool,
) -> CacheError {
    CacheError::Backend {
        operation,
        name: name.to_string(),
        message: err.to_string(),
        transient,
    }
}

/// Rejects a range whose end lies before its start.
fn check_range(name: &str, range: &Range<u64>) -> Result<usize> {
    if range.end < range.start {
        return Err(backend_error(
            "read",
            name,
            format!(
                "the range {}..{} ends before it starts",
                range.start, range.end
            ),
            false,
        ));
    }
    usize::try_from(range.end - range.start)
        .map_err(|_| backend_error("read", name, "the range is too large", false))
}

/// Alignment of direct reads of a local-directory backend (offset, length, buffer).
const DIRECT_ALIGN: usize = 4096;
/// The longest read the engine makes of a local directory when it merges chunks (one
/// 1 MiB chunk; see `LocalDirBackend::merge_limit`).
const LOCAL_MERGE_LIMIT: u64 = 1 << 20;
/// Reads of up to this many bytes go through the page cache: all the engine's reads of
/// chunks of up to 1 MiB, merged or not.
const DIRECT_MIN: usize = LOCAL_MERGE_LIMIT as usize;

/// Filesystem magic numbers (`statfs`'s `f_type`) of filesystems whose every read goes
/// to another machine or process: network filesystems, and FUSE (virtio-fs too) and 9p.
const REMOTE_FILESYSTEMS: [u64; 10] = [
    0x6573_5546, // FUSE
    0x6969,      // NFS
    0xff53_4d42, // CIFS
    0xfe53_4d42, // SMB2
    0x517b,      // SMB
    0x0102_1997, // 9p
    0x00c3_6400, // Ceph
    0x6b41_4653, // AFS (kAFS)
    0x5346_414f, // AFS
    0x7375_7245, // Coda
];

/// Whether `path` lies on one of [`REMOTE_FILESYSTEMS`].
fn on_remote_filesystem(path: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs64>::zeroed();
    // SAFETY: `file` is an open descriptor and `st` a properly sized out-buffer.
    if unsafe { libc::fstatfs64(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs64 succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    // f_type's width and sign differ between architectures; the magic is 32 bits.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64 & 0xffff_ffff;
    Ok(REMOTE_FILESYSTEMS.contains(&magic))
}

/// Reads `buf.len()` bytes of `path` at `offset` with `O_DIRECT`; `EINVAL` when the
/// filesystem or the alignment does not allow it.
fn read_direct(path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    file.read_exact_at(buf, offset)
}

/// Blobs stored as files under a local directory (the embedded default).
#[derive(Debug, Clone)]
pub struct LocalDirBackend {
    root: PathBuf,
}

impl LocalDirBackend {
    /// A backend rooted at `root`; the directory is created on the first upload.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory the blobs live in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, name: &str) -> Result<PathBuf> {
        let relative = Path::new(name);
        let only_normal = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if name.is_empty() || !only_normal {
            return Err(backend_error(
                "resolve",
                name,
                "the name is not a plain relative path",
                false,
            ));
        }
        Ok(self.root.join(relative))
    }
}

impl BlobBackend for LocalDirBackend {
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let path = self.path_of(name)?;
        let len = check_range(name, &range)?;
        let file = File::open(&path).map_err(|e| backend_error("read", name, e, true))?;
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, range.start).map_err(|e| {
            let transient = e.kind() != io::ErrorKind::UnexpectedEof;
            backend_error("read", name, e, transient)
        })?;
        Ok(data)
    }

    fn read_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let path = self.path_of(name)?;
        let read_error = |e: io::Error| {
            let transient = e.kind() != io::ErrorKind::UnexpectedEof;
            backend_error("read", name, e, transient)
        };
        // Reads longer than 1 MiB (only single chunks larger than that, see
        // `merge_limit`) bypass the page cache: what is fetched is kept in the cache file
        // (whose pages serve the readers), so a second cached copy of the stored object
        // would only cost a copy and memory. Shorter ones go through it, where the
        // kernel's readahead of the object serves the next reads. Whatever direct I/O
        // cannot do (a filesystem without it, an unaligned tail) is read through the
        // page cache too.
        let mut done = 0;
        let aligned = buf.len() - buf.len() % DIRECT_ALIGN;
        if aligned > DIRECT_MIN
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        {
            match read_direct(&path, offset, &mut buf[..aligned]) {
                Ok(()) => done = aligned,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(read_error(e)),
            }
        }
        if done < buf.len() {
            let file = File::open(&path).map_err(|e| backend_error("read", name, e, true))?;
            file.read_exact_at(&mut buf[done..], offset + done as u64)
                .map_err(read_error)?;
        }
        Ok(())
    }

    /// A read of a local disk costs no round trip, so merging chunks into one read buys
    /// nothing, while a long read holds back its first chunk until the last one is read,
    /// hashed and written. So the engine reads such a directory one chunk (of up to
    /// 1 MiB) at a time: each is ready as soon as it is read, and the reads go through
    /// the page cache, where the kernel's readahead of the stored file keeps the disk
    /// busy ahead of the engine's own read-ahead (cold sequential reads at 0.76–0.88 of
    /// the goal base against 0.55–0.73 with merged 4 MiB direct reads, docs/benchmarks.md).
    /// A directory on a network filesystem, FUSE (virtio-fs) or 9p pays a round trip
    /// per read, as a remote store does, and is read in merged reads.
    fn merge_limit(&self, name: &str) -> Option<u64> {
        let path = self.path_of(name).ok()?;
        match on_remote_filesystem(&path) {
            Ok(false) => Some(LOCAL_MERGE_LIMIT),
            Ok(true) => None,
            Err(err) => {
                tracing::debug!(path = %path.display(), "reading in merged reads: cannot tell the filesystem: {err}");
                None
            }
        }
    }

    fn size(&self, name: &str) -> Result<u64> {
        let path = self.path_of(name)?;
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| backend_error("stat", name, e, true))
    }

    fn put_file(&self, name: &str, path: &Path) -> Result<()> {
        let target = self.path_of(name)?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        // Copy to a temporary name first so a reader never sees a half-written blob, and
        // sync it: a stored object survives a power cut, as it would in a real store.
        let partial = target.with_extension("partial");
        fs::copy(path, &partial)
            .context(|| format!("copying {} to {}", path.display(), partial.display()))?;
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .context(|| format!("syncing {}", partial.display()))?;
        fs::rename(&partial, &target).context(|| format!("renaming {}", partial.display()))?;
        sync_parent(&target)
    }

    fn put_bytes(&self, name: &str, data: &[u8]) -> Result<()> {
        let target = self.path_of(name)?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        }
        let partial = target.with_extension("partial");
        fs::write(&partial, data).context(|| format!("writing {}", partial.display()))?;
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .context(|| format!("syncing {}", partial.display()))?;
        fs::rename(&partial, &target).context(|| format!("renaming {}", partial.display()))?;
        sync_parent(&target)
    }

    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    fn get_versioned(&self, name: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        let path = self.path_of(name)?;
        match fs::read(&path) {
            Ok(data) => {
                let version = local_version(&data);
                Ok(Some((data, version)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend_error("read", name, e, true)),
        }
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Option<ObjectVersion>> {
        let target = self.path_of(name)?;
        let staged = self.stage(name, &target, data)?;
        // link() refuses an existing name: the check and the write are one step.
        let linked = fs::hard_link(&staged, &target);
        let _ = fs::remove_file(&staged);
        match linked {
            Ok(()) => {
                sync_parent(&target)?;
                Ok(Some(local_version(data)))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(backend_error("upload", name, e, true)),
        }
    }

    fn put_if_version(
        &self,
        name: &str,
        data: &[u8],
        expected: &ObjectVersion,
    ) -> Result<Option<ObjectVersion>> {
        let target = self.path_of(name)?;
        // Compare and replace under a lock every writer of this directory takes.
        let _lock = self.conditional_lock()?;
        let current = match fs::read(&target) {
            Ok(current) => current,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend_error("read", name, e, true)),
        };
        if &local_version(&current) != expected {
            return Ok(None);
        }
        let staged = self.stage(name, &target, data)?;
        fs::rename(&staged, &target).map_err(|e| backend_error("upload", name, e, true))?;
        sync_parent(&target)?;
        Ok(Some(local_version(data)))
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path_of(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend_error("delete", name, e, true)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        let prefix = prefix.trim_matches('/');
        let start = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path_of(prefix)?
        };
        let mut out = Vec::new();
        let mut pending = vec![start];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(backend_error("list", prefix, e, true)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| backend_error("list", prefix, e, true))?;
                let meta = entry
                    .metadata()
                    .map_err(|e| backend_error("list", prefix, e, true))?;
                let path = entry.path();
                if meta.is_dir() {
                    pending.push(path);
                    continue;
                }
                let Ok(relative) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let name = relative.to_string_lossy().into_owned();
                // Staged copies of uploads in progress are not objects.
                if name.ends_with(".partial")
                    || name.contains("/.berth-")
                    || name.starts_with(".berth-")
                {
                    continue;
                }
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as i64);
                out.push(ListedObject {
                    name,
                    size: meta.len(),
                    modified_ms,
                });
            }
        }
        Ok(out)
    }
}

/// Syncs the directory holding `path`, so that a name just linked or renamed there
/// survives a power cut.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .context(|| format!("syncing the directory {}", parent.display()))
}

/// A local object's version: the digest of its content.
fn local_version(data: &[u8]) -> ObjectVersion {
    ObjectVersion(blake3::hash(data).to_hex().to_string())
}

impl LocalDirBackend {
    /// Writes `data` to a uniquely named file beside `target` (synced), for a link or
    /// rename into place.
    fn stage(&self, name: &str, target: &Path, data: &[u8]) -> Result<PathBuf> {
        use std::io::Write as _;
        let parent = target.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staged = parent.join(format!(".berth-stage-{}-{unique}", std::process::id()));
        let mut file = File::create(&staged).map_err(|e| backend_error("upload", name, e, true))?;
        file.write_all(data)
            .and_then(|()| file.sync_all())
            .map_err(|e| backend_error("upload", name, e, true))?;
        Ok(staged)
    }

    /// The lock conditional replacements of this directory take.
    fn conditional_lock(&self) -> Result<File> {
        fs::create_dir_all(&self.root).context(|| format!("creating {}", self.root.display()))?;
        let path = self.root.join(".berth-conditional.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(CacheError::Io {
                context: format!("locking {}", path.display()),
                source: io::Error::last_os_error(),
            });
        }
        Ok(file)
    }
}

/// Connection settings of an S3-compatible store.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Prefix put before every blob name (no leading or trailing `/` needed).
    pub prefix: String,
    /// Endpoint URL, e.g. of a self-hosted S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
}

/// A backend on an `object_store` store (S3 or HTTP), run on a small private
/// tokio runtime so callers stay synchronous.
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    description: String,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectStoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreBackend")
            .field("description", &self.description)
            .finish()
    }
}

/// Requests fail fast: the engine retries with its own backoff.
fn client_settings() -> (RetryConfig, ClientOptions) {
    let retry = RetryConfig {
        max_retries: 0,
        retry_timeout: Duration::from_secs(30),
        ..RetryConfig::default()
    };
    let options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(60));
    (retry, options)
}

fn private_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("berth-cache-io")
        .enable_all()
        .build()
        .context(|| "starting the backend's tokio runtime".to_string())
}

impl ObjectStoreBackend {
    /// An S3-compatible store. Settings left `None` fall back to the usual `AWS_*`
    /// environment variables.
    pub fn s3(config: &S3Config) -> Result<Self> {
        let (retry, options) = client_settings();
        // Our client defaults go in first and the environment on top of them:
        // `with_client_options` replaces every client setting, so applied after
        // `from_env` it would drop `AWS_ALLOW_HTTP`, `AWS_PROXY_URL` and the like.
        let mut builder = AmazonS3Builder::new()
            .with_retry(retry)
            .with_client_options(options);
        for (key, value) in std::env::vars_os() {
            let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
                continue;
            };
            if !key.starts_with("AWS_") {
                continue;
            }
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(config_key, value);
            }
        }
        builder = builder.with_bucket_name(&config.bucket);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if config.allow_http {
            builder = builder.with_allow_http(true);
        }
        let store = builder
            .build()
            .map_err(|e| build_error(&format!("s3://{}", config.bucket), e))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: config.prefix.trim_matches('/').to_string(),
            description: format!("s3://{}/{}", config.bucket, config.prefix.trim_matches('/')),
            runtime: private_runtime()?,
        })
    }

    /// Plain HTTP(S) range reads below `base_url` (read-only).
    pub fn http(base_url: &str) -> Result<Self> {
        let (retry, options) = client_settings();
        let store = HttpBuilder::new()
            .with_url(base_url)
            .with_retry(retry)
            .with_client_options(options.with_allow_http(true))
            .build()
            .map_err(|e| build_error(base_url, e))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: String::new(),
            description: base_url.to_string(),
            runtime: private_runtime()?,
        })
    }

    fn location(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{}", self.prefix, name))
        }
    }
}

fn classify(operation: &'static str, name: &str, err: object_store::Error) -> CacheError {
    let transient = !matches!(
        err,
        object_store::Error::NotFound { .. } | object_store::Error::NotSupported { .. }
    );
    backend_error(operation, name, err, transient)
}

/// Parts of at most this size are sent in one request when uploading.
const UPLOAD_PART_SIZE: usize = 16 << 20;

impl BlobBackend for ObjectStoreBackend {
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let location = self.location(name);
        let expected = check_range(name, &range)? as u64;
        if expected == 0 {
            return Ok(Vec::new());
        }
        let bytes = self
            .runtime
            .block_on(self.store.get_range(&location, range))
            .map_err(|e| classify("read", name, e))?;
        if bytes.len() as u64 != expected {
            return Err(backend_error(
                "read",
                name,
                format!("expected {expected} bytes, received {}", bytes.len()),
                true,
            ));
        }
        Ok(bytes.to_vec())
    }

    fn read_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let location = self.location(name);
        let end = range_end(name, offset, buf.len())?;
        let bytes = self
            .runtime
            .block_on(self.store.get_range(&location, offset..end))
            .map_err(|e| classify("read", name, e))?;
        copy_whole_range(name, offset..end, &bytes, buf)
    }

    fn size(&self, name: &str) -> Result<u64> {
        let location = self.location(name);
        self.runtime
            .block_on(self.store.head(&location))
            .map(|meta| meta.size)
            .map_err(|e| classify("stat", name, e))
    }

    fn put_file(&self, name: &str, path: &Path) -> Result<()> {
        let len = fs::metadata(path)
            .context(|| format!("reading {}", path.display()))?
            .len();
        if len <= UPLOAD_PART_SIZE as u64 {
            let data = fs::read(path).context(|| format!("reading {}", path.display()))?;
            return self.put_bytes(name, &data);
        }
        let location = self.location(name);
        let mut file = File::open(path).context(|| format!("opening {}", path.display()))?;
        self.runtime.block_on(async {
            let upload = self
                .store
                .put_multipart(&location)
                .await
                .map_err(|e| classify("upload", name, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_SIZE);
            let mut buffer = vec![0u8; UPLOAD_PART_SIZE];
            loop {
                let n = file
                    .read(&mut buffer)
                    .context(|| format!("reading {}", path.display()))?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| classify("upload", name, e))?;
                writer.write(&buffer[..n]);
            }
            writer
                .finish()
                .await
                .map_err(|e| classify("upload", name, e))?;
            Ok(())
        })
    }

    fn put_bytes(&self, name: &str, data: &[u8]) -> Result<()> {
        self.put_shared(name, bytes::Bytes::copy_from_slice(data))
    }

    fn put_shared(&self, name: &str, data: bytes::Bytes) -> Result<()> {
        let location = self.location(name);
        self.runtime
            .block_on(self.store.put(&location, PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| classify("upload", name, e))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn get_versioned(&self, name: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        let location = self.location(name);
        self.runtime.block_on(async {
            let result = match self.store.get(&location).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(classify("read", name, e)),
            };
            let version = version_of(result.meta.e_tag.clone(), result.meta.version.clone());
            let expected = result.meta.size;
            let data = result
                .bytes()
                .await
                .map_err(|e| classify("read", name, e))?;
            if data.len() as u64 != expected {
                return Err(backend_error(
                    "read",
                    name,
                    format!("expected {expected} bytes, received {}", data.len()),
                    true,
                ));
            }
            Ok(Some((data.to_vec(), version)))
        })
    }

    fn put_if_absent(&self, name: &str, data: &[u8]) -> Result<Option<ObjectVersion>> {
        let location = self.location(name);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        match self.runtime.block_on(
            self.store
                .put_opts(&location, payload, PutMode::Create.into()),
        ) {
            Ok(put) => Ok(Some(version_of(put.e_tag, put.version))),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(classify("upload", name, e)),
        }
    }

    fn put_if_version(
        &self,
        name: &str,
        data: &[u8],
        expected: &ObjectVersion,
    ) -> Result<Option<ObjectVersion>> {
        let location = self.location(name);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        let mode = PutMode::Update(UpdateVersion {
            e_tag: Some(expected.0.clone()),
            version: None,
        });
        match self
            .runtime
            .block_on(self.store.put_opts(&location, payload, mode.into()))
        {
            Ok(put) => Ok(Some(version_of(put.e_tag, put.version))),
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(classify("upload", name, e)),
        }
    }

    fn delete(&self, name: &str) -> Result<()> {
        let location = self.location(name);
        match self.runtime.block_on(self.store.delete(&location)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(classify("delete", name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        use futures_util::stream::TryStreamExt;
        let prefix = prefix.trim_matches('/');
        let full = match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, _) => prefix.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{prefix}", self.prefix),
        };
        let location = ObjectPath::from(full);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let listed: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&location)).try_collect())
            .map_err(|e| classify("list", prefix, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.as_ref().strip_prefix(&strip)?.to_string();
                Some(ListedObject {
                    name,
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis(),
                })
            })
            .collect())
    }
}

/// The version a conditional write compares: the ETag (or the store's version id).
fn version_of(e_tag: Option<String>, version: Option<String>) -> ObjectVersion {
    ObjectVersion(e_tag.or(version).unwrap_or_default())
}

/// Opens the backend named by `spec`:
/// - `s3://BUCKET[/PREFIX]` (endpoint, region and credentials from the `AWS_*`
///   environment variables, e.g. `AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true`),
/// - `http://…` or `https://…` (read-only range reads),
/// - `file://DIR` or a plain directory path.
pub fn open_backend(spec: &str) -> Result<Arc<dyn BlobBackend>> {
    if let Some(rest) = spec.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CacheError::InvalidBackend(spec.to_string()));
        }
        let config = S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            ..S3Config::default()
        };
        return Ok(Arc::new(ObjectStoreBackend::s3(&config)?));
    }
    if spec.starts_with("http://") || spec.starts_with("https://") {
        return Ok(Arc::new(ObjectStoreBackend::http(spec)?));
    }
    let dir = spec.strip_prefix("file://").unwrap_or(spec);
    if dir.is_empty() {
        return Err(CacheError::InvalidBackend(spec.to_string()));
    }
    Ok(Arc::new(LocalDirBackend::new(dir)))
}

/// What building an object-store client for `backend` failing means: a location it does
/// not understand, or an HTTP client that cannot be made (in practice, TLS without any
/// trusted root certificate).
fn build_error(backend: &str, err: object_store::Error) -> CacheError {
    match err {
        object_store::Error::Generic {
            store: "HTTP client",
            source,
        } => CacheError::BackendSetup {
            backend: backend.to_string(),
            message: format!(
                "{source} (the usual cause is no trusted CA certificate on this host: \
                     install the ca-certificates package, or point SSL_CERT_FILE at a bundle)"
            ),
        },
        other => CacheError::InvalidBackend(format!("{backend}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_on_a_local_filesystem_is_read_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalDirBackend::new(dir.path());
        backend.put_bytes("blobs/a", b"data").unwrap();
        if on_remote_filesystem(dir.path()).unwrap() {
            eprintln!("SKIP: the temporary directory is on a network or FUSE filesystem");
            return;
        }
        assert_eq!(backend.merge_limit("blobs/a"), Some(LOCAL_MERGE_LIMIT));
        // procfs is local too; an object that does not exist says nothing of its
        // filesystem, so the engine's own bound stays.
        assert!(!on_remote_filesystem(Path::new("/proc")).unwrap());
        assert_eq!(backend.merge_limit("blobs/missing"), None);
    }

    /// A page-aligned window of `len` bytes inside `storage`.
    fn aligned(storage: &mut [u8], len: usize) -> &mut [u8] {
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        &mut storage[start..start + len]
    }

    #[test]
    fn reads_into_a_buffer_match_range_reads_direct_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalDirBackend::new(dir.path());
        // Not a multiple of the direct I/O alignment, so reads at the end have a tail.
        let data: Vec<u8> = (0..(3 << 20) + 1234u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        backend.put_bytes("blobs/x", &data).unwrap();
        let mut storage = vec![0u8; (4 << 20) + DIRECT_ALIGN];
        // (offset, length, aligned buffer): direct reads, reads with a tail, an
        // unaligned offset, an unaligned buffer, a small read.
        let cases = [
            (0usize, 2 << 20, true),
            (1 << 20, data.len() - (1 << 20), true),
            (4096, (1 << 20) + 100, true),
            (513, 1 << 20, true),
            (0, 1 << 20, false),
            (8192, 4096, true),
        ];
        for (offset, len, is_aligned) in cases {
            let buf = if is_aligned {
                aligned(&mut storage, len)
            } else {
                let start = storage.as_ptr().align_offset(DIRECT_ALIGN) + 1;
                &mut storage[start..start + len]
            };
            buf.fill(0xee);
            backend
                .read_range_into("blobs/x", offset as u64, buf)
                .unwrap();
            assert!(
                buf == &data[offset..offset + len],
                "bytes {offset}..{} differ",
                offset + len
            );
        }
        // Past the end of the object: an error that retrying does not cure, direct
        // path or not.
        for (offset, len) in [(2 << 20, 2 << 20), (data.len() - 10, 20)] {
            let buf = aligned(&mut storage, len);
            let err = backend
                .read_range_into("blobs/x", offset as u64, buf)
                .unwrap_err();
            assert!(!err.is_transient(), "{err}");
        }
    }
}
