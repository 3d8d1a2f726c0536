//! The DAX window manager (`berth_dax::WindowManager`) against a model.
//!
//! Input: 4-byte operations on a 16-slot window (2 MiB slots) over three files. Byte 0 picks
//! the operation (low 3 bits) and a deliberate fault (top 2 bits), the others are arguments:
//!
//! - setup: inode, first slot, slot count, file offset (whole 2 MiB plus 0–3 pages), flags
//!   (including no access and unknown bits); sometimes a misaligned window offset;
//! - remove: first slot and count (sometimes past the window, or misaligned);
//! - a host size change seen after the fact (`resized`);
//! - a size change berth announces first (`resizing`, then the change, then `resized`);
//! - `recheck_all`, or `clear`.
//!
//! After every operation: what was accepted is what the model says may be accepted; every
//! slot holds what the model says (file, file offset, access) or nothing; every range shows
//! its file for exactly the pages the file reaches now and the placeholder past them; the fake
//! VMM (which refuses overlapping maps and unmaps that name no whole mapping, as QEMU does)
//! holds exactly the pieces the table implies; the counters agree with the table.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use berth_dax::{
    DaxError, Frontend, MappableFile, SetupRequest, WindowConfig, WindowManager,
    GUEST_MAPPING_GRANULE as G,
};

const SLOTS: u64 = 16;
const FILES: usize = 3;

/// What each operation did, for the replay tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: usize,
    pub refused: usize,
    pub repointed: usize,
}

/// A VMM with QEMU's rules, recording (window offset → len, inode number, file offset).
#[derive(Default)]
struct FakeVmm {
    mappings: RefCell<BTreeMap<u64, (u64, u64, u64)>>,
}

impl Frontend for FakeVmm {
    fn map(
        &self,
        window_offset: u64,
        len: u64,
        file: BorrowedFd<'_>,
        file_offset: u64,
        _writable: bool,
    ) -> io::Result<()> {
        let mut mappings = self.mappings.borrow_mut();
        let end = window_offset + len;
        assert!(end <= SLOTS * G, "a map past the window");
        assert!(
            !mappings
                .iter()
                .any(|(&s, &(l, ..))| s < end && window_offset < s + l),
            "a map over a live mapping at {window_offset:#x}"
        );
        let ino = File::from(file.try_clone_to_owned()?).metadata()?.ino();
        mappings.insert(window_offset, (len, ino, file_offset));
        Ok(())
    }

    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()> {
        let mut mappings = self.mappings.borrow_mut();
        match mappings.get(&window_offset) {
            Some(&(l, ..)) if l == len => {
                mappings.remove(&window_offset);
                Ok(())
            }
            _ => panic!("an unmap of {window_offset:#x}+{len:#x}, which is no whole mapping"),
        }
    }
}

/// The files of one thread (each input sets their sizes; parallel replays run on threads
/// of their own, so they never share them).
struct Files {
    _dir: tempfile::TempDir,
    files: Vec<(Arc<File>, u64)>,
}

thread_local! {
    static THREAD_FILES: Files = files();
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let files = (0..FILES)
        .map(|i| {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(format!("f{i}")))
                .expect("a file");
            let ino = file.metadata().expect("fstat").ino();
            (Arc::new(file), ino)
        })
        .collect();
    Files { _dir: dir, files }
}

fn page() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Runs the operations `data` describes and checks every invariant after each.
pub fn check(data: &[u8]) -> Outcome {
    THREAD_FILES.with(|f| run(f, data))
}

