use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use super::*;

const G: u64 = GUEST_MAPPING_GRANULE;

/// A VMM as QEMU behaves: a map must not meet a live mapping, an unmap must name exactly one.
#[derive(Default)]
struct FakeVmm {
    /// window offset → (len, host inode number of the file, file offset, writable)
    mappings: RefCell<BTreeMap<u64, (u64, u64, u64, bool)>>,
    fail_next_map: RefCell<bool>,
}

impl Frontend for FakeVmm {
    fn map(
        &self,
        window_offset: u64,
        len: u64,
        file: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> io::Result<()> {
        if self.fail_next_map.replace(false) {
            return Err(io::Error::other("injected failure"));
        }
        let mut mappings = self.mappings.borrow_mut();
        let end = window_offset + len;
        if mappings
            .iter()
            .any(|(&s, &(l, ..))| s < end && window_offset < s + l)
        {
            return Err(io::Error::other("overlapping map"));
        }
        let ino = File::from(file.try_clone_to_owned()?).metadata()?.ino();
        mappings.insert(window_offset, (len, ino, file_offset, writable));
        Ok(())
    }

    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()> {
        let mut mappings = self.mappings.borrow_mut();
        match mappings.get(&window_offset) {
            Some(&(l, ..)) if l == len => {
                mappings.remove(&window_offset);
                Ok(())
            }
            _ => Err(io::Error::other("no such mapping")),
        }
    }
}

struct Files {
    _dir: tempfile::TempDir,
    files: Vec<(Arc<File>, u64)>,
    read_only: Arc<File>,
}

fn files(count: usize) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let files = (0..count)
        .map(|i| {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(format!("f{i}")))
                .unwrap();
            let ino = file.metadata().unwrap().ino();
            (Arc::new(file), ino)
        })
        .collect();
    let read_only = Arc::new(File::open(dir.path().join("f0")).unwrap());
    Files {
        _dir: dir,
        files,
        read_only,
    }
}

fn window(slots: u64) -> WindowManager {
    WindowManager::new(WindowConfig {
        size: slots * G,
        granule: G,
        read_only: false,
    })
    .unwrap()
}

fn setup(
    w: &WindowManager,
    vmm: &FakeVmm,
    files: &Files,
    inode: usize,
    (window_offset, len): (u64, u64),
    file_offset: u64,
    flags: u64,
) -> Result<(), DaxError> {
    let file = files.files[inode].0.clone();
    w.setup(
        Some(vmm),
        &SetupRequest {
            inode: inode as u64,
            window_offset,
            len,
            file_offset,
            flags,
        },
        |_| {
            Ok(MappableFile {
                file,
                writable: true,
            })
        },
    )
}

const RW: u64 = SETUPMAPPING_FLAG_READ | SETUPMAPPING_FLAG_WRITE;
const RO: u64 = SETUPMAPPING_FLAG_READ;

/// The table and the VMM hold the same mappings.
fn assert_in_step(w: &WindowManager, vmm: &FakeVmm, files: &Files) {
    let ours: Vec<_> = w
        .mappings()
        .into_iter()
        .map(|m| {
            (
                m.window_offset,
                (
                    m.len,
                    files.files[m.inode as usize].1,
                    m.file_offset,
                    m.writable,
                ),
            )
        })
        .collect();
    let theirs: Vec<_> = vmm
        .mappings
        .borrow()
        .iter()
        .map(|(&k, &v)| (k, v))
        .collect();
    assert_eq!(ours, theirs);
    let metrics = w.metrics();
    assert_eq!(metrics.live_ranges, ours.len() as u64);
    assert_eq!(
        metrics.mapped_bytes,
        ours.iter().map(|(_, (len, ..))| len).sum::<u64>()
    );
}

#[test]
fn window_size_must_be_whole_granules() {
    for size in [0, G + 4096, G / 2] {
        let err = WindowManager::new(WindowConfig {
            size,
            granule: G,
            read_only: false,
        })
        .unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
    }
    assert!(WindowManager::new(WindowConfig {
        size: 512 * G,
        granule: G,
        read_only: false
    })
    .is_ok());
}

