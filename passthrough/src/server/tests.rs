//! Requests through the dispatcher from byte buffers, as a transport hands them over.

use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, EntryOut, ForgetIn, GetattrIn, InitIn, InitOut, OpenIn, OpenOut, OutHeader, ReadIn,
    WriteIn, WriteOut, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::Context;
use vm_memory::ByteValued;

use super::*;
use crate::{Config, PassthroughFs};

const UNIQUE: u64 = 0x1234_5678;
const FILE_LEN: usize = 3 << 20;

struct Fixture {
    dir: std::path::PathBuf,
    server: FsServer,
    content: Vec<u8>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture() -> Fixture {
    fixture_caching(crate::config::CachePolicy::default())
}

fn fixture_caching(cache: crate::config::CachePolicy) -> Fixture {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "berth-server-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let content: Vec<u8> = (0..FILE_LEN).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(dir.join("data"), &content).unwrap();
    let fs = PassthroughFs::new(Config {
        root_dir: dir.clone(),
        cache,
        ..Config::default()
    })
    .unwrap();
    Fixture {
        dir,
        server: FsServer::new(fs),
        content,
    }
}

/// A request: header (with `len` covering `args`), then the argument bytes.
fn request(opcode: u32, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
    let body: usize = args.iter().map(|a| a.len()).sum();
    let header = InHeader {
        len: (size_of::<InHeader>() + body) as u32,
        opcode,
        unique: UNIQUE,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
        ..Default::default()
    };
    let mut bytes = header.as_slice().to_vec();
    for arg in args {
        bytes.extend_from_slice(arg);
    }
    bytes
}

/// Serves `request` (one segment) with `reply_room` bytes of reply room (one segment).
fn serve(server: &FsServer, request: &[u8], reply_room: usize) -> (Served, Vec<u8>) {
    serve_with(server, request, reply_room, None)
}

fn serve_with(
    server: &FsServer,
    request: &[u8],
    reply_room: usize,
    dax: Option<&dyn DaxWindow>,
) -> (Served, Vec<u8>) {
    let mut request = request.to_vec();
    let mut reply = vec![0u8; reply_room];
    let served = {
        let request = [IoSegment::from_mut_slice(&mut request)];
        let reply_segments = [IoSegment::from_mut_slice(&mut reply)];
        server.handle(&request, &reply_segments, dax)
    };
    reply.truncate(served.reply_len());
    (served, reply)
}

fn header(reply: &[u8]) -> OutHeader {
    *OutHeader::from_slice(&reply[..size_of::<OutHeader>()]).unwrap()
}

fn errno(reply: &[u8]) -> i32 {
    assert_eq!(header(reply).unique, UNIQUE);
    -header(reply).error
}

fn body<T: ByteValued>(reply: &[u8]) -> T {
    *T::from_slice(&reply[size_of::<OutHeader>()..size_of::<OutHeader>() + size_of::<T>()]).unwrap()
}

fn lookup(server: &FsServer, name: &str) -> EntryOut {
    let name = format!("{name}\0");
    let (_, reply) = serve(
        server,
        &request(opcode::LOOKUP, ROOT_ID, &[name.as_bytes()]),
        4096,
    );
    assert_eq!(errno(&reply), 0, "LOOKUP {name}");
    body(&reply)
}

/// OPEN of `nodeid` with `flags`: the whole answer.
fn open_out(server: &FsServer, nodeid: u64, flags: i32) -> OpenOut {
    let args = OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    let (_, reply) = serve(
        server,
        &request(opcode::OPEN, nodeid, &[args.as_slice()]),
        4096,
    );
    assert_eq!(errno(&reply), 0, "OPEN");
    body(&reply)
}

fn open(server: &FsServer, nodeid: u64, flags: i32) -> u64 {
    open_out(server, nodeid, flags).fh
}

/// The open flags OPEN answers for `data`, opened read-write, under `cache`.
fn open_flags_caching(cache: crate::config::CachePolicy) -> u32 {
    let f = fixture_caching(cache);
    init(&f.server);
    let entry = lookup(&f.server, "data");
    open_out(&f.server, entry.nodeid, libc::O_RDWR).open_flags
}

/// Direct-I/O opens let non-extending writes run in parallel (without the flag the kernel
/// holds the inode's lock across each write's round trip: two writers took turns); opens
/// that go through the page cache have no direct writes to parallelize.
#[test]
fn direct_io_opens_allow_parallel_direct_writes() {
    use crate::config::CachePolicy;
    let direct = fuse_backend_rs::abi::fuse_abi::OpenOptions::DIRECT_IO.bits();
    let both = direct | abi::FOPEN_PARALLEL_DIRECT_WRITES;
    for (cache, expected) in [
        (CachePolicy::Never, both),
        (CachePolicy::Metadata, both),
        (CachePolicy::Auto, 0),
        (CachePolicy::Always, 0),
    ] {
        let flags = open_flags_caching(cache);
        assert_eq!(flags & both, expected, "{cache:?}: {flags:#x}");
    }
}

fn init(server: &FsServer) -> InitOut {
    let args = InitIn {
        major: 7,
        minor: 38,
        max_readahead: 1 << 17,
        flags: 0,
    };
    let (served, reply) = serve(server, &request(opcode::INIT, 0, &[args.as_slice()]), 4096);
    assert_eq!(served, Served::Replied(16 + size_of::<InitOut>()));
    assert_eq!(errno(&reply), 0);
    body(&reply)
}

#[test]
fn destroy_is_answered_with_a_bare_header_and_drops_the_session() {
    let f = fixture();
    init(&f.server);
    let node = lookup(&f.server, "data").nodeid;
    let (served, reply) = serve(&f.server, &request(opcode::DESTROY, 0, &[]), 4096);
    assert_eq!(served, Served::Replied(16));
    assert_eq!(header(&reply).len, 16);
    assert_eq!(errno(&reply), 0);
    let getattr = GetattrIn::default();
    let (_, reply) = serve(
        &f.server,
        &request(opcode::GETATTR, node, &[getattr.as_slice()]),
        4096,
    );
    assert_eq!(
        errno(&reply),
        libc::EBADF,
        "the inode went with the session"
    );
}

#[test]
fn forgets_and_interrupts_get_no_reply() {
    let f = fixture();
    let node = lookup(&f.server, "data").nodeid;
    for request in [
        request(opcode::FORGET, node, &[ForgetIn { nlookup: 1 }.as_slice()]),
        request(opcode::FORGET, node, &[]),
        request(opcode::INTERRUPT, 0, &[&[0u8; 8]]),
        request(
            opcode::BATCH_FORGET,
            0,
            &[&1u32.to_le_bytes(), &[0u8; 4], &[0u8; 8]],
        ),
    ] {
        let mut reply = vec![0xaau8; 64];
        let served = {
            let mut request = request.clone();
            f.server.handle(
                &[IoSegment::from_mut_slice(&mut request)],
                &[IoSegment::from_mut_slice(&mut reply)],
                None,
            )
        };
        assert_eq!(served, Served::NoReply);
        assert!(reply.iter().all(|&b| b == 0xaa), "nothing written");
    }
    assert_eq!(
        f.server.fs().inode_count(),
        1,
        "the FORGET dropped the lookup"
    );
}

#[test]
fn a_truncated_header_is_answered_einval_when_its_unique_id_is_there() {
    let f = fixture();
    let full = request(opcode::GETATTR, ROOT_ID, &[GetattrIn::default().as_slice()]);
    let (served, reply) = serve(&f.server, &full[..20], 4096);
    assert_eq!(served, Served::Replied(16));
    assert_eq!(errno(&reply), libc::EINVAL);
    let (served, _) = serve(&f.server, &full[..10], 4096);
    assert_eq!(served, Served::Dropped(DropReason::HeaderUnreadable));
    // A header that fits but no room for a reply header.
    let (served, _) = serve(&f.server, &full, 15);
    assert_eq!(served, Served::Dropped(DropReason::NoRoomForHeader));
}

#[test]
fn undecodable_requests_are_einval() {
    let f = fixture();
    // GETATTR without its arguments, LOOKUP of a name without its NUL, RENAME with one name.
    for request in [
        request(opcode::GETATTR, ROOT_ID, &[]),
        request(opcode::LOOKUP, ROOT_ID, &[b"data"]),
        request(
            opcode::RENAME,
            ROOT_ID,
            &[&ROOT_ID.to_le_bytes(), b"data\0"],
        ),
        request(opcode::INIT, 0, &[&[7, 0, 0, 0]]),
    ] {
        let (served, reply) = serve(&f.server, &request, 4096);
        assert_eq!(served, Served::Replied(16));
        assert_eq!(errno(&reply), libc::EINVAL);
    }
    // A header claiming more than the request holds.
    let mut lie = request(opcode::LOOKUP, ROOT_ID, &[b"data\0"]);
    lie[..4].copy_from_slice(&4096u32.to_le_bytes());
    let (_, reply) = serve(&f.server, &lie, 4096);
    assert_eq!(errno(&reply), libc::EINVAL);
}

#[test]
fn oversized_and_unknown_requests() {
    let f = fixture();
    let mut big = request(opcode::GETATTR, ROOT_ID, &[GetattrIn::default().as_slice()]);
    big[..4].copy_from_slice(&((1u32 << 20) + 4097).to_le_bytes());
    let (_, reply) = serve(&f.server, &big, 4096);
    assert_eq!(errno(&reply), libc::ENOMEM);
    big[4..8].copy_from_slice(&opcode::FORGET.to_le_bytes());
    assert_eq!(serve(&f.server, &big, 4096).0, Served::NoReply);
    for op in [52, 4096, u32::MAX] {
        let (_, reply) = serve(&f.server, &request(op, ROOT_ID, &[]), 4096);
        assert_eq!(errno(&reply), libc::ENOSYS, "opcode {op}");
    }
}

#[test]
fn a_reply_that_does_not_fit_its_room_is_eio() {
    let f = fixture();
    let getattr = request(opcode::GETATTR, ROOT_ID, &[GetattrIn::default().as_slice()]);
    let (served, reply) = serve(&f.server, &getattr, 16 + size_of::<AttrOut>() - 1);
    assert_eq!(served, Served::Replied(16));
    assert_eq!(errno(&reply), libc::EIO);
    let (served, reply) = serve(&f.server, &getattr, 16 + size_of::<AttrOut>());
    assert_eq!(served, Served::Replied(16 + size_of::<AttrOut>()));
    assert_eq!(errno(&reply), 0);
}

/// A DAX window that records what it is asked, or panics.
#[derive(Default)]
struct Window {
    setups: Mutex<Vec<(u64, SetupMappingIn)>>,
    removals: Mutex<Vec<RemoveMappingOne>>,
    panic: bool,
}

impl DaxWindow for Window {
    fn setup_mapping(
        &self,
        _ctx: &Context,
        nodeid: u64,
        mapping: &SetupMappingIn,
    ) -> std::io::Result<()> {
        assert!(!self.panic, "a bug in the window");
        self.setups.lock().unwrap().push((nodeid, *mapping));
        Ok(())
    }

