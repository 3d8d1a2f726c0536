//! Dirty-page logging for live migration, checked with the berth-frontend as the VMM: with a
//! log installed (SET_LOG_BASE over LOG_SHMFD) and VHOST_F_LOG_ALL set, the pages the daemon
//! marks must be exactly the pages it wrote: the reply header, the READ data it put straight
//! into guest memory, and the used ring, on every queue. A shadow log computed from the chains
//! the test published and the lengths the daemon reported is compared with the real one.

#[path = "common/frontend_util.rs"]
mod frontend_util;

use std::collections::BTreeSet;
use std::time::Duration;

use berth_frontend::dirty_log::{pages_of, LOG_PAGE_SIZE};
use berth_frontend::fuse::{opcode, ROOT_ID};
use berth_frontend::virtqueue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use berth_frontend::{FsQueue, RawDescriptor, RawNext, VhostUserFs};
use frontend_util::*;
use vm_memory::ByteValued;

/// Bytes of a FUSE reply header.
const OUT_HEADER: u64 = 16;
/// Bytes the used ring's index and first entries take: all tests stay on its first page.
const USED_RING_TOUCHED: u64 = 4 + 8 * 64 + 2;
/// How many bytes each READ asks for: spans several pages, ends inside one.
const READ_SIZE: u32 = 3 * 4096 + 1000;

/// One READ answered into two device-writable buffers (header, then data) placed so that the
/// header straddles a page boundary and the data buffer is larger than the reply; returns the
/// pages the daemon wrote according to the length it reported.
fn logged_read(queue: &mut FsQueue, nodeid: u64, fh: u64, offset: u64) -> BTreeSet<u64> {
    let request = queue.allocate_raw_buffer(4096).expect("request buffer");
    let read_in = FsQueue::read_in(fh, offset, READ_SIZE);
    let (_, request_len) = queue
        .write_request_bytes(request, opcode::READ, nodeid, &[read_in.as_slice()])
        .expect("write READ request");
    // Two pages for the header so that it can cross from the first into the second.
    let header_area = queue.allocate_raw_buffer(2 * 4096).expect("header buffer");
    let header = header_area.0 + 4096 - 8;
    let data = queue.allocate_raw_buffer(8 * 4096).expect("data buffer").0;
    let head = queue
        .submit_raw(&[
            RawDescriptor {
                addr: request.0,
                len: request_len,
                flags: VIRTQ_DESC_F_NEXT,
                next: RawNext::Following,
            },
            RawDescriptor {
                addr: header,
                len: OUT_HEADER as u32,
                flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                next: RawNext::Following,
            },
            RawDescriptor {
                addr: data,
                len: 8 * 4096,
                flags: VIRTQ_DESC_F_WRITE,
                next: RawNext::Following,
            },
        ])
        .expect("publish READ");
    let used = queue
        .wait_raw(head, Duration::from_secs(5))
        .expect("wait for READ")
        .expect("the daemon answers the READ");
    let used_len = u64::from(used.len);
    assert!(
        used_len > OUT_HEADER,
        "the READ returned data ({used_len} bytes)"
    );
    let mut pages: BTreeSet<u64> = pages_of(header, OUT_HEADER).collect();
    pages.extend(pages_of(data, used_len - OUT_HEADER));
    pages.extend(used_ring_pages(queue));
    pages
}

fn used_ring_pages(queue: &FsQueue) -> impl Iterator<Item = u64> {
    pages_of(queue.virtqueue_ref().used_ring().0, USED_RING_TOUCHED)
}

