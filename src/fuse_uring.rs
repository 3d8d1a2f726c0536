//! FUSE over io_uring for `berth fuse` (Linux 6.14+, `CONFIG_FUSE_IO_URING`, the fuse module's
//! `enable_uring` parameter set).
//!
//! Once FUSE_INIT negotiated `FUSE_OVER_IO_URING`, the kernel hands requests to ring entries
//! the server registered with `IORING_OP_URING_CMD` on /dev/fuse instead of queueing them for
//! read(2): one queue per possible CPU (a request goes to the queue of the CPU its caller runs
//! on), and the kernel starts using the ring only once every queue has an entry waiting. Each
//! queue here is served by at least two threads pinned to its CPU, each with its own ring and
//! one entry: the thread registers it and then, for each request that completes it, serves
//! the request and sends the reply with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also waits
//! for the entry's next request. One entry per thread means an entry is free exactly when its
//! thread is: a request that blocks in berth (SETLKW waiting for a lock) holds one thread,
//! and the kernel hands the queue's next request (the unlock, say) to an idle one.
//!
//! An entry is two buffers: a header area (`struct fuse_uring_req_header`: `fuse_in_header` /
//! `fuse_out_header`, the opcode's fixed argument struct, and `struct fuse_uring_ent_in_out`)
//! and a payload buffer for the rest of the request, and for the reply's body. The server is
//! handed the request as segments in the classic layout (header, fixed arguments, payload),
//! the kernel's `fuse_in_header.len` being the classic length, which tells how long the fixed
//! part is.
//!
//! FORGET, BATCH_FORGET and INTERRUPT still come through read(2), so the classic workers keep
//! serving /dev/fuse beside the rings.
//!
//! Confinement: every ring is created, given its two files (/dev/fuse and the workers' stop
//! event) and restricted (`IORING_REGISTER_RESTRICTIONS`) before the main thread's seccomp
//! filter: its submissions may only be `IORING_OP_URING_CMD` and `IORING_OP_POLL_ADD`, on those
//! registered files only (`IOSQE_FIXED_FILE` required), and no further registration is
//! allowed. io_uring operations bypass seccomp, so without the restriction a ring would be a
//! way around the filter; with it, a ring can do nothing but FUSE commands and wait for the
//! stop event. The ring threads then need only `io_uring_enter` beyond a FUSE worker's calls.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use anyhow::bail;
use berth_passthrough::{FsServer, IoSegment, Served};
use io_uring::{cqueue, opcode, register::Restriction, squeue, types, IoUring};
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

/// The fuse module's switch for FUSE over io_uring.
pub const ENABLE_PARAMETER: &str = "/sys/module/fuse/parameters/enable_uring";

/// Ring entries per ring (and thread): see the module's documentation.
const DEPTH: usize = 1;
/// The fewest threads (rings) serving one queue.
const MIN_RINGS_PER_QUEUE: usize = 2;

pub use crate::cli::IoUringMode;

/// What start-up found: how many queues the kernel expects (its possible CPUs), and how
/// many threads serve each.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub queues: usize,
    pub rings_per_queue: usize,
    pub required: bool,
}

