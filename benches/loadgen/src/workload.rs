//! The workloads, and the harness that runs N worker threads for a fixed time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::daemon::ProcSample;
use crate::stats::Histogram;

/// Bytes asked for per READDIRPLUS request.
pub const READDIR_BUFFER: u32 = 32 * 1024;

/// One kind of load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    Read {
        size: u32,
        random: bool,
    },
    Write {
        size: u32,
        random: bool,
    },
    /// LOOKUP + GETATTR + FORGET of a random file of the tree (natively: one statx).
    LookupGetattr,
    /// CREATE + RELEASE + UNLINK + FORGET (natively: openat(O_CREAT) + close + unlinkat).
    CreateUnlink,
    /// OPENDIR, READDIRPLUS until the end, RELEASEDIR and BATCH_FORGET of a tree directory
    /// (natively: getdents64 + statx per entry). Ops are directory entries.
    Readdirplus,
}

impl Workload {
    pub fn all() -> Vec<Workload> {
        let mut all = Vec::new();
        for size in [4096, 1 << 20] {
            for random in [true, false] {
                all.push(Workload::Read { size, random });
            }
        }
        for size in [4096, 1 << 20] {
            for random in [true, false] {
                all.push(Workload::Write { size, random });
            }
        }
        all.extend([
            Workload::LookupGetattr,
            Workload::CreateUnlink,
            Workload::Readdirplus,
        ]);
        all
    }

    pub fn name(&self) -> String {
        let io = |kind: &str, size: u32, random: bool| {
            let size = if size >= 1 << 20 {
                format!("{}m", size >> 20)
            } else {
                format!("{}k", size >> 10)
            };
            format!("{kind}-{size}-{}", if random { "rand" } else { "seq" })
        };
        match *self {
            Workload::Read { size, random } => io("read", size, random),
            Workload::Write { size, random } => io("write", size, random),
            Workload::LookupGetattr => "lookup-getattr".into(),
            Workload::CreateUnlink => "create-unlink".into(),
            Workload::Readdirplus => "readdirplus".into(),
        }
    }

    pub fn parse(name: &str) -> Option<Workload> {
        Workload::all().into_iter().find(|w| w.name() == name)
    }

    /// The family a plot groups it in.
    pub fn family(&self) -> &'static str {
        match self {
            Workload::Read { .. } => "read",
            Workload::Write { .. } => "write",
            Workload::LookupGetattr | Workload::CreateUnlink | Workload::Readdirplus => "metadata",
        }
    }

    /// Largest data buffer one request needs.
    pub fn max_data(&self) -> u32 {
        match *self {
            Workload::Read { size, .. } | Workload::Write { size, .. } => size.max(4096),
            Workload::Readdirplus => READDIR_BUFFER,
            _ => 4096,
        }
    }
}

/// What one run should do.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub workload: Workload,
    /// Generator threads, each driving its own request queue (or its own syscalls).
    pub threads: usize,
    /// Requests in flight per thread.
    pub depth: u16,
    /// Files (and churn directories) the jobs spread over: the logical queue count.
    pub files: usize,
    pub duration: Duration,
    /// Write generation, so data of an earlier run cannot pass for this one's.
    pub generation: u64,
}

/// What one worker thread measured.
#[derive(Default)]
pub struct WorkerResult {
    pub ops: u64,
    pub bytes: u64,
    pub latency: Histogram,
    /// Some (file, offset, len) this worker wrote, for checking on the host afterwards.
    pub written: Vec<(usize, u64, usize)>,
    /// Kicks sent and requests submitted (frontend only).
    pub kicks: u64,
    pub requests: u64,
}

/// What a whole run measured.
pub struct RunResult {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: f64,
    pub latency: Histogram,
    pub written: Vec<(usize, u64, usize)>,
    pub before: Option<ProcSample>,
    pub after: Option<ProcSample>,
    pub kicks: u64,
    pub requests: u64,
}

/// Runs `threads` workers: each sets itself up with `setup`, all start together, `run` goes
/// until the stop flag, and `sampler` reads the daemon's figures at the start and the stop.
/// Takes the queue of worker `index` out of the slots handed to [`harness`]'s workers.
pub fn take_queue<Q>(slots: &[std::sync::Mutex<Option<Q>>], index: usize) -> Result<Q> {
    slots
        .get(index)
        .ok_or_else(|| anyhow!("no queue for worker {index}"))?
        .lock()
        .map_err(|_| anyhow!("queue lock poisoned"))?
        .take()
        .ok_or_else(|| anyhow!("queue already taken"))
}

