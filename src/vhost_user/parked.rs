//! Resuming SETLKW requests whose wait was parked when their queue stopped (see
//! `berth_passthrough`'s lock waits): after a pause or a failed migration on this daemon, or
//! on a migration destination that loaded them with the state.
//!
//! The request's descriptor chain was taken off the avail ring before the stop, so the
//! library has no chain for it: the reply goes into the chain found again from the head index
//! in the queue's descriptor table (walked and checked as any chain), once the request header
//! there still names the same FUSE request. A resumed wait is parked again if its queue stops
//! again, and dropped if the guest's FUSE session ends meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use berth_passthrough::server::opcode;
use berth_passthrough::{FsServer, WaitingLock};
use tracing::{info, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::chain::{ChainSegments, REQUEST_HEADER_CHECK};
use super::queue::complete_request;
use super::{FsBackend, GuestMemory, InFlight, LoggedMemory, MemoryGuard, Vring};

/// How often a resumed wait looks whether its queue has started.
const START_POLL: Duration = Duration::from_millis(10);

/// What a resumed wait needs of the device, shared with the thread running it.
#[derive(Clone)]
pub(super) struct Resumer {
    pub server: Arc<FsServer>,
    pub memory: Arc<RwLock<Option<GuestMemory>>>,
    pub vrings: Arc<Vec<OnceLock<Vring>>>,
    pub in_flight: Vec<InFlight>,
    pub event_idx: Arc<AtomicBool>,
    pub logging: Arc<AtomicBool>,
}

impl Resumer {
    /// The guest's memory now (the lock on the table is not held meanwhile).
    fn guest_memory(&self) -> Option<MemoryGuard> {
        let memory = self.memory.read().unwrap_or_else(|e| e.into_inner());
        memory.as_ref().map(|m| m.memory())
    }

    /// The queue of `lock`, when it is started, with the guest's memory; an error when the
    /// queue is not the one the request was taken from (the guest set it up anew).
    fn started(&self, lock: &WaitingLock) -> Result<Option<(Vring, MemoryGuard)>, String> {
        let Some(memory) = self.guest_memory() else {
            return Ok(None);
        };
        let Some(vring) = self
            .vrings
            .get(usize::from(lock.origin.queue))
            .and_then(OnceLock::get)
        else {
            return Ok(None);
        };
        {
            let state = vring.get_ref();
            let queue = state.get_queue();
            if !queue.ready() || !state.is_enabled() {
                return Ok(None);
            }
            if queue.desc_table() != lock.origin.desc_table
                || queue.size() != lock.origin.queue_size
            {
                return Err(format!(
                    "the queue now has {} entries at {:#x}, it had {} at {:#x}",
                    queue.size(),
                    queue.desc_table(),
                    lock.origin.queue_size,
                    lock.origin.desc_table
                ));
            }
        }
        Ok(Some((vring.clone(), memory)))
    }

    /// Waits for the queue of `lock` to start, then for the lock, then answers the request
    /// in its chain. Blocks the calling thread throughout.
    pub(super) fn run(&self, lock: WaitingLock, epoch: u64) {
        let queue = usize::from(lock.origin.queue);
        let head = lock.origin.head;
        let Some(in_flight) = self.in_flight.get(queue) else {
            return;
        };
        let (request, vring, memory) = loop {
            if self.server.session_epoch() != epoch {
                return;
            }
            // Counted in flight before the queue is seen started: a stop from here on waits
            // for the answer, or parks the wait again.
            let request = in_flight.start();
            match self.started(&lock) {
                Ok(Some((vring, memory))) => break (request, vring, memory),
                Ok(None) => {
                    drop(request);
                    std::thread::sleep(START_POLL);
                }
                Err(why) => {
                    warn!(
                        queue,
                        head,
                        "Dropping the lock request waiting in descriptor chain {head} of queue \
                         {queue}: {why}."
                    );
                    self.server.drop_parked_lock_wait(&lock);
                    return;
                }
            }
        };
        // The chain is checked before the wait, so that a request whose chain is gone does
        // not take its lock, and walked again for the reply (the memory may have changed).
        if let Err(why) = chain_holds(&memory, &lock) {
            warn!(queue, head, "Dropping a resumed lock request: {why}.");
            self.server.drop_parked_lock_wait(&lock);
            return;
        }
        drop(memory);
        let Some(errno) = self.server.resume_lock_wait(lock, epoch) else {
            return;
        };
        let Some(memory) = self.guest_memory() else {
            warn!(
                queue,
                head, "Cannot answer a resumed lock request: no guest memory."
            );
            return;
        };
        let mut segments = ChainSegments::default();
        if let Err(why) = walk_request(&mut segments, &memory, &lock) {
            warn!(queue, head, "Cannot answer a resumed lock request: {why}.");
            return;
        }
        let served = self.server.answer(&segments.writable, lock.unique, errno);
        let len = served.reply_len();
        if self.logging.load(Ordering::SeqCst) {
            segments.mark_written(len);
        }
        if len == 0 {
            warn!(
                queue,
                head,
                "A resumed lock request's chain has no room for its reply; returning it empty."
            );
        } else {
            info!(
                queue,
                head, "Answered a lock request that waited across a queue stop (error {errno})."
            );
        }
        complete_request(
            queue,
            &mut vring.get_mut(),
            head,
            u32::try_from(len).unwrap_or(0),
            self.event_idx.load(Ordering::Relaxed),
        );
        drop(request);
    }
}

/// Walks the chain of `lock` into `segments` and checks that it still holds that request.
fn walk_request<'m>(
    segments: &mut ChainSegments<'m>,
    memory: &'m LoggedMemory,
    lock: &WaitingLock,
) -> Result<(), String> {
    let header = segments
        .walk_table(
            memory,
            lock.origin.desc_table,
            lock.origin.queue_size,
            lock.origin.head,
        )
        .map_err(|fault| format!("its descriptor chain is malformed: {fault}"))?;
    if !names_request(&header, lock.unique) {
        return Err(format!(
            "descriptor chain {} no longer holds request {} (the guest reused it)",
            lock.origin.head, lock.unique
        ));
    }
    Ok(())
}