/// Looks up and opens big.bin on `queue`.
fn open_big(queue: &mut FsQueue) -> (u64, u64) {
    let entry = queue.lookup(ROOT_ID, b"big.bin\0").expect("LOOKUP big.bin");
    let open = queue
        .open(entry.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN");
    (entry.nodeid, open.fh)
}

fn start_log(device: &mut VhostUserFs) -> berth_frontend::DirtyLog {
    let log = device.start_dirty_log().expect("start dirty logging");
    assert!(log.dirty_pages().is_empty(), "a fresh log is clean");
    log
}

#[test]
fn logged_pages_are_exactly_the_pages_written_on_one_queue() {
    if !testing_berth() {
        skip_by_design("dirty-log page accounting is checked on berth's own device");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let (nodeid, fh) = open_big(&mut queue);
    let log = start_log(&mut device);

    let expected = logged_read(&mut queue, nodeid, fh, 0);
    assert_eq!(log.dirty_pages(), expected, "dirty pages after a READ");

    // A short read at the end of the file: fewer data pages, and none past the reply.
    log.clear();
    let tail = (BIG_SIZE as u64) - 700;
    let expected = logged_read(&mut queue, nodeid, fh, tail);
    assert_eq!(
        log.dirty_pages(),
        expected,
        "dirty pages after a short READ"
    );
    assert!(
        expected.len() <= 4,
        "a 700-byte reply touches at most header, data and used ring pages: {expected:?}"
    );

    // With LOG_ALL cleared berth stops marking its replies (the library still marks the used
    // ring, which costs a migration nothing).
    device.stop_dirty_log().expect("stop dirty logging");
    log.clear();
    let written = logged_read(&mut queue, nodeid, fh, 0);
    let ring: BTreeSet<u64> = used_ring_pages(&queue).collect();
    let marked = log.dirty_pages();
    assert!(
        marked.is_subset(&ring),
        "no reply page is marked once logging stopped: {marked:?} (reply pages {written:?})"
    );
    daemon.assert_alive("after dirty logging");
}

#[test]
fn logged_pages_cover_every_queue_with_a_thread_pool() {
    if !testing_berth() {
        skip_by_design("dirty-log page accounting is checked on berth's own device");
        return;
    }
    for pool in ["0", "4"] {
        let fixture = Fixture::new();
        let mut args = fixture.basic_args();
        args.extend(["--thread-pool-size".into(), pool.into()]);
        let mut daemon = Daemon::spawn(args);
        daemon.wait_for_socket(&fixture.socket);
        let mut device = connect(&mut daemon, &fixture.socket, 4);
        let mut first = init_first_queue(&mut device);
        let (nodeid, _) = open_big(&mut first);
        let mut hiprio = device.take_queue(0).expect("hiprio queue");
        let mut queues = vec![first];
        queues.extend(device.take_request_queues());
        assert_eq!(queues.len(), 4, "four request queues");
        let handles: Vec<u64> = queues
            .iter_mut()
            .map(|q| q.open(nodeid, libc::O_RDONLY as u32).expect("OPEN").fh)
            .collect();
        let log = start_log(&mut device);

        // Every request queue reads at once, from its own thread.
        let threads: Vec<_> = queues
            .into_iter()
            .zip(handles)
            .enumerate()
            .map(|(n, (mut queue, fh))| {
                std::thread::spawn(move || {
                    let mut pages = BTreeSet::new();
                    for round in 0..4u64 {
                        let offset = (n as u64 * 4 + round) * 8192;
                        pages.extend(logged_read(&mut queue, nodeid, fh, offset));
                    }
                    pages
                })
            })
            .collect();
        let mut expected = BTreeSet::new();
        for thread in threads {
            expected.extend(thread.join().expect("reader thread"));
        }
        // The high-priority queue: a FORGET has no reply, only a used-ring entry.
        hiprio.forget(nodeid, 1).expect("FORGET on hiprio");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let hiprio_ring: BTreeSet<u64> = used_ring_pages(&hiprio).collect();
        while !log.dirty_pages().is_superset(&hiprio_ring) {
            assert!(
                std::time::Instant::now() < deadline,
                "the hiprio queue's used ring was never marked (pool {pool})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        expected.extend(hiprio_ring);
        assert_eq!(
            log.dirty_pages(),
            expected,
            "dirty pages over 4 request queues and hiprio (thread pool {pool})"
        );
        assert!(expected.len() > 16 * 4, "the reads covered many pages");
        assert_eq!(LOG_PAGE_SIZE, 4096);
        daemon.assert_alive("after logging on every queue");
    }
}
