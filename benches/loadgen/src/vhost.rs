//! Drives a vhost-user-fs daemon through berth-frontend: one thread per request queue, up to
//! `depth` operations in flight per queue, every reply checked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_frontend::fuse::{
    opcode, parse_direntplus, parse_struct, AttrOut, CreateIn, ForgetIn, GetattrIn, OpenIn,
    OpenOut, ReleaseIn, WriteIn, WriteOut, ROOT_ID,
};
use berth_frontend::queue::queue_memory_footprint;
use berth_frontend::{
    Completion, DeviceConfig, EntryOut, FsQueue, QueueConfig, Request, VhostUserFs,
};
use vm_memory::ByteValued;

use crate::daemon::ProcSample;
use crate::fileset::{self, FileSet, WRITE_FILE_BASE};
use crate::pattern;
use crate::workload::{
    harness, remember_write, take_queue, Case, Offsets, Rng, RunResult, WorkerResult, Workload,
    READDIR_BUFFER,
};

/// How the frontend is set up.
#[derive(Debug, Clone, Copy)]
pub struct FrontendOptions {
    pub event_idx: bool,
    pub timeout: Duration,
}

/// Connects to `socket`, sends FUSE_INIT and runs `case` on `case.threads` request queues.
pub fn run(
    socket: &std::path::Path,
    files: &FileSet,
    case: &Case,
    options: FrontendOptions,
    sampler: &(dyn Fn() -> Option<ProcSample> + Sync),
    on_connected: &dyn Fn(),
) -> Result<RunResult> {
    let queues = u16::try_from(case.threads).context("too many queues")?;
    let size = (4 * case.depth).next_power_of_two().max(16);
    let queue = QueueConfig {
        size,
        depth: case.depth,
        max_data: case.workload.max_data(),
        timeout: options.timeout,
    };
    let memory = queue_memory_footprint(&queue) * (u64::from(queues) + 1) + (1 << 20);
    let config = DeviceConfig {
        memory_size: usize::try_from((memory + 4095) & !4095)?,
        request_queues: queues,
        queue,
        socket_timeout: Duration::from_secs(10),
        event_idx: options.event_idx,
    };
    let mut device = VhostUserFs::connect(socket, config, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let mut all_queues = device.take_request_queues();
    let init = all_queues[0].init_default().context("FUSE_INIT failed")?;
    if let Workload::Write { size, .. } = case.workload {
        if init.max_write < size {
            bail!(
                "the daemon accepts writes of {} bytes at most",
                init.max_write
            );
        }
    }
    on_connected();
    let slots: Vec<Mutex<Option<FsQueue>>> =
        all_queues.drain(..).map(|q| Mutex::new(Some(q))).collect();
    let result = harness(
        case.threads,
        case.duration,
        sampler,
        |index| {
            let queue = take_queue(&slots, index)?;
            Worker::new(queue, files, case, index)
        },
        |worker, stop| worker.run(stop),
    )?;
    device.disconnect();
    Ok(result)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Io,
    Lookup,
    Getattr,
    Forget,
    Create,
    Release,
    Unlink,
    Opendir,
    Readdir,
    Releasedir,
    BatchForget,
}

struct Job {
    phase: Phase,
    unique: u64,
    rng: Rng,
    file: usize,
    op_started: Instant,
    request_started: Instant,
    offset: u64,
    dir: usize,
    entry: usize,
    nodeid: u64,
    fh: u64,
    dir_offset: u64,
    name: Vec<u8>,
    churn_counter: u64,
    seen: Vec<bool>,
    entries_seen: usize,
    forgets: Vec<(u64, u64)>,
}

struct Worker<'a> {
    queue: FsQueue,
    files: &'a FileSet,
    case: Case,
    index: usize,
    jobs: Vec<Job>,
    /// (nodeid, fh) of each data or write file, by file index.
    open_files: Vec<(u64, u64)>,
    /// Nodeids of the tree directories or churn directories.
    dirs: Vec<u64>,
    offsets: Offsets,
    args: Vec<u8>,
    payload: Vec<u8>,
    result: WorkerResult,
    counting: bool,
}

