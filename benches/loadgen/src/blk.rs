//! Drives a vhost-user-blk backend through berth-frontend: one thread per request queue, up
//! to `depth` requests in flight per queue, every status checked and every read compared with
//! the data pattern.
//!
//! The disk is split in two halves. The first (the read region) holds the pattern of
//! generation 0, written on the host when the image is made, and is only read. Write
//! workloads write the second half (the write region) with the pattern of their own
//! generation; afterwards a sample of what they wrote is read back through the device and,
//! once the backend has exited, from the host file, so a backend that drops or misplaces
//! writes fails the run.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_frontend::blk::{features, request_type, status, MIN_CONFIG_LEN, SECTOR_SIZE};
use berth_frontend::{BlkDeviceConfig, BlkQueue, Buffer, GuestRam, VhostUserBlk};
use vm_memory::{Bytes, GuestAddress};

use crate::daemon::ProcSample;
use crate::pattern;
use crate::workload::{harness, take_queue, Rng, RunResult, WorkerResult};

/// The pattern's file number for the disk (any constant: there is one disk).
pub const DISK_ID: u64 = 0xb1c;

/// One kind of block load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlkWorkload {
    Read {
        size: u32,
        random: bool,
    },
    Write {
        size: u32,
        random: bool,
    },
    /// A random write followed by a FLUSH, as one operation.
    WriteFlush {
        size: u32,
    },
}

impl BlkWorkload {
    pub fn all() -> Vec<BlkWorkload> {
        vec![
            BlkWorkload::Read {
                size: 4096,
                random: true,
            },
            BlkWorkload::Write {
                size: 4096,
                random: true,
            },
            BlkWorkload::Read {
                size: 128 << 10,
                random: false,
            },
            BlkWorkload::Write {
                size: 128 << 10,
                random: false,
            },
            BlkWorkload::Read {
                size: 1 << 20,
                random: false,
            },
            BlkWorkload::Write {
                size: 1 << 20,
                random: false,
            },
            BlkWorkload::WriteFlush { size: 4096 },
        ]
    }

    pub fn name(&self) -> String {
        let size = |size: u32| {
            if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
                format!("{}m", size >> 20)
            } else {
                format!("{}k", size >> 10)
            }
        };
        match *self {
            BlkWorkload::Read { size: s, random } => {
                format!("read-{}-{}", size(s), if random { "rand" } else { "seq" })
            }
            BlkWorkload::Write { size: s, random } => {
                format!("write-{}-{}", size(s), if random { "rand" } else { "seq" })
            }
            BlkWorkload::WriteFlush { size: s } => format!("write-flush-{}", size(s)),
        }
    }

    pub fn parse(name: &str) -> Option<BlkWorkload> {
        BlkWorkload::all().into_iter().find(|w| w.name() == name)
    }

    pub fn size(&self) -> u32 {
        match *self {
            BlkWorkload::Read { size, .. }
            | BlkWorkload::Write { size, .. }
            | BlkWorkload::WriteFlush { size } => size,
        }
    }

    fn random(&self) -> bool {
        match *self {
            BlkWorkload::Read { random, .. } | BlkWorkload::Write { random, .. } => random,
            BlkWorkload::WriteFlush { .. } => true,
        }
    }

    pub fn writes(&self) -> bool {
        !matches!(self, BlkWorkload::Read { .. })
    }
}

/// Parses a size such as `4096`, `64K`, `512M` or `1G` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'k' | 'K')) => (&text[..at], 10),
        Some((at, 'm' | 'M')) => (&text[..at], 20),
        Some((at, 'g' | 'G')) => (&text[..at], 30),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().map_err(|_| anyhow!("bad size '{text}'"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| anyhow!("size '{text}' is too large"))
}

/// Where the workloads go on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLayout {
    pub size: u64,
}

impl DiskLayout {
    /// The largest request; regions are multiples of it.
    pub const ALIGN: u64 = 1 << 20;

    pub fn new(size: u64) -> Result<Self> {
        if size < 4 * Self::ALIGN || !size.is_multiple_of(2 * Self::ALIGN) {
            bail!("the disk size must be a multiple of 2 MiB and at least 4 MiB, not {size}");
        }
        Ok(Self { size })
    }

