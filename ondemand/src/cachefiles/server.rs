//! The supervisor of a cachefiles server: owns `/dev/cachefiles`, mounts and unmounts
//! images for `berth mount` clients, and keeps a worker process serving.
//!
//! One process per host may hold the device, and erofs sends every fscache-mode mount
//! to the first bound cache, so one server serves every image of the machine; clients
//! hand it images over a socket in the cachefiles directory. The supervisor answers
//! OPEN itself (the object's size comes from the manifest, or the bootstrap file), serves
//! READs of bootstraps from the local file, and forwards READs of blobs, with the
//! object's anonymous descriptor, to the worker, which fetches through the cache engine
//! and completes them. It holds no engine, backend client or network code.
//!
//! Failover:
//! - the worker dies: requests simply wait; a new worker is started, given every image
//!   and object again, and every READ not completed yet (after [`WORKER_GRACE`] without
//!   a worker, waiting READs fail with EIO).
//! - the supervisor dies: the worker dies with it. Under a service manager with a
//!   descriptor store ([`super::fdstore`]) the device stays open; the restarted server
//!   takes it back, reloads the images it served from the state file in the cachefiles
//!   directory, writes `restore`, and the kernel hands it every unfinished request again
//!   (re-opening objects whose descriptors died; see [`OrphanReads`] for a descriptor
//!   that outlives the previous server). Without one, the kernel unbinds the
//!   cache and reads of the images fail with EIO (they never read as zeros).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use berth_cache::Manifest;
use serde::{Deserialize, Serialize};

use super::aligned::{copy_into_object, AlignedBuf, PAGE};
use super::device::{complete_read, Device, Request};
use super::fdstore;
use super::protocol::{ClientRequest, FromWorker, ImageSpec, ImageStatus, ServerReply, ToWorker};
use super::worker::WORKER_SOCKET_FD;
use crate::error::{IoContext, OndemandError, Result};
use crate::image::{file_digest, manifest_path_of};
use crate::ipc;
use crate::mount::{c_path, check_bootstrap, mount_erofs_readonly};
use crate::supervise::{ShutdownSignal, WorkerCommand};

/// The socket clients connect to, inside the cachefiles directory.
pub const SOCKET_NAME: &str = "berth.sock";
/// The images served, kept for a restarted server (inside the cachefiles directory).
pub const STATE_NAME: &str = "berth-images.json";
/// The cache tag bound (`tag` command); shows in `/proc/fs/fscache/caches`.
pub const CACHE_TAG: &str = "berth";
/// How long READs wait for a worker before they fail with EIO.
pub const WORKER_GRACE: Duration = Duration::from_secs(10);
/// How long a server started for one `berth mount` stays once nothing is mounted.
const IDLE_LINGER: Duration = Duration::from_secs(3);

/// How the server runs.
#[derive(Debug)]
pub struct ServerOptions {
    pub cachefiles_dir: PathBuf,
    pub worker: WorkerCommand,
    pub shutdown: ShutdownSignal,
    /// Exit once no image is mounted and no client is connected (a server started by
    /// `berth mount` itself).
    pub exit_when_idle: bool,
}

/// The state file: what a restarted server serves again.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    images: Vec<SavedImage>,
    /// The worker serving then: a restarted server waits for it to be gone before it
    /// writes `restore` (see `wait_for_previous_worker`).
    #[serde(default)]
    worker_pid: Option<u32>,
    /// Its start time (field 22 of `/proc/PID/stat`): a process that is exiting has an
    /// empty command line, so this is what tells it from a later process with the pid.
    #[serde(default)]
    worker_start_time: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedImage {
    spec: ImageSpec,
    fsid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the worker to open the blob.
    Adding,
    /// The mount(2) call is running in a helper thread.
    Mounting,
    Mounted,
    /// The umount(2) call is running in a helper thread.
    Unmounting,
}

struct Image {
    spec: ImageSpec,
    fsid: String,
    volume_key: String,
    manifest: Manifest,
    bootstrap: File,
    bootstrap_size: u64,
    phase: Phase,
    /// Clients waiting for this image's mount or unmount to finish.
    waiting: Vec<u64>,
}

#[derive(Debug)]
enum ObjectKind {
    /// An image's bootstrap (key: its fsid).
    Bootstrap(String),
    /// A data blob (key: its id).
    Blob(String),
}

struct Object {
    fd: OwnedFd,
    kind: ObjectKind,
}

struct PendingRead {
    object_id: u32,
    off: u64,
    len: u64,
    sent: bool,
    since: Instant,
}

/// READs the kernel handed over for objects this server holds no descriptor of. After a
/// restart, `restore` gives back every unfinished request; the kernel re-opens an object
/// first only if its last anonymous descriptor is closed. If a copy outlived the previous
/// server (a process still exiting, a descriptor in flight), the READ comes as it was and
/// cannot be completed: nothing here can write into that object. Once that copy is closed
/// the kernel would re-open the object, but only for a request it hands out again, so
/// `restore` is written again, with backoff, until no such READ is left.
struct OrphanReads {
    /// msg_id → object_id of the READs seen since the last `restore`.
    reads: BTreeMap<u32, u32>,
    /// When the first of them was seen.
    since: Instant,
    next_restore: Instant,
    interval: Duration,
    warned: bool,
}

/// The first re-`restore` after an orphan READ, and the longest wait between two.
const ORPHAN_RETRY_FIRST: Duration = Duration::from_millis(250);
const ORPHAN_RETRY_MAX: Duration = Duration::from_secs(2);
/// After this long the server names the processes still holding descriptors.
const ORPHAN_WARN_AFTER: Duration = Duration::from_secs(10);

enum WorkerState {
    Starting(Child),
    Ready(Child),
    /// None running; the next start is due then.
    Down(Instant),
}