    fn remove_mappings(
        &self,
        _ctx: &Context,
        _nodeid: u64,
        ranges: &[RemoveMappingOne],
    ) -> std::io::Result<()> {
        self.removals.lock().unwrap().extend_from_slice(ranges);
        Ok(())
    }
}

#[test]
fn mappings_are_enosys_without_a_window_and_go_to_the_window_with_one() {
    let f = fixture();
    let mapping = SetupMappingIn {
        fh: 3,
        foffset: 4096,
        len: 2 << 20,
        flags: 2,
        moffset: 8 << 20,
    };
    let setup = request(opcode::SETUPMAPPING, 5, &[mapping.as_slice()]);
    let ranges = [
        RemoveMappingOne {
            moffset: 0,
            len: 4096,
        },
        RemoveMappingOne {
            moffset: 1 << 21,
            len: 1 << 21,
        },
    ];
    let remove = request(
        opcode::REMOVEMAPPING,
        5,
        &[
            &2u32.to_le_bytes(),
            ranges[0].as_slice(),
            ranges[1].as_slice(),
        ],
    );
    for request in [&setup, &remove] {
        let (_, reply) = serve(&f.server, request, 4096);
        assert_eq!(errno(&reply), libc::ENOSYS);
    }
    let window = Window::default();
    let (_, reply) = serve_with(&f.server, &setup, 4096, Some(&window));
    assert_eq!(errno(&reply), 0);
    let (_, reply) = serve_with(&f.server, &remove, 4096, Some(&window));
    assert_eq!(errno(&reply), 0);
    assert_eq!(*window.setups.lock().unwrap(), vec![(5, mapping)]);
    assert_eq!(*window.removals.lock().unwrap(), ranges.to_vec());
    // A count the request does not carry is refused before the window sees anything.
    let short = request(
        opcode::REMOVEMAPPING,
        5,
        &[&3u32.to_le_bytes(), ranges[0].as_slice()],
    );
    let (_, reply) = serve_with(&f.server, &short, 4096, Some(&window));
    assert_eq!(errno(&reply), libc::EINVAL);
    let huge = request(opcode::REMOVEMAPPING, 5, &[&u32::MAX.to_le_bytes()]);
    let (_, reply) = serve_with(&f.server, &huge, 4096, Some(&window));
    assert_eq!(errno(&reply), libc::ENOMEM);
    assert_eq!(window.removals.lock().unwrap().len(), 2);
}

#[test]
fn a_panicking_handler_costs_one_request() {
    let f = fixture();
    let window = Window {
        panic: true,
        ..Window::default()
    };
    let setup = request(
        opcode::SETUPMAPPING,
        5,
        &[SetupMappingIn::default().as_slice()],
    );
    let (served, reply) = serve_with(&f.server, &setup, 4096, Some(&window));
    assert_eq!(served, Served::Replied(16));
    assert_eq!(errno(&reply), libc::EIO);
    assert_eq!(lookup(&f.server, "data").attr.size, FILE_LEN as u64);
}

/// `count` 4 KiB reply pages after a 16-byte header segment, in reverse order of memory
/// (like a guest's pinned user pages).
fn scattered(count: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    (vec![0u8; 16], (0..count).map(|_| vec![0u8; 4096]).collect())
}

#[test]
fn read_lands_in_scattered_reply_segments() {
    let f = fixture();
    let node = lookup(&f.server, "data").nodeid;
    let fh = open(&f.server, node, libc::O_RDWR);
    for (offset, pages) in [
        (8192u64, 1usize),
        (5000, 3),
        (0, 256),
        (FILE_LEN as u64 - 100, 1),
    ] {
        let size = (pages * 4096) as u32;
        let args = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let mut req = request(opcode::READ, node, &[args.as_slice()]);
        let (mut head, mut pages_buf) = scattered(pages);
        let served = {
            let mut segments = vec![IoSegment::from_mut_slice(&mut head)];
            segments.extend(pages_buf.iter_mut().map(|p| IoSegment::from_mut_slice(p)));
            f.server
                .handle(&[IoSegment::from_mut_slice(&mut req)], &segments, None)
        };
        let expected = (size as usize).min(FILE_LEN - offset as usize);
        assert_eq!(served, Served::Replied(16 + expected));
        assert_eq!(errno(&head), 0);
        assert_eq!(header(&head).len as usize, 16 + expected);
        let data: Vec<u8> = pages_buf.concat();
        let start = offset as usize;
        assert_eq!(&data[..expected], &f.content[start..start + expected]);
    }
    // A reply room smaller than the read: EIO, as fuse-backend-rs answered.
    let args = ReadIn {
        fh,
        size: 3 * 4096,
        ..Default::default()
    };
    let (_, reply) = serve(
        &f.server,
        &request(opcode::READ, node, &[args.as_slice()]),
        16 + 8192,
    );
    assert_eq!(errno(&reply), libc::EIO);
    // A handle that does not exist.
    let args = ReadIn {
        fh: fh + 1000,
        size: 4096,
        ..Default::default()
    };
    let (_, reply) = serve(
        &f.server,
        &request(opcode::READ, node, &[args.as_slice()]),
        8192,
    );
    assert_eq!(errno(&reply), libc::EBADF);
}

#[test]
fn write_takes_its_data_from_split_segments() {
    let f = fixture();
    let node = lookup(&f.server, "data").nodeid;
    let fh = open(&f.server, node, libc::O_RDWR);
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let args = WriteIn {
        fh,
        offset: 4096 * 3 + 17,
        size: payload.len() as u32,
        ..Default::default()
    };
    let mut head = request(opcode::WRITE, node, &[args.as_slice()]);
    let len = (head.len() + payload.len()) as u32;
    head[..4].copy_from_slice(&len.to_le_bytes());
    let mut parts: Vec<Vec<u8>> = vec![
        payload[..1000].to_vec(),
        payload[1000..5096].to_vec(),
        payload[5096..].to_vec(),
    ];
    let mut reply = vec![0u8; 64];
    let served = {
        let mut segments = vec![IoSegment::from_mut_slice(&mut head)];
        segments.extend(parts.iter_mut().map(|p| IoSegment::from_mut_slice(p)));
        f.server
            .handle(&segments, &[IoSegment::from_mut_slice(&mut reply)], None)
    };
    assert_eq!(served, Served::Replied(16 + size_of::<WriteOut>()));
    assert_eq!(errno(&reply), 0);
    assert_eq!(body::<WriteOut>(&reply).size as usize, payload.len());
    let on_disk = std::fs::read(f.dir.join("data")).unwrap();
    let start = args.offset as usize;
    assert_eq!(&on_disk[start..start + payload.len()], &payload[..]);
    // Claiming more data than the request carries writes what is there, as before.
    let args = WriteIn {
        fh,
        size: 8192,
        ..Default::default()
    };
    let short = request(opcode::WRITE, node, &[args.as_slice(), &[7u8; 100]]);
    let (_, reply) = serve(&f.server, &short, 64);
    assert_eq!(errno(&reply), 0);
    assert_eq!(body::<WriteOut>(&reply).size, 100);
}

#[test]
fn a_second_init_starts_a_new_session() {
    let f = fixture();
    init(&f.server);
    let node = lookup(&f.server, "data").nodeid;
    let fh = open(&f.server, node, libc::O_RDONLY);
    assert_eq!(f.server.fs().handle_count(), 1);
    // The guest rebooted: the new kernel mounts again without unmounting first.
    init(&f.server);
    assert_eq!(
        f.server.fs().handle_count(),
        0,
        "the old guest's files are closed"
    );
    assert_eq!(f.server.fs().inode_count(), 1, "only the root is left");
    let args = ReadIn {
        fh,
        size: 4096,
        ..Default::default()
    };
    let (_, reply) = serve(
        &f.server,
        &request(opcode::READ, node, &[args.as_slice()]),
        8192,
    );
    assert_eq!(errno(&reply), libc::EBADF);
    // And the new session works.
    let node = lookup(&f.server, "data").nodeid;
    open(&f.server, node, libc::O_RDONLY);
    // A reset from the transport does the same.
    f.server.reset_session();
    assert_eq!(f.server.fs().handle_count(), 0);
    assert_eq!(f.server.fs().inode_count(), 1);
}

#[test]
fn refused_requests_are_answered_when_they_can_be() {
    let f = fixture();
    let getattr = request(opcode::GETATTR, ROOT_ID, &[GetattrIn::default().as_slice()]);
    let mut reply = vec![0u8; 64];
    let served = {
        let mut req = getattr.clone();
        f.server.refuse(
            &[IoSegment::from_mut_slice(&mut req)],
            &[IoSegment::from_mut_slice(&mut reply)],
            libc::EIO,
        )
    };
    assert_eq!(served, Served::Replied(16));
    assert_eq!(errno(&reply), libc::EIO);
    // No reply room, no unique id, or a request that takes no reply.
    let mut req = getattr.clone();
    assert_eq!(
        f.server
            .refuse(&[IoSegment::from_mut_slice(&mut req)], &[], libc::EIO),
        Served::Dropped(DropReason::NoRoomForHeader)
    );
    let mut short = getattr[..12].to_vec();
    assert_eq!(
        f.server.refuse(
            &[IoSegment::from_mut_slice(&mut short)],
            &[IoSegment::from_mut_slice(&mut reply)],
            libc::EIO
        ),
        Served::Dropped(DropReason::HeaderUnreadable)
    );
    let mut forget = request(opcode::FORGET, 2, &[ForgetIn { nlookup: 1 }.as_slice()]);
    assert_eq!(
        f.server.refuse(
            &[IoSegment::from_mut_slice(&mut forget)],
            &[IoSegment::from_mut_slice(&mut reply)],
            libc::EIO
        ),
        Served::NoReply
    );
}

#[test]
fn request_counts_count_every_opcode_served() {
    let f = fixture();
    assert_eq!(f.server.request_counts(), "total=0 ");
    init(&f.server);
    lookup(&f.server, "data");
    lookup(&f.server, "data");
    // Opcodes berth does not serve, inside the table and past it, are counted too.
    let (_, reply) = serve(&f.server, &request(63, ROOT_ID, &[]), 4096);
    assert_eq!(errno(&reply), libc::ENOSYS);
    let (_, reply) = serve(&f.server, &request(4096, ROOT_ID, &[]), 4096);
    assert_eq!(errno(&reply), libc::ENOSYS);
    // A request whose header does not decode has no opcode to count.
    serve(
        &f.server,
        &request(opcode::GETATTR, ROOT_ID, &[])[..20],
        4096,
    );
    assert_eq!(
        f.server.request_counts(),
        "total=5 LOOKUP=2 INIT=1 op63=1 other=1"
    );
}

/// A server with FUSE passthrough backing files in `mode`, on a "device" that refuses the
/// backing ioctls (/dev/null answers ENOTTY), with its registrar on a thread of its own.
fn with_backing(mode: PassthroughMode) -> Fixture {
    let fixture = fixture();
    let device = std::fs::File::open("/dev/null").unwrap();
    let (backing, registrar) = BackingFiles::new(device, mode, 1);
    std::thread::spawn(move || registrar.serve());
    assert!(fixture.server.use_backing_files(backing));
    fixture
}

/// FUSE_INIT 7.45 offering `flags` (both words).
fn init_offering(server: &FsServer, flags: u64) -> (Served, Vec<u8>) {
    let args = InitIn {
        major: 7,
        minor: 45,
        max_readahead: 1 << 17,
        flags: flags as u32 | init_flags::INIT_EXT as u32,
    };
    let args2 = fuse_backend_rs::abi::fuse_abi::InitIn2 {
        flags2: (flags >> 32) as u32,
        ..Default::default()
    };
    serve(
        server,
        &request(opcode::INIT, 0, &[args.as_slice(), args2.as_slice()]),
        4096,
    )
}

#[test]
fn init_turns_passthrough_on_where_the_kernel_offers_it() {
    let f = with_backing(PassthroughMode::Auto);
    let (_, reply) = init_offering(&f.server, backing::INIT_PASSTHROUGH);
    assert_eq!(errno(&reply), 0);
    let out: InitOut = body(&reply);
    let enabled = u64::from(out.flags) | u64::from(out.flags2) << 32;
    assert_ne!(enabled & backing::INIT_PASSTHROUGH, 0, "{enabled:#x}");
    assert_ne!(
        enabled & init_flags::INIT_EXT,
        0,
        "flags2 must count: {enabled:#x}"
    );
    assert_eq!(out.unused[0], 1, "max_stack_depth");
    assert!(f.server.backing_files().unwrap().is_active());

    // The kernel refuses this "device"'s registration: the open is served the classic way.
    let entry = lookup(&f.server, "data");
    let open = open_out(&f.server, entry.nodeid, libc::O_RDONLY);
    assert_eq!(open.open_flags & backing::FOPEN_PASSTHROUGH, 0);
    assert_eq!(open.passthrough, 0);
    let summary = f.server.backing_files().unwrap().summary();
    assert!(summary.contains("refused=1"), "{summary}");
    assert!(summary.contains("classic_opens=1"), "{summary}");
}

#[test]
fn init_without_the_kernel_offer_leaves_passthrough_off_or_fails_always() {
    let f = with_backing(PassthroughMode::Auto);
    let (_, reply) = init_offering(&f.server, 0);
    assert_eq!(errno(&reply), 0);
    let out: InitOut = body(&reply);
    assert_eq!(u64::from(out.flags2) << 32 & backing::INIT_PASSTHROUGH, 0);
    assert_eq!(out.unused[0], 0, "no max_stack_depth without passthrough");
    assert!(!f.server.backing_files().unwrap().is_active());
    assert_eq!(f.server.backing_files().unwrap().failure(), None);

    let f = with_backing(PassthroughMode::Always);
    let (_, reply) = init_offering(&f.server, 0);
    assert_eq!(errno(&reply), libc::EPROTO);
    assert_eq!(
        f.server.backing_files().unwrap().failure(),
        Some(PassthroughError::NotOffered)
    );
}

#[test]
fn passthrough_is_off_with_the_writeback_cache() {
    let f = with_backing(PassthroughMode::Always);
    let b = f.server.backing_files().unwrap();
    assert_eq!(
        b.negotiate(backing::INIT_PASSTHROUGH, true),
        Err(PassthroughError::Writeback)
    );
    let f = with_backing(PassthroughMode::Auto);
    let b = f.server.backing_files().unwrap();
    assert_eq!(b.negotiate(backing::INIT_PASSTHROUGH, true), Ok(false));
    assert!(!b.is_active());
}

/// A fixture serving its directory with shared caching (no host watcher: nothing but the
/// tests changes it), and its version table.
fn with_versions() -> (Fixture, std::sync::Arc<berth_versions::VersionTable>) {
    use std::os::unix::fs::MetadataExt;
    let f = fixture();
    let meta = std::fs::metadata(&f.dir).unwrap();
    let table_path = f.dir.with_extension("table");
    let (table, _) = berth_versions::VersionTable::open(&berth_versions::TableOptions {
        path: table_path.clone(),
        slots: 1024,
        share_dev: meta.dev(),
        share_ino: meta.ino(),
    })
    .unwrap();
    let _ = std::fs::remove_file(&table_path);
    let table = std::sync::Arc::new(table);
    let fs = PassthroughFs::new(Config {
        root_dir: f.dir.clone(),
        shared_cache: Some(crate::SharedCache {
            table: table.clone(),
            watched_devices: vec![meta.dev()],
            timeout: std::time::Duration::from_secs(86400),
            track_client: false,
        }),
        ..Config::default()
    })
    .unwrap();
    let mut f = f;
    f.server = FsServer::new(fs);
    (f, table)
}

use berth_versions::wire::{VersionExt, INIT_SHARED_VERSIONS, VERSION_EXT_SIZE};

fn enabled_flags(reply: &[u8]) -> u64 {
    let out: InitOut = body(reply);
    u64::from(out.flags) | u64::from(out.flags2) << 32
}

/// The extension at `offset` bytes into the reply body.
fn ext_at(reply: &[u8], offset: usize) -> VersionExt {
    VersionExt::decode(&reply[size_of::<OutHeader>() + offset..]).unwrap()
}

#[test]
fn the_version_extension_needs_the_transport_offer_and_the_client_flag() {
    let (f, _table) = with_versions();
    // The transport did not offer the table: the flag is not echoed, replies are as before.
    let (_, reply) = init_offering(&f.server, INIT_SHARED_VERSIONS);
    assert_eq!(enabled_flags(&reply) & INIT_SHARED_VERSIONS, 0);
    let name = b"data\0";
    let (served, _) = serve(&f.server, &request(opcode::LOOKUP, ROOT_ID, &[name]), 4096);
    assert_eq!(served, Served::Replied(16 + size_of::<EntryOut>()));

    // Offered, but the client does not ask: still nothing.
    assert!(f.server.offer_shared_versions());
    let (_, reply) = init_offering(&f.server, 0);
    assert_eq!(enabled_flags(&reply) & INIT_SHARED_VERSIONS, 0);
    assert!(!f.server.shared_versions_negotiated());
    let (served, _) = serve(&f.server, &request(opcode::LOOKUP, ROOT_ID, &[name]), 4096);
    assert_eq!(served, Served::Replied(16 + size_of::<EntryOut>()));

    // Both: negotiated, and every LOOKUP reply grows by the extension.
    let (_, reply) = init_offering(&f.server, INIT_SHARED_VERSIONS);
    assert_ne!(enabled_flags(&reply) & INIT_SHARED_VERSIONS, 0);
    assert_ne!(enabled_flags(&reply) & init_flags::INIT_EXT, 0);
    assert!(f.server.shared_versions_negotiated());
    let (served, _) = serve(&f.server, &request(opcode::LOOKUP, ROOT_ID, &[name]), 4096);
    assert_eq!(
        served,
        Served::Replied(16 + size_of::<EntryOut>() + VERSION_EXT_SIZE)
    );

    // A server without a table never offers it.
    let plain = fixture();
    assert!(!plain.server.offer_shared_versions());
    let (_, reply) = init_offering(&plain.server, INIT_SHARED_VERSIONS);
    assert_eq!(enabled_flags(&reply) & INIT_SHARED_VERSIONS, 0);
}

#[test]
fn replies_carry_each_inodes_slot_and_the_version_they_are_as_new_as() {
    let (f, table) = with_versions();
    assert!(f.server.offer_shared_versions());
    let (_, reply) = init_offering(&f.server, INIT_SHARED_VERSIONS);
    assert_eq!(errno(&reply), 0);
    let generation = table.generation() as u32;

    // The root's slot, through GETATTR.
    let (served, reply) = serve(
        &f.server,
        &request(opcode::GETATTR, ROOT_ID, &[GetattrIn::default().as_slice()]),
        4096,
    );
    assert_eq!(
        served,
        Served::Replied(16 + size_of::<AttrOut>() + VERSION_EXT_SIZE)
    );
    let root = ext_at(&reply, size_of::<AttrOut>());
    assert_ne!(root.slot, berth_versions::Slot::NONE);
    assert_eq!(root.generation, generation);
    assert_eq!(root.version, table.version(berth_versions::Slot(root.slot)));
    assert_eq!(root.parent_version, 0);

    // LOOKUP: the file's own slot and the directory's version.
    let (_, reply) = serve(
        &f.server,
        &request(opcode::LOOKUP, ROOT_ID, &[b"data\0"]),
        4096,
    );
    let entry: EntryOut = body(&reply);
    let file = ext_at(&reply, size_of::<EntryOut>());
    assert_ne!(file.slot, berth_versions::Slot::NONE);
    assert_ne!(file.slot, root.slot);
    assert_eq!(file.version, table.version(berth_versions::Slot(file.slot)));
    assert_eq!(file.parent_version, root.version);

    // A change through the server moves the version, and the reply says it reflects it.
    let setattr = fuse_backend_rs::abi::fuse_abi::SetattrIn {
        valid: fuse_backend_rs::abi::fuse_abi::SetattrValid::MODE.bits(),
        mode: libc::S_IFREG | 0o600,
        ..Default::default()
    };
    let (_, reply) = serve(
        &f.server,
        &request(opcode::SETATTR, entry.nodeid, &[setattr.as_slice()]),
        4096,
    );
    assert_eq!(errno(&reply), 0);
    let changed = ext_at(&reply, size_of::<AttrOut>());
    assert_eq!(changed.slot, file.slot);
    assert_eq!(changed.version, file.version + 1);
    assert_eq!(
        table.version(berth_versions::Slot(file.slot)),
        changed.version
    );

    // A missing name: a negative entry (node 0) without a slot, good while the directory
    // holds its version.
    let (_, reply) = serve(
        &f.server,
        &request(opcode::LOOKUP, ROOT_ID, &[b"missing\0"]),
        4096,
    );
    assert_eq!(errno(&reply), 0);
    assert_eq!(body::<EntryOut>(&reply).nodeid, 0);
    let negative = ext_at(&reply, size_of::<EntryOut>());
    assert_eq!(negative.slot, berth_versions::Slot::NONE);
    assert_eq!(negative.parent_version, root.version);

    // Creating an entry moves the directory; the reply's parent version is the moved one.
    let mkdir = fuse_backend_rs::abi::fuse_abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let (served, reply) = serve(
        &f.server,
        &request(opcode::MKDIR, ROOT_ID, &[mkdir.as_slice(), b"sub\0"]),
        4096,
    );
    assert_eq!(
        served,
        Served::Replied(16 + size_of::<EntryOut>() + VERSION_EXT_SIZE)
    );
    let sub = ext_at(&reply, size_of::<EntryOut>());
    let root_now = table.version(berth_versions::Slot(root.slot));
    assert_eq!(root_now, root.version + 1);
    assert_eq!(sub.parent_version, root_now);
}

#[test]
fn readdirplus_records_carry_the_extension_between_entry_and_dirent() {
    let (f, table) = with_versions();
    std::fs::write(f.dir.join("a-longer-name"), b"x").unwrap();
    assert!(f.server.offer_shared_versions());
    init_offering(&f.server, INIT_SHARED_VERSIONS);
    let (_, reply) = serve(
        &f.server,
        &request(opcode::OPENDIR, ROOT_ID, &[OpenIn::default().as_slice()]),
        4096,
    );
    let fh = body::<OpenOut>(&reply).fh;
    let read = ReadIn {
        fh,
        size: 8192,
        ..Default::default()
    };
    let (_, reply) = serve(
        &f.server,
        &request(opcode::READDIRPLUS, ROOT_ID, &[read.as_slice()]),
        16384,
    );
    assert_eq!(errno(&reply), 0);
    let records = &reply[size_of::<OutHeader>()..];
    let dirent_size = size_of::<fuse_backend_rs::abi::fuse_abi::Dirent>();
    let mut pos = 0;
    let mut names = Vec::new();
    let mut root_version = None;
    while pos < records.len() {
        let entry = *EntryOut::from_slice(&records[pos..pos + size_of::<EntryOut>()]).unwrap();
        let ext = VersionExt::decode(&records[pos + size_of::<EntryOut>()..]).unwrap();
        let at = pos + size_of::<EntryOut>() + VERSION_EXT_SIZE;
        let dirent =
            *fuse_backend_rs::abi::fuse_abi::Dirent::from_slice(&records[at..at + dirent_size])
                .unwrap();
        let name = &records[at + dirent_size..at + dirent_size + dirent.namelen as usize];
        names.push(String::from_utf8_lossy(name).into_owned());
        // Every record: the directory's version as parent version; a slot for real entries.
        assert_eq!(
            *root_version.get_or_insert(ext.parent_version),
            ext.parent_version
        );
        if entry.nodeid == 0 {
            assert_eq!(ext.slot, berth_versions::Slot::NONE, "{name:?}");
        } else {
            assert_eq!(
                ext.version,
                table.version(berth_versions::Slot(ext.slot)),
                "{name:?}"
            );
        }
        pos = at + (dirent_size + dirent.namelen as usize).next_multiple_of(8);
    }
    assert_eq!(pos, records.len());
    names.sort();
    assert_eq!(names, [".", "..", "a-longer-name", "data"]);
}

#[test]
fn init_negotiates_io_uring_only_when_asked_and_offered() {
    use super::{IoUringInit, INIT_OVER_IO_URING};
    let enabled_of = |reply: &[u8]| {
        let out: InitOut = body(reply);
        u64::from(out.flags) | u64::from(out.flags2) << 32
    };
    // Not asked: the flag stays off even where the kernel offers it.
    let f = fixture();
    let (_, reply) = init_offering(&f.server, INIT_OVER_IO_URING);
    assert_eq!(errno(&reply), 0);
    assert_eq!(enabled_of(&reply) & INIT_OVER_IO_URING, 0);
    assert_eq!(f.server.io_uring_init(), IoUringInit::Undecided);

    // Asked and offered: on, with FUSE_INIT_EXT so that flags2 counts.
    let f = fixture();
    f.server.offer_io_uring(false);
    let (_, reply) = init_offering(&f.server, INIT_OVER_IO_URING);
    assert_eq!(errno(&reply), 0);
    let enabled = enabled_of(&reply);
    assert_ne!(enabled & INIT_OVER_IO_URING, 0, "{enabled:#x}");
    assert_ne!(enabled & init_flags::INIT_EXT, 0, "{enabled:#x}");
    assert_eq!(f.server.io_uring_init(), IoUringInit::Enabled);

    // Asked, not offered: off under auto, FUSE_INIT refused under always.
    let f = fixture();
    f.server.offer_io_uring(false);
    let (_, reply) = init_offering(&f.server, 0);
    assert_eq!(errno(&reply), 0);
    assert_eq!(enabled_of(&reply) & INIT_OVER_IO_URING, 0);
    assert_eq!(f.server.io_uring_init(), IoUringInit::NotOffered);
    let f = fixture();
    f.server.offer_io_uring(true);
    let (_, reply) = init_offering(&f.server, 0);
    assert_eq!(errno(&reply), libc::EPROTO);
    assert_eq!(f.server.io_uring_init(), IoUringInit::NotOffered);
}
