//! Drives the daemon through a real vhost-user connection and real split virtqueues with the
//! berth-frontend crate: negotiation, memory table, vrings, FUSE requests checked against the
//! host directory, multiple request queues, malformed descriptor chains and disconnect.
//!
//! By default the berth binary is tested. `BERTH_TEST_DAEMON=/path/to/virtiofsd cargo test
//! --test vhost_user_protocol` runs the same suite against virtiofsd (started with
//! `--sandbox none --seccomp none`); tests needing more than one request queue then skip.

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use berth_frontend::fuse::{opcode, OutHeader, ROOT_ID};
use berth_frontend::virtqueue::{
    Descriptor, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use berth_frontend::{FsQueue, RawDescriptor, RawNext, Request};
use frontend_util::*;
use tmpfs::TmpfsMount;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Address, Bytes, GuestAddress};

const S_IFMT: u32 = libc::S_IFMT;

fn assert_attr_matches(attr: &berth_frontend::fuse::Attr, path: &std::path::Path) {
    let meta = fs::symlink_metadata(path).expect("stat host file");
    assert_eq!(attr.size, meta.len(), "size of {}", path.display());
    assert_eq!(attr.mode, meta.mode(), "mode of {}", path.display());
    assert_eq!(
        attr.nlink as u64,
        meta.nlink(),
        "nlink of {}",
        path.display()
    );
    assert_eq!(attr.uid, meta.uid(), "uid of {}", path.display());
    assert_eq!(
        attr.mtime as i64,
        meta.mtime(),
        "mtime of {}",
        path.display()
    );
}

/// Reads a whole file through FUSE in `chunk`-sized READs.
fn read_all(queue: &mut FsQueue, nodeid: u64, fh: u64, chunk: u32) -> Vec<u8> {
    let mut content = Vec::new();
    loop {
        let data = queue
            .read(nodeid, fh, content.len() as u64, chunk)
            .expect("READ");
        if data.is_empty() {
            return content;
        }
        content.extend_from_slice(&data);
    }
}

#[test]
fn negotiation_and_init() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let negotiated = *device.negotiated();
    assert_ne!(
        negotiated.acked_features & berth_frontend::device::VIRTIO_F_VERSION_1,
        0
    );
    assert!(
        negotiated.backend_queues >= 2,
        "a virtio-fs backend needs hiprio plus a request queue, got {}",
        negotiated.backend_queues
    );
    assert!(
        negotiated
            .acked_protocol_features
            .contains(VhostUserProtocolFeatures::MQ),
        "MQ not negotiated: offered {:?}",
        negotiated.offered_protocol_features
    );
    let mut queue = device.take_request_queue(1).expect("queue 1");
    let init = queue.init_default().expect("FUSE_INIT");
    assert_eq!(init.major, 7);
    assert!(init.minor >= 27, "minor version {} too old", init.minor);
    assert!(init.max_write >= 4096, "max_write {}", init.max_write);
    daemon.assert_alive("after FUSE_INIT");
}