/// What a helper thread finished.
enum Done {
    Mounted {
        fsid: String,
        outcome: io::Result<()>,
    },
    Unmounted {
        fsid: String,
        outcome: io::Result<()>,
    },
}

struct Server {
    dir: PathBuf,
    device: Device,
    listener: OwnedFd,
    clients: HashMap<u64, OwnedFd>,
    next_client: u64,
    images: BTreeMap<String, Image>,
    objects: HashMap<u32, Object>,
    pending: BTreeMap<u32, PendingRead>,
    orphans: Option<OrphanReads>,
    worker: WorkerState,
    socket: Option<OwnedFd>,
    command: WorkerCommand,
    failures: u32,
    down_since: Option<Instant>,
    done_sender: mpsc::Sender<Done>,
    done: mpsc::Receiver<Done>,
    wake: ShutdownSignal,
    idle_since: Option<Instant>,
    stopping: bool,
}

/// The fsid a mount gets unless one is given: stable for an image at a mount point (so
/// a remount finds its bootstrap cached) and unique per mount point, as erofs requires
/// within a domain.
pub fn default_fsid(bootstrap_digest: &str, mountpoint: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(bootstrap_digest.as_bytes());
    hasher.update(b"\0");
    hasher.update(mountpoint.as_os_str().as_encoded_bytes());
    format!("berth-{}", &hasher.finalize().to_hex()[..24])
}

/// Whether `name` works as an erofs fsid/domain id and cachefiles key: plain text
/// without separators the mount options or the cache's file names would misread.
pub fn valid_key(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Whether `path` is an erofs mount point now.
fn is_erofs_mount(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines().any(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let fstype = fields
                    .iter()
                    .position(|f| *f == "-")
                    .and_then(|dash| fields.get(dash + 1));
                fields.get(4).map(|m| unescape_mountinfo(m)) == Some(wanted.to_string())
                    && fstype == Some(&"erofs")
            })
        })
        .unwrap_or(false)
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn mount_erofs_fscache(image: &ImageSpec, fsid: &str, blob_id: &str) -> io::Result<()> {
    let target =
        c_path(&image.mountpoint).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut options = format!("fsid={fsid},device={blob_id}");
    if let Some(domain) = &image.domain_id {
        options.push_str(&format!(",domain_id={domain}"));
    }
    let data = std::ffi::CString::new(options)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    mount_erofs_readonly(
        c"none",
        &target,
        &data,
        &image.mountpoint,
        image.kernel_readahead,
    )
}

