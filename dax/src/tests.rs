use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use super::*;

const G: u64 = GUEST_MAPPING_GRANULE;
const FILE_LEN: u64 = 64 << 30;

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
            // Long enough (sparse) that no test range reaches past the end unless a test
            // shrinks the file.
            file.set_len(FILE_LEN).unwrap();
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

/// The table and the VMM hold the same mappings: each range's file part from its file, its
/// placeholder part from the placeholder at the same offset.
fn assert_in_step(w: &WindowManager, vmm: &FakeVmm, files: &Files) {
    let placeholder_ino = File::from(w.placeholder_fd().try_clone_to_owned().unwrap())
        .metadata()
        .unwrap()
        .ino();
    let mut ours = Vec::new();
    for m in w.mappings() {
        assert!(m.file_backed <= m.len);
        if m.file_backed > 0 {
            let ino = files.files[m.inode as usize].1;
            ours.push((
                m.window_offset,
                (m.file_backed, ino, m.file_offset, m.writable),
            ));
        }
        if m.file_backed < m.len {
            let at = m.window_offset + m.file_backed;
            ours.push((at, (m.len - m.file_backed, placeholder_ino, at, m.writable)));
        }
    }
    let theirs: Vec<_> = vmm
        .mappings
        .borrow()
        .iter()
        .map(|(&k, &v)| (k, v))
        .collect();
    assert_eq!(ours, theirs);
    let metrics = w.metrics();
    assert_eq!(metrics.live_ranges, w.mappings().len() as u64);
    assert_eq!(
        metrics.mapped_bytes,
        w.mappings().iter().map(|m| m.len).sum::<u64>()
    );
    assert_eq!(
        metrics.placeholder_bytes,
        w.mappings()
            .iter()
            .map(|m| m.len - m.file_backed)
            .sum::<u64>()
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

fn page() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

#[test]
fn setup_maps_pages_past_the_end_from_the_placeholder() {
    let f = files(1);
    let w = window(4);
    let vmm = FakeVmm::default();
    // 100 bytes into the file's second page: two pages show the file.
    f.files[0].0.set_len(G + page() + 100).unwrap();
    setup(&w, &vmm, &f, 0, (0, 2 * G), G, RW).unwrap();
    assert_eq!(w.mappings()[0].file_backed, 2 * page());
    assert_in_step(&w, &vmm, &f);
    assert_eq!(w.metrics().maps, 2);
    // Wholly past the end: only placeholder.
    setup(&w, &vmm, &f, 0, (2 * G, G), 4 * G, RO).unwrap();
    assert_eq!(w.mappings()[1].file_backed, 0);
    assert_in_step(&w, &vmm, &f);
    // Splitting a range keeps each remainder's parts.
    w.remove(Some(&vmm), &[(0, G)]).unwrap();
    let m = w.mappings();
    assert_eq!((m[0].window_offset, m[0].file_offset), (G, 2 * G));
    assert_eq!(m[0].file_backed, 0);
    assert_in_step(&w, &vmm, &f);
}

#[test]
fn resizing_repoints_before_and_resized_follows_the_file() {
    let f = files(2);
    let w = window(8);
    let vmm = FakeVmm::default();
    setup(&w, &vmm, &f, 0, (0, 4 * G), 0, RW).unwrap();
    setup(&w, &vmm, &f, 1, (4 * G, G), 0, RO).unwrap();
    assert_eq!(w.metrics().placeholder_bytes, 0);
    // Berth is about to cut inode 0 to G + 1 bytes: pages from G + page on are re-pointed
    // while the file is still long; the other file's range is left alone.
    assert_eq!(w.resizing(Some(&vmm), 0, G + 1), 1);
    assert_eq!(w.mappings()[0].file_backed, G + page());
    assert_eq!(f.files[0].0.metadata().unwrap().len(), FILE_LEN);
    assert_in_step(&w, &vmm, &f);
    assert_eq!(w.metrics().repoints, 1);
    // Asking again changes nothing; a larger size never maps back before the change.
    assert_eq!(w.resizing(Some(&vmm), 0, G + 1), 0);
    assert_eq!(w.resizing(Some(&vmm), 0, 3 * G), 0);
    // The file really is cut, then a host process cuts it further: resized follows fstat.
    f.files[0].0.set_len(G + 1).unwrap();
    assert_eq!(w.resized(Some(&vmm), 0), 0);
    f.files[0].0.set_len(page()).unwrap();
    assert_eq!(w.resized(Some(&vmm), 0), 1);
    assert_eq!(w.mappings()[0].file_backed, page());
    assert_in_step(&w, &vmm, &f);
    // It grows again (an extending write): the file shows through again.
    f.files[0].0.set_len(3 * G).unwrap();
    assert_eq!(w.resized(Some(&vmm), 0), 1);
    assert_eq!(w.mappings()[0].file_backed, 3 * G);
    assert_eq!(w.metrics().restores, 1);
    assert_in_step(&w, &vmm, &f);
    // recheck_all sees both files.
    f.files[0].0.set_len(0).unwrap();
    f.files[1].0.set_len(0).unwrap();
    assert_eq!(w.recheck_all(Some(&vmm)), 2);
    assert!(w.mappings().iter().all(|m| m.file_backed == 0));
    assert_eq!(w.metrics().placeholder_bytes, 5 * G);
    assert_in_step(&w, &vmm, &f);
    assert!(w.maps_inode(1));
    assert!(!w.maps_inode(7));
    // Without a channel nothing can be re-pointed, and nothing is pretended.
    f.files[0].0.set_len(FILE_LEN).unwrap();
    assert_eq!(w.resized(None, 0), 0);
    assert_eq!(w.mappings()[0].file_backed, 0);
}

#[test]
fn placeholder_bytes_a_guest_wrote_are_gone_once_the_range_leaves() {
    use std::os::unix::fs::FileExt;
    let f = files(1);
    let w = window(2);
    let vmm = FakeVmm::default();
    f.files[0].0.set_len(0).unwrap();
    setup(&w, &vmm, &f, 0, (G, G), 0, RW).unwrap();
    // What the VMM would see when the guest writes through the re-pointed range.
    let placeholder = File::from(w.placeholder_fd().try_clone_to_owned().unwrap());
    placeholder.write_all_at(b"guest bytes", G + 10).unwrap();
    w.remove(Some(&vmm), &[(G, G)]).unwrap();
    let mut back = [0xffu8; 11];
    placeholder.read_exact_at(&mut back, G + 10).unwrap();
    assert_eq!(back, [0u8; 11]);
    // The seals keep its size: the VMM cannot truncate it under its own mappings.
    assert!(placeholder.set_len(0).is_err());
    assert_eq!(placeholder.metadata().unwrap().len(), 2 * G);
}

/// Random setups, removals and file size changes (announced by `resizing`, or only seen
/// after the fact by `resized`) against a per-page model: every range shows its file exactly
/// where the file reaches, the placeholder elsewhere, and the VMM agrees.
#[test]
fn random_resizes_match_a_per_page_model() {
    const SLOTS: u64 = 16;
    let page = page();
    let f = files(3);
    let w = window(SLOTS);
    let vmm = FakeVmm::default();
    let mut sizes = [FILE_LEN; 3];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for step in 0..3_000 {
        match rng.below(4) {
            0 => {
                let start = rng.below(SLOTS);
                let slots = 1 + rng.below(3).min(SLOTS - start - 1);
                let inode = rng.below(3) as usize;
                let file_offset = rng.below(8) * G + rng.below(4) * page;
                setup(&w, &vmm, &f, inode, (start * G, slots * G), file_offset, RW).unwrap();
            }
            1 => {
                let start = rng.below(SLOTS);
                w.remove(Some(&vmm), &[(start * G, G)]).unwrap();
            }
            op => {
                let inode = rng.below(3) as usize;
                let size = rng.below(10 * G / page) * page + rng.below(page);
                if op == 2 && size < sizes[inode] {
                    w.resizing(Some(&vmm), inode as u64, size);
                }
                f.files[inode].0.set_len(size).unwrap();
                sizes[inode] = size;
                w.resized(Some(&vmm), inode as u64);
            }
        }
        for m in w.mappings() {
            let reach = sizes[m.inode as usize].div_ceil(page) * page;
            let expected = reach.saturating_sub(m.file_offset).min(m.len);
            assert_eq!(m.file_backed, expected, "step {step}: {m:?}");
        }
        assert_in_step(&w, &vmm, &f);
    }
    let metrics = w.metrics();
    assert!(
        metrics.repoints > 100 && metrics.restores > 100,
        "{metrics:?}"
    );
}

/// A VMM that accepts everything and keeps nothing (to measure the table alone).
struct NullVmm;

impl Frontend for NullVmm {
    fn map(&self, _: u64, _: u64, _: BorrowedFd<'_>, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }

    fn unmap(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Counts the heap bytes the current thread holds, for the memory bound below.
struct CountingAllocator;

thread_local! {
    static HELD: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the counter is a
// const-initialised thread-local without destructor, which never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        HELD.with(|h| h.set(h.get() + layout.size() as isize));
        // SAFETY: the caller's layout contract is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HELD.with(|h| h.set(h.get() - layout.size() as isize));
        // SAFETY: ptr came from alloc with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A 64 GiB window full of 2 MiB ranges (32 768) costs at most MAX_BYTES_PER_RANGE each,
/// whether every range is another file's or all are one file's.
#[test]
fn a_full_64_gib_window_costs_a_bounded_amount_of_memory() {
    const RANGES: u64 = 32_768;
    let f = files(1);
    for distinct_inodes in [true, false] {
        let w = window(RANGES);
        let before = HELD.with(|h| h.get());
        for slot in 0..RANGES {
            let file = f.files[0].0.clone();
            let inode = if distinct_inodes { slot } else { 0 };
            w.setup(
                Some(&NullVmm),
                &SetupRequest {
                    inode,
                    window_offset: slot * G,
                    len: G,
                    file_offset: 0,
                    flags: RO,
                },
                |_| {
                    Ok(MappableFile {
                        file,
                        writable: true,
                    })
                },
            )
            .unwrap();
        }
        let held = HELD.with(|h| h.get()) - before;
        assert_eq!(w.metrics().live_ranges, RANGES);
        let per_range = held as usize / RANGES as usize;
        assert!(
            per_range <= MAX_BYTES_PER_RANGE,
            "{per_range} bytes per range (distinct inodes: {distinct_inodes})"
        );
        // The bound is tight enough to mean something.
        assert!(per_range >= 56, "{per_range} bytes per range");
        eprintln!("distinct inodes {distinct_inodes}: {per_range} bytes per range");
        assert_eq!(w.clear(Some(&NullVmm)), RANGES as usize);
    }
}

#[test]
fn a_refused_end_page_falls_back_to_zeros_not_a_hole() {
    let f = files(1);
    let w = window(2);
    let vmm = FakeVmm::default();
    setup(&w, &vmm, &f, 0, (0, G), 0, RW).unwrap();
    // The file shrinks to 3 pages + 1 byte; the VMM refuses the first map after the unmap
    // (as QEMU 11.1 refuses a file piece reaching past the end inside the last page).
    f.files[0].0.set_len(3 * page() + 1).unwrap();
    *vmm.fail_next_map.borrow_mut() = true;
    assert_eq!(w.resized(Some(&vmm), 0), 1);
    let m = w.mappings();
    assert_eq!((m.len(), m[0].file_backed), (1, 3 * page()));
    assert_in_step(&w, &vmm, &f);
    assert_eq!(w.metrics().frontend_errors, 1);
}