#[test]
fn file_and_directory_operations_on_one_queue() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let shared = &fixture.shared;

    // GETATTR on the root matches the shared directory itself.
    let root = queue.getattr(ROOT_ID).expect("GETATTR root");
    assert_attr_matches(&root.attr, shared);
    assert_eq!(root.attr.mode & S_IFMT, libc::S_IFDIR);

    // LOOKUP + GETATTR + OPEN + READ of a small file.
    let hello = queue
        .lookup(ROOT_ID, b"hello.txt")
        .expect("LOOKUP hello.txt");
    assert_ne!(hello.nodeid, 0);
    assert_attr_matches(&hello.attr, &shared.join("hello.txt"));
    let attr = queue.getattr(hello.nodeid).expect("GETATTR hello.txt");
    assert_eq!(attr.attr.size, HELLO_CONTENT.len() as u64);
    let opened = queue
        .open(hello.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN hello.txt");
    let content = queue
        .read(hello.nodeid, opened.fh, 0, 4096)
        .expect("READ hello.txt");
    assert_eq!(content, HELLO_CONTENT);
    let tail = queue
        .read(hello.nodeid, opened.fh, 6, 4)
        .expect("READ hello.txt at offset");
    assert_eq!(tail, &HELLO_CONTENT[6..10]);
    queue
        .release(hello.nodeid, opened.fh, libc::O_RDONLY as u32)
        .expect("RELEASE hello.txt");

    // Mode bits come through unchanged.
    let restricted = queue.lookup(ROOT_ID, b"mode640.txt").expect("LOOKUP");
    assert_eq!(restricted.attr.mode & 0o7777, 0o640);

    // A multi-chunk read of a file larger than one request.
    let big = queue.lookup(ROOT_ID, b"big.bin").expect("LOOKUP big.bin");
    assert_eq!(big.attr.size, BIG_SIZE as u64);
    let big_fh = queue
        .open(big.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN big.bin")
        .fh;
    assert!(read_all(&mut queue, big.nodeid, big_fh, 128 * 1024) == big_content());
    queue
        .release(big.nodeid, big_fh, libc::O_RDONLY as u32)
        .expect("RELEASE big.bin");

    // Nested lookup.
    let sub = queue.lookup(ROOT_ID, b"sub").expect("LOOKUP sub");
    assert_eq!(sub.attr.mode & S_IFMT, libc::S_IFDIR);
    let inner = queue
        .lookup(sub.nodeid, b"inner.txt")
        .expect("LOOKUP inner");
    assert_attr_matches(&inner.attr, &shared.join("sub/inner.txt"));

    // Missing names fail with ENOENT.
    let missing = queue.lookup(ROOT_ID, b"no-such-file").unwrap_err();
    assert_eq!(missing.errno(), Some(libc::ENOENT), "{missing}");

    // WRITE to an existing file lands on the host.
    let rw = queue
        .open(hello.nodeid, libc::O_RDWR as u32)
        .expect("OPEN hello.txt rw");
    let written = queue
        .write(hello.nodeid, rw.fh, 0, b"HELLO")
        .expect("WRITE hello.txt");
    assert_eq!(written, 5);
    queue
        .release(hello.nodeid, rw.fh, libc::O_RDWR as u32)
        .expect("RELEASE");
    let mut expected = HELLO_CONTENT.to_vec();
    expected[..5].copy_from_slice(b"HELLO");
    assert_eq!(fs::read(shared.join("hello.txt")).unwrap(), expected);

    // CREATE + WRITE + READ back a new file.
    let (created, created_open) = queue
        .create(ROOT_ID, b"created.txt", 0o100600, libc::O_RDWR as u32)
        .expect("CREATE created.txt");
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let written = queue
        .write(created.nodeid, created_open.fh, 0, &payload)
        .expect("WRITE created.txt");
    assert_eq!(written as usize, payload.len());
    let back = read_all(&mut queue, created.nodeid, created_open.fh, 32 * 1024);
    assert!(back == payload, "read-back differs from what was written");
    queue
        .release(created.nodeid, created_open.fh, libc::O_RDWR as u32)
        .expect("RELEASE created.txt");
    let host = shared.join("created.txt");
    assert!(fs::read(&host).unwrap() == payload);
    assert_eq!(
        fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // MKDIR appears on the host.
    let made = queue.mkdir(ROOT_ID, b"made", 0o755).expect("MKDIR");
    assert_eq!(made.attr.mode & S_IFMT, libc::S_IFDIR);
    assert!(shared.join("made").is_dir());

    // READDIRPLUS lists exactly the host entries, with matching attributes.
    let entries = queue.list_dir_plus(ROOT_ID).expect("READDIRPLUS root");
    let listed: BTreeSet<String> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    let on_host: BTreeSet<String> = fs::read_dir(shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, on_host);
    for entry in &entries {
        let name = String::from_utf8_lossy(&entry.name).into_owned();
        if name == "." || name == ".." || entry.entry.nodeid == 0 {
            continue;
        }
        assert_attr_matches(&entry.entry.attr, &shared.join(&name));
        // READDIRPLUS counts as a lookup; give it back.
        queue.forget(entry.entry.nodeid, 1).expect("FORGET");
    }

    // UNLINK removes the host file; a later LOOKUP fails.
    queue.unlink(ROOT_ID, b"created.txt").expect("UNLINK");
    assert!(!host.exists());
    let gone = queue.lookup(ROOT_ID, b"created.txt").unwrap_err();
    assert_eq!(gone.errno(), Some(libc::ENOENT));

    // Like a Linux guest, send FORGET on the high-priority queue.
    let mut hiprio = device
        .take_queue(berth_frontend::HIPRIO_QUEUE)
        .expect("hiprio queue");
    hiprio.forget(hello.nodeid, 2).expect("FORGET on hiprio");
    let again = queue
        .lookup(ROOT_ID, b"hello.txt")
        .expect("LOOKUP after FORGET");
    assert_eq!(again.attr.size, HELLO_CONTENT.len() as u64);
    daemon.assert_alive("after the file operations");
}

#[test]
fn pipelined_reads_on_one_queue() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    // The load generator's deepest setting: 64 requests in flight on a 256-entry ring.
    let mut config = test_config(1);
    config.queue.size = 256;
    config.queue.depth = 64;
    let mut device = connect_with(&mut daemon, &fixture.socket, config);
    let mut queue = init_first_queue(&mut device);
    let big = queue.lookup(ROOT_ID, b"big.bin").expect("LOOKUP big.bin");
    let fh = queue
        .open(big.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN")
        .fh;
    let expected = big_content();
    let chunk = 4096u32;
    let reads = 400u64;
    let depth = queue.config().depth as usize;
    let mut offsets = std::collections::HashMap::new();
    let mut next = 0u64;
    let mut completed = 0u64;
    let mut max_outstanding = 0;
    while completed < reads {
        while next < reads && queue.has_room() {
            // A stride keeps offsets distinct and spread over the file.
            let offset = (next * 7 * u64::from(chunk)) % (expected.len() as u64 - 1);
            let read = FsQueue::read_in(fh, offset, chunk);
            let ticket = queue
                .submit(&Request {
                    opcode: opcode::READ,
                    nodeid: big.nodeid,
                    args: &[vm_memory::ByteValued::as_slice(&read)],
                    payload: &[],
                    reply_capacity: Some(chunk),
                })
                .expect("submit READ");
            offsets.insert(ticket.unique, offset as usize);
            next += 1;
        }
        max_outstanding = max_outstanding.max(queue.outstanding());
        queue.notify().expect("kick");
        let done = queue
            .next_completion()
            .expect("completion")
            .check()
            .expect("READ");
        let offset = offsets.remove(&done.unique).expect("known unique");
        let end = (offset + chunk as usize).min(expected.len());
        assert!(done.body == expected[offset..end], "READ at {offset}");
        completed += 1;
    }
    assert_eq!(max_outstanding, depth, "the queue should have been filled");
    assert!(offsets.is_empty());
    daemon.assert_alive("after pipelined reads");
}

/// Distinct content for each queue's file.
fn queue_pattern(queue: u16, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(u32::from(queue) * 7) as u8
        })
        .collect()
}

