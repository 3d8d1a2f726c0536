//! Termination signals (SIGINT, SIGTERM, SIGHUP) handled synchronously by one thread.
//!
//! The signals are blocked before any other thread starts, so every thread inherits the mask
//! and only the dedicated waiter receives them; it then runs ordinary (non-async-signal-safe)
//! cleanup such as unmounting or removing the socket file.

use std::io;
use std::mem::MaybeUninit;
use std::thread;

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The blocked termination signals; create it before spawning threads.
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks the termination signals in the calling thread (and the threads it spawns later).
    pub fn block() -> io::Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given; sigaddset only writes to it.
        let set = unsafe {
            if libc::sigemptyset(set.as_mut_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            for signal in TERMINATION_SIGNALS {
                if libc::sigaddset(set.as_mut_ptr(), signal) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            set.assume_init()
        };
        // SAFETY: `set` is an initialised signal set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(TerminationSignals { set })
    }

    /// Gives the termination signals back their default action (ending the process) for a
    /// one-shot command that has nothing to clean up: threads started meanwhile keep them
    /// blocked, and the kernel hands a signal to a thread that does not block it, this one.
    pub fn restore_default(self) -> anyhow::Result<()> {
        // SAFETY: `self.set` is an initialised signal set; the old mask is not needed.
        let rc =
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.set, std::ptr::null_mut()) };
        if rc != 0 {
            let err = io::Error::from_raw_os_error(rc);
            anyhow::bail!("cannot unblock termination signals: {err}");
        }
        Ok(())
    }

    /// Runs `on_signal` with the first termination signal received, on a dedicated thread.
    pub fn spawn_handler<F>(self, on_signal: F) -> io::Result<()>
    where
        F: FnOnce(libc::c_int) + Send + 'static,
    {
        self.spawn_handler_after(|| {}, on_signal)
    }

    /// [`Self::spawn_handler`], with `setup` run first on the dedicated thread (to prepare
    /// what `on_signal` needs and confine the thread before it waits).
    pub fn spawn_handler_after<S, F>(self, setup: S, on_signal: F) -> io::Result<()>
    where
        S: FnOnce() + Send + 'static,
        F: FnOnce(libc::c_int) + Send + 'static,
    {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                setup();
                if let Some(signal) = self.wait() {
                    on_signal(signal);
                }
            })
            .map(drop)
    }

    /// Runs `work` (a slow start-up step: opening a volume whose bucket does not answer
    /// can take a minute) while a helper thread watches for a termination signal; one that
    /// arrives meanwhile runs `on_signal` at once (which should end the process) rather than
    /// wait, blocked, for `work` to finish. A signal that arrives as `work` returns stays
    /// pending for [`Self::spawn_handler`].
    pub fn watch_during<T>(
        &self,
        on_signal: impl FnOnce(libc::c_int) + Send,
        work: impl FnOnce() -> T,
    ) -> T {
        let done = std::sync::atomic::AtomicBool::new(false);
        thread::scope(|scope| {
            let watcher = thread::Builder::new()
                .name("signals-start".into())
                .spawn_scoped(scope, || {
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        if let Some(signal) = self.wait_for(std::time::Duration::from_millis(100)) {
                            on_signal(signal);
                            return;
                        }
                    }
                });
            if let Err(e) = &watcher {
                tracing::debug!("Cannot watch for signals during start-up: {e}.");
            }
            let result = work();
            done.store(true, std::sync::atomic::Ordering::Release);
            result
        })
    }

    /// A termination signal received within `timeout`, if one was.
    fn wait_for(&self, timeout: std::time::Duration) -> Option<libc::c_int> {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `self.set` is initialised, `timeout` is a valid timespec, and no siginfo
        // is asked for.
        let rc = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &timeout) };
        (rc > 0).then_some(rc)
    }

    fn wait(&self) -> Option<libc::c_int> {
        loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `self.set` is initialised and `signal` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&self.set, &mut signal) };
            match rc {
                0 => return Some(signal),
                libc::EINTR => continue,
                err => {
                    tracing::error!(
                        "Waiting for termination signals failed: {}",
                        io::Error::from_raw_os_error(err)
                    );
                    return None;
                }
            }
        }
    }
}

/// Name of a termination signal for log lines.
pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a termination signal",
    }
}