/// Decides, before mounting, whether to offer FUSE over io_uring: `None` when it is off
/// (logged for `auto`), an error for `always` when the kernel cannot.
/// `threads` (`--threads`) spread over the queues, at least [`MIN_RINGS_PER_QUEUE`] each.
pub fn plan(mode: IoUringMode, threads: usize, host_locks: bool) -> anyhow::Result<Option<Plan>> {
    if mode == IoUringMode::Never {
        info!("FUSE transport: /dev/fuse read and write (--io-uring never).");
        return Ok(None);
    }
    // A lock request that waits in berth holds its ring entry until it is granted, and the
    // kernel queues a CPU's requests behind its own queue's entries only: as many waits from
    // one CPU as it has entries would hold up every request from that CPU, the holder's
    // unlock too. On /dev/fuse such waits go to threads of their own.
    const LOCKS_ON_RINGS: &str = "with --posix-lock or --flock a lock request that waits holds \
                                  its ring entry, and a CPU's requests wait behind as many of \
                                  them as it has rings";
    if host_locks && mode == IoUringMode::Auto {
        info!("FUSE transport: /dev/fuse read and write (io_uring is off: {LOCKS_ON_RINGS}).");
        return Ok(None);
    }
    let obstacle = match std::fs::read_to_string(ENABLE_PARAMETER) {
        Ok(value) if value.trim() == "Y" || value.trim() == "1" => None,
        Ok(value) => Some(format!(
            "the fuse module's enable_uring parameter is {}; set {ENABLE_PARAMETER} to Y",
            value.trim()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(
            "this kernel has no FUSE over io_uring (Linux 6.14+ built with \
             CONFIG_FUSE_IO_URING)"
                .to_owned(),
        ),
        Err(e) => Some(format!("cannot read {ENABLE_PARAMETER}: {e}")),
    };
    if let Some(why) = obstacle {
        if mode == IoUringMode::Always {
            bail!("--io-uring always: {why}");
        }
        info!("FUSE transport: /dev/fuse read and write (io_uring is off: {why}).");
        return Ok(None);
    }
    let queues = possible_cpus()?;
    if host_locks {
        warn!(
            "--io-uring always: {LOCKS_ON_RINGS} ({} per CPU here); use --io-uring never (or \
             auto) where guests wait for contended locks.",
            threads.div_ceil(queues).max(MIN_RINGS_PER_QUEUE)
        );
    }
    Ok(Some(Plan {
        queues,
        rings_per_queue: threads.div_ceil(queues).max(MIN_RINGS_PER_QUEUE),
        required: mode == IoUringMode::Always,
    }))
}

/// The number of possible CPUs (the kernel's queue count), from sysfs.
fn possible_cpus() -> anyhow::Result<usize> {
    let path = "/sys/devices/system/cpu/possible";
    let list =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?;
    let mut count = 0usize;
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let bad = || anyhow::anyhow!("cannot parse {path}: {:?}", list.trim());
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (a.parse::<usize>(), b.parse::<usize>()),
            None => (range.parse::<usize>(), range.parse::<usize>()),
        };
        let (first, last) = (first.map_err(|_| bad())?, last.map_err(|_| bad())?);
        if last < first {
            return Err(bad());
        }
        count += last - first + 1;
    }
    if count == 0 || count > usize::from(u16::MAX) {
        bail!("{path} lists {count} CPUs");
    }
    Ok(count)
}

/// Requests served per transport, for the log at exit (and the tests, which read it).
#[derive(Debug, Default)]
pub struct TransportCounts {
    /// Per ring queue.
    pub ring: Vec<AtomicU64>,
    pub device: AtomicU64,
    /// Of `device`: FORGET, BATCH_FORGET and INTERRUPT, which never go over the ring.
    pub device_no_reply: AtomicU64,
}