#[test]
fn four_request_queues_all_answer() {
    let fixture = Fixture::new();
    // A directory every queue lists at the same time.
    let listing = fixture.shared.join("listing");
    fs::create_dir(&listing).unwrap();
    for i in 0..300 {
        fs::write(
            listing.join(format!("entry-{i:03}-{}", "x".repeat(i % 40))),
            b"e",
        )
        .unwrap();
    }
    let listed_on_host: BTreeSet<String> = fs::read_dir(&listing)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut daemon = fixture.start_daemon();
    let mut device = match berth_frontend::VhostUserFs::connect(
        &fixture.socket,
        test_config(4),
        STARTUP_TIMEOUT,
    ) {
        Ok(device) => device,
        Err(berth_frontend::Error::NotEnoughQueues { offered, .. }) if !testing_berth() => {
            skip_by_design(&format!(
                "the daemon under test offers {offered} queues, 5 are needed"
            ));
            return;
        }
        Err(err) => panic!("4-queue setup failed: {err}\n{}", daemon.stderr()),
    };
    assert!(device.negotiated().backend_queues >= 5);
    let mut first = init_first_queue(&mut device);
    let hello = first.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
    let listing_node = first.lookup(ROOT_ID, b"listing").expect("LOOKUP listing");
    let fh = first
        .open(hello.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN")
        .fh;
    let mut queues = vec![first];
    queues.extend(device.take_request_queues());
    assert_eq!(queues.len(), 4);
    const CHUNK: usize = 16 * 1024;
    const CHUNKS: usize = 8;

    // One thread per queue, each with several requests in flight: READs of a shared file,
    // pipelined WRITEs of its own file, READDIRPLUS of a shared directory, all at once.
    let workers: Vec<_> = queues
        .into_iter()
        .map(|mut queue| {
            let expected_listing = listed_on_host.clone();
            std::thread::spawn(move || {
                let index = queue.index();
                let mut tickets = Vec::new();
                for i in 0..8u64 {
                    let read = FsQueue::read_in(fh, i, 8);
                    let ticket = queue
                        .submit(&Request {
                            opcode: opcode::READ,
                            nodeid: hello.nodeid,
                            args: &[vm_memory::ByteValued::as_slice(&read)],
                            payload: &[],
                            reply_capacity: Some(8),
                        })
                        .expect("submit READ");
                    tickets.push((ticket, i as usize));
                }
                queue.notify().expect("kick");
                for (ticket, offset) in tickets {
                    let done = queue
                        .wait_for(ticket)
                        .expect("reply")
                        .check()
                        .expect("READ");
                    let end = (offset + 8).min(HELLO_CONTENT.len());
                    assert_eq!(done.body, &HELLO_CONTENT[offset..end], "queue {index}");
                }
                let attr = queue.getattr(hello.nodeid).expect("GETATTR");
                assert_eq!(attr.attr.size, HELLO_CONTENT.len() as u64);

                let name = format!("written-by-queue-{index}");
                let (file, open) = queue
                    .create(ROOT_ID, name.as_bytes(), 0o100644, libc::O_RDWR as u32)
                    .expect("CREATE");
                let content = queue_pattern(index, CHUNK * CHUNKS);
                let mut writes = Vec::new();
                for (n, chunk) in content.chunks(CHUNK).enumerate() {
                    let write = berth_frontend::fuse::WriteIn {
                        fh: open.fh,
                        offset: (n * CHUNK) as u64,
                        size: chunk.len() as u32,
                        fuse_flags: 0,
                        lock_owner: 0,
                        flags: 0,
                        padding: 0,
                    };
                    let ticket = queue
                        .submit(&Request {
                            opcode: opcode::WRITE,
                            nodeid: file.nodeid,
                            args: &[vm_memory::ByteValued::as_slice(&write)],
                            payload: chunk,
                            reply_capacity: Some(
                                std::mem::size_of::<berth_frontend::fuse::WriteOut>() as u32,
                            ),
                        })
                        .expect("submit WRITE");
                    writes.push(ticket);
                }
                queue.notify().expect("kick");
                for ticket in writes {
                    let done = queue
                        .wait_for(ticket)
                        .expect("reply")
                        .check()
                        .expect("WRITE");
                    let out: berth_frontend::fuse::WriteOut =
                        berth_frontend::fuse::parse_struct(&done.body, false, "WRITE").unwrap();
                    assert_eq!(out.size as usize, CHUNK, "queue {index}: bytes written");
                }
                queue
                    .release(file.nodeid, open.fh, libc::O_RDWR as u32)
                    .expect("RELEASE");

                let entries = queue
                    .list_dir_plus(listing_node.nodeid)
                    .expect("READDIRPLUS");
                let listed: BTreeSet<String> = entries
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                    .filter(|n| n != "." && n != "..")
                    .collect();
                assert_eq!(
                    listed, expected_listing,
                    "queue {index}: READDIRPLUS listing"
                );
                let forgets: Vec<(u64, u64)> = entries
                    .iter()
                    .filter(|e| e.entry.nodeid != 0)
                    .map(|e| (e.entry.nodeid, 1))
                    .collect();
                for batch in forgets.chunks(FsQueue::MAX_BATCH_FORGET) {
                    queue.batch_forget(batch).expect("BATCH_FORGET");
                }
                index
            })
        })
        .collect();
    let mut answered: Vec<u16> = workers
        .into_iter()
        .map(|w| w.join().expect("worker panicked"))
        .collect();
    answered.sort();
    assert_eq!(answered, vec![1, 2, 3, 4]);
    for index in 1..=4u16 {
        let on_host = fs::read(fixture.shared.join(format!("written-by-queue-{index}"))).unwrap();
        assert!(
            on_host == queue_pattern(index, CHUNK * CHUNKS),
            "the file queue {index} wrote has the content it sent"
        );
    }
    daemon.assert_alive("after using four queues");
}

/// Sends a hand-crafted chain, then checks the daemon either returned it with an error reply
/// or dropped it, stayed alive, and still answers a valid request on the same queue.
fn malformed_chain_is_survived(
    name: &str,
    build: impl FnOnce(&mut FsQueue, &Fixture) -> (Vec<RawDescriptor>, Option<GuestAddress>),
) {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let (chain, reply_header) = build(&mut queue, &fixture);
    let head = queue.submit_raw(&chain).expect("publish raw chain");
    let returned = queue
        .wait_raw(head, Duration::from_millis(500))
        .expect("used ring");
    if let (Some(used), Some(reply_addr)) = (returned, reply_header) {
        if used.len > 0 {
            assert!(
                used.len as usize >= std::mem::size_of::<OutHeader>(),
                "{name}: daemon wrote a {}-byte partial reply",
                used.len
            );
            let header: OutHeader = queue.ram().memory().read_obj(reply_addr).unwrap();
            assert!(
                header.error < 0,
                "{name}: daemon answered success: {header:?}"
            );
        }
    }
    eprintln!(
        "{name}: daemon {}",
        match returned {
            Some(used) => format!("returned the chain with {} bytes written", used.len),
            None => "dropped the chain".into(),
        }
    );
    std::thread::sleep(Duration::from_millis(50));
    daemon.assert_alive(&format!("after {name}"));
    let root = queue
        .getattr(ROOT_ID)
        .unwrap_or_else(|e| panic!("{name}: valid GETATTR afterwards failed: {e}"));
    assert_eq!(root.attr.mode & S_IFMT, libc::S_IFDIR);
    daemon.assert_alive(&format!("after a valid request following {name}"));
}

/// A GETATTR request in a fresh buffer; returns (address, length).
fn getattr_request(queue: &mut FsQueue) -> (GuestAddress, u32) {
    let addr = queue.allocate_raw_buffer(4096).unwrap();
    let getattr = berth_frontend::fuse::GetattrIn::default();
    let (_, len) = queue
        .write_request_bytes(
            addr,
            opcode::GETATTR,
            ROOT_ID,
            &[vm_memory::ByteValued::as_slice(&getattr)],
        )
        .unwrap();
    (addr, len)
}

fn readable(addr: GuestAddress, len: u32, next: bool) -> RawDescriptor {
    RawDescriptor {
        addr: addr.0,
        len,
        flags: if next { VIRTQ_DESC_F_NEXT } else { 0 },
        next: RawNext::Following,
    }
}

fn writable(addr: GuestAddress, len: u32) -> RawDescriptor {
    RawDescriptor {
        addr: addr.0,
        len,
        flags: VIRTQ_DESC_F_WRITE,
        next: RawNext::Following,
    }
}

#[test]
fn malformed_request_shorter_than_header() {
    malformed_chain_is_survived("header too short", |queue, _| {
        let (request, _) = getattr_request(queue);
        let reply = queue.allocate_raw_buffer(4096).unwrap();
        (
            vec![readable(request, 10, true), writable(reply, 4096)],
            Some(reply),
        )
    });
}

#[test]
fn malformed_reply_buffer_device_readable() {
    malformed_chain_is_survived("reply buffer in the wrong direction", |queue, _| {
        let (request, len) = getattr_request(queue);
        let reply = queue.allocate_raw_buffer(4096).unwrap();
        (
            vec![readable(request, len, true), readable(reply, 4096, false)],
            None,
        )
    });
}

#[test]
fn malformed_descriptor_outside_guest_memory() {
    malformed_chain_is_survived("descriptor outside guest memory", |queue, _| {
        let (request, len) = getattr_request(queue);
        let beyond = queue.ram().end().0 + 0x10_0000;
        (
            vec![
                readable(request, len, true),
                RawDescriptor {
                    addr: beyond,
                    len: 4096,
                    flags: VIRTQ_DESC_F_WRITE,
                    next: RawNext::Following,
                },
            ],
            None,
        )
    });
}

#[test]
fn malformed_request_header_outside_guest_memory() {
    malformed_chain_is_survived("request header outside guest memory", |queue, _| {
        let beyond = queue.ram().end().0 - 8;
        let reply = queue.allocate_raw_buffer(4096).unwrap();
        (
            vec![
                RawDescriptor {
                    addr: beyond,
                    len: 4096,
                    flags: VIRTQ_DESC_F_NEXT,
                    next: RawNext::Following,
                },
                writable(reply, 4096),
            ],
            Some(reply),
        )
    });
}

#[test]
fn malformed_next_index_out_of_range() {
    malformed_chain_is_survived("next index out of range", |queue, _| {
        let (request, len) = getattr_request(queue);
        let size = queue.virtqueue().size();
        (
            vec![RawDescriptor {
                addr: request.0,
                len,
                flags: VIRTQ_DESC_F_NEXT,
                next: RawNext::Index(size + 5),
            }],
            None,
        )
    });
}

#[test]
fn malformed_looping_chain() {
    malformed_chain_is_survived("looping chain", |queue, _| {
        let (request, len) = getattr_request(queue);
        let reply = queue.allocate_raw_buffer(4096).unwrap();
        (
            vec![
                readable(request, len, true),
                RawDescriptor {
                    addr: reply.0,
                    len: 4096,
                    flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                    next: RawNext::ChainPosition(0),
                },
            ],
            Some(reply),
        )
    });
}

/// Publishes a GETATTR whose device-readable part is cut to `readable_len` bytes (the whole
/// request when `None`), with `reply_len` bytes of reply room; returns what came back on the
/// used ring, the reply header if the daemon wrote one, and the request's unique id.
fn bent_getattr(
    queue: &mut FsQueue,
    readable_len: Option<u32>,
    reply_len: u32,
) -> (Option<berth_frontend::UsedElement>, Option<OutHeader>, u64) {
    let addr = queue.allocate_raw_buffer(4096).unwrap();
    let getattr = berth_frontend::fuse::GetattrIn::default();
    let (unique, len) = queue
        .write_request_bytes(
            addr,
            opcode::GETATTR,
            ROOT_ID,
            &[vm_memory::ByteValued::as_slice(&getattr)],
        )
        .unwrap();
    let reply = queue.allocate_raw_buffer(4096).unwrap();
    // A recognisable pattern, to tell a reply from untouched memory.
    queue
        .ram()
        .memory()
        .write_slice(&[0xa5u8; 64], reply)
        .unwrap();
    let head = queue
        .submit_raw(&[
            readable(addr, readable_len.unwrap_or(len), true),
            writable(reply, reply_len),
        ])
        .expect("publish raw chain");
    let used = queue
        .wait_raw(head, Duration::from_secs(2))
        .expect("used ring");
    let header = used
        .filter(|u| u.len >= 16)
        .map(|_| queue.ram().memory().read_obj::<OutHeader>(reply).unwrap());
    (used, header, unique)
}

#[test]
fn a_request_cut_short_is_answered_einval_when_its_unique_id_is_there() {
    if !testing_berth() {
        eprintln!("skipping: berth's answer to malformed chains is berth's own");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    // 20 bytes: the header's len, opcode and unique are there, the rest is not.
    let (used, header, unique) = bent_getattr(&mut queue, Some(20), 4096);
    let used = used.expect("the chain is returned");
    assert_eq!(used.len, 16, "a bare error header");
    let header = header.unwrap();
    assert_eq!(
        (header.len, header.error, header.unique),
        (16, -libc::EINVAL, unique)
    );
    // 10 bytes: not even the unique id; nothing can be answered, the chain comes back empty.
    let (used, _, _) = bent_getattr(&mut queue, Some(10), 4096);
    assert_eq!(used.expect("the chain is returned").len, 0);
    daemon.assert_alive("after requests cut short");
    assert_eq!(
        queue.getattr(ROOT_ID).unwrap().attr.mode & S_IFMT,
        libc::S_IFDIR
    );
}

#[test]
fn a_reply_buffer_too_small_for_the_reply_is_answered_eio() {
    if !testing_berth() {
        eprintln!("skipping: berth's answer to malformed chains is berth's own");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    // Room for a header but not for fuse_attr_out.
    let (used, header, unique) = bent_getattr(&mut queue, None, 32);
    assert_eq!(used.expect("the chain is returned").len, 16);
    let header = header.unwrap();
    assert_eq!((header.error, header.unique), (-libc::EIO, unique));
    // Room for less than a header: returned with nothing written.
    let (used, _, _) = bent_getattr(&mut queue, None, 8);
    assert_eq!(used.expect("the chain is returned").len, 0);
    daemon.assert_alive("after short reply buffers");
}

#[test]
fn a_chain_that_does_not_end_is_answered_eio() {
    if !testing_berth() {
        eprintln!("skipping: berth's answer to malformed chains is berth's own");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let (request, len) = getattr_request(&mut queue);
    let reply = queue.allocate_raw_buffer(4096).unwrap();
    let size = queue.virtqueue().size();
    let head = queue
        .submit_raw(&[
            readable(request, len, true),
            RawDescriptor {
                addr: reply.0,
                len: 4096,
                flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                next: RawNext::Index(size + 7),
            },
        ])
        .unwrap();
    let used = queue
        .wait_raw(head, Duration::from_secs(2))
        .unwrap()
        .expect("the chain is returned");
    assert_eq!(used.len, 16);
    let header: OutHeader = queue.ram().memory().read_obj(reply).unwrap();
    assert_eq!(header.error, -libc::EIO);
    let log = daemon.stderr();
    assert!(
        log.contains("Answering a malformed descriptor chain with EIO"),
        "the daemon says why: {log}"
    );
}

#[test]
fn destroy_is_answered() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    // A Linux guest logs "virtio-fs: response too short (0)" at every unmount otherwise.
    let done = queue
        .call(&Request {
            opcode: opcode::DESTROY,
            nodeid: 0,
            args: &[],
            payload: &[],
            reply_capacity: Some(0),
        })
        .expect("DESTROY gets a reply header");
    assert_eq!(done.used_len, 16);
    assert_eq!(done.header.map(|h| h.error), Some(0));
    // The guest may mount again on the same connection.
    queue.init_default().expect("FUSE_INIT after DESTROY");
    assert_eq!(
        queue.getattr(ROOT_ID).unwrap().attr.mode & S_IFMT,
        libc::S_IFDIR
    );
}

/// The daemon with its default log level (info), for tests that read what it says.
fn start_daemon_logging_info(fixture: &Fixture) -> Daemon {
    let mut daemon = Daemon::spawn_with(fixture.basic_args(), |command| {
        command.env("RUST_LOG", "info");
    });
    daemon.wait_for_socket(&fixture.socket);
    daemon
}

/// A session with a file looked up and opened: (queue, node id, handle).
fn open_data_file(fixture: &Fixture, queue: &mut FsQueue) -> (u64, u64) {
    fs::write(fixture.shared.join("held"), b"kept open across the reset").unwrap();
    let node = queue.lookup(ROOT_ID, b"held").expect("LOOKUP").nodeid;
    let fh = queue.open(node, libc::O_RDONLY as u32).expect("OPEN").fh;
    (node, fh)
}

#[test]
fn a_guest_that_restarts_the_device_mounts_afresh() {
    if !testing_berth() {
        eprintln!("skipping: session reset on a new FUSE_INIT is berth's");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = start_daemon_logging_info(&fixture);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let (node, fh) = open_data_file(&fixture, &mut queue);
    // The guest reboots: QEMU stops every queue (GET_VRING_BASE), the new kernel's driver
    // sets up new rings and mounts again, without an unmount in between.
    drop(queue);
    device.stop_queues().expect("GET_VRING_BASE on every queue");
    device.start_fresh_queues().expect("queues set up again");
    let mut queue = init_first_queue(&mut device);
    let err = queue
        .read(node, fh, 0, 100)
        .expect_err("the old handle is gone");
    assert_eq!(err.errno(), Some(libc::EBADF), "{err}");
    let err = queue.getattr(node).expect_err("the old inode is gone");
    assert_eq!(err.errno(), Some(libc::EBADF), "{err}");
    // The new session works on the same daemon.
    let (node, fh) = open_data_file(&fixture, &mut queue);
    assert_eq!(
        queue.read(node, fh, 0, 100).unwrap(),
        b"kept open across the reset"
    );
    let log = daemon.stderr();
    assert!(log.contains("The frontend stopped every queue"), "{log}");
    assert!(log.contains("started a new FUSE session"), "{log}");
    assert!(
        !log.contains("ERROR"),
        "stopping and restarting is no error: {log}"
    );
    daemon.assert_alive("after the restart");
}

#[test]
fn a_paused_guest_keeps_its_files() {
    if !testing_berth() {
        eprintln!("skipping: berth-specific lifecycle");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let (node, fh) = open_data_file(&fixture, &mut queue);
    // `stop` and `cont` in QEMU (or a migration that failed): the queues stop and start again
    // where they were, and no FUSE_INIT follows.
    let bases = device.stop_queues().expect("GET_VRING_BASE on every queue");
    let hiprio = device.take_queue(0).expect("hiprio queue");
    device.restart_queue(&hiprio, bases[0]).unwrap();
    device.restart_queue(&queue, bases[1]).unwrap();
    assert_eq!(
        queue.read(node, fh, 0, 100).unwrap(),
        b"kept open across the reset"
    );
    let log = daemon.stderr();
    assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
    daemon.assert_alive("after the pause");
}

#[test]
fn reset_device_drops_the_guest_session() {
    if !testing_berth() {
        eprintln!("skipping: berth-specific lifecycle");
        return;
    }
    let fixture = Fixture::new();
    let mut daemon = start_daemon_logging_info(&fixture);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    assert!(device
        .negotiated()
        .acked_protocol_features
        .contains(VhostUserProtocolFeatures::RESET_DEVICE));
    let mut queue = init_first_queue(&mut device);
    let (node, fh) = open_data_file(&fixture, &mut queue);
    drop(queue);
    device.reset_device().expect("RESET_DEVICE");
    let mut queue = device.take_request_queue(1).unwrap();
    let err = queue
        .read(node, fh, 0, 100)
        .expect_err("the old handle is gone");
    assert_eq!(err.errno(), Some(libc::EBADF), "{err}");
    queue.init_default().expect("FUSE_INIT after the reset");
    let (node, fh) = open_data_file(&fixture, &mut queue);
    assert_eq!(
        queue.read(node, fh, 0, 100).unwrap(),
        b"kept open across the reset"
    );
    let log = daemon.stderr();
    assert!(log.contains("The frontend reset the device"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// Writes `descriptors` as an indirect table at a fresh guest address; returns it.
fn indirect_table(queue: &mut FsQueue, descriptors: &[Descriptor]) -> GuestAddress {
    let table = queue.allocate_raw_buffer(4096).unwrap();
    for (i, descriptor) in descriptors.iter().enumerate() {
        queue
            .ram()
            .memory()
            .write_obj(*descriptor, table.unchecked_add(16 * i as u64))
            .unwrap();
    }
    table
}

/// A GETATTR request plus a reply buffer, as the two descriptors of an indirect table.
fn getattr_table_entries(queue: &mut FsQueue) -> ([Descriptor; 2], GuestAddress) {
    let (request, len) = getattr_request(queue);
    let reply = queue.allocate_raw_buffer(4096).unwrap();
    (
        [
            Descriptor {
                addr: request.0,
                len,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            },
            Descriptor {
                addr: reply.0,
                len: 4096,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ],
        reply,
    )
}

fn indirect(table: GuestAddress, len: u32, extra_flags: u16) -> RawDescriptor {
    RawDescriptor {
        addr: table.0,
        len,
        flags: VIRTQ_DESC_F_INDIRECT | extra_flags,
        next: RawNext::Following,
    }
}

#[test]
fn indirect_descriptor_table_is_served() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let negotiated = device.negotiated().acked_features;
    assert_ne!(
        negotiated & berth_frontend::device::VIRTIO_RING_F_INDIRECT_DESC,
        0,
        "the daemon offers indirect descriptors"
    );
    let mut queue = init_first_queue(&mut device);
    let (entries, reply) = getattr_table_entries(&mut queue);
    let table = indirect_table(&mut queue, &entries);
    let head = queue
        .submit_raw(&[indirect(table, 32, 0)])
        .expect("publish an indirect chain");
    let used = queue
        .wait_raw(head, Duration::from_secs(5))
        .expect("used ring")
        .expect("the indirect request is answered");
    let header: OutHeader = queue.ram().memory().read_obj(reply).unwrap();
    assert_eq!(
        header.error, 0,
        "GETATTR through an indirect table: {header:?}"
    );
    assert_eq!(used.len, header.len);
    let attr: berth_frontend::fuse::AttrOut = queue
        .ram()
        .memory()
        .read_obj(reply.unchecked_add(std::mem::size_of::<OutHeader>() as u64))
        .unwrap();
    assert_eq!(attr.attr.mode & S_IFMT, libc::S_IFDIR);
    assert_eq!(
        u64::from(attr.attr.mode),
        u64::from(fs::metadata(&fixture.shared).unwrap().mode())
    );
    daemon.assert_alive("after an indirect request");
}

#[test]
fn malformed_indirect_table_outside_guest_memory() {
    malformed_chain_is_survived("indirect table outside guest memory", |queue, _| {
        let beyond = GuestAddress(queue.ram().end().0 + 0x10_0000);
        (vec![indirect(beyond, 32, 0)], None)
    });
}

#[test]
fn malformed_indirect_table_straddling_the_end_of_memory() {
    malformed_chain_is_survived("indirect table past the end of memory", |queue, _| {
        let near_end = GuestAddress(queue.ram().end().0 - 16);
        (vec![indirect(near_end, 64, 0)], None)
    });
}

#[test]
fn malformed_nested_indirect_table() {
    malformed_chain_is_survived("nested indirect table", |queue, _| {
        let (entries, reply) = getattr_table_entries(queue);
        let inner = indirect_table(queue, &entries);
        let outer = indirect_table(
            queue,
            &[Descriptor {
                addr: inner.0,
                len: 32,
                flags: VIRTQ_DESC_F_INDIRECT,
                next: 0,
            }],
        );
        (vec![indirect(outer, 16, 0)], Some(reply))
    });
}

#[test]
fn malformed_zero_length_indirect_table() {
    malformed_chain_is_survived("zero-length indirect table", |queue, _| {
        let (entries, reply) = getattr_table_entries(queue);
        let table = indirect_table(queue, &entries);
        (vec![indirect(table, 0, 0)], Some(reply))
    });
}

#[test]
fn malformed_indirect_table_of_odd_length() {
    malformed_chain_is_survived("indirect table not a multiple of 16 bytes", |queue, _| {
        let (entries, reply) = getattr_table_entries(queue);
        let table = indirect_table(queue, &entries);
        (vec![indirect(table, 20, 0)], Some(reply))
    });
}

#[test]
fn malformed_indirect_with_next() {
    malformed_chain_is_survived("indirect descriptor with NEXT", |queue, _| {
        let (entries, reply) = getattr_table_entries(queue);
        let table = indirect_table(queue, &entries);
        let extra = queue.allocate_raw_buffer(4096).unwrap();
        (
            vec![
                indirect(table, 32, VIRTQ_DESC_F_NEXT),
                writable(extra, 4096),
            ],
            Some(reply),
        )
    });
}

#[test]
fn malformed_indirect_next_index_out_of_the_table() {
    malformed_chain_is_survived("indirect next index beyond the table", |queue, _| {
        let (mut entries, reply) = getattr_table_entries(queue);
        entries[0].next = 9;
        let table = indirect_table(queue, &entries);
        (vec![indirect(table, 32, 0)], Some(reply))
    });
}

#[test]
fn malformed_indirect_table_looping() {
    malformed_chain_is_survived("indirect table looping on itself", |queue, _| {
        let (mut entries, reply) = getattr_table_entries(queue);
        entries[1].flags |= VIRTQ_DESC_F_NEXT;
        entries[1].next = 0;
        let table = indirect_table(queue, &entries);
        (vec![indirect(table, 32, 0)], Some(reply))
    });
}

#[test]
fn malformed_avail_head_out_of_range() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let size = queue.virtqueue().size();
    queue
        .virtqueue()
        .add_raw_avail_entry(size + 3)
        .expect("publish bogus head");
    queue.notify().expect("kick");
    std::thread::sleep(Duration::from_millis(200));
    daemon.assert_alive("after an out-of-range avail head");
    // The device must not return the bogus head; a valid request still gets its answer.
    let root = queue
        .getattr(ROOT_ID)
        .unwrap_or_else(|e| panic!("valid GETATTR after a bogus head failed: {e}"));
    assert_eq!(root.attr.mode & S_IFMT, libc::S_IFDIR);
    daemon.assert_alive("after a valid request following an out-of-range head");
}

#[test]
fn disconnect_makes_daemon_exit_zero() {
    let fixture = Fixture::new();
    let mut daemon = fixture.start_daemon();
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    queue.getattr(ROOT_ID).expect("GETATTR");
    drop(queue);
    device.disconnect();
    let status = daemon.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "daemon still running 5 s after disconnect\n{}",
            daemon.stderr()
        )
    });
    assert!(
        status.success(),
        "daemon exited with {} after disconnect\n--- daemon stderr ---\n{}",
        describe_status(status),
        daemon.stderr()
    );
}

fn submount_flag(extra_args: &[&str]) -> Option<(u32, u32)> {
    let fixture = Fixture::new();
    let mountpoint = fixture.shared.join("mnt");
    fs::create_dir(&mountpoint).expect("create mnt");
    let _tmpfs = TmpfsMount::new(&mountpoint, None)?;
    let mut args = fixture.basic_args();
    args.extend(extra_args.iter().map(Into::into));
    let mut daemon = Daemon::spawn(args);
    daemon.wait_for_socket(&fixture.socket);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = device.take_request_queue(1).expect("queue 1");
    queue.init_default().expect("FUSE_INIT");
    let mounted = queue.lookup(ROOT_ID, b"mnt").expect("LOOKUP mnt");
    let plain = queue.lookup(ROOT_ID, b"sub").expect("LOOKUP sub");
    daemon.assert_alive("after the lookups");
    Some((mounted.attr.flags, plain.attr.flags))
}

const FUSE_ATTR_SUBMOUNT: u32 = 1;

#[test]
fn submounts_are_announced() {
    if !testing_berth() {
        skip_by_design("berth-specific default");
        return;
    }
    let Some((mounted, plain)) = submount_flag(&[]) else {
        skip("cannot mount a tmpfs here (needs root)");
        return;
    };
    assert_eq!(
        mounted & FUSE_ATTR_SUBMOUNT,
        FUSE_ATTR_SUBMOUNT,
        "a host mount point must carry FUSE_ATTR_SUBMOUNT"
    );
    assert_eq!(plain & FUSE_ATTR_SUBMOUNT, 0, "a plain directory must not");
}

#[test]
fn no_announce_submounts_hides_them() {
    let Some((mounted, _)) = submount_flag(&["--no-announce-submounts"]) else {
        skip("cannot mount a tmpfs here (needs root)");
        return;
    };
    assert_eq!(mounted & FUSE_ATTR_SUBMOUNT, 0);
}
