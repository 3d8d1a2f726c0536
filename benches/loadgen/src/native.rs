//! The native limit: the same operations as direct syscalls from the generator's threads.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::fileset::{self, FileSet, WRITE_FILE_BASE};
use crate::pattern;
use crate::workload::{
    harness, remember_write, Case, Offsets, Rng, RunResult, WorkerResult, Workload,
};

struct NativeWorker<'a> {
    files: &'a FileSet,
    case: Case,
    index: usize,
    file_index: usize,
    file: Option<File>,
    dirs: Vec<File>,
    rng: Rng,
    offsets: Offsets,
    buffer: Vec<u8>,
    result: WorkerResult,
}

pub fn run(files: &FileSet, case: &Case) -> Result<RunResult> {
    harness(
        case.threads,
        case.duration,
        &|| None,
        |index| NativeWorker::new(files, case, index),
        |worker, stop| worker.run(stop),
    )
}

fn c_name(name: &str) -> CString {
    // Names are generated here and never hold NUL.
    CString::new(name).unwrap_or_default()
}

impl<'a> NativeWorker<'a> {
    fn new(files: &'a FileSet, case: &Case, index: usize) -> Result<Self> {
        let file_index = index % case.files;
        let mut file = None;
        let mut dirs = Vec::new();
        let (size, random) = match case.workload {
            Workload::Read { size, random } => {
                file = Some(File::open(files.data_path(file_index))?);
                (size, random)
            }
            Workload::Write { size, random } => {
                file = Some(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(files.write_path(file_index))?,
                );
                (size, random)
            }
            Workload::LookupGetattr | Workload::Readdirplus => {
                for dir in 0..files.layout.tree_dirs {
                    dirs.push(File::open(files.dir_path(dir))?);
                }
                (4096, true)
            }
            Workload::CreateUnlink => {
                dirs.push(File::open(files.churn_path(file_index))?);
                (4096, true)
            }
        };
        Ok(Self {
            files,
            case: *case,
            index,
            file_index,
            file,
            dirs,
            rng: Rng::new(((index as u64) << 32) + 7 + (case.generation << 48)),
            offsets: Offsets::new(size, files.layout.file_size, random, fileset::FILES),
            buffer: vec![0; size as usize],
            result: WorkerResult::default(),
        })
    }

    fn run(mut self, stop: &AtomicBool) -> Result<WorkerResult> {
        let mut listing_dir = self.index;
        let mut churn_counter = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            match self.case.workload {
                Workload::Read { size, .. } => {
                    let offset = self.offsets.next(self.file_index, &mut self.rng);
                    let file = self.file.as_ref().context("no file")?;
                    file.read_exact_at(&mut self.buffer, offset)?;
                    pattern::check(&self.buffer, self.file_index as u64, 0, offset)
                        .map_err(|at| anyhow!("pread returned wrong data at {at}"))?;
                    self.result.bytes += u64::from(size);
                }
                Workload::Write { size, .. } => {
                    let offset = self.offsets.next(self.file_index, &mut self.rng);
                    pattern::fill(
                        &mut self.buffer,
                        WRITE_FILE_BASE + self.file_index as u64,
                        self.case.generation,
                        offset,
                    );
                    let file = self.file.as_ref().context("no file")?;
                    file.write_all_at(&self.buffer, offset)?;
                    remember_write(
                        &mut self.result.written,
                        self.result.ops,
                        (self.file_index, offset, size as usize),
                    );
                    self.result.bytes += u64::from(size);
                }
                Workload::LookupGetattr => {
                    let dir = self.rng.below(self.dirs.len() as u64) as usize;
                    let entry = self.rng.below(self.files.layout.files_per_dir as u64) as usize;
                    let name = c_name(&fileset::tree_file_name(entry));
                    let ino = stat_at(&self.dirs[dir], &name)?;
                    if ino != self.files.tree_inos[dir][entry] {
                        bail!("statx returned the wrong inode");
                    }
                }
                Workload::CreateUnlink => {
                    churn_counter += 1;
                    let name = c_name(&format!(
                        "n{}-{}-{churn_counter}",
                        self.case.generation, self.index
                    ));
                    let dir = self.dirs[0].as_raw_fd();
                    // SAFETY: `name` is NUL-terminated and `dir` an open directory.
                    let fd = unsafe {
                        libc::openat(
                            dir,
                            name.as_ptr(),
                            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
                            0o644,
                        )
                    };
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error()).context("openat(O_CREAT)");
                    }
                    // SAFETY: `fd` was just opened and nothing else owns it.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                    // SAFETY: as above.
                    if unsafe { libc::unlinkat(dir, name.as_ptr(), 0) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("unlinkat");
                    }
                }
                Workload::Readdirplus => {
                    listing_dir = (listing_dir + 1) % self.dirs.len();
                    let path = self.files.dir_path(listing_dir);
                    let mut count = 0usize;
                    for entry in std::fs::read_dir(&path)? {
                        let entry_started = Instant::now();
                        let entry = entry?;
                        // DirEntry::metadata is an fstatat relative to the open directory.
                        let meta = entry.metadata()?;
                        std::hint::black_box(meta);
                        count += 1;
                        self.result
                            .latency
                            .record(entry_started.elapsed().as_nanos() as u64);
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    self.result.ops += count as u64;
                    if count != self.files.layout.files_per_dir && !stop.load(Ordering::Relaxed) {
                        bail!("readdir listed {count} entries");
                    }
                    continue;
                }
            }
            self.result.ops += 1;
            self.result
                .latency
                .record(started.elapsed().as_nanos() as u64);
        }
        Ok(self.result)
    }
}

fn stat_at(dir: &File, name: &CString) -> Result<u64> {
    // SAFETY: libc::stat is plain old data; zeroes are a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated, `stat` is writable, `dir` an open directory.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut stat,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("fstatat");
    }
    Ok(stat.st_ino)
}