impl TransportCounts {
    pub fn new(queues: usize) -> Self {
        TransportCounts {
            ring: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    /// `io_uring=N dev_fuse=N forget_interrupt=N queue0=N queue1=N…`.
    pub fn summary(&self) -> String {
        let per_queue: Vec<u64> = self
            .ring
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut out = format!(
            "io_uring={} dev_fuse={} forget_interrupt={}",
            per_queue.iter().sum::<u64>(),
            self.device.load(Ordering::Relaxed),
            self.device_no_reply.load(Ordering::Relaxed)
        );
        for (qid, n) in per_queue.iter().enumerate() {
            out.push_str(&format!(" queue{qid}={n}"));
        }
        out
    }
}

/// Where the ring threads stand: they register their entries only once FUSE_INIT was
/// answered with io_uring on (the kernel refuses registrations before INIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    Waiting,
    Open,
    /// Not this session (the kernel did not offer it, or a registration failed under auto).
    Closed,
    Stopping,
}

#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    pub fn new() -> Self {
        Gate {
            state: Mutex::new(GateState::Waiting),
            changed: Condvar::new(),
        }
    }

    fn set(&self, to: GateState) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state != GateState::Stopping {
            *state = to;
        }
        self.changed.notify_all();
    }

    /// FUSE_INIT enabled io_uring: register.
    pub fn open(&self) {
        self.set(GateState::Open);
    }

    /// FUSE_INIT did not enable io_uring: the ring threads only wait for the end.
    pub fn close(&self) {
        self.set(GateState::Closed);
    }

    /// The workers are stopping.
    pub fn stop(&self) {
        self.set(GateState::Stopping);
    }

    /// Waits until the state is no longer `Waiting` (or, with `until_stop`, until stopping).
    fn wait(&self, until_stop: bool) -> GateState {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while *state == GateState::Waiting || (until_stop && *state != GateState::Stopping) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        *state
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// A ring serving one queue, created and restricted before the seccomp filter.
pub struct QueueRing {
    qid: u16,
    /// Which of the queue's rings.
    slot: usize,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

/// Fixed-file indexes of the ring's registered files.
const FUSE_FILE: types::Fixed = types::Fixed(0);
const STOP_FILE: types::Fixed = types::Fixed(1);
/// `user_data` of the stop event's poll; entries use their index.
const STOP_TOKEN: u64 = u64::MAX;

/// Creates `plan.rings_per_queue` restricted rings for each of `plan`'s queues, on `fuse` (the
/// session's /dev/fuse) and `stop` (the workers' stop event). Call it before the seccomp
/// filter.
pub fn create_rings(plan: &Plan, fuse: &File, stop: &EventFd) -> io::Result<Vec<QueueRing>> {
    (0..plan.queues)
        .flat_map(|qid| (0..plan.rings_per_queue).map(move |slot| (qid, slot)))
        .map(|(qid, slot)| {
            let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
                .setup_r_disabled()
                .setup_coop_taskrun()
                .build(8)?;
            let submitter = ring.submitter();
            submitter.register_files(&[fuse.as_raw_fd(), stop.as_raw_fd()])?;
            let mut restrictions = [
                Restriction::sqe_op(opcode::UringCmd80::CODE),
                Restriction::sqe_op(opcode::PollAdd::CODE),
                Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
            ];
            submitter.register_restrictions(&mut restrictions)?;
            submitter.register_enable_rings()?;
            Ok(QueueRing {
                qid: qid as u16,
                slot,
                ring,
            })
        })
        .collect()
}

impl QueueRing {
    pub fn qid(&self) -> usize {
        usize::from(self.qid)
    }

    pub fn slot(&self) -> usize {
        self.slot
    }
}

/// Pins the calling thread to CPU `cpu`, where it exists and the process may run.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the CPU_* helpers stay within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return;
    }
    // SAFETY: `cpu` is within the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        debug!(
            cpu,
            "Cannot pin the FUSE ring thread: {}.",
            io::Error::last_os_error()
        );
    }
}

/// `FUSE_IO_URING_CMD_*` (include/uapi/linux/fuse.h).
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Layout of `struct fuse_uring_req_header`.
const IN_OUT_SIZE: usize = 128;
const OP_IN_SIZE: usize = 128;
const ENT_IN_OUT: usize = IN_OUT_SIZE + OP_IN_SIZE;
/// `fuse_uring_ent_in_out.payload_sz`.
const PAYLOAD_SZ_OFFSET: usize = ENT_IN_OUT + 16;
const COMMIT_ID_OFFSET: usize = ENT_IN_OUT + 8;
const HEADER_AREA: usize = ENT_IN_OUT + 32;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;

