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

    /// Runs `on_signal` with the first termination signal received, on a dedicated thread.
    pub fn spawn_handler<F>(self, on_signal: F) -> io::Result<()>
    where
        F: FnOnce(libc::c_int) + Send + 'static,
    {
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = self.wait() {
                    on_signal(signal);
                }
            })
            .map(drop)
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
