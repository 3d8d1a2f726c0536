//! A fixed set of threads running boxed jobs, for `--thread-pool-size`.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Runs jobs on `size` threads; the threads end when the pool is dropped.
pub struct WorkerPool {
    sender: Mutex<Sender<Job>>,
}

impl WorkerPool {
    pub fn new(size: usize) -> io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..size {
            let receiver = receiver.clone();
            thread::Builder::new()
                .name(format!("berth-pool-{index}"))
                .spawn(move || run_jobs(&receiver))?;
        }
        Ok(WorkerPool {
            sender: Mutex::new(sender),
        })
    }

    /// Queues `job`; it runs on the first idle thread.
    pub fn execute(&self, job: Job) {
        let sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(mpsc::SendError(job)) = sender.send(job) {
            // Every pool thread is gone (they only stop on a panic): run it here instead.
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
            Ok(job) => job(),
            Err(mpsc::RecvError) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn jobs_run_concurrently() {
        // Two jobs that wait for each other only finish if they run on two threads at once.
        let pool = WorkerPool::new(2).unwrap();
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while done.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            thread::yield_now();
        }
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }
}
