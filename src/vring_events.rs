//! What both vhost-user devices (virtio-fs in [`crate::vhost_user`], virtio-blk in
//! [`crate::vhost_blk`]) do with their queue threads: have each one confine itself (its
//! seccomp filter) before a frontend connects, route an event to the queue it kicked, and
//! drain a queue with guest notifications suppressed meanwhile when EVENT_IDX is on.
//!
//! Errors returned to vhost-user-backend from an event handler stop the queue's thread,
//! so the event paths here log problems instead of returning them.

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use tracing::warn;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long the queue threads get to confine themselves.
const CONFINE_TIMEOUT: Duration = Duration::from_secs(10);

/// One start-up event per queue thread: written once, it makes the thread confine itself
/// (the library gives no hook that runs on a queue thread before the first kick).
pub(crate) struct QueueConfinement {
    /// Closed once every thread has confined itself (one descriptor per queue thread less
    /// for the daemon's life).
    events: Mutex<Vec<EventFd>>,
    /// The event id the threads' listeners are registered under: above the queues and the
    /// library's exit event (`num_queues()`), as `register_listener` requires.
    event_id: u16,
    reports: Mutex<Option<mpsc::Sender<Result<(), String>>>>,
}

impl QueueConfinement {
    pub(crate) fn new(threads: usize, num_queues: usize) -> anyhow::Result<Self> {
        let events = (0..threads)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot create the queue threads' start-up events")?;
        let event_id = u16::try_from(num_queues + 1).context("too many queues")?;
        Ok(Self {
            events: Mutex::new(events),
            event_id,
            reports: Mutex::new(None),
        })
    }

    pub(crate) fn event_id(&self) -> u16 {
        self.event_id
    }

    /// Has every queue thread of `handlers` run its confinement (see [`Self::on_event`])
    /// before any frontend connects, and fails if one cannot or does not answer in time.
    pub(crate) fn confine_all<T: VhostUserBackend>(
        &self,
        handlers: &[Arc<VringEpollHandler<T>>],
    ) -> anyhow::Result<()> {
        let (reports, received) = mpsc::channel();
        *self.reports.lock().unwrap_or_else(|e| e.into_inner()) = Some(reports);
        {
            // Not held while waiting: each thread takes it to read its event.
            let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            for (thread, handler) in handlers.iter().enumerate() {
                let event = events
                    .get(thread)
                    .ok_or_else(|| anyhow!("queue thread {thread} has no start-up event"))?;
                handler
                    .register_listener(event.as_raw_fd(), EventSet::IN, u64::from(self.event_id))
                    .with_context(|| format!("cannot reach queue thread {thread}"))?;
                event
                    .write(1)
                    .with_context(|| format!("cannot wake queue thread {thread}"))?;
            }
        }
        for _ in handlers {
            match received.recv_timeout(CONFINE_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(anyhow!(e)),
                Err(_) => {
                    return Err(anyhow!(
                        "the queue threads did not confine themselves within {CONFINE_TIMEOUT:?}"
                    ))
                }
            }
        }
        // Done with: out of the threads' epoll sets, and closed.
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        for (handler, event) in handlers.iter().zip(events.iter()) {
            if let Err(e) = handler.unregister_listener(
                event.as_raw_fd(),
                EventSet::IN,
                u64::from(self.event_id),
            ) {
                warn!("Cannot remove a queue thread's start-up event: {e}.");
            }
        }
        events.clear();
        Ok(())
    }

    /// Runs on queue thread `thread` when its start-up event fires: `confine` installs the
    /// thread's restrictions; the outcome goes to [`Self::confine_all`].
    pub(crate) fn on_event(&self, thread: usize, confine: impl FnOnce() -> Result<(), String>) {
        if let Some(event) = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(thread)
        {
            // Level-triggered: drain it, or the thread would be woken again and again.
            let _ = event.read();
        }
        let outcome = confine().map_err(|e| format!("queue thread {thread}: {e}"));
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reports) = reports.as_ref() {
            let _ = reports.send(outcome);
        }
    }
}

/// A vhost-user device's side of its queue threads, for [`handle_queue_event`].
pub(crate) trait QueueThreads {
    type Vring;
    fn confinement(&self) -> &QueueConfinement;
    /// Runs once on each queue thread, from its start-up event.
    fn confine_this_queue_thread(&self, thread: usize);
    /// Shows the device the vrings of `thread`, on every event of that thread.
    fn saw_vrings(&self, _thread: usize, _vrings: &[Self::Vring]) {}
    /// Serves what the guest made available on `queue`.
    fn serve_queue(&self, queue: usize, vring: &Self::Vring);
}

/// The body of `VhostUserBackend::handle_event` for a device with one queue per thread (the
/// thread index is the queue index, the event its only vring): routes the start-up event
/// and kicks; never returns an error, since one would stop the thread.
pub(crate) fn handle_queue_event<D: QueueThreads>(
    device: &D,
    device_event: u16,
    evset: EventSet,
    vrings: &[D::Vring],
    thread_id: usize,
) -> std::io::Result<()> {
    if evset != EventSet::IN {
        warn!(
            queue = thread_id,
            "Ignoring an unexpected queue event {evset:?}."
        );
        return Ok(());
    }
    device.saw_vrings(thread_id, vrings);
    if device_event == device.confinement().event_id() {
        device.confine_this_queue_thread(thread_id);
        return Ok(());
    }
    match vrings.get(usize::from(device_event)) {
        Some(vring) => device.serve_queue(thread_id, vring),
        None => warn!(
            queue = thread_id,
            "Ignoring an event for unknown vring {device_event}."
        ),
    }
    Ok(())
}

/// Whether a queue may still be served after a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Emptied; with EVENT_IDX, look again after re-enabling notifications.
    Empty,
    /// The frontend stopped the queue meanwhile: leave it alone.
    Stopped,
}

/// Runs `drain` until the queue is empty. With EVENT_IDX the guest is asked not to kick
/// while it runs, and a request made just before notifications come back on is caught by
/// draining once more.
pub(crate) fn drain_queue<M, V>(
    queue: usize,
    vring: &V,
    event_idx: bool,
    mut drain: impl FnMut() -> Drained,
) where
    M: GuestAddressSpace,
    V: VringT<M>,
{
    loop {
        if event_idx {
            if let Err(e) = vring.disable_notification() {
                warn!(queue, "Cannot disable queue notifications: {e}.");
            }
        }
        if drain() == Drained::Stopped || !event_idx {
            return;
        }
        match vring.enable_notification() {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                warn!(queue, "Cannot re-enable queue notifications: {e}.");
                return;
            }
        }
    }
}