fn unmount(path: &Path) -> io::Result<()> {
    let target = c_path(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `target` is a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Server {
    fn worker_pid(&self) -> Option<u32> {
        match &self.worker {
            WorkerState::Starting(child) | WorkerState::Ready(child) => Some(child.id()),
            WorkerState::Down(_) => None,
        }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_NAME)
    }

    fn save_state(&self) {
        let state = SavedState {
            images: self
                .images
                .values()
                .filter(|i| matches!(i.phase, Phase::Mounted | Phase::Unmounting))
                .map(|i| SavedImage {
                    spec: i.spec.clone(),
                    fsid: i.fsid.clone(),
                })
                .collect(),
            worker_pid: self.worker_pid(),
            worker_start_time: self.worker_pid().and_then(process_start_time),
        };
        let outcome = serde_json::to_vec_pretty(&state)
            .map_err(io::Error::other)
            .and_then(|text| {
                berth_cache::blob_writer::write_file_atomically(&self.state_path(), &text)
                    .map_err(io::Error::other)
            });
        if let Err(err) = outcome {
            tracing::error!(
                "cannot record the served images in {}: {err}",
                self.state_path().display()
            );
        }
    }

    /// Checks an image and registers it (not mounted yet).
    fn register(&mut self, spec: ImageSpec, fsid: Option<String>, phase: Phase) -> Result<String> {
        let manifest_path = manifest_path_of(&spec.image);
        let manifest = Manifest::load(&manifest_path)?;
        let image_dir = manifest_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let bootstrap_path = image_dir.join(&manifest.bootstrap);
        check_bootstrap(&manifest, &bootstrap_path)?;
        let fsid = match fsid.or_else(|| spec.fsid.clone()) {
            Some(fsid) => fsid,
            None => default_fsid(&file_digest(&bootstrap_path)?, &spec.mountpoint),
        };
        for (what, key) in [
            ("fsid", Some(&fsid)),
            ("domain id", spec.domain_id.as_ref()),
        ] {
            if let Some(key) = key {
                if !valid_key(key) {
                    return Err(OndemandError::InvalidImage(format!(
                        "the {what} `{key}` is not usable: 1 to 128 letters, digits, `-`, `_` or `.`"
                    )));
                }
            }
        }
        if self.images.contains_key(&fsid) {
            return Err(OndemandError::InvalidImage(format!(
                "an image with fsid {fsid} is already served"
            )));
        }
        let bootstrap = File::open(&bootstrap_path)
            .context(|| format!("opening {}", bootstrap_path.display()))?;
        let bootstrap_size = bootstrap
            .metadata()
            .context(|| format!("reading {}", bootstrap_path.display()))?
            .len();
        let volume_key = format!("erofs,{}", spec.domain_id.as_deref().unwrap_or(&fsid));
        tracing::info!(fsid = %fsid, blob = %manifest.blob_id, mountpoint = %spec.mountpoint.display(), "serving image {}", spec.image.display());
        self.images.insert(
            fsid.clone(),
            Image {
                spec,
                fsid: fsid.clone(),
                volume_key,
                manifest,
                bootstrap,
                bootstrap_size,
                phase,
                waiting: Vec::new(),
            },
        );
        Ok(fsid)
    }

    fn reply(&mut self, client: u64, reply: &ServerReply) {
        if let Some(socket) = self.clients.get(&client) {
            if ipc::send(socket.as_raw_fd(), reply, None).is_err() {
                self.clients.remove(&client);
            }
        }
    }

    fn send_worker(&mut self, message: &ToWorker, fd: Option<RawFd>) -> bool {
        if !matches!(self.worker, WorkerState::Ready(_)) {
            return false;
        }
        let Some(socket) = &self.socket else {
            return false;
        };
        ipc::send(socket.as_raw_fd(), message, fd).is_ok()
    }

    fn add_to_worker(&mut self, fsid: &str) {
        let Some(image) = self.images.get(fsid) else {
            return;
        };
        let message = ToWorker::AddImage {
            key: fsid.to_string(),
            manifest: manifest_path_of(&image.spec.image),
            backend: image.spec.backend.clone(),
            prefetch: image.spec.prefetch,
        };
        self.send_worker(&message, None);
    }

    fn handle_client(&mut self, client: u64, request: ClientRequest) {
        match request {
            ClientRequest::Status => {
                let status = self
                    .images
                    .values()
                    .map(|i| ImageStatus {
                        spec: i.spec.clone(),
                        fsid: i.fsid.clone(),
                        blob_id: i.manifest.blob_id.clone(),
                        mounted: i.phase == Phase::Mounted,
                    })
                    .collect();
                self.reply(client, &ServerReply::Status(status));
            }
            ClientRequest::Mount(spec) => {
                if self.stopping {
                    self.reply(
                        client,
                        &ServerReply::Error("the server is shutting down".into()),
                    );
                    return;
                }
                if let Some(image) = self
                    .images
                    .values_mut()
                    .find(|i| i.spec.mountpoint == spec.mountpoint)
                {
                    if image.spec.image == spec.image && image.phase == Phase::Mounted {
                        let fsid = image.fsid.clone();
                        self.reply(
                            client,
                            &ServerReply::Mounted {
                                fsid,
                                already: true,
                            },
                        );
                    } else if image.spec.image == spec.image && image.phase != Phase::Unmounting {
                        image.waiting.push(client);
                    } else {
                        let message = format!(
                            "{} is in use by image {}",
                            spec.mountpoint.display(),
                            image.spec.image.display()
                        );
                        self.reply(client, &ServerReply::Error(message));
                    }
                    return;
                }
                match self.register(spec, None, Phase::Adding) {
                    Ok(fsid) => {
                        if let Some(image) = self.images.get_mut(&fsid) {
                            image.waiting.push(client);
                        }
                        self.add_to_worker(&fsid);
                    }
                    Err(err) => self.reply(client, &ServerReply::Error(err.to_string())),
                }
            }
            ClientRequest::Unmount { mountpoint } => {
                let found = self
                    .images
                    .values_mut()
                    .find(|i| i.spec.mountpoint == mountpoint)
                    .map(|i| {
                        i.waiting.push(client);
                        (i.fsid.clone(), i.phase)
                    });
                match found {
                    None => self.reply(
                        client,
                        &ServerReply::Error(format!(
                            "nothing is served at {}",
                            mountpoint.display()
                        )),
                    ),
                    Some((fsid, Phase::Mounted)) => self.start_unmount(&fsid),
                    // Mounting or adding: answered once that finishes (as Busy).
                    Some(_) => {}
                }
            }
        }
    }

    fn start_mount(&mut self, fsid: &str) {
        let Some(image) = self.images.get_mut(fsid) else {
            return;
        };
        image.phase = Phase::Mounting;
        let (spec, key, blob) = (
            image.spec.clone(),
            image.fsid.clone(),
            image.manifest.blob_id.clone(),
        );
        let (sender, wake) = (self.done_sender.clone(), self.wake.clone());
        // mount(2) waits for the bootstrap's OPEN and READs, which this thread answers:
        // it runs beside the loop.
        let spawned = std::thread::Builder::new()
            .name("berth-fscache-mount".into())
            .spawn(move || {
                let outcome = mount_erofs_fscache(&spec, &key, &blob);
                let _ = sender.send(Done::Mounted { fsid: key, outcome });
                wake.trigger();
            });
        if let Err(err) = spawned {
            let fsid = fsid.to_string();
            self.mount_done(&fsid, Err(err));
        }
    }

    fn start_unmount(&mut self, fsid: &str) {
        let Some(image) = self.images.get_mut(fsid) else {
            return;
        };
        image.phase = Phase::Unmounting;
        let (mountpoint, key) = (image.spec.mountpoint.clone(), image.fsid.clone());
        let (sender, wake) = (self.done_sender.clone(), self.wake.clone());
        // umount(2) waits for the daemon to read the CLOSE of each object.
        let spawned = std::thread::Builder::new()
            .name("berth-fscache-umount".into())
            .spawn(move || {
                let outcome = unmount(&mountpoint);
                let _ = sender.send(Done::Unmounted { fsid: key, outcome });
                wake.trigger();
            });
        if let Err(err) = spawned {
            let fsid = fsid.to_string();
            self.unmount_done(&fsid, Err(err));
        }
    }

    fn mount_done(&mut self, fsid: &str, outcome: io::Result<()>) {
        let Some(image) = self.images.get_mut(fsid) else {
            return;
        };
        let waiting = std::mem::take(&mut image.waiting);
        match outcome {
            Ok(()) => {
                image.phase = Phase::Mounted;
                tracing::info!(fsid, mountpoint = %image.spec.mountpoint.display(), "mounted image");
                self.save_state();
                for client in waiting {
                    self.reply(
                        client,
                        &ServerReply::Mounted {
                            fsid: fsid.to_string(),
                            already: false,
                        },
                    );
                }
            }
            Err(err) => {
                let message = format!(
                    "mounting {} on {} failed: {err}",
                    image.spec.image.display(),
                    image.spec.mountpoint.display()
                );
                tracing::error!("{message}");
                self.forget(fsid);
                for client in waiting {
                    self.reply(client, &ServerReply::Error(message.clone()));
                }
            }
        }
    }

    fn unmount_done(&mut self, fsid: &str, outcome: io::Result<()>) {
        let Some(image) = self.images.get_mut(fsid) else {
            return;
        };
        let waiting = std::mem::take(&mut image.waiting);
        let reply = match outcome {
            Ok(()) => {
                tracing::info!(fsid, mountpoint = %image.spec.mountpoint.display(), "unmounted image");
                self.forget(fsid);
                self.save_state();
                ServerReply::Unmounted
            }
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                // Unmounted behind our back: nothing is left to serve.
                self.forget(fsid);
                self.save_state();
                ServerReply::Unmounted
            }
            Err(err) => {
                image.phase = Phase::Mounted;
                if err.raw_os_error() == Some(libc::EBUSY) {
                    ServerReply::Busy
                } else {
                    ServerReply::Error(format!("unmounting failed: {err}"))
                }
            }
        };
        for client in waiting {
            self.reply(client, &reply);
        }
    }

    fn forget(&mut self, fsid: &str) {
        if self.images.remove(fsid).is_some() {
            self.send_worker(
                &ToWorker::RemoveImage {
                    key: fsid.to_string(),
                },
                None,
            );
        }
    }

    fn handle_open(
        &mut self,
        msg_id: u32,
        object_id: u32,
        volume_key: &str,
        cookie_key: &str,
        fd: OwnedFd,
    ) {
        // The kernel installs the descriptor without close-on-exec: a worker started
        // later would inherit it and keep the object alive past its CLOSE.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        let found = self.images.values().find_map(|image| {
            if image.volume_key != volume_key {
                None
            } else if image.fsid == cookie_key {
                Some((
                    ObjectKind::Bootstrap(image.fsid.clone()),
                    image.bootstrap_size,
                ))
            } else if image.manifest.blob_id == cookie_key {
                Some((
                    ObjectKind::Blob(image.manifest.blob_id.clone()),
                    image.manifest.blob_size,
                ))
            } else {
                None
            }
        });
        let Some((kind, size)) = found else {
            tracing::warn!(
                volume = volume_key,
                cookie = cookie_key,
                "refusing to open a cache object of no image served here"
            );
            if let Err(err) = self.device.copen(msg_id, -i64::from(libc::ENOENT)) {
                tracing::error!("{err}");
            }
            return;
        };
        tracing::debug!(object_id, ?kind, size, "cache object opened");
        if let Err(err) = self.device.copen(msg_id, size as i64) {
            tracing::error!("answering OPEN of {cookie_key}: {err}");
            return;
        }
        if let ObjectKind::Blob(blob_id) = &kind {
            let message = ToWorker::Object {
                object_id,
                blob_id: blob_id.clone(),
            };
            self.send_worker(&message, Some(fd.as_raw_fd()));
        }
        self.objects.insert(object_id, Object { fd, kind });
    }

    fn handle_read(&mut self, msg_id: u32, object_id: u32, off: u64, len: u64) {
        // `restore` hands out again every request not completed yet, those in the
        // worker's hands included: one already pending is the same request (message ids
        // are allocated cyclically over 32 bits).
        if self.pending.contains_key(&msg_id) {
            tracing::debug!(
                msg_id,
                object_id,
                "a READ handed out again; already in hand"
            );
            return;
        }
        let Some(object) = self.objects.get(&object_id) else {
            self.orphan_read(msg_id, object_id);
            return;
        };
        match &object.kind {
            ObjectKind::Bootstrap(fsid) => {
                let served = self
                    .images
                    .get(fsid)
                    .map(|image| serve_bootstrap(image, &object.fd, off, len));
                match served {
                    Some(Ok(())) => {}
                    Some(Err(err)) => {
                        tracing::error!(fsid = %fsid, "serving the bootstrap failed (the read gets EIO): {err}")
                    }
                    None => {
                        tracing::error!(fsid = %fsid, "a READ of the bootstrap of an image no longer served")
                    }
                }
                if let Err(err) = complete_read(object.fd.as_raw_fd(), msg_id) {
                    tracing::debug!(msg_id, "completing a READ: {err}");
                }
            }
            ObjectKind::Blob(_) => {
                self.pending.insert(
                    msg_id,
                    PendingRead {
                        object_id,
                        off,
                        len,
                        sent: false,
                        since: Instant::now(),
                    },
                );
                self.dispatch();
            }
        }
    }

    fn orphan_read(&mut self, msg_id: u32, object_id: u32) {
        let now = Instant::now();
        let orphans = self.orphans.get_or_insert_with(|| {
            tracing::warn!(
                object_id,
                msg_id,
                "a READ of an object this server never opened: a descriptor of it outlived \
                 the previous server; asking the kernel again once that copy is closed"
            );
            OrphanReads {
                reads: BTreeMap::new(),
                since: now,
                next_restore: now + ORPHAN_RETRY_FIRST,
                interval: ORPHAN_RETRY_FIRST,
                warned: false,
            }
        });
        orphans.reads.insert(msg_id, object_id);
    }

    /// Writes `restore` again while READs of unknown objects are waiting (see
    /// [`OrphanReads`]).
    fn retry_orphans(&mut self) {
        let Some(orphans) = self.orphans.as_mut() else {
            return;
        };
        let now = Instant::now();
        if now < orphans.next_restore {
            return;
        }
        if orphans.reads.is_empty() {
            // None came back after the last `restore`: the kernel re-opened their
            // objects and handed them out under the new ids.
            tracing::info!(
                waited_ms = orphans.since.elapsed().as_millis() as u64,
                "every READ of an object the previous server held is handed out again"
            );
            self.orphans = None;
            return;
        }
        if !orphans.warned && orphans.since.elapsed() > ORPHAN_WARN_AFTER {
            orphans.warned = true;
            let objects: Vec<u32> = orphans.reads.values().copied().collect();
            let holders = processes_holding_cachefiles_descriptors();
            tracing::error!(
                ?objects,
                holders = %if holders.is_empty() { "none found".to_string() } else { holders.join(", ") },
                "reads of these cache objects wait: a descriptor of them still outlives the \
                 previous server; they go on once the processes holding one close it"
            );
        }
        orphans.reads.clear();
        orphans.next_restore = now + orphans.interval;
        orphans.interval = (orphans.interval * 2).min(ORPHAN_RETRY_MAX);
        if let Err(err) = self.device.restore() {
            tracing::error!("asking the kernel for the waiting READs again: {err}");
        }
    }

    fn handle_close(&mut self, object_id: u32) {
        if let Some(object) = self.objects.remove(&object_id) {
            tracing::debug!(object_id, kind = ?object.kind, "cache object closed");
            if matches!(object.kind, ObjectKind::Blob(_)) {
                self.send_worker(&ToWorker::DropObject { object_id }, None);
            }
        }
        // Requests of a closed object are cancelled by the kernel.
        self.pending.retain(|_, read| read.object_id != object_id);
    }

    fn read_device(&mut self) {
        for _ in 0..256 {
            match self.device.read_request() {
                Ok(None) => return,
                Ok(Some(Ok(request))) => match request {
                    Request::Open {
                        msg_id,
                        object_id,
                        volume_key,
                        cookie_key,
                        fd,
                    } => self.handle_open(msg_id, object_id, &volume_key, &cookie_key, fd),
                    Request::Read {
                        msg_id,
                        object_id,
                        off,
                        len,
                    } => self.handle_read(msg_id, object_id, off, len),
                    Request::Close { object_id } => self.handle_close(object_id),
                },
                Ok(Some(Err(message))) => {
                    tracing::error!("a malformed cachefiles message: {message}")
                }
                Err(err) => {
                    tracing::error!("{err}");
                    return;
                }
            }
        }
    }

    /// Sends every unsent READ to a ready worker.
    fn dispatch(&mut self) {
        if !matches!(self.worker, WorkerState::Ready(_)) {
            return;
        }
        let unsent: Vec<(u32, u32, u64, u64)> = self
            .pending
            .iter()
            .filter(|(_, r)| !r.sent)
            .map(|(id, r)| (*id, r.object_id, r.off, r.len))
            .collect();
        for (msg_id, object_id, off, len) in unsent {
            if !self.send_worker(
                &ToWorker::Read {
                    msg_id,
                    object_id,
                    off,
                    len,
                },
                None,
            ) {
                return;
            }
            if let Some(read) = self.pending.get_mut(&msg_id) {
                read.sent = true;
            }
        }
    }

    fn spawn_worker(&mut self) -> Result<()> {
        let (ours, theirs) =
            ipc::socket_pair().context(|| "creating the worker's socket".into())?;
        let socket = theirs.as_raw_fd();
        let mut command = Command::new(&self.command.program);
        command.args(&self.command.args).stdin(Stdio::null());
        // SAFETY: runs between fork and exec and only calls dup2, which is
        // async-signal-safe; dup2 clears close-on-exec on the new number.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(socket, WORKER_SOCKET_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| OndemandError::Command {
            command: format!("{} (cachefiles worker)", self.command.program.display()),
            message: e.to_string(),
        })?;
        drop(theirs);
        ipc::set_nonblocking(ours.as_raw_fd(), true);
        tracing::info!(pid = child.id(), "started the cachefiles worker");
        self.socket = Some(ours);
        self.worker = WorkerState::Starting(child);
        self.save_state();
        Ok(())
    }

    fn worker_ready(&mut self) {
        if let WorkerState::Starting(child) =
            std::mem::replace(&mut self.worker, WorkerState::Down(Instant::now()))
        {
            tracing::info!(pid = child.id(), "the cachefiles worker is serving");
            self.worker = WorkerState::Ready(child);
        }
        self.failures = 0;
        self.down_since = None;
        // Everything it must know, in order: images, objects, then the waiting READs.
        let keys: Vec<String> = self.images.keys().cloned().collect();
        for key in keys {
            self.add_to_worker(&key);
        }
        let objects: Vec<(u32, String, RawFd)> = self
            .objects
            .iter()
            .filter_map(|(id, o)| match &o.kind {
                ObjectKind::Blob(blob) => Some((*id, blob.clone(), o.fd.as_raw_fd())),
                ObjectKind::Bootstrap(_) => None,
            })
            .collect();
        for (object_id, blob_id, fd) in objects {
            self.send_worker(&ToWorker::Object { object_id, blob_id }, Some(fd));
        }
        for read in self.pending.values_mut() {
            read.sent = false;
        }
        self.dispatch();
    }

    fn read_worker(&mut self) -> bool {
        loop {
            let Some(socket) = self.socket.as_ref().map(AsRawFd::as_raw_fd) else {
                return false;
            };
            match ipc::receive::<FromWorker>(socket) {
                Ok(Some((message, _))) => match message {
                    FromWorker::Ready => self.worker_ready(),
                    FromWorker::ImageAdded { key, error } => {
                        let phase = self.images.get(&key).map(|i| i.phase);
                        match (phase, error) {
                            (Some(Phase::Adding), None) => self.start_mount(&key),
                            (Some(Phase::Adding), Some(error)) => {
                                let waiting = self
                                    .images
                                    .get_mut(&key)
                                    .map(|i| std::mem::take(&mut i.waiting))
                                    .unwrap_or_default();
                                self.forget(&key);
                                for client in waiting {
                                    self.reply(client, &ServerReply::Error(error.clone()));
                                }
                            }
                            (_, Some(error)) => {
                                tracing::error!(fsid = %key, "the worker cannot serve a mounted image; its reads fail: {error}")
                            }
                            _ => {}
                        }
                    }
                    FromWorker::ReadDone { msg_id, .. } => {
                        self.pending.remove(&msg_id);
                    }
                },
                Ok(None) => return false,
                Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => return true,
                Err(err) => {
                    tracing::error!("the cachefiles worker's socket failed: {err}");
                    return false;
                }
            }
        }
    }

    fn worker_lost(&mut self) {
        self.socket = None;
        let mut child = match std::mem::replace(&mut self.worker, WorkerState::Down(Instant::now()))
        {
            WorkerState::Starting(child) | WorkerState::Ready(child) => child,
            down => {
                self.worker = down;
                return;
            }
        };
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        self.failures += 1;
        let delay = Duration::from_millis(100 * 2u64.pow(self.failures.min(6)));
        tracing::error!(
            pid = child.id(),
            "the cachefiles worker died ({status}); {} reads wait for a new one in {delay:?}",
            self.pending.len()
        );
        for read in self.pending.values_mut() {
            read.sent = false;
        }
        self.down_since.get_or_insert_with(Instant::now);
        self.worker = WorkerState::Down(Instant::now() + delay);
        // Images still being added are re-added by the next worker.
    }

    /// READs that waited longer than the grace period without a worker get EIO.
    fn fail_overdue(&mut self) {
        let Some(since) = self.down_since else { return };
        if since.elapsed() <= WORKER_GRACE {
            return;
        }
        let overdue: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, r)| r.since.elapsed() > WORKER_GRACE)
            .map(|(id, _)| *id)
            .collect();
        for msg_id in overdue {
            if let Some(read) = self.pending.remove(&msg_id) {
                tracing::error!(
                    object_id = read.object_id,
                    off = read.off,
                    len = read.len,
                    "failing a read with EIO: no cachefiles worker came up"
                );
                if let Some(object) = self.objects.get(&read.object_id) {
                    let _ = complete_read(object.fd.as_raw_fd(), msg_id);
                }
            }
        }
    }

    fn accept_clients(&mut self) {
        while let Ok(Some(client)) = ipc::accept(self.listener.as_raw_fd()) {
            let id = self.next_client;
            self.next_client += 1;
            self.clients.insert(id, client);
        }
    }

    fn read_client(&mut self, id: u64) {
        let Some(socket) = self.clients.get(&id).map(AsRawFd::as_raw_fd) else {
            return;
        };
        match ipc::receive::<ClientRequest>(socket) {
            Ok(Some((request, _))) => self.handle_client(id, request),
            Ok(None) => {
                self.clients.remove(&id);
            }
            Err(err) => {
                tracing::warn!("dropping a client that sent garbage: {err}");
                self.clients.remove(&id);
            }
        }
    }

    /// One round of the loop; returns whether the shutdown signal fired.
    fn poll_once(&mut self, shutdown: &ShutdownSignal) -> bool {
        let mut fds = vec![
            libc::pollfd {
                fd: shutdown.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.raw(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.device.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let socket_slot = self.socket.as_ref().map(|s| {
            fds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.len() - 1
        });
        let client_slots: Vec<(usize, u64)> = self
            .clients
            .iter()
            .map(|(id, s)| {
                fds.push(libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                (fds.len() - 1, *id)
            })
            .collect();
        // SAFETY: `fds` is a valid array for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if fds[2].revents != 0 {
            self.read_device();
        }
        if let Some(slot) = socket_slot {
            if fds[slot].revents != 0 && !self.read_worker() {
                self.worker_lost();
            }
        }
        if fds[1].revents != 0 {
            self.wake.triggered();
        }
        while let Ok(done) = self.done.try_recv() {
            match done {
                Done::Mounted { fsid, outcome } => self.mount_done(&fsid, outcome),
                Done::Unmounted { fsid, outcome } => self.unmount_done(&fsid, outcome),
            }
        }
        if fds[3].revents != 0 {
            self.accept_clients();
        }
        for (slot, id) in client_slots {
            if fds[slot].revents != 0 {
                self.read_client(id);
            }
        }
        let exited = match &mut self.worker {
            WorkerState::Starting(child) | WorkerState::Ready(child) => {
                matches!(child.try_wait(), Ok(Some(_)))
            }
            WorkerState::Down(_) => false,
        };
        if exited {
            self.worker_lost();
        }
        if let WorkerState::Down(at) = self.worker {
            if Instant::now() >= at && !self.stopping {
                if let Err(err) = self.spawn_worker() {
                    tracing::error!("cannot start a cachefiles worker: {err}");
                    self.failures += 1;
                    self.down_since.get_or_insert_with(Instant::now);
                    self.worker = WorkerState::Down(Instant::now() + Duration::from_secs(5));
                }
            }
        }
        self.fail_overdue();
        self.retry_orphans();
        self.dispatch();
        fds[0].revents != 0 && shutdown.triggered()
    }
}

/// The processes other than this one with a cachefiles anonymous descriptor open, as
/// "PID (NAME)", for an error message.
fn processes_holding_cachefiles_descriptors() -> Vec<String> {
    let own = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut holders = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[cachefiles]")
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            holders.push(format!("{pid} ({})", comm.trim()));
        }
    }
    holders
}