fn run(f: &Files, data: &[u8]) -> Outcome {
    let page = page();
    let mut sizes = [0u64; FILES];
    for (i, (file, _)) in f.files.iter().enumerate() {
        sizes[i] = 12 * G;
        file.set_len(sizes[i]).expect("set_len");
    }
    let w = WindowManager::new(WindowConfig {
        size: SLOTS * G,
        granule: G,
        read_only: false,
    })
    .expect("a window");
    let vmm = FakeVmm::default();
    let placeholder_ino = File::from(w.placeholder_fd().try_clone_to_owned().expect("dup"))
        .metadata()
        .expect("fstat")
        .ino();
    // slot → (file, file offset of the slot)
    let mut model: Vec<Option<(usize, u64)>> = vec![None; SLOTS as usize];
    let mut outcome = Outcome::default();
    for op in data.chunks_exact(4) {
        let (a, b, c) = (u64::from(op[1]), u64::from(op[2]), u64::from(op[3]));
        let inode = (a % FILES as u64) as usize;
        // Low 3 bits: the operation; bits 6–7: a deliberate fault (1 misaligned, 2 unknown
        // flag); bits 3–5: sub-page bytes of a size.
        let fault = op[0] >> 6;
        match op[0] & 7 {
            0 | 6 => {
                let start = b % (SLOTS + 2);
                let slots = 1 + c % 4;
                let file_offset = (a >> 2) % 8 * G + (c >> 2) % 4 * page;
                let flags = ((a >> 5) % 4) | if fault == 2 { 8 } else { 0 };
                let misaligned = fault == 1;
                let window_offset = start * G + if misaligned { page } else { 0 };
                let valid =
                    start + slots <= SLOTS && flags & 3 != 0 && flags & !3 == 0 && !misaligned;
                let file = f.files[inode].0.clone();
                let done = w.setup(
                    Some(&vmm),
                    &SetupRequest {
                        inode: inode as u64,
                        window_offset,
                        len: slots * G,
                        file_offset,
                        flags,
                    },
                    |_| {
                        Ok(MappableFile {
                            file,
                            writable: true,
                        })
                    },
                );
                assert_eq!(done.is_ok(), valid, "setup {op:?}: {done:?}");
                if let Err(e) = done {
                    assert_eq!(e.errno(), libc::EINVAL, "{e}");
                    outcome.refused += 1;
                } else {
                    outcome.accepted += 1;
                    for i in 0..slots {
                        model[(start + i) as usize] = Some((inode, file_offset + i * G));
                    }
                }
            }
            1 | 7 => {
                let start = b % (SLOTS + 2);
                let slots = 1 + c % 4;
                let misaligned = fault == 1;
                let len = slots * G - if misaligned { page } else { 0 };
                let valid = start + slots <= SLOTS && !misaligned;
                let done: Result<(), DaxError> = w.remove(Some(&vmm), &[(start * G, len)]);
                assert_eq!(done.is_ok(), valid, "remove {op:?}: {done:?}");
                if valid {
                    outcome.accepted += 1;
                    for slot in start..start + slots {
                        model[slot as usize] = None;
                    }
                } else {
                    outcome.refused += 1;
                }
            }
            kind @ (2 | 3) => {
                let size = (b * 256 + c) * page / 4 + u64::from(op[0] >> 3 & 7) % 3;
                if kind == 3 && size < sizes[inode] {
                    outcome.repointed += w.resizing(Some(&vmm), inode as u64, size);
                }
                f.files[inode].0.set_len(size).expect("set_len");
                sizes[inode] = size;
                outcome.repointed += w.resized(Some(&vmm), inode as u64);
            }
            4 => {
                outcome.repointed += w.recheck_all(Some(&vmm));
            }
            _ => {
                if a == 0 {
                    w.clear(Some(&vmm));
                    model.iter_mut().for_each(|slot| *slot = None);
                }
            }
        }
        check_state(f, &w, &vmm, &model, &sizes, page, placeholder_ino);
    }
    outcome
}

fn check_state(
    f: &Files,
    w: &WindowManager,
    vmm: &FakeVmm,
    model: &[Option<(usize, u64)>],
    sizes: &[u64; FILES],
    page: u64,
    placeholder_ino: u64,
) {
    let mut seen: Vec<Option<(usize, u64)>> = vec![None; SLOTS as usize];
    let mut pieces = BTreeMap::new();
    for m in w.mappings() {
        let inode = m.inode as usize;
        for i in 0..m.len / G {
            let slot = (m.window_offset / G + i) as usize;
            assert!(seen[slot].is_none(), "slot {slot} mapped twice");
            seen[slot] = Some((inode, m.file_offset + i * G));
        }
        let reach = sizes[inode].div_ceil(page) * page;
        let expected = reach.saturating_sub(m.file_offset).min(m.len);
        assert_eq!(m.file_backed, expected, "{m:?} with size {}", sizes[inode]);
        if m.file_backed > 0 {
            pieces.insert(
                m.window_offset,
                (m.file_backed, f.files[inode].1, m.file_offset),
            );
        }
        if m.file_backed < m.len {
            let at = m.window_offset + m.file_backed;
            pieces.insert(at, (m.len - m.file_backed, placeholder_ino, at));
        }
    }
    assert_eq!(seen, model);
    assert_eq!(pieces, *vmm.mappings.borrow());
    let metrics = w.metrics();
    let mappings = w.mappings();
    assert_eq!(metrics.live_ranges, mappings.len() as u64);
    assert_eq!(
        metrics.mapped_bytes,
        mappings.iter().map(|m| m.len).sum::<u64>()
    );
    assert_eq!(
        metrics.placeholder_bytes,
        mappings.iter().map(|m| m.len - m.file_backed).sum::<u64>()
    );
}