fn lookup_path(queue: &mut FsQueue, path: &[&str]) -> Result<u64> {
    let mut node = ROOT_ID;
    for part in path {
        node = queue
            .lookup(node, part.as_bytes())
            .with_context(|| format!("LOOKUP {part}"))?
            .nodeid;
    }
    Ok(node)
}

fn reply_error(done: &Completion) -> Result<()> {
    match done.header {
        Some(header) if header.error != 0 => Err(anyhow!(
            "{} failed: {}",
            berth_frontend::fuse::opcode_name(done.opcode),
            std::io::Error::from_raw_os_error(-header.error)
        )),
        _ => Ok(()),
    }
}

impl<'a> Worker<'a> {
    fn new(mut queue: FsQueue, files: &'a FileSet, case: &Case, index: usize) -> Result<Self> {
        let depth = usize::from(case.depth);
        let file_of = |job: usize| (index * depth + job) % case.files;
        let needed: Vec<usize> = {
            let mut needed: Vec<usize> = (0..depth).map(file_of).collect();
            needed.sort_unstable();
            needed.dedup();
            needed
        };
        let mut open_files = vec![(0, 0); fileset::FILES];
        let mut dirs = Vec::new();
        match case.workload {
            Workload::Read { .. } | Workload::Write { .. } => {
                let writing = matches!(case.workload, Workload::Write { .. });
                for &file in &needed {
                    let name = if writing {
                        fileset::write_name(file)
                    } else {
                        fileset::data_name(file)
                    };
                    let node = lookup_path(&mut queue, &[&name])?;
                    let flags = if writing {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    let fh = queue.open(node, flags as u32).context("OPEN")?.fh;
                    open_files[file] = (node, fh);
                }
            }
            Workload::LookupGetattr | Workload::Readdirplus => {
                let tree = lookup_path(&mut queue, &["tree"])?;
                for dir in 0..files.layout.tree_dirs {
                    let name = fileset::dir_name(dir);
                    dirs.push(
                        queue
                            .lookup(tree, name.as_bytes())
                            .with_context(|| format!("LOOKUP {name}"))?
                            .nodeid,
                    );
                }
            }
            Workload::CreateUnlink => {
                let churn = lookup_path(&mut queue, &["churn"])?;
                for file in 0..fileset::FILES {
                    let name = fileset::churn_name(file);
                    dirs.push(
                        queue
                            .lookup(churn, name.as_bytes())
                            .with_context(|| format!("LOOKUP {name}"))?
                            .nodeid,
                    );
                }
            }
        }
        let (size, random) = match case.workload {
            Workload::Read { size, random } | Workload::Write { size, random } => (size, random),
            _ => (4096, true),
        };
        let now = Instant::now();
        let jobs = (0..depth)
            .map(|job| Job {
                phase: Phase::Idle,
                unique: 0,
                rng: Rng::new(((index as u64) << 32) + job as u64 + 1 + (case.generation << 48)),
                file: file_of(job),
                op_started: now,
                request_started: now,
                offset: 0,
                dir: (index * depth + job) % files.layout.tree_dirs.max(1),
                entry: 0,
                nodeid: 0,
                fh: 0,
                dir_offset: 0,
                name: Vec::new(),
                churn_counter: 0,
                seen: Vec::new(),
                entries_seen: 0,
                forgets: Vec::new(),
            })
            .collect();
        Ok(Self {
            queue,
            files,
            case: *case,
            index,
            jobs,
            open_files,
            dirs,
            offsets: Offsets::new(size, files.layout.file_size, random, fileset::FILES),
            args: Vec::with_capacity(4096),
            payload: Vec::with_capacity(case.workload.max_data() as usize),
            result: WorkerResult::default(),
            counting: true,
        })
    }

    fn run(mut self, stop: &AtomicBool) -> Result<WorkerResult> {
        for job in 0..self.jobs.len() {
            self.begin_op(job)?;
        }
        self.queue.notify()?;
        let mut done = Completion {
            unique: 0,
            opcode: 0,
            header: None,
            body: Vec::new(),
            used_len: 0,
        };
        while self.jobs.iter().any(|j| j.phase != Phase::Idle) {
            self.queue.next_completion_into(&mut done)?;
            if self.counting && stop.load(Ordering::Relaxed) {
                self.counting = false;
            }
            let job = self
                .jobs
                .iter()
                .position(|j| j.unique == done.unique && j.phase != Phase::Idle)
                .ok_or_else(|| anyhow!("a reply matches no request (unique {:#x})", done.unique))?;
            reply_error(&done)?;
            self.advance(job, &done)?;
            self.queue.notify()?;
        }
        self.result.kicks = self.queue.virtqueue_ref().kicks_sent();
        Ok(self.result)
    }

    /// Starts a new operation on `job`, unless the run is over.
    fn begin_op(&mut self, job: usize) -> Result<()> {
        if !self.counting {
            self.jobs[job].phase = Phase::Idle;
            return Ok(());
        }
        let now = Instant::now();
        let tree_files = self.files.layout.files_per_dir as u64;
        let tree_dirs = self.files.layout.tree_dirs as u64;
        let j = &mut self.jobs[job];
        j.op_started = now;
        j.phase = match self.case.workload {
            Workload::Read { .. } | Workload::Write { .. } => {
                j.offset = self.offsets.next(j.file, &mut j.rng);
                Phase::Io
            }
            Workload::LookupGetattr => {
                j.dir = j.rng.below(tree_dirs) as usize;
                j.entry = j.rng.below(tree_files) as usize;
                Phase::Lookup
            }
            Workload::CreateUnlink => {
                j.churn_counter += 1;
                j.name = format!(
                    "c{}-{}-{}-{}",
                    self.case.generation, self.index, job, j.churn_counter
                )
                .into_bytes();
                Phase::Create
            }
            Workload::Readdirplus => {
                j.dir = (j.dir + 1) % tree_dirs as usize;
                j.dir_offset = 0;
                j.entries_seen = 0;
                j.seen.clear();
                j.seen.resize(tree_files as usize, false);
                j.forgets.clear();
                Phase::Opendir
            }
        };
        self.issue(job)
    }

    /// Submits the request of `job`'s current phase.
    fn issue(&mut self, job: usize) -> Result<()> {
        self.args.clear();
        self.payload.clear();
        let j = &self.jobs[job];
        let read_like = |fh, offset, size| FsQueue::read_in(fh, offset, size);
        let (op, nodeid, reply): (u32, u64, Option<u32>) = match j.phase {
            Phase::Idle => return Ok(()),
            Phase::Io => {
                let (node, fh) = self.open_files[j.file];
                match self.case.workload {
                    Workload::Read { size, .. } => {
                        let read = read_like(fh, j.offset, size);
                        self.args.extend_from_slice(read.as_slice());
                        (opcode::READ, node, Some(size))
                    }
                    Workload::Write { size, .. } => {
                        let write = WriteIn {
                            fh,
                            offset: j.offset,
                            size,
                            ..Default::default()
                        };
                        self.args.extend_from_slice(write.as_slice());
                        self.payload.resize(size as usize, 0);
                        pattern::fill(
                            &mut self.payload,
                            WRITE_FILE_BASE + j.file as u64,
                            self.case.generation,
                            j.offset,
                        );
                        (
                            opcode::WRITE,
                            node,
                            Some(std::mem::size_of::<WriteOut>() as u32),
                        )
                    }
                    _ => bail!("I/O phase in a metadata workload"),
                }
            }
            Phase::Lookup => {
                self.args
                    .extend_from_slice(fileset::tree_file_name(j.entry).as_bytes());
                self.args.push(0);
                (
                    opcode::LOOKUP,
                    self.dirs[j.dir],
                    Some(std::mem::size_of::<EntryOut>() as u32),
                )
            }
            Phase::Getattr => {
                self.args.extend_from_slice(GetattrIn::default().as_slice());
                (
                    opcode::GETATTR,
                    j.nodeid,
                    Some(std::mem::size_of::<AttrOut>() as u32),
                )
            }
            Phase::Forget => {
                self.args
                    .extend_from_slice(ForgetIn { nlookup: 1 }.as_slice());
                (opcode::FORGET, j.nodeid, None)
            }
            Phase::Create => {
                let create = CreateIn {
                    flags: (libc::O_CREAT | libc::O_EXCL | libc::O_RDWR) as u32,
                    mode: libc::S_IFREG | 0o644,
                    umask: 0,
                    fuse_flags: 0,
                };
                self.args.extend_from_slice(create.as_slice());
                self.args.extend_from_slice(&j.name);
                self.args.push(0);
                let reply = std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>();
                (opcode::CREATE, self.dirs[j.file], Some(reply as u32))
            }
            Phase::Release | Phase::Releasedir => {
                let release = ReleaseIn {
                    fh: j.fh,
                    flags: if j.phase == Phase::Release {
                        libc::O_RDWR as u32
                    } else {
                        libc::O_RDONLY as u32
                    },
                    release_flags: 0,
                    lock_owner: 0,
                };
                self.args.extend_from_slice(release.as_slice());
                let op = if j.phase == Phase::Release {
                    opcode::RELEASE
                } else {
                    opcode::RELEASEDIR
                };
                let node = if j.phase == Phase::Release {
                    j.nodeid
                } else {
                    self.dirs[j.dir]
                };
                (op, node, Some(0))
            }
            Phase::Unlink => {
                self.args.extend_from_slice(&j.name);
                self.args.push(0);
                (opcode::UNLINK, self.dirs[j.file], Some(0))
            }
            Phase::Opendir => {
                let open = OpenIn {
                    flags: libc::O_RDONLY as u32,
                    fuse_flags: 0,
                };
                self.args.extend_from_slice(open.as_slice());
                (
                    opcode::OPENDIR,
                    self.dirs[j.dir],
                    Some(std::mem::size_of::<OpenOut>() as u32),
                )
            }
            Phase::Readdir => {
                let read = read_like(j.fh, j.dir_offset, READDIR_BUFFER);
                self.args.extend_from_slice(read.as_slice());
                (opcode::READDIRPLUS, self.dirs[j.dir], Some(READDIR_BUFFER))
            }
            Phase::BatchForget => {
                let take = j.forgets.len().min(FsQueue::MAX_BATCH_FORGET);
                let tail = j.forgets.len() - take;
                self.args = FsQueue::batch_forget_args(&j.forgets[tail..])?;
                (opcode::BATCH_FORGET, 0, None)
            }
        };
        let ticket = self.queue.submit(&Request {
            opcode: op,
            nodeid,
            args: &[&self.args],
            payload: &self.payload,
            reply_capacity: reply,
        })?;
        self.result.requests += 1;
        let j = &mut self.jobs[job];
        j.unique = ticket.unique;
        j.request_started = Instant::now();
        Ok(())
    }

    fn finish_op(&mut self, job: usize, ops: u64, bytes: u64) {
        if self.counting {
            let j = &self.jobs[job];
            self.result.ops += ops;
            self.result.bytes += bytes;
            self.result
                .latency
                .record(j.op_started.elapsed().as_nanos() as u64);
        }
    }

    /// Checks a reply and moves `job` on: next request of the operation, or a new operation.
    fn advance(&mut self, job: usize, done: &Completion) -> Result<()> {
        let phase = self.jobs[job].phase;
        let next = match phase {
            Phase::Idle => bail!("a reply for an idle job"),
            Phase::Io => {
                let j = &self.jobs[job];
                match self.case.workload {
                    Workload::Read { size, .. } => {
                        if done.body.len() != size as usize {
                            bail!(
                                "READ of {size} bytes at {} returned {} bytes",
                                j.offset,
                                done.body.len()
                            );
                        }
                        pattern::check(&done.body, j.file as u64, 0, j.offset).map_err(|at| {
                            anyhow!(
                                "READ of {} returned wrong data at offset {at}",
                                fileset::data_name(j.file)
                            )
                        })?;
                        let bytes = u64::from(size);
                        self.finish_op(job, 1, bytes);
                    }
                    Workload::Write { size, .. } => {
                        let out: WriteOut = parse_struct(&done.body, false, "WRITE")?;
                        if out.size != size {
                            bail!("WRITE of {size} bytes wrote {}", out.size);
                        }
                        let (file, offset) = (j.file, j.offset);
                        if self.counting {
                            let count = self.result.ops;
                            remember_write(
                                &mut self.result.written,
                                count,
                                (file, offset, size as usize),
                            );
                        }
                        self.finish_op(job, 1, u64::from(size));
                    }
                    _ => bail!("I/O reply in a metadata workload"),
                }
                None
            }
            Phase::Lookup => {
                let entry: EntryOut = parse_struct(&done.body, false, "LOOKUP")?;
                let j = &mut self.jobs[job];
                let expected = self.files.tree_inos[j.dir][j.entry];
                if entry.nodeid == 0 || entry.attr.ino != expected {
                    bail!(
                        "LOOKUP d{}/f{} returned inode {} (nodeid {}), expected inode {expected}",
                        j.dir,
                        j.entry,
                        entry.attr.ino,
                        entry.nodeid
                    );
                }
                j.nodeid = entry.nodeid;
                Some(Phase::Getattr)
            }
            Phase::Getattr => {
                let attr: AttrOut = parse_struct(&done.body, false, "GETATTR")?;
                let j = &self.jobs[job];
                let expected = self.files.tree_inos[j.dir][j.entry];
                if attr.attr.ino != expected {
                    bail!(
                        "GETATTR returned inode {}, expected {expected}",
                        attr.attr.ino
                    );
                }
                Some(Phase::Forget)
            }
            Phase::Forget => {
                self.finish_op(job, 1, 0);
                None
            }
            Phase::Create => {
                let entry: EntryOut = parse_struct(&done.body, false, "CREATE entry")?;
                let open: OpenOut = parse_struct(
                    done.body
                        .get(std::mem::size_of::<EntryOut>()..)
                        .unwrap_or(&[]),
                    false,
                    "CREATE open",
                )?;
                if entry.nodeid == 0
                    || entry.attr.mode & libc::S_IFMT != libc::S_IFREG
                    || entry.attr.size != 0
                {
                    bail!(
                        "CREATE returned a bad entry: nodeid {}, mode {:o}",
                        entry.nodeid,
                        entry.attr.mode
                    );
                }
                let j = &mut self.jobs[job];
                j.nodeid = entry.nodeid;
                j.fh = open.fh;
                Some(Phase::Release)
            }
            Phase::Release => Some(Phase::Unlink),
            Phase::Unlink => Some(Phase::Forget),
            Phase::Opendir => {
                let open: OpenOut = parse_struct(&done.body, false, "OPENDIR")?;
                self.jobs[job].fh = open.fh;
                Some(Phase::Readdir)
            }
            Phase::Readdir => {
                let entries = parse_direntplus(&done.body)?;
                let per_dir = self.files.layout.files_per_dir;
                let inos = &self.files.tree_inos;
                let counting = self.counting;
                let j = &mut self.jobs[job];
                let mut named = 0u64;
                for entry in &entries {
                    j.dir_offset = entry.offset;
                    if entry.name == b"." || entry.name == b".." {
                        continue;
                    }
                    let index = std::str::from_utf8(&entry.name)
                        .ok()
                        .and_then(|n| n.strip_prefix('f'))
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|i| *i < per_dir)
                        .ok_or_else(|| {
                            anyhow!(
                                "READDIRPLUS returned an unknown name {:?}",
                                String::from_utf8_lossy(&entry.name)
                            )
                        })?;
                    if std::mem::replace(&mut j.seen[index], true) {
                        bail!("READDIRPLUS returned f{index} twice");
                    }
                    if entry.entry.nodeid != 0 {
                        if entry.entry.attr.ino != inos[j.dir][index] {
                            bail!(
                                "READDIRPLUS gave f{index} inode {}, expected {}",
                                entry.entry.attr.ino,
                                inos[j.dir][index]
                            );
                        }
                        j.forgets.push((entry.entry.nodeid, 1));
                    }
                    named += 1;
                }
                j.entries_seen += named as usize;
                let request_started = j.request_started;
                if counting {
                    self.result.ops += named;
                    self.result.bytes += done.body.len() as u64;
                    self.result
                        .latency
                        .record(request_started.elapsed().as_nanos() as u64);
                }
                let j = &self.jobs[job];
                if entries.is_empty() {
                    if j.entries_seen != per_dir {
                        bail!(
                            "READDIRPLUS listed {} of the {per_dir} entries of d{}",
                            j.entries_seen,
                            j.dir
                        );
                    }
                    Some(Phase::Releasedir)
                } else if !counting {
                    // The run is over: close the directory without reading the rest.
                    Some(Phase::Releasedir)
                } else {
                    Some(Phase::Readdir)
                }
            }
            Phase::Releasedir | Phase::BatchForget => {
                let j = &mut self.jobs[job];
                if phase == Phase::BatchForget {
                    let take = j.forgets.len().min(FsQueue::MAX_BATCH_FORGET);
                    let keep = j.forgets.len() - take;
                    j.forgets.truncate(keep);
                }
                if j.forgets.is_empty() {
                    None
                } else {
                    Some(Phase::BatchForget)
                }
            }
        };
        match next {
            Some(phase) => {
                self.jobs[job].phase = phase;
                self.issue(job)
            }
            None => self.begin_op(job),
        }
    }
}