fn chain_holds(memory: &LoggedMemory, lock: &WaitingLock) -> Result<(), String> {
    walk_request(&mut ChainSegments::default(), memory, lock)
}

/// Whether a request header (length, opcode, unique) is the SETLKW `unique`.
fn names_request(header: &[u8], unique: u64) -> bool {
    if header.len() < REQUEST_HEADER_CHECK {
        return false;
    }
    let opcode = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&header[8..16]);
    opcode == opcode::SETLKW && u64::from_le_bytes(id) == unique
}

impl FsBackend {
    fn resumer(&self) -> Resumer {
        Resumer {
            server: self.server.clone(),
            memory: self.memory.clone(),
            vrings: self.vrings.clone(),
            in_flight: self.in_flight.clone(),
            event_idx: self.event_idx.clone(),
            logging: self.logging.clone(),
        }
    }

    /// Resumes parked lock waits: those of `started`'s queue when it has just started at vring
    /// base `base`, or every one of a queue not stopped (a loaded state). They wait on the
    /// lock waiters, which berth has whenever it holds the guest's locks on the host (the only
    /// way a wait is parked).
    pub(super) fn resume_parked_waits(&self, started: Option<(usize, u16)>) {
        let parked = match started {
            Some((queue, base)) => {
                let Ok(queue) = u16::try_from(queue) else {
                    return;
                };
                self.server.lock_queue_started(queue);
                let parked = self
                    .server
                    .parked_lock_waits_to_resume(|lock| lock.origin.queue == queue);
                parked
                    .into_iter()
                    .filter(|lock| {
                        let same = lock.avail == base;
                        if !same {
                            self.server.drop_parked_lock_wait(lock);
                            warn!(
                                queue,
                                "Dropping the lock request waiting in descriptor chain {} of \
                                 queue {queue}: the queue stopped at {} and started again at \
                                 {base} (the guest set it up anew).",
                                lock.origin.head,
                                lock.avail
                            );
                        }
                        same
                    })
                    .collect()
            }
            None if self.lock_waiters.is_some() => {
                self.server.parked_lock_waits_to_resume(|_| true)
            }
            None => return,
        };
        if parked.is_empty() {
            return;
        }
        info!(
            "Resuming {} lock requests that were waiting when their queue stopped.",
            parked.len()
        );
        let epoch = self.server.session_epoch();
        for lock in parked {
            let resumer = self.resumer();
            match &self.lock_waiters {
                Some(pool) => pool.execute(Box::new(move || resumer.run(lock, epoch))),
                None => resumer.run(lock, epoch),
            }
        }
    }
}