/// One ring entry's memory, which the kernel writes while the entry waits for a request.
/// Only raw pointers are kept: the server gets [`IoSegment`]s, which it reads and writes with
/// volatile copies.
struct RingEntry {
    /// `struct fuse_uring_req_header`, as u64s for alignment.
    header: Box<[u64]>,
    payload: Box<[u8]>,
    /// The iovec pair handed to REGISTER (the kernel copies it at submission).
    iov: Box<[libc::iovec; 2]>,
}

impl RingEntry {
    fn new(payload_len: usize) -> Self {
        let mut header = vec![0u64; HEADER_AREA / 8].into_boxed_slice();
        let mut payload = vec![0u8; payload_len].into_boxed_slice();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: HEADER_AREA,
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload_len,
            },
        ]);
        RingEntry {
            header,
            payload,
            iov,
        }
    }

    fn header_ptr(&mut self) -> *mut u8 {
        self.header.as_mut_ptr().cast()
    }

    fn read_u32(&mut self, offset: usize) -> u32 {
        debug_assert!(offset + 4 <= HEADER_AREA);
        // SAFETY: in bounds of the header area (callers pass fixed offsets within it).
        unsafe { std::ptr::read_unaligned(self.header_ptr().add(offset).cast::<u32>()) }
    }

    fn read_u64(&mut self, offset: usize) -> u64 {
        debug_assert!(offset + 8 <= HEADER_AREA);
        // SAFETY: as in read_u32.
        unsafe { std::ptr::read_unaligned(self.header_ptr().add(offset).cast::<u64>()) }
    }

    fn write_u32(&mut self, offset: usize, value: u32) {
        debug_assert!(offset + 4 <= HEADER_AREA);
        // SAFETY: as in read_u32.
        unsafe { std::ptr::write_unaligned(self.header_ptr().add(offset).cast::<u32>(), value) }
    }

    fn write_u64(&mut self, offset: usize, value: u64) {
        debug_assert!(offset + 8 <= HEADER_AREA);
        // SAFETY: as in read_u32.
        unsafe { std::ptr::write_unaligned(self.header_ptr().add(offset).cast::<u64>(), value) }
    }
}

