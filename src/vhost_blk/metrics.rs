//! `--metrics-file` of `berth block serve-vhost`: the device's counters (and its image's
//! cache engine or its volume's), rewritten atomically every interval and at exit.
//!
//! The file's directory is opened before the process enters its sandbox, and the file is
//! written relative to that descriptor (`openat` a temporary name, `renameat2` over the
//! file), so it lands in the host directory whatever the root is afterwards. The writer
//! thread is started after the main thread's filter, which allows both calls.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tracing::warn;

/// Where the metrics go: a directory opened before the sandbox and a name in it.
pub(super) struct MetricsFile {
    dir: OwnedFd,
    name: CString,
    temporary: CString,
    shown: String,
}

impl MetricsFile {
    pub(super) fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("--metrics-file {} names no file", path.display()))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent_c = CString::new(parent.as_os_str().as_bytes())
            .map_err(|_| anyhow!("--metrics-file {} holds a NUL byte", path.display()))?;
        // SAFETY: open(2) of a NUL-terminated path we own; the result is checked.
        let fd = unsafe {
            libc::open(
                parent_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "cannot open {}, the directory of --metrics-file",
                    parent.display()
                )
            });
        }
        // SAFETY: a descriptor open(2) just returned, owned by nobody else.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut temporary = name.as_bytes().to_vec();
        temporary.extend_from_slice(b".tmp");
        Ok(Self {
            dir,
            name: CString::new(name.as_bytes())
                .map_err(|_| anyhow!("--metrics-file {} holds a NUL byte", path.display()))?,
            temporary: CString::new(temporary)
                .map_err(|_| anyhow!("--metrics-file {} holds a NUL byte", path.display()))?,
            shown: path.display().to_string(),
        })
    }

    /// Replaces the file's contents with `text` (a reader sees the old or the new file).
    pub(super) fn write(&self, text: &str) -> io::Result<()> {
        // SAFETY: openat(2) relative to our directory descriptor with a NUL-terminated
        // name; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                self.temporary.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor openat(2) just returned, owned by nobody else.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(text.as_bytes())?;
        drop(file);
        // The system call itself: glibc's wrapper turns flags 0 into renameat, which the
        // filters do not allow.
        // SAFETY: renameat2(2) within our directory descriptor, NUL-terminated names.
        let renamed = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                self.dir.as_raw_fd(),
                self.temporary.as_ptr(),
                self.dir.as_raw_fd(),
                self.name.as_ptr(),
                0u32,
            )
        };
        if renamed < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_logged(&self, text: &str) {
        if let Err(e) = self.write(text) {
            warn!("Cannot write the metrics file {}: {e}.", self.shown);
        }
    }
}

/// Rewrites the metrics file every `interval` until dropped, and once more then.
pub(super) struct MetricsWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsWriter {
    pub(super) fn start(
        file: MetricsFile,
        interval: Duration,
        render: impl Fn() -> String + Send + 'static,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("berth-metrics".into())
            .spawn(move || {
                let step = Duration::from_millis(100);
                let mut waited = interval;
                while !stopped.load(Ordering::SeqCst) {
                    if waited >= interval {
                        file.write_logged(&render());
                        waited = Duration::ZERO;
                    }
                    std::thread::sleep(step);
                    waited += step;
                }
                file.write_logged(&render());
            })
            .context("cannot start the metrics thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
