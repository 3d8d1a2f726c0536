//! A guest trying to take host memory or descriptors past the configured limits, over
//! vhost-user against the real daemon with its default confinement: lookups without FORGET,
//! opens without RELEASE, maximum-size writes on every queue at full depth (inline and through
//! the thread pool), oversized requests and xattr buffers, a frontend that never reads its
//! replies. Each time the guest gets errors, berth stays up and its memory and descriptors stay
//! under a stated bound.

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/security_util.rs"]
mod security_util;

use std::ffi::OsString;
use std::fs;
use std::time::{Duration, Instant};

use berth_frontend::fuse::GetxattrIn;
use berth_frontend::fuse::{opcode, WriteIn, ROOT_ID};
use berth_frontend::{DeviceConfig, FsQueue, Request};
use frontend_util::*;
use security_util::*;
use vm_memory::ByteValued;

/// The largest WRITE payload the daemon takes (FUSE max_write: 256 pages).
const MAX_WRITE: usize = 1 << 20;
/// Private (anonymous) memory the serving process may use at most in these tests.
const ANON_BOUND_KIB: u64 = 64 * 1024;

fn start(fixture: &Fixture, extra: &[&str]) -> (Daemon, u32) {
    let mut args = fixture.basic_args();
    args.extend(extra.iter().map(OsString::from));
    let mut daemon = Daemon::spawn(args);
    daemon.wait_for_socket(&fixture.socket);
    let server = serving_pid(daemon.pid(), true);
    (daemon, server)
}

fn berth_only(test: &str) -> bool {
    if !testing_berth() {
        skip_or_fail(test, "tests berth's own limits and flags");
        return false;
    }
    true
}

/// Samples the server's RssAnon while `work` runs; returns the peak in KiB.
fn peak_anon_during<T>(server: u32, work: impl FnOnce() -> T) -> (T, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(vm_kib(server, "RssAnon:"));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak.max(vm_kib(server, "RssAnon:"))
        })
    };
    let result = work();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (result, sampler.join().unwrap())
}

#[test]
fn lookups_past_max_inodes_get_enfile_and_memory_stays_flat() {
    let test = "lookups_past_max_inodes_get_enfile_and_memory_stays_flat";
    if !berth_only(test) {
        return;
    }
    let fixture = Fixture::new();
    let many = fixture.shared.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..300 {
        fs::write(many.join(format!("f{i}")), b"").unwrap();
    }
    let (mut daemon, server) = start(&fixture, &["--max-inodes=100"]);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let dir = queue.lookup(ROOT_ID, b"many").expect("LOOKUP many");
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..300 {
        match queue.lookup(dir.nodeid, format!("f{i}").as_bytes()) {
            Ok(entry) => held.push(entry.nodeid),
            Err(e) => {
                assert_eq!(e.errno(), Some(libc::ENFILE), "{e}");
                refused += 1;
            }
        }
    }
    // The root and "many" count too.
    assert_eq!(held.len(), 98, "inodes granted under --max-inodes=100");
    assert_eq!(refused, 202);
    // Keep hammering past the cap: every refusal costs nothing that stays.
    let before = vm_kib(server, "RssAnon:");
    for round in 0..20 {
        for i in 200..300 {
            let err = queue
                .lookup(dir.nodeid, format!("f{i}").as_bytes())
                .expect_err("still over the cap");
            assert_eq!(err.errno(), Some(libc::ENFILE), "round {round}");
        }
    }
    let after = vm_kib(server, "RssAnon:");
    assert!(
        after <= before + 2048,
        "RssAnon grew from {before} KiB to {after} KiB over 2000 refused lookups"
    );
    // What is held still works, and forgetting makes room again.
    queue.getattr(held[0]).expect("GETATTR of a held inode");
    queue.forget(held[0], 1).expect("FORGET");
    queue
        .lookup(dir.nodeid, b"f299")
        .expect("LOOKUP after a FORGET freed a slot");
    daemon.assert_alive("after the lookup flood");
}