    /// [start, end) of the region a workload uses.
    pub fn region(&self, writes: bool) -> (u64, u64) {
        let half = self.size / 2;
        if writes {
            (half, self.size)
        } else {
            (0, half)
        }
    }

    /// [start, end) of the slice of the region queue `index` of `queues` uses.
    pub fn slice(&self, writes: bool, index: usize, queues: usize) -> (u64, u64) {
        let (start, end) = self.region(writes);
        let queues = queues.max(1) as u64;
        let per = (end - start) / queues / Self::ALIGN * Self::ALIGN;
        let begin = start + per * index as u64;
        (begin, begin + per)
    }
}

/// Offsets of one queue's stream: random blocks of its slice, or a cursor that wraps.
pub struct BlkOffsets {
    start: u64,
    blocks: u64,
    size: u64,
    random: bool,
    cursor: u64,
}

impl BlkOffsets {
    pub fn new(slice: (u64, u64), size: u32, random: bool) -> Self {
        let size = u64::from(size);
        Self {
            start: slice.0,
            blocks: ((slice.1 - slice.0) / size).max(1),
            size,
            random,
            cursor: 0,
        }
    }

    pub fn next(&mut self, rng: &mut Rng) -> u64 {
        let block = if self.random {
            rng.below(self.blocks)
        } else {
            let block = self.cursor;
            self.cursor = (self.cursor + 1) % self.blocks;
            block
        };
        self.start + block * self.size
    }
}

/// Writes the pattern of generation 0 over the whole image (made once; a file of the right
/// size with a matching stamp file next to it is reused: the read region is never written by
/// a run, and the write region's content is irrelevant).
pub fn prepare_image(path: &Path, layout: DiskLayout) -> Result<()> {
    let stamp = path.with_extension("ready");
    let want = format!("pattern v1 size {}\n", layout.size);
    let ready = std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
        && std::fs::metadata(path).map(|m| m.len()).ok() == Some(layout.size);
    if ready {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&stamp);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < layout.size {
        let len = (layout.size - offset).min(chunk.len() as u64) as usize;
        pattern::fill(&mut chunk[..len], DISK_ID, 0, offset);
        file.write_all_at(&chunk[..len], offset)?;
        offset += len as u64;
    }
    file.sync_all()?;
    let mut stamp_file = std::fs::File::create(&stamp)?;
    stamp_file.write_all(want.as_bytes())?;
    Ok(())
}

/// Checks `ranges` (offset, len) of the host file against the pattern of `generation`.
pub fn verify_on_host(path: &Path, generation: u64, ranges: &[(u64, u32)]) -> Result<()> {
    let file = std::fs::File::open(path)?;
    let mut buffer = Vec::new();
    for &(offset, len) in ranges {
        buffer.resize(len as usize, 0);
        file.read_exact_at(&mut buffer, offset)?;
        pattern::check(&buffer, DISK_ID, generation, offset).map_err(|at| {
            anyhow!(
                "the host file holds wrong data at {at} after a write of {len} bytes at {offset}"
            )
        })?;
    }
    Ok(())
}

/// What one run should do.
#[derive(Debug, Clone, Copy)]
pub struct BlkCase {
    pub workload: BlkWorkload,
    pub queues: usize,
    pub depth: u16,
    pub duration: Duration,
    /// Write generation (non-zero), so data of an earlier run cannot pass for this one's.
    pub generation: u64,
    /// Data descriptors are cut to at most this many bytes.
    pub segment: u32,
    pub event_idx: bool,
}

/// What a run measured, with the written ranges to check on the host.
pub struct BlkRun {
    pub result: RunResult,
    pub written: Vec<(u64, u32)>,
    /// Ranges read back through the device after the run.
    pub read_back: usize,
}

/// What a worker measured, the writes it kept and how many of them it read back.
type WorkerOutcome = (WorkerResult, Vec<(u64, u32)>, usize);

/// Written ranges each queue keeps for checking (a uniform sample of all its writes).
const KEEP_WRITES: usize = 512;

