//! Device state for live migration (protocol feature DEVICE_STATE): SET_DEVICE_STATE_FD hands
//! berth a pipe to write its state into (source) or read it from (destination), and
//! CHECK_DEVICE_STATE asks how that went.
//!
//! The control thread must not block on the pipe (the VMM reads or writes it after the
//! reply), and its seccomp filter allows no file access, so the transfer runs on a thread of
//! its own, started with the device and confined to the migration role; the control thread
//! hands it the pipe and, at CHECK_DEVICE_STATE, waits for its verdict. After a load it also
//! takes again the guest's locks the source still held, waiting for them in the kernel.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use berth_passthrough::FsServer;
use berth_seccomp::{SeccompAction, ThreadRole};
use tracing::{error, info};
use vhost::vhost_user::message::VhostTransferStateDirection;

/// Largest state stream a destination accepts (a million inodes with long paths fit).
const MAX_STATE_BYTES: usize = 1 << 30;
/// How long CHECK_DEVICE_STATE waits for the transfer to finish once the VMM has closed its
/// end of the pipe (loading) or read it to the end (saving).
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

struct Job {
    direction: VhostTransferStateDirection,
    file: File,
    done: mpsc::Sender<Result<(), String>>,
}

/// The thread that saves and loads the filesystem's state.
pub(super) struct StateTransfer {
    /// Taken when the device goes, which ends the thread.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The verdict of the transfer started last, until CHECK_DEVICE_STATE collects it.
    pending: Mutex<Option<mpsc::Receiver<Result<(), String>>>>,
    /// Joined when the device goes, so that nothing of the thread outlives it.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StateTransfer {
    fn drop(&mut self) {
        self.jobs
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // A transfer still running ends with its pipe: the VMM's end closes when the VMM
        // goes, and the VMM has gone from this device already.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl StateTransfer {
    /// Starts the transfer thread (from the main thread, which may still create threads).
    /// `queues`: the device's number of queues, which a loaded state's waiting lock requests
    /// must come from.
    pub(super) fn start(
        server: Arc<FsServer>,
        seccomp: SeccompAction,
        queues: usize,
    ) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("berth-migration".into())
            .spawn(move || {
                if let Err(e) = berth_seccomp::install_filter(ThreadRole::Migration, seccomp) {
                    // Without its filter the thread refuses every transfer rather than run
                    // wider than promised.
                    error!("{e}; live migration is unavailable.");
                    for job in queue {
                        let _ = job.done.send(Err(format!(
                            "the migration thread could not confine itself ({e})"
                        )));
                    }
                    return;
                }
                loop {
                    // Locks a loaded state brought that the source still held are waited for
                    // here between jobs (the source lets go when it exits).
                    let job = if server.migrated_locks_pending() {
                        match queue.try_recv() {
                            Ok(job) => job,
                            Err(mpsc::TryRecvError::Empty) => {
                                server.wait_for_migrated_locks(
                                    berth_passthrough::LOCK_RETRY_INTERVAL,
                                );
                                continue;
                            }
                            Err(mpsc::TryRecvError::Disconnected) => break,
                        }
                    } else {
                        match queue.recv() {
                            Ok(job) => job,
                            Err(_) => break,
                        }
                    };
                    let outcome = transfer(&server, job.direction, job.file, queues);
                    if let Err(e) = &outcome {
                        error!("{e}");
                    }
                    let _ = job.done.send(outcome);
                }
            })
            .context("cannot start the migration thread")?;
        Ok(StateTransfer {
            jobs: Mutex::new(Some(jobs)),
            pending: Mutex::new(None),
            thread: Some(thread),
        })
    }

    /// SET_DEVICE_STATE_FD: queues the transfer over `file` and returns at once.
    pub(super) fn begin(
        &self,
        direction: VhostTransferStateDirection,
        file: File,
    ) -> io::Result<()> {
        let (done, verdict) = mpsc::channel();
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(verdict);
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or_else(|| io::Error::other("the migration thread is gone"))?
            .send(Job {
                direction,
                file,
                done,
            })
            .map_err(|_| io::Error::other("the migration thread is gone"))
    }

    /// CHECK_DEVICE_STATE: waits for the last transfer's verdict.
    pub(super) fn check(&self) -> io::Result<()> {
        let verdict = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| io::Error::other("no device state transfer was started"))?;
        match verdict.recv_timeout(CHECK_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::other(format!(
                "the device state transfer did not finish within {CHECK_TIMEOUT:?}"
            ))),
        }
    }
}

fn transfer(
    server: &FsServer,
    direction: VhostTransferStateDirection,
    mut file: File,
    queues: usize,
) -> Result<(), String> {
    match direction {
        VhostTransferStateDirection::SAVE => {
            let state = server
                .save_state()
                .map_err(|e| format!("Cannot save the device state: {e}"))?;
            file.write_all(&state)
                .and_then(|()| file.flush())
                .map_err(|e| format!("Cannot send the device state to the frontend: {e}."))?;
            info!(
                bytes = state.len(),
                "Sent the device state to the migration destination."
            );
            Ok(())
        }
        VhostTransferStateDirection::LOAD => {
            let stream = berth_passthrough::read_stream(&mut file, MAX_STATE_BYTES)
                .map_err(|e| format!("Cannot read the device state from the frontend: {e}."))?;
            server
                .load_state(&stream, Some(queues))
                .map_err(|e| format!("Refusing the migrated device state: {e}"))?;
            info!(
                bytes = stream.len(),
                "Loaded the device state from the migration source."
            );
            Ok(())
        }
    }
}