/// Looks up `count` tree files on one queue and keeps them looked up, then forgets them all.
/// Returns the daemon's descriptor count before, while holding them, and after forgetting.
pub fn hold_lookups(
    socket: &std::path::Path,
    files: &FileSet,
    count: usize,
    fds: &dyn Fn() -> u64,
) -> Result<(u64, u64, u64)> {
    let config = DeviceConfig {
        memory_size: 16 << 20,
        request_queues: 1,
        queue: QueueConfig {
            size: 64,
            depth: 16,
            max_data: 4096,
            timeout: Duration::from_secs(20),
        },
        socket_timeout: Duration::from_secs(10),
        event_idx: true,
    };
    let mut device = VhostUserFs::connect(socket, config, Duration::from_secs(10))?;
    let mut queue = device
        .take_request_queue(1)
        .context("request queue 1 is missing")?;
    queue.init_default().context("FUSE_INIT failed")?;
    let tree = lookup_path(&mut queue, &["tree"])?;
    let before = fds();
    let mut held = Vec::with_capacity(count);
    'dirs: for dir in 0..files.layout.tree_dirs {
        let dir_node = queue
            .lookup(tree, fileset::dir_name(dir).as_bytes())?
            .nodeid;
        held.push((dir_node, 1));
        for file in 0..files.layout.files_per_dir {
            if held.len() >= count {
                break 'dirs;
            }
            let entry = queue.lookup(dir_node, fileset::tree_file_name(file).as_bytes())?;
            held.push((entry.nodeid, 1));
        }
    }
    let holding = fds();
    for chunk in held.chunks(FsQueue::MAX_BATCH_FORGET) {
        queue.batch_forget(chunk)?;
    }
    // A request after the forgets makes sure the daemon has processed them.
    queue.getattr(ROOT_ID)?;
    let after = fds();
    device.disconnect();
    Ok((before, holding, after))
}