/// Connects to `socket` and runs `case`.
pub fn run(
    socket: &Path,
    layout: DiskLayout,
    case: &BlkCase,
    sampler: &(dyn Fn() -> Option<ProcSample> + Sync),
) -> Result<BlkRun> {
    let queues = u16::try_from(case.queues).context("too many queues")?;
    let size = case.workload.size();
    let segment = case.segment.clamp(512, size.max(512));
    let per_request = 2 + size.div_ceil(segment) as usize;
    let queue_size = (usize::from(case.depth) * per_request)
        .next_power_of_two()
        .clamp(16, 1024);
    if usize::from(case.depth) * per_request > queue_size {
        bail!(
            "{} requests of {per_request} descriptors do not fit a queue",
            case.depth
        );
    }
    let per_queue = u64::from(case.depth) * (u64::from(size) + 8192) + (1 << 20);
    let memory = per_queue * u64::from(queues) + (4 << 20);
    let config = BlkDeviceConfig {
        memory_size: usize::try_from((memory + 4095) & !4095)?,
        queues,
        queue_size: queue_size as u16,
        max_data: 4096,
        segment_size: segment,
        event_idx: case.event_idx,
        timeout: Duration::from_secs(10),
        // What QEMU 7.2's backends accept (they refuse a GET_CONFIG beyond their struct).
        config_len: MIN_CONFIG_LEN,
    };
    let mut device = VhostUserBlk::connect(socket, config, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let capacity = device.config().capacity * SECTOR_SIZE;
    if capacity < layout.size {
        bail!("the device has {capacity} bytes, the image {}", layout.size);
    }
    if case.workload.writes() && device.acked_features() & features::RO != 0 {
        bail!("the device is read-only");
    }
    if matches!(case.workload, BlkWorkload::WriteFlush { .. })
        && device.acked_features() & features::FLUSH == 0
    {
        bail!("the device does not offer VIRTIO_BLK_F_FLUSH");
    }
    let seg_max = device.config().seg_max;
    if device.acked_features() & features::SEG_MAX != 0 && (size.div_ceil(segment)) > seg_max.max(1)
    {
        bail!(
            "a request needs {} segments, the device takes {seg_max}",
            size.div_ceil(segment)
        );
    }
    let slots: Vec<Mutex<Option<BlkQueue>>> = (0..queues)
        .map(|i| Mutex::new(device.take_queue(i)))
        .collect();
    let written = Mutex::new(Vec::new());
    let read_back = Mutex::new(0usize);
    let result = harness(
        case.queues,
        case.duration,
        sampler,
        |index| {
            let queue = take_queue(&slots, index)?;
            Worker::new(queue, layout, case, index)
        },
        |worker, stop| {
            let (result, ranges, checked) = worker.run(stop)?;
            written
                .lock()
                .map_err(|_| anyhow!("lock poisoned"))?
                .extend(ranges);
            *read_back.lock().map_err(|_| anyhow!("lock poisoned"))? += checked;
            Ok(result)
        },
    )?;
    device.disconnect();
    let written = written.into_inner().map_err(|_| anyhow!("lock poisoned"))?;
    let read_back = read_back
        .into_inner()
        .map_err(|_| anyhow!("lock poisoned"))?;
    if case.workload.writes() && result.ops > 0 && written.is_empty() {
        bail!("writes completed but none was kept for checking");
    }
    // Every request issued was answered OK before the workers returned (a slow backend may
    // finish none inside a short window: that is a timing, not a failure).
    if result.requests == 0 {
        bail!("no request was issued");
    }
    Ok(BlkRun {
        result,
        written,
        read_back,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Read,
    Write,
    Flush,
}

struct Job {
    phase: Phase,
    head: u16,
    rng: Rng,
    offset: u64,
    op_started: Instant,
    header: GuestAddress,
    status: GuestAddress,
    data: GuestAddress,
}

struct Worker {
    queue: BlkQueue,
    ram: std::sync::Arc<GuestRam>,
    case: BlkCase,
    jobs: Vec<Job>,
    /// Job index by head descriptor.
    by_head: Vec<Option<usize>>,
    offsets: BlkOffsets,
    buffer: Vec<u8>,
    result: WorkerResult,
    written: Vec<(u64, u32)>,
    writes_seen: u64,
    sample_rng: Rng,
    counting: bool,
}

impl Worker {
    fn new(mut queue: BlkQueue, layout: DiskLayout, case: &BlkCase, index: usize) -> Result<Self> {
        let ram = queue.ram().clone();
        let size = case.workload.size();
        let now = Instant::now();
        let mut jobs = Vec::new();
        for job in 0..usize::from(case.depth) {
            jobs.push(Job {
                phase: Phase::Idle,
                head: 0,
                rng: Rng::new(((index as u64) << 32) + job as u64 + 1 + (case.generation << 48)),
                offset: 0,
                op_started: now,
                header: ram.allocate(16, 64)?,
                status: ram.allocate(1, 64)?,
                data: ram.allocate(u64::from(size), 4096)?,
            });
        }
        let slice = layout.slice(case.workload.writes(), index, case.queues);
        let queue_size = usize::from(queue.virtqueue().size());
        Ok(Self {
            queue,
            ram,
            case: *case,
            jobs,
            by_head: vec![None; queue_size],
            offsets: BlkOffsets::new(slice, size, case.workload.random()),
            buffer: vec![0u8; size as usize],
            result: WorkerResult::default(),
            written: Vec::with_capacity(KEEP_WRITES),
            writes_seen: 0,
            sample_rng: Rng::new(case.generation ^ ((index as u64) << 20) ^ 0x5eed),
            counting: true,
        })
    }

    fn run(mut self, stop: &AtomicBool) -> Result<WorkerOutcome> {
        for job in 0..self.jobs.len() {
            self.begin_op(job)?;
        }
        self.queue.virtqueue().notify()?;
        let timeout = Duration::from_secs(20);
        while self.jobs.iter().any(|j| j.phase != Phase::Idle) {
            let first = self.queue.virtqueue().wait_used(timeout)?;
            let mut next = Some(first);
            while let Some(used) = next {
                if self.counting && stop.load(Ordering::Relaxed) {
                    self.counting = false;
                }
                let job = self
                    .by_head
                    .get_mut(usize::from(used.head))
                    .and_then(Option::take)
                    .ok_or_else(|| anyhow!("the device returned head {} twice", used.head))?;
                self.complete(job)?;
                next = self.queue.virtqueue().pop_used()?;
            }
            self.queue.virtqueue().notify()?;
        }
        self.result.kicks = self.queue.virtqueue().kicks_sent();
        let checked = self.read_back()?;
        Ok((self.result, self.written, checked))
    }

    fn begin_op(&mut self, job: usize) -> Result<()> {
        if !self.counting {
            self.jobs[job].phase = Phase::Idle;
            return Ok(());
        }
        let j = &mut self.jobs[job];
        j.op_started = Instant::now();
        j.offset = self.offsets.next(&mut j.rng);
        j.phase = match self.case.workload {
            BlkWorkload::Read { .. } => Phase::Read,
            BlkWorkload::Write { .. } | BlkWorkload::WriteFlush { .. } => Phase::Write,
        };
        self.issue(job)
    }

    /// Publishes the request of `job`'s phase (the caller kicks).
    fn issue(&mut self, job: usize) -> Result<()> {
        let size = self.case.workload.size();
        let segment = self.case.segment.clamp(512, size.max(512));
        let mem = self.ram.memory();
        let j = &self.jobs[job];
        let (kind, sector) = match j.phase {
            Phase::Idle => return Ok(()),
            Phase::Read => (request_type::IN, j.offset / SECTOR_SIZE),
            Phase::Write => (request_type::OUT, j.offset / SECTOR_SIZE),
            Phase::Flush => (request_type::FLUSH, 0),
        };
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, j.header)?;
        // A status the device must overwrite.
        mem.write_obj(0xffu8, j.status)?;
        let data: Vec<Buffer> = match j.phase {
            Phase::Flush | Phase::Idle => Vec::new(),
            _ => (0..size)
                .step_by(segment as usize)
                .map(|at| Buffer {
                    addr: GuestAddress(j.data.0 + u64::from(at)),
                    len: (size - at).min(segment),
                })
                .collect(),
        };
        match j.phase {
            Phase::Write => {
                pattern::fill(&mut self.buffer, DISK_ID, self.case.generation, j.offset);
                mem.write_slice(&self.buffer, j.data)?;
            }
            Phase::Read => {
                // Poison the first and last words, so data left from an earlier request
                // cannot pass for this one's.
                mem.write_obj(!0u64, j.data)?;
                mem.write_obj(!0u64, GuestAddress(j.data.0 + u64::from(size) - 8))?;
            }
            _ => {}
        }
        let header_buffer = Buffer {
            addr: j.header,
            len: 16,
        };
        let status_buffer = Buffer {
            addr: j.status,
            len: 1,
        };
        let head = if j.phase == Phase::Read {
            let mut writable = data;
            writable.push(status_buffer);
            self.queue
                .virtqueue()
                .add_chain(&[header_buffer], &writable)?
        } else {
            let mut readable = vec![header_buffer];
            readable.extend(data);
            self.queue
                .virtqueue()
                .add_chain(&readable, &[status_buffer])?
        };
        let slot = self
            .by_head
            .get_mut(usize::from(head))
            .ok_or_else(|| anyhow!("head {head} outside the queue"))?;
        if slot.replace(job).is_some() {
            bail!("head {head} handed out twice");
        }
        self.jobs[job].head = head;
        self.result.requests += 1;
        Ok(())
    }

    fn complete(&mut self, job: usize) -> Result<()> {
        let size = self.case.workload.size();
        let mem = self.ram.memory();
        let (phase, offset, data, status_addr) = {
            let j = &self.jobs[job];
            (j.phase, j.offset, j.data, j.status)
        };
        let status: u8 = mem.read_obj(status_addr)?;
        if status != status::OK {
            bail!(
                "{} at {offset} returned status {status}",
                match phase {
                    Phase::Read => "READ",
                    Phase::Write => "WRITE",
                    Phase::Flush => "FLUSH",
                    Phase::Idle => "an idle request",
                }
            );
        }
        let next = match phase {
            Phase::Idle => bail!("a completion for an idle job"),
            Phase::Read => {
                mem.read_slice(&mut self.buffer, data)?;
                pattern::check(&self.buffer, DISK_ID, 0, offset).map_err(|at| {
                    anyhow!("READ of {size} bytes at {offset} returned wrong data at {at}")
                })?;
                None
            }
            Phase::Write => {
                self.remember(offset, size);
                match self.case.workload {
                    BlkWorkload::WriteFlush { .. } => Some(Phase::Flush),
                    _ => None,
                }
            }
            Phase::Flush => None,
        };
        if let Some(phase) = next {
            self.jobs[job].phase = phase;
            return self.issue(job);
        }
        if self.counting {
            self.result.ops += 1;
            self.result.bytes += u64::from(size);
            self.result
                .latency
                .record(self.jobs[job].op_started.elapsed().as_nanos() as u64);
        }
        self.begin_op(job)
    }

    /// Keeps a uniform sample of this queue's writes (reservoir sampling).
    fn remember(&mut self, offset: u64, size: u32) {
        self.writes_seen += 1;
        if self.written.len() < KEEP_WRITES {
            self.written.push((offset, size));
        } else {
            let pick = self.sample_rng.below(self.writes_seen) as usize;
            if pick < KEEP_WRITES {
                self.written[pick] = (offset, size);
            }
        }
    }

    /// Reads the sampled writes back through the device, one at a time.
    fn read_back(&mut self) -> Result<usize> {
        let ranges = self.written.clone();
        let mem = self.ram.memory();
        let job = self.jobs.first().context("no job")?;
        let (header_addr, status_addr, data) = (job.header, job.status, job.data);
        for &(offset, len) in &ranges {
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&request_type::IN.to_le_bytes());
            header[8..16].copy_from_slice(&(offset / SECTOR_SIZE).to_le_bytes());
            mem.write_slice(&header, header_addr)?;
            mem.write_obj(0xffu8, status_addr)?;
            mem.write_obj(!0u64, data)?;
            let head = self.queue.virtqueue().add_chain(
                &[Buffer {
                    addr: header_addr,
                    len: 16,
                }],
                &[
                    Buffer { addr: data, len },
                    Buffer {
                        addr: status_addr,
                        len: 1,
                    },
                ],
            )?;
            self.queue.virtqueue().notify()?;
            let used = self.queue.virtqueue().wait_used(Duration::from_secs(20))?;
            if used.head != head {
                bail!("read-back: the device returned head {}", used.head);
            }
            let status: u8 = mem.read_obj(status_addr)?;
            if status != status::OK {
                bail!("read-back READ at {offset} returned status {status}");
            }
            let buffer = &mut self.buffer[..len as usize];
            mem.read_slice(buffer, data)?;
            pattern::check(buffer, DISK_ID, self.case.generation, offset).map_err(|at| {
                anyhow!("a write of {len} bytes at {offset} reads back wrong data at {at}")
            })?;
        }
        Ok(ranges.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        let all = BlkWorkload::all();
        assert_eq!(all.len(), 7);
        for workload in &all {
            assert_eq!(BlkWorkload::parse(&workload.name()), Some(*workload));
        }
        assert_eq!(
            BlkWorkload::parse("read-128k-seq"),
            Some(BlkWorkload::Read {
                size: 128 << 10,
                random: false
            })
        );
        assert_eq!(
            BlkWorkload::parse("write-flush-4k"),
            Some(BlkWorkload::WriteFlush { size: 4096 })
        );
        assert_eq!(
            BlkWorkload::parse("write-1m-seq"),
            Some(BlkWorkload::Write {
                size: 1 << 20,
                random: false
            })
        );
        assert_eq!(BlkWorkload::parse("read-1024k-seq"), None);
        assert_eq!(BlkWorkload::parse("read-2m-seq"), None);
        assert!(BlkWorkload::parse("write-flush-4k").unwrap().writes());
        assert!(!BlkWorkload::parse("read-4k-rand").unwrap().writes());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("1T").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn regions_and_slices_do_not_overlap() {
        assert!(DiskLayout::new(3 << 20).is_err());
        assert!(DiskLayout::new((64 << 20) + 4096).is_err());
        let layout = DiskLayout::new(64 << 20).unwrap();
        assert_eq!(layout.region(false), (0, 32 << 20));
        assert_eq!(layout.region(true), (32 << 20, 64 << 20));
        let slices: Vec<_> = (0..3).map(|i| layout.slice(true, i, 3)).collect();
        for (i, &(start, end)) in slices.iter().enumerate() {
            assert!(start >= 32 << 20 && end <= 64 << 20 && start < end, "{i}");
            assert_eq!(start % DiskLayout::ALIGN, 0);
            if i > 0 {
                assert!(slices[i - 1].1 <= start);
            }
        }
    }

    #[test]
    fn offsets_stay_in_their_slice_and_sequential_ones_wrap() {
        let mut rng = Rng::new(7);
        let mut sequential = BlkOffsets::new((1 << 20, 1 << 20 | 3 << 17), 128 << 10, false);
        let seen: Vec<u64> = (0..4).map(|_| sequential.next(&mut rng)).collect();
        let base = 1u64 << 20;
        assert_eq!(
            seen,
            vec![base, base + (128 << 10), base + (256 << 10), base]
        );
        let mut random = BlkOffsets::new((2 << 20, 4 << 20), 4096, true);
        for _ in 0..10_000 {
            let offset = random.next(&mut rng);
            assert!(offset.is_multiple_of(4096) && offset >= 2 << 20 && offset + 4096 <= 4 << 20);
        }
    }

    #[test]
    fn a_prepared_image_holds_the_read_pattern_and_host_checks_catch_other_data() {
        let dir = std::env::temp_dir().join(format!("blk-loadgen-test-{}", std::process::id()));
        let path = dir.join("disk.img");
        let layout = DiskLayout::new(4 << 20).unwrap();
        prepare_image(&path, layout).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        verify_on_host(&path, 0, &[(0, 4096), ((4 << 20) - 8192, 8192)]).unwrap();
        assert!(verify_on_host(&path, 1, &[(4096, 4096)]).is_err());
        // A second prepare reuses the file: a write survives it.
        let mut block = vec![0u8; 4096];
        pattern::fill(&mut block, DISK_ID, 9, 3 << 20);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&block, 3 << 20)
            .unwrap();
        prepare_image(&path, layout).unwrap();
        verify_on_host(&path, 9, &[(3 << 20, 4096)]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
