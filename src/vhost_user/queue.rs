//! Serving a virtqueue: pop a descriptor chain, turn it into segments ([`chain`]), hand it to
//! the FUSE server, return it on the used ring with the reply's length.
//!
//! Every request takes this one path, READ and WRITE included: the server moves their data
//! between the host file and the guest's buffers with one `preadv`/`pwritev`.

use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use berth_passthrough::{DaxWindow, FsServer, QueueOrigin, Served};
use tracing::{debug, info, warn};

use crate::vring_events::{self, Drained};
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use super::chain::ChainSegments;
use super::{FsBackend, GuestMemory, LoggedMemory, MemoryGuard, Vring, HIPRIO_QUEUE};

impl FsBackend {
    /// Serves everything available on one queue, re-checking after re-enabling notifications
    /// so that a request added in between is not left waiting for a kick that never comes.
    pub(super) fn serve_kicked_queue(&self, queue: usize, vring: &Vring) {
        let Some(mem) = self.guest_memory() else {
            warn!(
                queue,
                "The frontend kicked a queue before sending the guest memory table; ignoring it."
            );
            return;
        };
        if !vring.get_ref().get_queue().ready() {
            // A kick (or the library's vring-enabled event) for a queue stopped meanwhile.
            return;
        }
        if !self.queue_started[queue].swap(true, Ordering::Relaxed) {
            let kind = if queue == HIPRIO_QUEUE {
                "high-priority"
            } else {
                "request"
            };
            info!(queue, "The frontend started using {kind} queue {queue}.");
            // Before anything new is taken off it, the queue is where it stopped.
            let base = vring.get_ref().get_queue().next_avail();
            self.resume_parked_waits(Some((queue, base)));
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut handled = 0usize;
        loop {
            let before = handled;
            self.serve_until_empty(queue, vring, &mem, event_idx, &mut handled);
            // A guest that just got a reply often sends the next request within microseconds:
            // waiting briefly here saves both sides a sleep and a wake-up.
            if handled == before || self.poll.is_zero() || !self.poll_for_work(vring, &mem) {
                break;
            }
        }
        if handled > 0 {
            debug!(queue, handled, "served requests");
        }
    }

    /// Spins up to the poll window; true when the guest made a new request available.
    fn poll_for_work(&self, vring: &Vring, mem: &MemoryGuard) -> bool {
        let deadline = Instant::now() + self.poll;
        loop {
            let pending = {
                let state = vring.get_mut();
                let queue = state.get_queue();
                queue
                    .avail_idx(&**mem, Ordering::Acquire)
                    .map(|avail| avail != Wrapping(queue.next_avail()))
                    .unwrap_or(false)
            };
            if pending {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn serve_until_empty(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &MemoryGuard,
        event_idx: bool,
        handled: &mut usize,
    ) {
        vring_events::drain_queue(queue, vring, event_idx, || {
            *handled += self.drain_queue(queue, vring, mem, event_idx);
            Drained::Empty
        });
    }

    fn drain_queue(
        &self,
        queue: usize,
        vring: &Vring,
        mem: &MemoryGuard,
        event_idx: bool,
    ) -> usize {
        let mut handled = 0;
        loop {
            let (chain, desc_table, queue_size) = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                // Stopped (GET_VRING_BASE) since the kick: the frontend has taken it back.
                if !queue.ready() {
                    return handled;
                }
                let desc_table = queue.desc_table();
                let size = queue.size();
                (queue.pop_descriptor_chain(mem.clone()), desc_table, size)
            };
            let Some(chain) = chain else {
                return handled;
            };
            handled += 1;
            let in_flight = self.in_flight[queue].start();
            let head_flags = head_descriptor_flags(mem, desc_table, chain.head_index());
            let origin = QueueOrigin {
                queue: queue as u16,
                head: chain.head_index(),
                queue_size,
                desc_table,
            };
            // A lock request that may wait goes to the lock waiters: on the queue's thread, or
            // on a pool thread, it would hold up later requests, the holder's unlock too.
            let pool = self
                .lock_waiters
                .as_ref()
                .filter(|_| asks_to_wait_for_a_lock(mem, &chain))
                .or(self.pool.as_ref());
            match pool {
                Some(pool) => {
                    let server = self.server.clone();
                    let dax = self.dax.clone();
                    let vring = vring.clone();
                    let mem = mem.clone();
                    let logging = self.logging.clone();
                    pool.execute(Box::new(move || {
                        let head = chain.head_index();
                        let dax = dax.as_deref().map(|d| d as &dyn DaxWindow);
                        let request = TakenChain {
                            chain: &chain,
                            head_flags,
                            origin,
                        };
                        if let Some(used) =
                            serve_request_from(&server, &mem, request, dax, &logging)
                        {
                            complete_request(queue, &mut vring.get_mut(), head, used, event_idx);
                        }
                        drop(in_flight);
                    }));
                }
                None => {
                    let head = chain.head_index();
                    let dax = self.dax.as_deref().map(|d| d as &dyn DaxWindow);
                    let request = TakenChain {
                        chain: &chain,
                        head_flags,
                        origin,
                    };
                    if let Some(used) =
                        serve_request_from(&self.server, mem, request, dax, &self.logging)
                    {
                        complete_request(queue, &mut vring.get_mut(), head, used, event_idx);
                    }
                    drop(in_flight);
                }
            }
        }
    }
}

/// Serves the request in one descriptor chain and returns the number of reply bytes written
/// into it. A malformed chain is answered with EIO when its request's unique id can be read
/// and a reply header fits, and returned with nothing written (and a warning) otherwise.
///
/// The server writes replies through raw pointers, which guest memory's dirty bitmap does not
/// see: when `logging` is set once the reply is written (the frontend is migrating the guest),
/// the reply's pages are marked in the log here. The used ring is written through the memory
/// API, which marks its pages itself.
#[allow(dead_code)] // The fuzz harness serves its requests through this.
pub(crate) fn serve_request<M>(
    server: &FsServer,
    queue: usize,
    mem: &LoggedMemory,
    chain: &DescriptorChain<M>,
    head_flags: Option<u16>,
    dax: Option<&dyn DaxWindow>,
    logging: &AtomicBool,
) -> u32
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    // Without the chain's place on its queue nothing is parked: there is always a length.
    let origin = QueueOrigin {
        queue: u16::try_from(queue).unwrap_or(u16::MAX),
        head: chain.head_index(),
        queue_size: 0,
        desc_table: 0,
    };
    let request = TakenChain {
        chain,
        head_flags,
        origin,
    };
    serve(server, mem, request, dax, logging, false).unwrap_or(0)
}

/// A chain taken off a queue, with what the server needs to know of its place there.
pub(crate) struct TakenChain<'c, M> {
    pub chain: &'c DescriptorChain<M>,
    /// The head descriptor's flags as the table holds them, when they could be read.
    pub head_flags: Option<u16>,
    pub origin: QueueOrigin,
}

/// [`serve_request`] for a chain whose place on its queue is known: a SETLKW from it may be
/// parked when the queue stops, and then `None` says the chain must not be returned.
fn serve_request_from<M>(
    server: &FsServer,
    mem: &LoggedMemory,
    request: TakenChain<'_, M>,
    dax: Option<&dyn DaxWindow>,
    logging: &AtomicBool,
) -> Option<u32>
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    serve(server, mem, request, dax, logging, true)
}