/// The 80-byte command of an SQE: `struct fuse_uring_cmd_req` (flags, commit_id, qid).
fn command(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// The REGISTER command for `entry`: its iovec pair in `addr`, 2 in `len`.
fn register_sqe(entry: &RingEntry, index: usize, qid: u16) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(FUSE_FILE, CMD_REGISTER)
        .cmd(command(0, qid))
        .addr(Some(entry.iov.as_ptr() as u64))
        .build()
        .flags(squeue::Flags::FIXED_FILE)
        .user_data(index as u64);
    // The crate's UringCmd80 leaves `len` at 0; the kernel wants the iovec count there
    // (struct io_uring_sqe: `len` is the u32 at byte 24).
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is a repr(C) 128-byte SQE (asserted above) of plain integers, so its
    // bytes may be viewed and patched as an array and turned back.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above; every bit pattern of the patched field is a valid u32.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

fn commit_sqe(commit_id: u64, index: usize, qid: u16) -> squeue::Entry128 {
    opcode::UringCmd80::new(FUSE_FILE, CMD_COMMIT_AND_FETCH)
        .cmd(command(commit_id, qid))
        .build()
        .flags(squeue::Flags::FIXED_FILE)
        .user_data(index as u64)
}

fn stop_sqe() -> squeue::Entry128 {
    squeue::Entry128::from(
        opcode::PollAdd::new(STOP_FILE, libc::POLLIN as u32)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(STOP_TOKEN),
    )
}

/// How a ring thread ended.
pub enum RingEnd {
    /// Stopped, or the connection went away (unmounted).
    Done,
    /// io_uring was not used for this session; nothing was served.
    NotUsed,
}

/// A ring thread's life after its seccomp filter: waits for FUSE_INIT, registers its entries
/// and serves until stopped or unmounted. `payload_len` must hold the kernel's largest
/// payload (max_write, max_pages pages).
pub fn serve_queue(
    queue: QueueRing,
    server: &FsServer,
    gate: &Gate,
    required: bool,
    payload_len: usize,
    counts: &TransportCounts,
) -> Result<RingEnd, String> {
    match gate.wait(false) {
        GateState::Open => {}
        GateState::Stopping => return Ok(RingEnd::NotUsed),
        _ => {
            gate.wait(true);
            return Ok(RingEnd::NotUsed);
        }
    }
    let qid = queue.qid;
    let mut entries: Vec<RingEntry> = (0..DEPTH).map(|_| RingEntry::new(payload_len)).collect();
    let mut queue = queue;
    let outcome = run_ring(&mut queue, &mut entries, server, payload_len, counts);
    // The kernel keeps the entries' addresses until the ring is gone (closing it cancels
    // the commands, which may finish after the close returns, and the thread ends right
    // after): the ring goes first, and the buffers are left to the process's end rather than
    // freed under a command that may still be completing.
    drop(queue);
    std::mem::forget(entries);
    match outcome {
        Ok(()) => Ok(RingEnd::Done),
        Err(RingError::Refused(error)) => {
            // The kernel falls back to read(2) for the whole connection when a registration
            // fails.
            if required {
                return Err(format!(
                    "--io-uring always: the kernel refused ring entries for queue {qid}: {error}"
                ));
            }
            warn!(
                queue = qid,
                "The kernel refused FUSE ring entries ({error}); it serves /dev/fuse read and \
                 write instead."
            );
            gate.close();
            gate.wait(true);
            Ok(RingEnd::NotUsed)
        }
        Err(RingError::Failed(e)) => Err(e),
    }
}

enum RingError {
    /// A registration failed before any request came.
    Refused(io::Error),
    Failed(String),
}

/// Registers `entries` on `queue` and serves their requests until the stop event or the end
/// of the connection.
fn run_ring(
    queue: &mut QueueRing,
    entries: &mut [RingEntry],
    server: &FsServer,
    payload_len: usize,
    counts: &TransportCounts,
) -> Result<(), RingError> {
    let qid = queue.qid;
    let full = || RingError::Failed("the ring is full".to_owned());
    let mut scratch = vec![0u8; payload_len.max(IN_HEADER_SIZE)];
    {
        let mut sq = queue.ring.submission();
        for (index, entry) in entries.iter().enumerate() {
            let sqe = register_sqe(entry, index, qid);
            // SAFETY: the entry's buffers and iovec outlive the ring (serve_queue).
            unsafe { sq.push(&sqe) }.map_err(|_| full())?;
        }
        // SAFETY: the poll refers to a registered file, no memory.
        unsafe { sq.push(&stop_sqe()) }.map_err(|_| full())?;
    }
    let mut live = entries.len();
    let mut served_any = false;
    let mut completions = Vec::with_capacity(entries.len() + 1);
    loop {
        match queue.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(RingError::Failed(format!("io_uring_enter: {e}"))),
        }
        completions.clear();
        completions.extend(queue.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(token, result) in &completions {
            if token == STOP_TOKEN {
                return Ok(());
            }
            let Some(entry) = usize::try_from(token).ok().and_then(|i| entries.get_mut(i)) else {
                continue;
            };
            if result < 0 {
                let errno = -result;
                match errno {
                    libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV | libc::ECANCELED => {
                        live -= 1;
                        if live == 0 {
                            return Ok(());
                        }
                        continue;
                    }
                    _ if !served_any => {
                        return Err(RingError::Refused(io::Error::from_raw_os_error(errno)))
                    }
                    _ => {
                        // The entry is lost to the kernel; the queue goes on with the others.
                        let error = io::Error::from_raw_os_error(errno);
                        warn!(queue = qid, "A FUSE ring command failed: {error}.");
                        live -= 1;
                        if live == 0 {
                            return Err(RingError::Failed(format!(
                                "every entry of FUSE ring queue {qid} failed, the last with \
                                 {error}"
                            )));
                        }
                        continue;
                    }
                }
            }
            served_any = true;
            if let Some(count) = counts.ring.get(usize::from(qid)) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            let commit_id = entry.read_u64(COMMIT_ID_OFFSET);
            serve_entry(entry, &mut scratch, server, qid);
            server.reply_sent();
            let sqe = commit_sqe(commit_id, token as usize, qid);
            let mut sq = queue.ring.submission();
            // SAFETY: as for the registration: the entry outlives the ring.
            unsafe { sq.push(&sqe) }.map_err(|_| full())?;
        }
    }
}

/// Serves the request in `entry` and leaves the reply there (header in `in_out`, body in
/// the payload, its size in `payload_sz`).
fn serve_entry(entry: &mut RingEntry, scratch: &mut [u8], server: &FsServer, qid: u16) {
    let total = entry.read_u32(0) as usize;
    let payload_sz = entry.read_u32(PAYLOAD_SZ_OFFSET) as usize;
    let unique = entry.read_u64(8);
    let fixed = total
        .checked_sub(IN_HEADER_SIZE)
        .and_then(|rest| rest.checked_sub(payload_sz))
        .filter(|&fixed| fixed <= OP_IN_SIZE && payload_sz <= entry.payload.len());
    let Some(fixed) = fixed else {
        warn!(
            queue = qid,
            "A FUSE ring request does not add up (length {total}, payload {payload_sz}); \
             answering EIO."
        );
        error_reply(entry, unique, libc::EIO);
        return;
    };
    // The header is copied aside: the reply's header overwrites it in place.
    let (in_header, room) = scratch.split_at_mut(IN_HEADER_SIZE);
    // SAFETY: the first 40 bytes of the header area hold the kernel's fuse_in_header.
    unsafe {
        std::ptr::copy_nonoverlapping(entry.header_ptr(), in_header.as_mut_ptr(), IN_HEADER_SIZE)
    };
    let header_ptr = entry.header_ptr();
    let payload_ptr = entry.payload.as_mut_ptr();
    let payload_len = entry.payload.len();
    // SAFETY: each segment lies inside the entry's header area or payload, which the kernel
    // does not touch while the entry is with userspace (between its completion and the
    // commit), and which outlive this call.
    let (op_in, payload, reply_header, reply_payload) = unsafe {
        (
            IoSegment::from_raw_parts(header_ptr.add(IN_OUT_SIZE), fixed),
            IoSegment::from_raw_parts(payload_ptr, payload_sz),
            IoSegment::from_raw_parts(header_ptr, OUT_HEADER_SIZE),
            IoSegment::from_raw_parts(payload_ptr, payload_len),
        )
    };
    let request = [IoSegment::from_mut_slice(in_header), op_in, payload];
    // A request with a payload (a write, a name) is read from the payload buffer while the
    // reply is written: its reply goes to the scratch room first, then into the payload.
    let via_scratch = payload_sz > 0;
    let room_len = room.len().min(payload_len);
    let served = if via_scratch {
        server.handle(
            &request,
            &[
                reply_header,
                IoSegment::from_mut_slice(&mut room[..room_len]),
            ],
            None,
        )
    } else {
        server.handle(&request, &[reply_header, reply_payload], None)
    };
    match served {
        Served::Replied(len) if len >= OUT_HEADER_SIZE => {
            let body = len - OUT_HEADER_SIZE;
            if via_scratch {
                entry.payload[..body].copy_from_slice(&room[..body]);
            }
            entry.write_u32(PAYLOAD_SZ_OFFSET, body as u32);
        }
        // Only a virtqueue request is ever parked.
        Served::Replied(_) | Served::NoReply | Served::Parked => {
            error_reply(entry, unique, libc::EIO)
        }
        Served::Dropped(why) => {
            warn!(queue = qid, "Dropping a FUSE request: {why}.");
            error_reply(entry, unique, libc::EIO);
        }
    }
}

/// A bare error reply to request `unique` (the entry must be committed in any case, or the
/// kernel's request would wait forever).
fn error_reply(entry: &mut RingEntry, unique: u64, errno: i32) {
    entry.write_u32(0, OUT_HEADER_SIZE as u32);
    entry.write_u32(4, (-errno) as u32);
    entry.write_u64(8, unique);
    entry.write_u32(PAYLOAD_SZ_OFFSET, 0);
}

/// Logs what is in use once FUSE_INIT decided.
pub fn log_transport(queues: usize, rings: usize, payload_len: usize) {
    info!(
        "FUSE transport: io_uring, {queues} queues (one per possible CPU) served by {} \
         threads each, one {} KiB ring entry per thread; FORGET and INTERRUPT still over \
         /dev/fuse.",
        rings / queues.max(1),
        payload_len / 1024
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits `sqe` on `ring` and returns its completion's result.
    fn complete(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, sqe: squeue::Entry128) -> i32 {
        // SAFETY: the entries below refer to no memory but a static path.
        unsafe { ring.submission().push(&sqe) }.expect("room in the ring");
        ring.submit_and_wait(1).expect("io_uring_enter");
        let cqe = ring.completion().next().expect("a completion");
        cqe.result()
    }

    #[test]
    fn rings_take_nothing_but_their_own_commands_on_their_own_files() {
        let fuse = File::open("/dev/null").expect("open /dev/null");
        let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let plan = Plan {
            queues: 1,
            rings_per_queue: 1,
            required: false,
        };
        let mut rings = create_rings(&plan, &fuse, &stop).expect("a restricted ring");
        let ring = &mut rings[0].ring;
        let path = c"/etc/passwd";

        // Another operation, even on a registered file: refused by the restriction.
        let openat = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1);
        assert_eq!(complete(ring, openat.into()), -libc::EACCES, "openat");
        let read = opcode::Read::new(FUSE_FILE, std::ptr::null_mut(), 0)
            .build()
            .flags(squeue::Flags::FIXED_FILE)
            .user_data(2);
        assert_eq!(complete(ring, read.into()), -libc::EACCES, "read");
        // An allowed operation on a descriptor that is not registered: refused too.
        let poll = opcode::PollAdd::new(types::Fd(stop.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(3);
        assert_eq!(complete(ring, poll.into()), -libc::EACCES, "poll, raw fd");
        // No registration after the ring was enabled.
        let registered = ring.submitter().register_files(&[fuse.as_raw_fd()]);
        assert!(registered.is_err(), "registering files again was allowed");
        // What the ring is for: the stop event's poll.
        stop.write(1).expect("write the stop event");
        let result = complete(ring, stop_sqe());
        assert!(result > 0 && result & libc::POLLIN as i32 != 0, "{result}");
    }

    #[test]
    fn commands_carry_the_commit_id_and_queue() {
        let cmd = command(0x1122_3344_5566_7788, 3);
        assert_eq!(&cmd[..8], &[0; 8], "flags");
        assert_eq!(
            u64::from_ne_bytes(cmd[8..16].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert_eq!(u16::from_ne_bytes(cmd[16..18].try_into().unwrap()), 3);
        assert!(cmd[18..].iter().all(|&b| b == 0));
        // REGISTER carries the iovec pair's address and count.
        let entry = RingEntry::new(8192);
        let sqe = register_sqe(&entry, 0, 3);
        // SAFETY: as in register_sqe.
        let bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(bytes[0], opcode::UringCmd80::CODE);
        assert_eq!(u32::from_ne_bytes(bytes[24..28].try_into().unwrap()), 2);
        assert_eq!(
            u64::from_ne_bytes(bytes[16..24].try_into().unwrap()),
            entry.iov.as_ptr() as u64
        );
        assert_eq!(entry.iov[0].iov_len, HEADER_AREA);
        assert_eq!(HEADER_AREA, 288, "struct fuse_uring_req_header");
    }
}
