//! Guest lock requests waiting on the host (FUSE_SETLKW) across a queue stop.
//!
//! A SETLKW that waits for a lock holds its descriptor chain: the guest process sleeps until
//! the reply comes. When the frontend stops the queue the request came from (GET_VRING_BASE:
//! a pause, a migration, a reset), berth must neither answer it after the stop nor leave it
//! behind: the wait is *parked*. The thread waiting in the host lock call is woken with a
//! signal (the call fails with EINTR), writes nothing and returns its chain to no one; what the
//! request asked for is kept as a [`WaitingLock`], which a state save carries to the migration
//! destination and which the queue's next start resumes (there, or here after a pause or a
//! failed migration): the wait starts again and its reply goes into the same chain.
//!
//! A lock granted while the wait was being parked stays held: the saved state lists it as the
//! owner's, and the resumed request is granted at once on the description that holds it.

use std::collections::HashMap;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// The signal that interrupts a parked wait's host lock call. Ignored by default, so a stray
/// one does no harm; berth uses it for nothing else.
const WAKE_SIGNAL: libc::c_int = libc::SIGURG;
/// How often a parked waiter is signalled again until it has left its lock call (a signal that
/// lands just before the call does not interrupt it).
const WAKE_INTERVAL: Duration = Duration::from_millis(2);
/// How long a queue stop waits for its waiters to leave their lock calls.
const PARK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a request sits on a split virtqueue: enough to find its descriptor chain again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOrigin {
    /// Queue index.
    pub queue: u16,
    /// Head descriptor index of the request's chain.
    pub head: u16,
    /// Entries in the queue's descriptor table.
    pub queue_size: u16,
    /// Guest address of the queue's descriptor table.
    pub desc_table: u64,
}

impl QueueOrigin {
    /// A request read from /dev/fuse: on no virtqueue, so never stopped, never parked.
    pub const DEVICE: QueueOrigin = QueueOrigin {
        queue: u16::MAX,
        head: 0,
        queue_size: 0,
        desc_table: 0,
    };
}

/// A SETLKW whose wait was parked: where its chain is and what it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitingLock {
    pub origin: QueueOrigin,
    /// The queue's next available index when it stopped (its vring base).
    pub avail: u16,
    /// The request's FUSE unique id, which its reply carries.
    pub unique: u64,
    pub nodeid: u64,
    pub fh: u64,
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub lock_type: u32,
    pub pid: u32,
    pub lk_flags: u32,
}

/// What became of a wait.
#[derive(Debug)]
pub enum WaitOutcome {
    /// The lock was granted (`Ok`) or refused: the request is to be answered.
    Answered(io::Result<()>),
    /// The queue stopped: the request is parked, unanswered.
    Parked,
    /// A resumed request that is no longer parked (the guest's session ended): nothing to do.
    Gone,
}

/// A parked wait; `resuming` once a thread was given it to resume (it stays listed, and is
/// saved with the state, until that thread takes it up).
struct Parked {
    lock: WaitingLock,
    resuming: bool,
}

fn same_request(a: &WaitingLock, b: &WaitingLock) -> bool {
    (a.origin.queue, a.origin.head, a.unique) == (b.origin.queue, b.origin.head, b.unique)
}

struct Active {
    lock: WaitingLock,
    tid: libc::pid_t,
    cancelled: bool,
    /// The kernel interrupted the request (FUSE_INTERRUPT): it is answered with EINTR.
    interrupted: bool,
}

/// Interrupts of lock requests not waiting yet that are remembered (the kernel may send one
/// while its request is still on its way to the thread that will wait for it).
const EARLY_INTERRUPTS: usize = 64;

#[derive(Default)]
struct Waits {
    next_id: u64,
    active: HashMap<u64, Active>,
    /// Queues stopped since they last started, with their vring base: a wait from one parks
    /// at once.
    stopped: HashMap<u16, u16>,
    parked: Vec<Parked>,
    /// Bumped when the guest's session ends: a resumed wait of an older session is dropped.
    epoch: u64,
    /// The latest interrupts that found no wait, by request unique id.
    early_interrupts: std::collections::VecDeque<u64>,
}

/// The waits in progress and the parked ones.
#[derive(Default)]
pub(crate) struct LockWaits {
    waits: Mutex<Waits>,
    left: Condvar,
}

