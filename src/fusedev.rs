//! `berth fuse`: the same filesystem mounted on the host through /dev/fuse.
//!
//! The main thread mounts, starts the worker threads (each reading requests from its own
//! channel on the FUSE connection) and then waits for one of two things: a termination signal,
//! after which it stops the workers and unmounts, or a worker stopping by itself, which means
//! the filesystem was unmounted from outside (or the connection failed).

use std::os::unix::io::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use berth_passthrough::FsServer;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};
use tracing::{debug, error, info, warn};

use crate::shutdown::{signal_name, TerminationSignals};

/// How long stopping workers may take before berth unmounts anyway (a worker can be stuck in
/// a slow host operation).
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

enum Event {
    Signal(libc::c_int),
    WorkerStopped { index: usize, error: Option<String> },
}

/// Mounts the filesystem served by `server` on `mountpoint` and serves it with `threads`
/// workers until a termination signal or an external unmount.
pub fn serve(
    server: Arc<FsServer>,
    mountpoint: &Path,
    threads: usize,
    readonly: bool,
    signals: TerminationSignals,
) -> anyhow::Result<()> {
    let mut session = FuseSession::new(mountpoint, "berth", "berth", readonly)
        .map_err(|e| anyhow!("cannot use {} as a mount point: {e}", mountpoint.display()))?;
    session.set_allow_other(true);
    session
        .mount()
        .map_err(|e| anyhow!("cannot mount on {}: {e}", mountpoint.display()))?;
    info!(
        "Mounted the shared directory on {} with {threads} worker threads.",
        mountpoint.display()
    );

    let (events, event_receiver) = mpsc::channel();
    let signal_events = events.clone();
    signals.spawn_handler(move |signal| {
        let _ = signal_events.send(Event::Signal(signal));
    })?;

    let mut running = 0;
    for index in 0..threads {
        let channel = match session.new_channel() {
            Ok(channel) => channel,
            Err(e) => {
                error!("Cannot open a channel on the FUSE connection: {e}.");
                break;
            }
        };
        let server = server.clone();
        let events = events.clone();
        let spawned = thread::Builder::new()
            .name(format!("berth-fuse-{index}"))
            .spawn(move || {
                let error = run_worker(index, channel, &server).err();
                let _ = events.send(Event::WorkerStopped { index, error });
            });
        match spawned {
            Ok(_) => running += 1,
            Err(e) => {
                error!("Cannot start FUSE worker thread {index}: {e}.");
                break;
            }
        }
    }
    if running < threads {
        stop_workers(&session, &event_receiver, running);
        unmount(&mut session, mountpoint);
        bail!("could not start the FUSE worker threads");
    }

    let mut lost = false;
    let outcome = match event_receiver.recv() {
        Ok(Event::Signal(signal)) => {
            info!("Received {}; unmounting.", signal_name(signal));
            stop_workers(&session, &event_receiver, running);
            Ok(())
        }
        Ok(Event::WorkerStopped { index, error }) => {
            lost = connection_lost(&session);
            stop_workers(&session, &event_receiver, running - 1);
            match error {
                _ if lost => {
                    info!("The filesystem was unmounted; shutting down.");
                    Ok(())
                }
                None => {
                    info!("The FUSE connection was closed; shutting down.");
                    Ok(())
                }
                Some(e) => Err(anyhow!("FUSE worker {index} failed: {e}")),
            }
        }
        Err(mpsc::RecvError) => Err(anyhow!("lost track of the FUSE worker threads")),
    };
    if lost {
        // Already gone from the mount table; this only closes berth's side.
        let _ = session.umount();
    } else {
        unmount(&mut session, mountpoint);
    }
    outcome
}

fn run_worker(index: usize, mut channel: FuseChannel, server: &FsServer) -> Result<(), String> {
    loop {
        let (reader, writer) = match channel.get_request() {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            server.handle_message(reader, writer.into(), None)
        }));
        match result {
            Ok(Ok(_)) => {}
            // The kernel forgets interrupted requests; a reply to one fails with ENOENT.
            Ok(Err(fuse_backend_rs::Error::EncodeMessage(e)))
                if e.raw_os_error() == Some(libc::ENOENT) =>
            {
                debug!(worker = index, "The kernel dropped an interrupted request.");
            }
            Ok(Err(e)) => warn!(worker = index, "Could not serve a FUSE request: {e}."),
            Err(_) => error!(
                worker = index,
                "Serving a FUSE request panicked; the request was dropped."
            ),
        }
    }
}

/// Wakes every worker and waits (bounded) for `running` of them to report that they stopped.
fn stop_workers(session: &FuseSession, events: &mpsc::Receiver<Event>, mut running: usize) {
    if let Err(e) = session.wake() {
        warn!("Cannot wake the FUSE worker threads: {e}.");
    }
    let deadline = Instant::now() + WORKER_STOP_GRACE;
    while running > 0 {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(timeout) {
            Ok(Event::WorkerStopped { index, error }) => {
                running -= 1;
                if let Some(e) = error {
                    debug!(worker = index, "FUSE worker stopped: {e}.");
                }
            }
            Ok(Event::Signal(_)) => {}
            Err(RecvTimeoutError::Timeout) => {
                warn!("{running} FUSE worker threads are still busy; unmounting anyway.");
                return;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Whether the kernel side of the FUSE connection is gone (unmounted or aborted).
fn connection_lost(session: &FuseSession) -> bool {
    let Some(file) = session.get_fuse_file() else {
        return true;
    };
    let mut pollfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    rc > 0 && pollfd.revents & libc::POLLERR != 0
}

fn unmount(session: &mut FuseSession, mountpoint: &Path) {
    match session.umount() {
        Ok(()) => info!("Unmounted {}.", mountpoint.display()),
        Err(e) => error!("Cannot unmount {}: {e}.", mountpoint.display()),
    }
}