/// Copies `off..off + len` of the image's bootstrap into its cache object (whole
/// pages: cachefiles writes them with direct I/O).
fn serve_bootstrap(image: &Image, object: &OwnedFd, off: u64, len: u64) -> io::Result<()> {
    let start = off - off % PAGE as u64;
    let end = off.saturating_add(len).min(image.bootstrap_size);
    if start >= end {
        return Ok(());
    }
    let mut buffer = AlignedBuf::new(((end - start) as usize).min(1 << 20));
    copy_into_object(
        &image.bootstrap,
        object.as_raw_fd(),
        start,
        end - start,
        &mut buffer,
    )
}

/// Whether `dir` lies on tmpfs, where cachefiles cannot bind (no `sync_fs`).
fn on_tmpfs(dir: &Path) -> bool {
    let Ok(path) = c_path(dir) else { return false };
    // SAFETY: statfs writes into our zeroed struct; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == libc::TMPFS_MAGIC
}

/// How long a restarted server waits for the previous worker to be gone.
const PREVIOUS_WORKER_GRACE: Duration = Duration::from_secs(30);

/// Where a process is, from `/proc/PID/stat`: its state letter and start time (field 22,
/// in clock ticks since boot). `None` once it is reaped.
fn process_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after it are
    // counted from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 3 (the state) .. 22 (the start time): 19 more after the state.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