#[test]
fn each_refusal_has_its_errno_and_reaches_no_vmm() {
    let f = files(1);
    let w = window(4);
    let vmm = FakeVmm::default();
    let cases: [(u64, u64, u64, u64, i32); 8] = [
        // window_offset, len, file_offset, flags, errno
        (4 * G, G, 0, RO, libc::EINVAL),     // past the end
        (3 * G, 2 * G, 0, RO, libc::EINVAL), // runs past the end
        (G / 2, G, 0, RO, libc::EINVAL),     // misaligned window offset
        (0, G + 4096, 0, RO, libc::EINVAL),  // not whole granules
        (0, 0, 0, RO, libc::EINVAL),         // empty
        (0, G, 100, RO, libc::EINVAL),       // file offset not page-aligned
        (0, G, 0, 0, libc::EINVAL),          // no access
        (0, G, 0, RO | 4, libc::EINVAL),     // unknown flag
    ];
    for (i, (offset, len, file_offset, flags, errno)) in cases.into_iter().enumerate() {
        let err = setup(&w, &vmm, &f, 0, (offset, len), file_offset, flags).unwrap_err();
        assert_eq!(err.errno(), errno, "case {i}: {err}");
    }
    let err = setup(&w, &vmm, &f, 0, (0, G), u64::MAX - 4095, RO).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert_eq!(w.metrics().refused, 9);
    assert!(vmm.mappings.borrow().is_empty());

    // A writable mapping of a file opened read-only.
    let read_only = f.read_only.clone();
    let err = w
        .setup(
            Some(&vmm),
            &SetupRequest {
                inode: 0,
                window_offset: 0,
                len: G,
                file_offset: 0,
                flags: RW,
            },
            |asked_writable| {
                assert!(asked_writable);
                Ok(MappableFile {
                    file: read_only,
                    writable: false,
                })
            },
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EACCES);

    // The filesystem refuses to open the file (a stale handle, say).
    let err = w
        .setup(
            Some(&vmm),
            &SetupRequest {
                inode: 0,
                window_offset: 0,
                len: G,
                file_offset: 0,
                flags: RO,
            },
            |_| Err(io::Error::from_raw_os_error(libc::EBADF)),
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EBADF);

    // No channel to the VMM.
    let err = w
        .setup(
            None,
            &SetupRequest {
                inode: 0,
                window_offset: 0,
                len: G,
                file_offset: 0,
                flags: RO,
            },
            |_| unreachable!("no file is opened without a channel"),
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENODEV);

    // Removal ranges are checked, all before any is carried out.
    setup(&w, &vmm, &f, 0, (0, G), 0, RO).unwrap();
    let err = w.remove(Some(&vmm), &[(0, G), (G, 4096)]).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    let err = w.remove(Some(&vmm), &[(0, G), (3 * G, 2 * G)]).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert_eq!(w.mappings().len(), 1);
    assert_in_step(&w, &vmm, &f);
}

#[test]
fn read_only_share_refuses_writable_mappings() {
    let f = files(1);
    let w = WindowManager::new(WindowConfig {
        size: 4 * G,
        granule: G,
        read_only: true,
    })
    .unwrap();
    let vmm = FakeVmm::default();
    let err = setup(&w, &vmm, &f, 0, (0, G), 0, RW).unwrap_err();
    assert_eq!(err.errno(), libc::EROFS);
    setup(&w, &vmm, &f, 0, (0, G), 0, RO).unwrap();
    assert!(!w.mappings()[0].writable);
    assert_in_step(&w, &vmm, &f);
}

#[test]
fn overlapping_setup_replaces_and_keeps_the_remainders() {
    let f = files(2);
    let w = window(8);
    let vmm = FakeVmm::default();
    setup(&w, &vmm, &f, 0, (0, 6 * G), 10 * G, RW).unwrap();
    setup(&w, &vmm, &f, 1, (2 * G, G), 0, RO).unwrap();
    let m = w.mappings();
    let shape: Vec<_> = m
        .iter()
        .map(|m| (m.window_offset, m.len, m.inode, m.file_offset, m.writable))
        .collect();
    assert_eq!(
        shape,
        vec![
            (0, 2 * G, 0, 10 * G, true),
            (2 * G, G, 1, 0, false),
            (3 * G, 3 * G, 0, 13 * G, true),
        ]
    );
    assert_in_step(&w, &vmm, &f);
    // One map, then one unmap of the whole and three maps (two remainders, the new range).
    let metrics = w.metrics();
    assert_eq!((metrics.maps, metrics.unmaps), (4, 1));
}