extern "C" fn on_wake_signal(_: libc::c_int) {}

/// Installs the wake-up signal's handler (once, from the thread that builds the filesystem,
/// before any seccomp filter). Without SA_RESTART, so that the lock call fails with EINTR.
pub(crate) fn install_wake_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain old data; all-zeroes is a valid empty action.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_wake_signal as extern "C" fn(libc::c_int) as usize;
        // SAFETY: the mask is part of `action`, which sigemptyset initialises.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that does nothing (async-signal-safe) for a signal berth
        // uses for nothing else; the result is checked.
        if unsafe { libc::sigaction(WAKE_SIGNAL, &action, std::ptr::null_mut()) } != 0 {
            tracing::warn!(
                "Cannot install the lock wait wake-up handler ({}); a lock wait cannot be \
                 parked when its queue stops.",
                io::Error::last_os_error()
            );
        }
    });
}

/// A timer that sends the calling thread the wake-up signal after a while, then every
/// [`WAKE_INTERVAL`] (a signal that lands just before a lock call does not interrupt it), until
/// dropped: it bounds a blocking host lock call, which has no timeout of its own.
pub(crate) struct WakeTimer(libc::timer_t);

impl WakeTimer {
    /// Arms the timer for the calling thread; its first signal comes after `after`.
    pub(crate) fn arm(after: Duration) -> io::Result<Self> {
        // SAFETY: sigevent is plain old data; all-zeroes is valid before the fields are set.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = WAKE_SIGNAL;
        event.sigev_notify_thread_id = gettid();
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the result is checked.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let timer = WakeTimer(timer);
        let spec = libc::itimerspec {
            it_value: timespec(after.max(Duration::from_micros(1))),
            it_interval: timespec(WAKE_INTERVAL),
        };
        // SAFETY: the timer was just created; `spec` is valid for the call; checked.
        if unsafe { libc::timer_settime(timer.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(timer)
    }
}

impl Drop for WakeTimer {
    fn drop(&mut self) {
        // SAFETY: deletes the timer this value created, once.
        unsafe { libc::timer_delete(self.0) };
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

impl LockWaits {
    fn state(&self) -> MutexGuard<'_, Waits> {
        self.waits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current session's epoch, for a resumed wait to check before it answers.
    pub(crate) fn epoch(&self) -> u64 {
        self.state().epoch
    }

    /// Runs the wait for `lock`: `try_now` once without blocking, then `block` (the blocking
    /// host call) until it returns something other than EINTR or the queue stops. A
    /// `resumed` wait is taken off the parked list first ([`WaitOutcome::Gone`] if it is no
    /// longer there).
    pub(crate) fn wait(
        &self,
        lock: WaitingLock,
        resumed: bool,
        try_now: impl FnOnce() -> io::Result<()>,
        block: impl Fn() -> io::Result<()>,
    ) -> WaitOutcome {
        let id = {
            let mut waits = self.state();
            if resumed {
                let Some(at) = waits
                    .parked
                    .iter()
                    .position(|p| same_request(&p.lock, &lock))
                else {
                    return WaitOutcome::Gone;
                };
                waits.parked.remove(at);
            }
            if let Some(&avail) = waits.stopped.get(&lock.origin.queue) {
                // Taken from the queue before it stopped, served after: park it unanswered.
                waits.parked.push(Parked {
                    lock: WaitingLock { avail, ..lock },
                    resuming: false,
                });
                return WaitOutcome::Parked;
            }
            if let Some(at) = waits
                .early_interrupts
                .iter()
                .position(|u| *u == lock.unique)
            {
                waits.early_interrupts.remove(at);
                return WaitOutcome::Answered(Err(io::Error::from_raw_os_error(libc::EINTR)));
            }
            // Listed before the first try, which may itself wait (for locks a migration
            // brought to be settled): a stop meanwhile still parks the request.
            waits.next_id += 1;
            let id = waits.next_id;
            waits.active.insert(
                id,
                Active {
                    lock,
                    tid: gettid(),
                    cancelled: false,
                    interrupted: false,
                },
            );
            id
        };
        let mut result = try_now();
        let outcome = loop {
            {
                let mut waits = self.state();
                if waits.active.get(&id).is_none_or(|a| a.cancelled) {
                    // The stop parked it (see park_queue).
                    waits.active.remove(&id);
                    self.left.notify_all();
                    break WaitOutcome::Parked;
                }
                let interrupted = waits.active.get(&id).is_some_and(|a| a.interrupted);
                match result {
                    // (Granted meanwhile, the lock is held, and that is the answer.)
                    Err(_) if interrupted => {
                        waits.active.remove(&id);
                        self.left.notify_all();
                        break WaitOutcome::Answered(Err(io::Error::from_raw_os_error(
                            libc::EINTR,
                        )));
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {}
                    other => {
                        waits.active.remove(&id);
                        self.left.notify_all();
                        break WaitOutcome::Answered(other);
                    }
                }
            }
            result = block();
        };
        // A wake-up signal sent before this thread left the list may still be pending: any
        // system call delivers it here, before it can interrupt an unrelated call.
        gettid();
        outcome
    }

    /// The frontend stopped `queue` at vring base `avail`: parks every wait from it and wakes
    /// their threads, waiting (bounded) for them to leave their lock calls. Returns how many
    /// requests of the queue are parked.
    pub(crate) fn park_queue(&self, queue: u16, avail: u16) -> usize {
        let mut waits = self.state();
        let waits_now = &mut *waits;
        waits_now.stopped.insert(queue, avail);
        // Waits parked earlier (taken off before a stop) get the base too.
        for parked in waits_now.parked.iter_mut() {
            if parked.lock.origin.queue == queue {
                parked.lock.avail = avail;
            }
        }
        let mut ids = Vec::new();
        for (id, active) in waits_now.active.iter_mut() {
            if active.lock.origin.queue == queue && !active.cancelled {
                active.cancelled = true;
                // Listed at once, so that a save right after the stop carries it even if its
                // thread is slow to notice.
                waits_now.parked.push(Parked {
                    lock: WaitingLock {
                        avail,
                        ..active.lock
                    },
                    resuming: false,
                });
                ids.push(*id);
            }
        }
        let (waits, left) = self.wake_until_left(waits, &ids);
        if left > 0 {
            tracing::warn!(
                queue,
                "{left} lock waits of queue {queue} did not stop within {PARK_TIMEOUT:?}; they \
                 are carried over, but may still take their lock here."
            );
        }
        waits
            .parked
            .iter()
            .filter(|p| p.lock.origin.queue == queue)
            .count()
    }

    /// Signals the threads of waits `ids` until they have left their lock calls, for at most
    /// [`PARK_TIMEOUT`]; returns the list and how many had not left by then.
    fn wake_until_left<'a>(
        &'a self,
        mut waits: MutexGuard<'a, Waits>,
        ids: &[u64],
    ) -> (MutexGuard<'a, Waits>, usize) {
        let deadline = Instant::now() + PARK_TIMEOUT;
        loop {
            let left: Vec<libc::pid_t> = ids
                .iter()
                .filter_map(|id| waits.active.get(id).map(|a| a.tid))
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                return (waits, left.len());
            }
            // Sent with the list locked: a waiter that has left it is never signalled.
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            for tid in left {
                // SAFETY: signals a thread of this process that is waiting for a lock; the
                // handler does nothing.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, WAKE_SIGNAL) };
            }
            waits = self
                .left
                .wait_timeout(waits, WAKE_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// FUSE_INTERRUPT of request `unique`: a lock wait of that request stops and is answered
    /// with EINTR (unless granted meanwhile). An interrupt that finds no wait is remembered
    /// for a while, in case its request is still on its way to the thread that will wait.
    /// Returns whether a wait was interrupted.
    pub(crate) fn interrupt(&self, unique: u64) -> bool {
        let mut waits = self.state();
        let mut ids = Vec::new();
        for (id, active) in waits.active.iter_mut() {
            if active.lock.unique == unique && !active.cancelled {
                active.interrupted = true;
                ids.push(*id);
            }
        }
        if ids.is_empty() {
            if waits.early_interrupts.len() == EARLY_INTERRUPTS {
                waits.early_interrupts.pop_front();
            }
            waits.early_interrupts.push_back(unique);
            return false;
        }
        let (_waits, left) = self.wake_until_left(waits, &ids);
        if left > 0 {
            tracing::warn!(
                unique,
                "An interrupted lock wait did not stop within {PARK_TIMEOUT:?}."
            );
        }
        true
    }

    /// `queue` started again: waits from it block as usual.
    pub(crate) fn queue_started(&self, queue: u16) {
        self.state().stopped.remove(&queue);
    }

    /// The parked waits to resume: those `select` picks among the ones of queues not stopped
    /// and not given out already. They stay listed until [`wait`](Self::wait) takes them up.
    pub(crate) fn to_resume(&self, select: impl Fn(&WaitingLock) -> bool) -> Vec<WaitingLock> {
        let mut waits = self.state();
        let Waits {
            stopped, parked, ..
        } = &mut *waits;
        parked
            .iter_mut()
            .filter(|p| {
                !p.resuming && !stopped.contains_key(&p.lock.origin.queue) && select(&p.lock)
            })
            .map(|p| {
                p.resuming = true;
                p.lock
            })
            .collect()
    }

    /// Drops a parked wait that cannot be answered any more.
    pub(crate) fn drop_parked(&self, lock: &WaitingLock) {
        self.state().parked.retain(|p| !same_request(&p.lock, lock));
    }

    /// A copy of the parked waits, for a state save.
    pub(crate) fn parked(&self) -> Vec<WaitingLock> {
        self.state().parked.iter().map(|p| p.lock).collect()
    }

    /// Replaces the parked waits (a state load).
    pub(crate) fn set_parked(&self, parked: Vec<WaitingLock>) {
        self.state().parked = parked
            .into_iter()
            .map(|lock| Parked {
                lock,
                resuming: false,
            })
            .collect();
    }

    /// The guest's session ended: parked waits are dropped, resumed ones answer no one.
    pub(crate) fn end_session(&self) {
        let mut waits = self.state();
        waits.parked.clear();
        waits.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(unique: u64) -> WaitingLock {
        WaitingLock {
            origin: QueueOrigin::DEVICE,
            avail: 0,
            unique,
            nodeid: 2,
            fh: 1,
            owner: 9,
            start: 0,
            end: 9,
            lock_type: libc::F_WRLCK as u32,
            pid: 1,
            lk_flags: 0,
        }
    }

    fn errno_of(outcome: WaitOutcome) -> Option<i32> {
        match outcome {
            WaitOutcome::Answered(result) => result.err().and_then(|e| e.raw_os_error()),
            other => panic!("not answered: {other:?}"),
        }
    }

    fn held_elsewhere() -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    /// Stands for a blocking lock call: sleeps up to 10 s, ended early by a signal.
    fn blocked() -> io::Result<()> {
        let long = libc::timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        // SAFETY: valid timespec; no remainder wanted.
        match unsafe { libc::nanosleep(&long, std::ptr::null_mut()) } {
            0 => held_elsewhere(),
            _ => Err(io::Error::last_os_error()),
        }
    }

    #[test]
    fn an_interrupt_ends_a_wait_with_eintr() {
        install_wake_handler();
        let waits = LockWaits::default();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| waits.wait(request(7), false, held_elsewhere, blocked));
            std::thread::sleep(Duration::from_millis(100));
            // Another request's interrupt changes nothing.
            assert!(!waits.interrupt(8));
            let started = Instant::now();
            assert!(waits.interrupt(7), "the wait was found");
            assert_eq!(errno_of(waiter.join().unwrap()), Some(libc::EINTR));
            assert!(started.elapsed() < Duration::from_secs(5));
        });
    }

    #[test]
    fn an_interrupt_that_comes_first_is_kept_for_its_request() {
        let waits = LockWaits::default();
        assert!(!waits.interrupt(42));
        let outcome = waits.wait(request(42), false, held_elsewhere, || {
            panic!("an interrupted request must not wait")
        });
        assert_eq!(errno_of(outcome), Some(libc::EINTR));
        // Kept once only, and only the latest are kept.
        for unique in 100..100 + EARLY_INTERRUPTS as u64 + 1 {
            waits.interrupt(unique);
        }
        let granted = waits.wait(request(100), false, || Ok(()), held_elsewhere);
        assert_eq!(
            errno_of(granted),
            None,
            "the oldest interrupt was forgotten"
        );
        let outcome = waits.wait(request(101), false, held_elsewhere, held_elsewhere);
        assert_eq!(errno_of(outcome), Some(libc::EINTR));
    }
}
