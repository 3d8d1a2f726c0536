//! A fixed set of threads running boxed jobs, for `--thread-pool-size`.
//!
//! The queue of waiting jobs is bounded: when every thread is busy and the queue is full, the
//! submitting queue thread waits, so it stops taking descriptor chains from its virtqueue and
//! the guest sees a full ring instead of the daemon growing a backlog without limit.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context};

pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Jobs that may wait for a free pool thread, per pool thread.
const BACKLOG_PER_THREAD: usize = 16;

/// Threads that wait for host locks for lock requests (FUSE_SETLKW, with `--posix-lock` or
/// `--flock`) where no request pool takes them: a request that waited on the thread that
/// reads requests would keep it from reading the one that lets go of the lock. As many
/// requests wait at once; more queue behind them.
pub const LOCK_WAITERS: usize = 8;

/// How long a starting pool thread may take to confine itself.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs jobs on `size` threads; the threads end when the pool is dropped.
pub struct WorkerPool {
    sender: Mutex<SyncSender<Job>>,
}

impl WorkerPool {
    /// Starts `size` threads, with [`BACKLOG_PER_THREAD`] jobs per thread waiting at most (see
    /// [`WorkerPool::new`]).
    pub fn start<F>(size: usize, on_start: F) -> anyhow::Result<Self>
    where
        F: Fn() -> Result<(), String> + Clone + Send + 'static,
    {
        Self::new(size, size * BACKLOG_PER_THREAD, on_start)
    }

    /// Starts `size` threads that first run `on_start` (e.g. install their seccomp filter) and
    /// then take jobs; at most `backlog` jobs wait for a free thread. Fails, stopping the pool,
    /// if any thread cannot start or `on_start` fails on it.
    pub fn new<F>(size: usize, backlog: usize, on_start: F) -> anyhow::Result<Self>
    where
        F: Fn() -> Result<(), String> + Clone + Send + 'static,
    {
        let (sender, receiver) = mpsc::sync_channel::<Job>(backlog.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let (started, start_reports) = mpsc::channel();
        for index in 0..size {
            let receiver = receiver.clone();
            let started = started.clone();
            let on_start = on_start.clone();
            thread::Builder::new()
                .name(format!("berth-pool-{index}"))
                .spawn(move || {
                    let outcome = on_start();
                    let ready = outcome.is_ok();
                    let _ = started.send(outcome);
                    if ready {
                        run_jobs(&receiver);
                    }
                })
                .with_context(|| format!("cannot start thread {index} of the request pool"))?;
        }
        for _ in 0..size {
            match start_reports.recv_timeout(START_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(anyhow!("a request pool thread failed to start: {e}")),
                Err(_) => {
                    return Err(anyhow!(
                        "the request pool threads did not start within {START_TIMEOUT:?}"
                    ))
                }
            }
        }
        Ok(WorkerPool {
            sender: Mutex::new(sender),
        })
    }

    /// Queues `job`, waiting while the backlog is full; it runs on the first idle thread.
    pub fn execute(&self, job: Job) {
        // Cloning the sender lets several queue threads wait for room at once.
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Err(mpsc::SendError(job)) = sender.send(job) {
            // Every pool thread is gone: run it here instead (the queue thread's filter allows
            // everything a pool thread's does).
            tracing::warn!("The request thread pool has stopped; serving the request inline.");
            job();
        }
    }
}

fn run_jobs(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let receiver = receiver.lock().unwrap_or_else(|e| e.into_inner());
            receiver.recv()
        };
        match job {
            Ok(job) => {
                // A panicking job must not take the thread with it.
                if panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                    tracing::error!("A request pool job panicked; the pool thread goes on.");
                }
            }
            Err(mpsc::RecvError) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Instant;

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::yield_now();
        }
    }

    #[test]
    fn jobs_run_concurrently() {
        // Two jobs that wait for each other only finish if they run on two threads at once.
        let pool = WorkerPool::new(2, 4, || Ok(())).unwrap();
        let barrier = Arc::new(Barrier::new(3));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let barrier = barrier.clone();
            let done = done.clone();
            pool.execute(Box::new(move || {
                barrier.wait();
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        barrier.wait();
        wait_until("both jobs", || done.load(Ordering::SeqCst) == 2);
    }

    #[test]
    fn a_failing_start_hook_fails_the_pool() {
        let err = WorkerPool::new(3, 4, || Err("no filter for you".to_owned()))
            .err()
            .expect("the pool must not start");
        assert!(err.to_string().contains("no filter for you"), "{err}");
    }

    #[test]
    fn the_backlog_is_bounded_and_the_submitter_waits() {
        let pool = Arc::new(WorkerPool::new(1, 2, || Ok(())).unwrap());
        let release = Arc::new(Barrier::new(2));
        let queued = Arc::new(AtomicUsize::new(0));
        // One job occupies the only thread until released.
        let blocker = release.clone();
        let running = Arc::new(AtomicUsize::new(0));
        let started = running.clone();
        pool.execute(Box::new(move || {
            started.store(1, Ordering::SeqCst);
            blocker.wait();
        }));
        wait_until("the blocking job", || running.load(Ordering::SeqCst) == 1);
        // Two more fill the backlog; the fourth submission must wait.
        let submitter = {
            let pool = pool.clone();
            let queued = queued.clone();
            thread::spawn(move || {
                for _ in 0..3 {
                    pool.execute(Box::new(|| {}));
                    queued.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        wait_until("the backlog to fill", || queued.load(Ordering::SeqCst) >= 2);
        thread::sleep(Duration::from_millis(100));
        assert_eq!(
            queued.load(Ordering::SeqCst),
            2,
            "a third job was accepted past the backlog"
        );
        release.wait();
        submitter.join().unwrap();
        assert_eq!(queued.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_panicking_job_keeps_its_thread() {
        let pool = WorkerPool::new(1, 4, || Ok(())).unwrap();
        pool.execute(Box::new(|| panic!("job bug")));
        let done = Arc::new(AtomicUsize::new(0));
        let counter = done.clone();
        pool.execute(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        wait_until("the job after the panic", || {
            done.load(Ordering::SeqCst) == 1
        });
    }
}
