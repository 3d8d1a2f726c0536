//! What both vhost-user devices (virtio-fs in [`crate::vhost_user`], virtio-blk in
//! [`crate::vhost_blk`]) do with a queue thread's events: route an event to the queue it
//! kicked (or to the thread's one-time confinement), and drain a queue with guest
//! notifications suppressed meanwhile when EVENT_IDX is on.
//!
//! Errors returned to vhost-user-backend from an event handler stop the queue's thread,
//! so everything here logs problems instead of returning them.

use tracing::warn;
use vhost_user_backend::VringT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

/// Where one queue thread's event goes.
pub(crate) enum QueueEvent<'a, V> {
    /// The device's own event: confine this queue thread (its seccomp filter).
    Confine,
    /// The guest kicked this vring.
    Kick(&'a V),
}

/// Routes `device_event` of `thread_id`; `None` for an event to ignore (logged).
pub(crate) fn route<'a, V>(
    device_event: u16,
    evset: EventSet,
    vrings: &'a [V],
    thread_id: usize,
    confine_event_id: u16,
) -> Option<QueueEvent<'a, V>> {
    if evset != EventSet::IN {
        warn!(
            queue = thread_id,
            "Ignoring an unexpected queue event {evset:?}."
        );
        return None;
    }
    if device_event == confine_event_id {
        return Some(QueueEvent::Confine);
    }
    // One queue per thread: the thread index is the queue index, the event its only vring.
    let vring = vrings.get(usize::from(device_event));
    if vring.is_none() {
        warn!(
            queue = thread_id,
            "Ignoring an event for unknown vring {device_event}."
        );
    }
    vring.map(QueueEvent::Kick)
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