#[test]
fn opens_past_max_handles_get_emfile_and_descriptors_stay_bounded() {
    let test = "opens_past_max_handles_get_emfile_and_descriptors_stay_bounded";
    if !berth_only(test) {
        return;
    }
    let fixture = Fixture::new();
    let (mut daemon, server) = start(&fixture, &["--max-handles=50"]);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
    let sub = queue.lookup(ROOT_ID, b"sub").expect("LOOKUP sub");
    let baseline = open_fds(server);
    let mut handles = Vec::new();
    for _ in 0..50 {
        handles.push(
            queue
                .open(hello.nodeid, libc::O_RDONLY as u32)
                .expect("OPEN under the cap")
                .fh,
        );
    }
    for _ in 0..500 {
        let err = queue
            .open(hello.nodeid, libc::O_RDONLY as u32)
            .expect_err("OPEN past the cap");
        assert_eq!(err.errno(), Some(libc::EMFILE), "{err}");
    }
    // Directories share the cap.
    let err = queue.opendir(sub.nodeid).expect_err("OPENDIR past the cap");
    assert_eq!(err.errno(), Some(libc::EMFILE), "{err}");
    let fds = open_fds(server);
    assert!(
        fds <= baseline + 50 + 4,
        "{fds} descriptors open for 50 handles (baseline {baseline})"
    );
    queue
        .release(hello.nodeid, handles[0], libc::O_RDONLY as u32)
        .expect("RELEASE");
    queue
        .open(hello.nodeid, libc::O_RDONLY as u32)
        .expect("OPEN after a RELEASE freed a slot");
    daemon.assert_alive("after the open flood");
}

#[test]
fn the_default_handle_cap_follows_rlimit_nofile() {
    let test = "the_default_handle_cap_follows_rlimit_nofile";
    if !berth_only(test) {
        return;
    }
    if !is_root() {
        // Setting a hard limit above the current one needs CAP_SYS_RESOURCE; lowering it
        // would do, but the caller's hard limit may already be below 2048.
        skip_or_fail(test, "needs root to set RLIMIT_NOFILE to exactly 2048");
        return;
    }
    let fixture = Fixture::new();
    let (mut daemon, server) = start(
        &fixture,
        &["--rlimit-nofile=2048", "--inode-file-handles=never"],
    );
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
    // 2048 minus a reserve of 512, halved.
    let expected = (2048 - 512) / 2;
    let mut opened = 0;
    loop {
        match queue.open(hello.nodeid, libc::O_RDONLY as u32) {
            Ok(_) => opened += 1,
            Err(e) => {
                assert_eq!(e.errno(), Some(libc::EMFILE), "{e}");
                break;
            }
        }
        assert!(opened <= expected, "no cap at {opened} handles");
    }
    assert_eq!(opened, expected);
    assert!(open_fds(server) < 2048);
    queue.getattr(ROOT_ID).expect("GETATTR still served");
    daemon.assert_alive("at the derived cap");
}

/// One queue's share of the write flood: `rounds` times, `depth` 1 MiB WRITEs in flight.
fn flood_queue(mut queue: FsQueue, node: u64, fh: u64, rounds: usize) -> usize {
    let payload = vec![0x5au8; MAX_WRITE];
    let depth = queue.config().depth as usize;
    let index = u64::from(queue.index());
    let mut written = 0;
    for round in 0..rounds {
        let mut tickets = Vec::new();
        for slot in 0..depth {
            let offset = (index * 64 + slot as u64) * MAX_WRITE as u64;
            let write = WriteIn {
                fh,
                offset,
                size: MAX_WRITE as u32,
                ..Default::default()
            };
            let ticket = queue
                .submit(&Request {
                    opcode: opcode::WRITE,
                    nodeid: node,
                    args: &[write.as_slice()],
                    payload: &payload,
                    reply_capacity: Some(16),
                })
                .expect("submit WRITE");
            tickets.push(ticket);
        }
        queue.notify().expect("kick");
        for ticket in tickets {
            let done = queue
                .wait_for(ticket)
                .unwrap_or_else(|e| panic!("queue {index} round {round}: {e}"))
                .check()
                .unwrap_or_else(|e| panic!("queue {index} round {round}: {e}"));
            assert_eq!(&done.body[..4], &(MAX_WRITE as u32).to_le_bytes());
            written += MAX_WRITE;
        }
    }
    written
}