#[test]
fn partial_removal_splits() {
    let f = files(1);
    let w = window(8);
    let vmm = FakeVmm::default();
    setup(&w, &vmm, &f, 0, (G, 4 * G), 0, RO).unwrap();
    w.remove(Some(&vmm), &[(2 * G, G), (7 * G, G)]).unwrap();
    let shape: Vec<_> = w
        .mappings()
        .iter()
        .map(|m| (m.window_offset, m.len, m.file_offset))
        .collect();
    assert_eq!(shape, vec![(G, G, 0), (3 * G, 2 * G, 2 * G)]);
    assert_in_step(&w, &vmm, &f);
    // A removal spanning both pieces and free space.
    w.remove(Some(&vmm), &[(0, 8 * G)]).unwrap();
    assert!(w.mappings().is_empty());
    assert_in_step(&w, &vmm, &f);
}

#[test]
fn clear_unmaps_everything_or_forgets_it() {
    let f = files(1);
    let w = window(8);
    let vmm = FakeVmm::default();
    for slot in [0, 3, 5] {
        setup(&w, &vmm, &f, 0, (slot * G, G), 0, RO).unwrap();
    }
    assert_eq!(w.clear(Some(&vmm)), 3);
    assert_in_step(&w, &vmm, &f);
    setup(&w, &vmm, &f, 0, (0, G), 0, RO).unwrap();
    assert_eq!(w.clear(None), 1);
    assert!(w.mappings().is_empty());
    assert_eq!(w.metrics().live_ranges, 0);
}

#[test]
fn a_failed_map_leaves_table_and_vmm_in_step() {
    let f = files(1);
    let w = window(4);
    let vmm = FakeVmm::default();
    *vmm.fail_next_map.borrow_mut() = true;
    let err = setup(&w, &vmm, &f, 0, (0, G), 0, RO).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(w.metrics().frontend_errors, 1);
    assert_in_step(&w, &vmm, &f);
}

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 10 000 random setups and removals against a model with one entry per 2 MiB slot: the
/// table, the VMM and the model agree on every slot after every operation.
#[test]
fn random_operations_match_a_per_slot_model() {
    const SLOTS: u64 = 64;
    let f = files(4);
    let w = window(SLOTS);
    let vmm = FakeVmm::default();
    // slot → (file index, file offset of the slot, writable)
    let mut model: Vec<Option<(usize, u64, bool)>> = vec![None; SLOTS as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for step in 0..10_000 {
        let start = rng.below(SLOTS);
        let slots = 1 + rng.below(6);
        let valid = start + slots <= SLOTS;
        if rng.below(3) > 0 {
            let inode = rng.below(4) as usize;
            let file_offset = rng.below(32) * G;
            let flags = if rng.below(2) == 0 { RO } else { RW };
            let done = setup(
                &w,
                &vmm,
                &f,
                inode,
                (start * G, slots * G),
                file_offset,
                flags,
            );
            assert_eq!(done.is_ok(), valid, "step {step}: {done:?}");
            if valid {
                for i in 0..slots {
                    model[(start + i) as usize] = Some((inode, file_offset + i * G, flags == RW));
                }
            }
        } else {
            let mut ranges = vec![(start * G, slots * G)];
            if rng.below(2) == 0 {
                let other = rng.below(SLOTS);
                ranges.push((other * G, G));
            }
            let done = w.remove(Some(&vmm), &ranges);
            assert_eq!(done.is_ok(), valid, "step {step}: {done:?}");
            if valid {
                for (offset, len) in ranges {
                    for slot in offset / G..(offset + len) / G {
                        model[slot as usize] = None;
                    }
                }
            }
        }
        let mut seen: Vec<Option<(usize, u64, bool)>> = vec![None; SLOTS as usize];
        for m in w.mappings() {
            for i in 0..m.len / G {
                let slot = (m.window_offset / G + i) as usize;
                assert!(
                    seen[slot].is_none(),
                    "step {step}: slot {slot} mapped twice"
                );
                seen[slot] = Some((m.inode as usize, m.file_offset + i * G, m.writable));
            }
        }
        assert_eq!(seen, model, "step {step}");
        assert_in_step(&w, &vmm, &f);
    }
    assert!(w.metrics().maps > 1000);
}