pub fn harness<W, S, R>(
    threads: usize,
    duration: Duration,
    sampler: &(dyn Fn() -> Option<ProcSample> + Sync),
    setup: S,
    run: R,
) -> Result<RunResult>
where
    S: Fn(usize) -> Result<W> + Sync,
    R: Fn(W, &AtomicBool) -> Result<WorkerResult> + Sync,
{
    let barrier = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|index| {
                let (barrier, stop, setup, run) = (&barrier, &stop, &setup, &run);
                scope.spawn(move || {
                    let worker = setup(index);
                    // Every thread reaches the barrier, even a failed one, so none waits forever.
                    barrier.wait();
                    run(worker?, stop)
                })
            })
            .collect();
        barrier.wait();
        let before = sampler();
        let started = Instant::now();
        std::thread::sleep(duration);
        let after = sampler();
        stop.store(true, Ordering::SeqCst);
        let elapsed = started.elapsed().as_secs_f64();
        let mut total = RunResult {
            ops: 0,
            bytes: 0,
            elapsed,
            latency: Histogram::default(),
            written: Vec::new(),
            before,
            after,
            kicks: 0,
            requests: 0,
        };
        let mut first_error = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok(result)) => {
                    total.ops += result.ops;
                    total.bytes += result.bytes;
                    total.latency.merge(&result.latency);
                    total.written.extend(result.written);
                    total.kicks += result.kicks;
                    total.requests += result.requests;
                }
                Ok(Err(err)) => {
                    first_error.get_or_insert(err);
                }
                Err(_) => {
                    first_error.get_or_insert(anyhow!("a worker thread panicked"));
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(total),
        }
    })
}

/// A small fast PRNG (xorshift64*), one per job so runs do not share state.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// Offsets of one I/O stream: random blocks or a sequential cursor that wraps.
pub struct Offsets {
    pub size: u64,
    pub file_size: u64,
    pub random: bool,
    cursors: Vec<u64>,
}

impl Offsets {
    pub fn new(size: u32, file_size: u64, random: bool, files: usize) -> Self {
        Self {
            size: u64::from(size),
            file_size,
            random,
            cursors: vec![0; files],
        }
    }

    pub fn next(&mut self, file: usize, rng: &mut Rng) -> u64 {
        let blocks = (self.file_size / self.size).max(1);
        if self.random {
            return rng.below(blocks) * self.size;
        }
        let cursor = &mut self.cursors[file];
        let offset = *cursor;
        *cursor = if offset + 2 * self.size > blocks * self.size {
            0
        } else {
            offset + self.size
        };
        offset
    }
}

/// Keeps a bounded sample of written ranges.
pub fn remember_write(
    written: &mut Vec<(usize, u64, usize)>,
    count: u64,
    entry: (usize, u64, usize),
) {
    const KEEP: usize = 64;
    if written.len() < KEEP {
        written.push(entry);
    } else {
        written[(count % KEEP as u64) as usize] = entry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let all = Workload::all();
        assert_eq!(all.len(), 11);
        for workload in &all {
            assert_eq!(Workload::parse(&workload.name()), Some(*workload));
        }
        assert_eq!(
            Workload::parse("read-4k-rand"),
            Some(Workload::Read {
                size: 4096,
                random: true
            })
        );
        assert_eq!(Workload::parse("nope"), None);
    }

    #[test]
    fn sequential_offsets_wrap_inside_the_file() {
        let mut offsets = Offsets::new(4096, 3 * 4096 + 100, false, 1);
        let mut rng = Rng::new(1);
        let seen: Vec<u64> = (0..5).map(|_| offsets.next(0, &mut rng)).collect();
        assert_eq!(seen, vec![0, 4096, 8192, 0, 4096]);
        let mut random = Offsets::new(4096, 1 << 20, true, 1);
        for _ in 0..1000 {
            let offset = random.next(0, &mut rng);
            assert!(offset & 4095 == 0 && offset + 4096 <= 1 << 20);
        }
    }
}