fn write_flood(test: &str, extra: &[&str]) {
    if !berth_only(test) {
        return;
    }
    let queues = 4u16;
    let depth = 32u16;
    let fixture = Fixture::new();
    let mut args = vec!["--max-request-queues=4"];
    args.extend_from_slice(extra);
    let (mut daemon, server) = start(&fixture, &args);
    let guest_ram = (queues as usize + 1) * depth as usize * (MAX_WRITE + (16 << 10)) + (16 << 20);
    let mut config = DeviceConfig {
        memory_size: guest_ram,
        request_queues: queues,
        ..DeviceConfig::default()
    };
    config.queue.size = depth * 4;
    config.queue.depth = depth;
    config.queue.max_data = MAX_WRITE as u32 + (64 << 10);
    config.queue.timeout = Duration::from_secs(30);
    let mut device = connect_with(&mut daemon, &fixture.socket, config);
    let mut first = init_first_queue(&mut device);
    let (file, opened) = first
        .create(
            ROOT_ID,
            b"flood",
            libc::S_IFREG | 0o600,
            libc::O_RDWR as u32,
        )
        .expect("CREATE");
    // A WRITE larger than the daemon takes is refused, and nothing is written.
    let oversized = vec![1u8; MAX_WRITE + (8 << 10)];
    let err = first
        .write(file.nodeid, opened.fh, 0, &oversized)
        .expect_err("a WRITE above max_write");
    assert!(
        err.errno().is_some(),
        "an error reply, not a dropped chain: {err}"
    );
    assert_eq!(fs::metadata(fixture.shared.join("flood")).unwrap().len(), 0);

    let mut all = vec![first];
    all.extend(device.take_request_queues());
    assert_eq!(all.len(), queues as usize);
    let started = Instant::now();
    let (written, peak_anon) = peak_anon_during(server, || {
        let workers: Vec<_> = all
            .into_iter()
            .map(|queue| std::thread::spawn(move || flood_queue(queue, file.nodeid, opened.fh, 3)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("flood thread"))
            .sum::<usize>()
    });
    assert_eq!(written, 3 * queues as usize * depth as usize * MAX_WRITE);
    let hwm = vm_kib(server, "VmHWM:");
    eprintln!(
        "{extra:?}: {} MiB written in {:?}; server peak RssAnon {peak_anon} KiB, VmHWM {hwm} KiB \
         (guest RAM {} MiB)",
        written >> 20,
        started.elapsed(),
        guest_ram >> 20
    );
    // The payloads go from guest memory straight to the file: the daemon's private memory does
    // not grow with the data in flight, and its whole footprint stays within guest RAM (which
    // it maps) plus the bound.
    assert!(
        peak_anon < ANON_BOUND_KIB,
        "peak RssAnon {peak_anon} KiB over {ANON_BOUND_KIB} KiB"
    );
    assert!(
        hwm < (guest_ram as u64 >> 10) + ANON_BOUND_KIB,
        "VmHWM {hwm} KiB"
    );
    daemon.assert_alive("after the write flood");
}

#[test]
fn max_size_writes_on_every_queue_at_full_depth_stay_bounded() {
    write_flood(
        "max_size_writes_on_every_queue_at_full_depth_stay_bounded",
        &[],
    );
}

#[test]
fn max_size_writes_through_the_thread_pool_stay_bounded() {
    // 4 queues x 32 requests against a pool backlog of 2 x 16: the queue threads wait for
    // room instead of piling work up.
    write_flood(
        "max_size_writes_through_the_thread_pool_stay_bounded",
        &["--thread-pool-size=2"],
    );
}

#[test]
fn huge_xattr_buffers_cost_nothing() {
    let test = "huge_xattr_buffers_cost_nothing";
    if !berth_only(test) {
        return;
    }
    let fixture = Fixture::new();
    let (mut daemon, server) = start(&fixture, &["--xattr"]);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let hello = queue.lookup(ROOT_ID, b"hello.txt").expect("LOOKUP");
    let before = vm_kib(server, "VmPeak:");
    // A guest asks for 4 GiB of xattr value and name list, 64 times over.
    for _ in 0..64 {
        let name: &[u8] = b"user.none\0";
        for (op, args) in [(22u32, vec![name]), (23u32, Vec::new())] {
            let get = GetxattrIn {
                size: u32::MAX,
                padding: 0,
            };
            let mut all_args: Vec<&[u8]> = vec![get.as_slice()];
            all_args.extend(args);
            let done = queue
                .call(&Request {
                    opcode: op,
                    nodeid: hello.nodeid,
                    args: &all_args,
                    payload: &[],
                    reply_capacity: Some(4000),
                })
                .expect("a reply");
            let header = done.header.expect("a reply header");
            if op == 22 {
                assert_eq!(-header.error, libc::ENODATA);
            }
        }
    }
    let after = vm_kib(server, "VmPeak:");
    assert!(
        after < before + (256 << 10),
        "virtual memory peaked at {after} KiB (from {before} KiB)"
    );
    daemon.assert_alive("after the xattr requests");
}

#[test]
fn a_frontend_that_never_reads_replies_does_not_stall_other_queues() {
    let test = "a_frontend_that_never_reads_replies_does_not_stall_other_queues";
    if !berth_only(test) {
        return;
    }
    for extra in [&[][..], &["--thread-pool-size=2"]] {
        let fixture = Fixture::new();
        let (mut daemon, server) = start(&fixture, extra);
        let mut config = test_config(2);
        config.queue.size = 256;
        config.queue.depth = 64;
        let mut device = connect_with(&mut daemon, &fixture.socket, config);
        let mut stuck = init_first_queue(&mut device);
        let mut other = device.take_request_queue(2).expect("queue 2");
        let big = stuck.lookup(ROOT_ID, b"big.bin").expect("LOOKUP");
        let fh = stuck
            .open(big.nodeid, libc::O_RDONLY as u32)
            .expect("OPEN")
            .fh;
        let before = vm_kib(server, "RssAnon:");
        // Fill queue 1 with reads and never look at the used ring.
        let mut tickets = Vec::new();
        while stuck.has_room() {
            let read = FsQueue::read_in(fh, 0, 64 << 10);
            tickets.push(
                stuck
                    .submit(&Request {
                        opcode: opcode::READ,
                        nodeid: big.nodeid,
                        args: &[read.as_slice()],
                        payload: &[],
                        reply_capacity: Some(64 << 10),
                    })
                    .expect("submit"),
            );
        }
        stuck.notify().expect("kick");
        // Queue 2 is served as usual meanwhile.
        for _ in 0..200 {
            let attr = other
                .getattr(big.nodeid)
                .expect("GETATTR on the other queue");
            assert_eq!(attr.attr.size, BIG_SIZE as u64);
        }
        let after = vm_kib(server, "RssAnon:");
        assert!(after <= before + 4096, "RssAnon {before} -> {after} KiB");
        // Everything on the stuck queue was answered and waits in its used ring.
        for ticket in tickets {
            let done = stuck
                .wait_for(ticket)
                .expect("reply")
                .check()
                .expect("READ");
            assert_eq!(done.body.len(), 64 << 10);
        }
        daemon.assert_alive("after the stuck queue drained");
    }
}

#[test]
fn each_held_inode_costs_a_bounded_amount_of_memory() {
    let test = "each_held_inode_costs_a_bounded_amount_of_memory";
    if !berth_only(test) {
        return;
    }
    let fixture = Fixture::new();
    let many = fixture.shared.join("many");
    fs::create_dir(&many).unwrap();
    const FILES: usize = 20_000;
    for i in 0..FILES {
        fs::write(many.join(format!("f{i}")), b"").unwrap();
    }
    let (mut daemon, server) = start(&fixture, &["--max-inodes=10000"]);
    let mut device = connect(&mut daemon, &fixture.socket, 1);
    let mut queue = init_first_queue(&mut device);
    let dir = queue.lookup(ROOT_ID, b"many").expect("LOOKUP many");
    // Warm up allocator arenas and the server's tables before measuring.
    for i in 0..100 {
        let entry = queue
            .lookup(dir.nodeid, format!("f{i}").as_bytes())
            .unwrap();
        queue.forget(entry.nodeid, 1).unwrap();
    }
    let before = vm_kib(server, "RssAnon:");
    let mut held = 0u64;
    let mut refused = 0u64;
    for i in 0..FILES {
        match queue.lookup(dir.nodeid, format!("f{i}").as_bytes()) {
            Ok(_) => held += 1,
            Err(e) => {
                assert_eq!(e.errno(), Some(libc::ENFILE));
                refused += 1;
            }
        }
    }
    let after = vm_kib(server, "RssAnon:");
    assert_eq!(held, 10_000 - 2, "root and 'many' count against the cap");
    assert_eq!(refused, FILES as u64 - held);
    let per_inode = (after.saturating_sub(before) * 1024) / held;
    eprintln!(
        "{held} inodes held cost {} KiB: {per_inode} bytes each",
        after - before
    );
    assert!(per_inode < 1024, "{per_inode} bytes per held inode");
    daemon.assert_alive("after holding 10 000 inodes");
}