fn serve<M>(
    server: &FsServer,
    mem: &LoggedMemory,
    request: TakenChain<'_, M>,
    dax: Option<&dyn DaxWindow>,
    logging: &AtomicBool,
    parkable: bool,
) -> Option<u32>
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let TakenChain {
        chain,
        head_flags,
        origin,
    } = request;
    let queue = usize::from(origin.queue);
    let head = chain.head_index();
    let mut segments = ChainSegments::default();
    let served = match segments.walk(chain, mem, head_flags) {
        Ok(()) => {
            let origin = parkable.then_some(origin);
            let served = server.handle_from(&segments.readable, &segments.writable, dax, origin);
            if served == Served::Parked {
                debug!(
                    queue,
                    head, "Parked a lock wait: its queue stopped while it waited."
                );
                return None;
            }
            // The reply is in guest memory: shared caching settles what it handed out.
            server.reply_sent();
            served
        }
        Err(fault) => {
            let served = server.refuse(&segments.readable, &segments.writable, libc::EIO);
            if logging.load(Ordering::SeqCst) {
                segments.mark_written(served.reply_len());
            }
            match served {
                Served::Replied(_) => warn!(
                    queue,
                    head, "Answering a malformed descriptor chain with EIO: {fault}."
                ),
                _ => warn!(
                    queue,
                    head, "Dropping a malformed descriptor chain: {fault}."
                ),
            }
            return Some(u32::try_from(served.reply_len()).unwrap_or(0));
        }
    };
    if logging.load(Ordering::SeqCst) {
        segments.mark_written(served.reply_len());
    }
    if let Served::Dropped(why) = served {
        warn!(queue, head, "Dropping a request: {why}.");
    }
    Some(u32::try_from(served.reply_len()).unwrap_or(0))
}

/// The flags of the chain's head descriptor in the queue's descriptor table (`None` when the
/// table cannot be read there).
pub(crate) fn head_descriptor_flags(mem: &LoggedMemory, desc_table: u64, head: u16) -> Option<u16> {
    // A split-ring descriptor is 16 bytes: address, length, then the 16-bit flags.
    let addr = desc_table.checked_add(u64::from(head) * 16 + 12)?;
    let mut flags = [0u8; 2];
    GuestMemoryBackend::get_slice(mem, vm_memory::GuestAddress(addr), 2)
        .ok()?
        .copy_to(&mut flags);
    Some(u16::from_le_bytes(flags))
}

/// Whether the chain's request is a FUSE_SETLKW, read from its first descriptor (a header
/// split over descriptors is not looked for: that request is served where it is).
fn asks_to_wait_for_a_lock(mem: &MemoryGuard, chain: &DescriptorChain<MemoryGuard>) -> bool {
    let Some(first) = chain.clone().next() else {
        return false;
    };
    if first.is_write_only() || first.len() < 8 {
        return false;
    }
    let mut opcode = [0u8; 4];
    first
        .addr()
        .checked_add(4)
        .is_some_and(|at| mem.read_slice(&mut opcode, at).is_ok())
        && u32::from_le_bytes(opcode) == berth_passthrough::server::opcode::SETLKW
}

/// Puts a served chain on the used ring and tells the guest if it asked to be told.
pub(super) fn complete_request(
    queue: usize,
    vring: &mut VringState<GuestMemory>,
    head: u16,
    used: u32,
    event_idx: bool,
) {
    if let Err(e) = vring.add_used(head, used) {
        warn!(
            queue,
            head, "Cannot return a descriptor chain to the used ring: {e}."
        );
        return;
    }
    let notify = !event_idx
        || vring.needs_notification().unwrap_or_else(|e| {
            warn!(
                queue,
                "Cannot tell whether the guest wants a notification ({e}); sending one."
            );
            true
        });
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            warn!(queue, "Cannot notify the guest of used descriptors: {e}.");
        }
    }
}