/// Whether process `pid`, started at `start_time`, still holds its descriptors. They are
/// closed when its last thread exits: a zombie leader (state Z) whose other threads are
/// still finishing (a fetch thread in a slow read, say) keeps them, and so the blob
/// caches' locks and the cachefiles objects.
fn process_running(pid: u32, start_time: u64) -> bool {
    match process_stat(pid) {
        Some((state, start)) if start == start_time => {
            if !matches!(state, 'Z' | 'X') {
                return true;
            }
            // Exited threads other than the leader are released at once: any listed here
            // is still running or exiting.
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|mut tasks| {
                tasks.any(|task| {
                    task.is_ok_and(|task| task.file_name().to_str() != Some(&pid.to_string()))
                })
            })
        }
        _ => false,
    }
}

fn process_start_time(pid: u32) -> Option<u64> {
    process_stat(pid).map(|(_, start)| start)
}

/// The previous server's worker (killed with it) may still be finishing a system call or
/// its exit. Until it is gone it holds the objects' descriptors and the blob caches'
/// locks: `restore` written meanwhile hands this server READs of objects whose
/// descriptors only that process has, and the new worker finds the blobs locked. So it is
/// killed (if it is still that berth cachefiles worker) and waited for, for a bounded
/// time. A process that is exiting has released its memory, so its command line reads
/// empty: it is recognised by its start time as well.
fn wait_for_previous_worker(pid: u32, saved_start_time: Option<u64>) {
    let Some((_, start_time)) = process_stat(pid) else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let named_worker =
        words.iter().any(|w| *w == b"fscache") && words.iter().any(|w| *w == b"--internal-worker");
    let same_process = saved_start_time == Some(start_time);
    // An old state file has no start time: only the command line can tell then.
    if !(same_process || (saved_start_time.is_none() && named_worker)) {
        return;
    }
    let alive = || process_running(pid, start_time);
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a pid checked above to be the previous berth worker and a
    // constant signal; no memory is involved.
    unsafe { libc::kill(raw_pid, libc::SIGKILL) };
    let started = Instant::now();
    while alive() {
        if started.elapsed() > PREVIOUS_WORKER_GRACE {
            tracing::warn!(pid, "the previous cachefiles worker is still not gone; restoring anyway (reads of objects it held wait until it is)");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(
        pid,
        waited_ms = started.elapsed().as_millis() as u64,
        "the previous cachefiles worker is gone"
    );
}

/// Runs the server until the shutdown signal fires (then unmounts everything it
/// serves, waiting while mounts are busy) or, with `exit_when_idle`, until nothing is
/// mounted any more.
pub fn serve(options: ServerOptions) -> Result<()> {
    let dir = options.cachefiles_dir.clone();
    std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir).context(|| format!("resolving {}", dir.display()))?;
    let inherited = fdstore::take_listen_fds()
        .into_iter()
        .find(|(name, _)| name == fdstore::DEVICE_FD_NAME)
        .map(|(_, fd)| fd);
    let restoring = inherited.is_some();
    let device = match inherited {
        Some(fd) => {
            tracing::info!("took /dev/cachefiles back from the service manager; restoring");
            Device::from_fd(fd)
        }
        None => {
            let device = Device::open()?;
            if on_tmpfs(&dir) {
                return Err(OndemandError::Io {
                    context: format!(
                        "using {} as the cachefiles directory: it is on tmpfs, which cachefiles \
                         cannot use; give a directory on ext4, xfs or another disk filesystem",
                        dir.display()
                    ),
                    source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
                });
            }
            device.bind(&dir, CACHE_TAG)?;
            tracing::info!(dir = %dir.display(), "bound the cachefiles cache (on-demand mode)");
            device
        }
    };
    if fdstore::enabled() && !restoring {
        let fd = device.try_clone_fd()?;
        if let Err(err) = fdstore::store_device(fd.as_raw_fd()) {
            tracing::warn!("cannot hand /dev/cachefiles to the service manager (no recovery after a restart): {err}");
        }
    }
    let socket_path = dir.join(SOCKET_NAME);
    let listener =
        ipc::listen(&socket_path).context(|| format!("listening on {}", socket_path.display()))?;
    ipc::set_nonblocking(listener.as_raw_fd(), true);
    let (done_sender, done) = mpsc::channel();
    let mut server = Server {
        dir: dir.clone(),
        device,
        listener,
        clients: HashMap::new(),
        next_client: 1,
        images: BTreeMap::new(),
        objects: HashMap::new(),
        pending: BTreeMap::new(),
        orphans: None,
        worker: WorkerState::Down(Instant::now()),
        socket: None,
        command: options.worker.clone(),
        failures: 0,
        down_since: None,
        done_sender,
        done,
        wake: ShutdownSignal::new()?,
        idle_since: None,
        stopping: false,
    };
    if restoring {
        let saved: SavedState = std::fs::read(server.state_path())
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok())
            .unwrap_or_default();
        if let Some(pid) = saved.worker_pid {
            wait_for_previous_worker(pid, saved.worker_start_time);
        }
        for image in saved.images {
            if !is_erofs_mount(&image.spec.mountpoint) {
                tracing::warn!(mountpoint = %image.spec.mountpoint.display(), "no longer mounted; not served again");
                continue;
            }
            let mountpoint = image.spec.mountpoint.clone();
            if let Err(err) = server.register(image.spec, Some(image.fsid), Phase::Mounted) {
                tracing::error!(mountpoint = %mountpoint.display(), "cannot serve again after the restart (its reads fail): {err}");
            }
        }
        server.save_state();
        // The previous daemon's descriptors died with it: the kernel re-opens objects
        // as their requests come round again.
        server.device.restore()?;
    }
    server.spawn_worker()?;
    let _ = fdstore::notify("READY=1", None);
    tracing::info!(socket = %socket_path.display(), images = server.images.len(), "serving erofs images over cachefiles");
    let mut served_any = restoring && !server.images.is_empty();
    loop {
        let signalled = server.poll_once(&options.shutdown);
        if signalled && !server.stopping {
            server.stopping = true;
            tracing::info!("unmounting {} images", server.images.len());
            let _ = fdstore::notify("STOPPING=1", None);
        }
        served_any |= !server.images.is_empty();
        if server.stopping {
            // Images not mounted yet are dropped; their clients hear why.
            let adding: Vec<String> = server
                .images
                .values()
                .filter(|i| i.phase == Phase::Adding)
                .map(|i| i.fsid.clone())
                .collect();
            for fsid in adding {
                let waiting = server
                    .images
                    .get_mut(&fsid)
                    .map(|i| std::mem::take(&mut i.waiting))
                    .unwrap_or_default();
                server.forget(&fsid);
                for client in waiting {
                    server.reply(
                        client,
                        &ServerReply::Error("the server is shutting down".into()),
                    );
                }
            }
            let mounted: Vec<String> = server
                .images
                .values()
                .filter(|i| i.phase == Phase::Mounted)
                .map(|i| i.fsid.clone())
                .collect();
            for fsid in mounted {
                server.start_unmount(&fsid);
            }
            if server.images.is_empty() {
                break;
            }
            // Busy mounts are retried after a pause, serving meanwhile.
            std::thread::sleep(Duration::from_millis(50));
        } else if options.exit_when_idle && served_any {
            if server.images.is_empty() && server.clients.is_empty() {
                let since = *server.idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() > IDLE_LINGER {
                    tracing::info!("nothing is mounted any more; exiting");
                    break;
                }
            } else {
                server.idle_since = None;
            }
        }
    }
    // Nothing is mounted: stop the worker, forget the device in the service manager,
    // and close it (dropping the server unbinds the cache).
    server.stopping = true;
    if let Some(socket) = &server.socket {
        let _ = ipc::send(socket.as_raw_fd(), &ToWorker::Stop, None);
    }
    if let WorkerState::Starting(mut child) | WorkerState::Ready(mut child) =
        std::mem::replace(&mut server.worker, WorkerState::Down(Instant::now()))
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = fdstore::remove_device();
    let _ = std::fs::remove_file(&socket_path);
    server.save_state();
    tracing::info!("the cachefiles server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_fsids_are_stable_per_mountpoint_and_valid() {
        let a = default_fsid("d1", Path::new("/mnt/a"));
        assert_eq!(a, default_fsid("d1", Path::new("/mnt/a")));
        assert_ne!(a, default_fsid("d1", Path::new("/mnt/b")));
        assert_ne!(a, default_fsid("d2", Path::new("/mnt/a")));
        assert!(valid_key(&a), "{a}");
        for bad in ["", "a,b", "a b", "a/b", "x=y", &"z".repeat(200)] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn process_stat_reads_state_and_start_time() {
        let (state, start) = process_stat(std::process::id()).expect("own stat");
        assert!(!matches!(state, 'Z' | 'X'), "{state}");
        assert!(start > 0);
        let mut child = Command::new("sleep").arg("30").spawn().expect("sleep");
        let (_, child_start) = process_stat(child.id()).expect("child stat");
        assert!(child_start >= start);
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(
            process_stat(child.id()),
            None,
            "a reaped process has no stat"
        );
    }

    #[test]
    fn previous_worker_is_known_by_its_start_time_only() {
        // A process of another start time (the pid reused) is left alone.
        let mut other = Command::new("sleep").arg("30").spawn().expect("sleep");
        let start = process_start_time(other.id()).expect("start time");
        wait_for_previous_worker(other.id(), Some(start + 1));
        assert!(
            other.try_wait().expect("try_wait").is_none(),
            "a stranger was killed"
        );
        // Without a recorded start time only a worker's command line counts.
        wait_for_previous_worker(other.id(), None);
        assert!(
            other.try_wait().expect("try_wait").is_none(),
            "a stranger was killed"
        );
        // The recorded process is killed and waited for, whatever its command line says
        // (an exiting one reads empty). It is our child, so it stays a zombie until reaped,
        // and a zombie counts as gone.
        wait_for_previous_worker(other.id(), Some(start));
        let status = other.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn a_zombie_leader_with_a_thread_left_still_holds_its_descriptors() {
        // The leader thread exits (pthread_exit) while another thread sleeps: the leader
        // reads as a zombie, yet the process, and its descriptors, are still there.
        let script = "import ctypes, threading, time\n\
            threading.Thread(target=time.sleep, args=(60,)).start()\n\
            ctypes.CDLL(None).pthread_exit(None)\n";
        let mut child = match Command::new("python3").args(["-c", script]).spawn() {
            Ok(child) => child,
            Err(err) => {
                eprintln!("SKIP: python3 is needed to make a zombie leader: {err}");
                return;
            }
        };
        let start = process_start_time(child.id()).expect("start time");
        let deadline = Instant::now() + Duration::from_secs(20);
        while process_stat(child.id()).is_some_and(|(state, _)| state != 'Z') {
            assert!(
                Instant::now() < deadline,
                "the leader never became a zombie"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            process_running(child.id(), start),
            "a zombie leader with a live thread counted as gone"
        );
        assert!(
            !process_running(child.id(), start + 1),
            "another start time"
        );
        child.kill().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(20);
        while process_running(child.id(), start) {
            assert!(Instant::now() < deadline, "the killed process never went");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().expect("wait");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
    }
}
