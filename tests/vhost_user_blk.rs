//! `berth block serve-vhost` driven by the repo's own frontend as a VMM and virtio-blk
//! driver: every request type against a raw file (checked on the host file), FLUSH,
//! DISCARD and WRITE_ZEROES, read-only refusal, out-of-range and malformed requests, two
//! queues at once, and a lazily fetched image that only fetches what is read. The daemon
//! runs with its default `--seccomp kill`, so a system call its filters miss ends the test.

#[path = "common/frontend_util.rs"]
mod frontend_util;
#[path = "common/security_util.rs"]
mod security_util;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_frontend::blk::{features, request_type, status, RANGE_FLAG_UNMAP};
use berth_frontend::virtqueue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use berth_frontend::{BlkDeviceConfig, BlkQueue, RawDescriptor, RawNext, VhostUserBlk};
use frontend_util::{describe_status, Daemon};
use tmpfs::TmpfsMount;
use vm_memory::{Bytes, GuestAddress};

const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;
/// The raw file exported by most tests: 8 MiB.
const FILE_SIZE: u64 = 8 << 20;

/// Deterministic, position-dependent bytes.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

struct Served {
    dir: tempfile::TempDir,
    daemon: Daemon,
    socket: PathBuf,
}

impl Served {
    /// A daemon serving `target` with `extra` flags, its socket ready.
    fn start(dir: tempfile::TempDir, target: &Path, extra: &[&str]) -> Served {
        let socket = dir.path().join("blk.sock");
        let mut args: Vec<String> = vec![
            "block".into(),
            "serve-vhost".into(),
            "--socket-path".into(),
            socket.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(target.display().to_string());
        let mut daemon = Daemon::spawn(&args);
        daemon.wait_for_socket(&socket);
        Served {
            dir,
            daemon,
            socket,
        }
    }

    /// A daemon serving a fresh 8 MiB raw file (returned) filled with pattern 1.
    fn raw(extra: &[&str]) -> (Served, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.raw");
        fs::write(&file, pattern(1, FILE_SIZE as usize)).unwrap();
        (Served::start(dir, &file, extra), file)
    }

    fn connect(&mut self, config: BlkDeviceConfig) -> VhostUserBlk {
        match VhostUserBlk::connect(&self.socket, config, Duration::from_secs(10)) {
            Ok(device) => device,
            Err(e) => panic!(
                "cannot connect: {e}\n--- daemon stderr ---\n{}",
                self.daemon.stderr()
            ),
        }
    }

    /// Disconnects `device` and expects the daemon to exit with status 0; hands back the
    /// directory holding the served file.
    fn finish(mut self, device: VhostUserBlk) -> tempfile::TempDir {
        device.disconnect();
        let status = self
            .daemon
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the daemon did not exit after the frontend left"));
        assert!(
            status.success(),
            "daemon ended with {}\n--- stderr ---\n{}",
            describe_status(status),
            self.daemon.stderr()
        );
        assert!(!self.socket.exists(), "the socket is removed at exit");
        self.dir
    }
}

fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn config_space_and_features_describe_the_file() {
    let (mut served, _file) = Served::raw(&["--queues", "3", "--queue-size", "256"]);
    let device = served.connect(BlkDeviceConfig::default());
    let config = *device.config();
    assert_eq!(config.capacity, FILE_SIZE / 512);
    assert_eq!(config.blk_size, BLOCK as u32);
    assert_eq!(config.num_queues, 3);
    assert_eq!(config.seg_max, 254, "queue size minus header and status");
    assert_eq!(device.backend_queues(), 3);
    assert_eq!(config.discard_sector_alignment, SECTORS_PER_BLOCK as u32);
    assert!(config.max_discard_sectors > 0 && config.max_discard_seg > 0);
    assert!(config.max_write_zeroes_sectors > 0 && config.max_write_zeroes_seg > 0);
    let offered = device.offered_features();
    for (bit, name) in [
        (features::FLUSH, "FLUSH"),
        (features::MQ, "MQ"),
        (features::BLK_SIZE, "BLK_SIZE"),
        (features::SEG_MAX, "SEG_MAX"),
        (features::DISCARD, "DISCARD"),
        (features::WRITE_ZEROES, "WRITE_ZEROES"),
    ] {
        assert_ne!(offered & bit, 0, "{name} offered");
    }
    assert_eq!(offered & features::RO, 0, "a writable file is not RO");
    let _dir = served.finish(device);
}

#[test]
fn a_short_config_space_read_describes_the_file_too() {
    // QEMU 7.2's backends refuse a GET_CONFIG beyond their 60-byte struct; the frontend can
    // ask for just that much, and berth answers it with the same fields.
    let (mut served, _file) = Served::raw(&["--queues", "2"]);
    let device = served.connect(BlkDeviceConfig {
        config_len: berth_frontend::blk::MIN_CONFIG_LEN,
        ..BlkDeviceConfig::default()
    });
    let config = *device.config();
    assert_eq!(config.capacity, FILE_SIZE / 512);
    assert_eq!(config.blk_size, BLOCK as u32);
    assert_eq!(config.num_queues, 2);
    assert!(config.max_write_zeroes_sectors > 0 && config.max_write_zeroes_seg > 0);
    let _dir = served.finish(device);
    for config_len in [berth_frontend::blk::MIN_CONFIG_LEN - 1, 73] {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let refused = VhostUserBlk::from_stream(
            ours,
            BlkDeviceConfig {
                config_len,
                ..BlkDeviceConfig::default()
            },
        );
        assert!(
            matches!(refused, Err(berth_frontend::Error::InvalidConfig(_))),
            "config_len {config_len} must be refused before any message"
        );
    }
}

#[test]
fn every_request_type_round_trips_against_the_file() {
    let (mut served, file) = Served::raw(&["--serial", "berth-test-disk"]);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();

    // IN: what the file holds, over several data descriptors (256 KiB in 64 KiB pieces).
    let at = 1u64 << 20;
    let read = queue.read(at / 512, 256 << 10).unwrap().unwrap();
    assert_eq!(read, read_file_at(&file, at, 256 << 10));

    // OUT then IN: the file changes, and reads see it.
    let data = pattern(7, 512 << 10);
    let at = 3u64 << 20;
    assert_eq!(queue.write(at / 512, &data).unwrap(), status::OK);
    assert_eq!(read_file_at(&file, at, data.len()), data);
    assert_eq!(queue.read(at / 512, 512 << 10).unwrap().unwrap(), data);
    // The blocks around it are untouched.
    assert_eq!(
        read_file_at(&file, at - BLOCK as u64, BLOCK),
        pattern(1, FILE_SIZE as usize)[(at as usize - BLOCK)..at as usize]
    );

    // FLUSH.
    assert_eq!(queue.flush().unwrap(), status::OK);

    // GET_ID: the serial, NUL-padded to 20 bytes, and the used length counts it.
    let reply = queue
        .request(request_type::GET_ID, 0, &[], 20)
        .expect("GET_ID");
    assert_eq!(reply.status, status::OK);
    assert_eq!(&reply.data[..15], b"berth-test-disk");
    assert!(reply.data[15..].iter().all(|&b| b == 0));
    assert_eq!(reply.used_len, 21);

    // A read's used length is its data plus the status byte.
    let reply = queue.request(request_type::IN, 0, &[], 8192).unwrap();
    assert_eq!((reply.status, reply.used_len), (status::OK, 8193));

    // Types berth does not serve are UNSUPP.
    for kind in [request_type::GET_LIFETIME, 99, 0x8000_0000] {
        let reply = queue.request(kind, 0, &[], 0).unwrap();
        assert_eq!(reply.status, status::UNSUPP, "type {kind:#x}");
    }
    let _dir = served.finish(device);
    // Everything written is in the file after the daemon exits.
    assert_eq!(read_file_at(&file, 3 << 20, data.len()), data);
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let (mut served, file) = Served::raw(&[]);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let blocks_before = fs::metadata(&file).unwrap().blocks();

    // DISCARD of 1 MiB at 2 MiB: a punched hole that reads as zeros.
    let sector = (2u64 << 20) / 512;
    assert_eq!(queue.discard(&[(sector, 2048, 0)]).unwrap(), status::OK);
    assert!(read_file_at(&file, 2 << 20, 1 << 20)
        .iter()
        .all(|&b| b == 0));
    assert!(
        fs::metadata(&file).unwrap().blocks() < blocks_before,
        "the discarded range is deallocated"
    );

    // WRITE_ZEROES of two segments, one allowed to unmap.
    let a = (4u64 << 20) / 512;
    let b = (5u64 << 20) / 512;
    assert_eq!(
        queue
            .write_zeroes(&[(a, 16, 0), (b, 8, RANGE_FLAG_UNMAP)])
            .unwrap(),
        status::OK
    );
    assert!(read_file_at(&file, a * 512, 16 * 512)
        .iter()
        .all(|&b| b == 0));
    assert!(read_file_at(&file, b * 512, 8 * 512)
        .iter()
        .all(|&b| b == 0));
    // The block after each range keeps its data.
    let original = pattern(1, FILE_SIZE as usize);
    let after = (a * 512 + 16 * 512) as usize;
    assert_eq!(
        read_file_at(&file, after as u64, BLOCK),
        original[after..after + BLOCK]
    );

    // DISCARD may not carry UNMAP, nor any segment an unknown flag: UNSUPP, nothing done.
    let untouched = (6u64 << 20) / 512;
    assert_eq!(
        queue.discard(&[(untouched, 8, RANGE_FLAG_UNMAP)]).unwrap(),
        status::UNSUPP
    );
    assert_eq!(
        queue.write_zeroes(&[(untouched, 8, 1 << 5)]).unwrap(),
        status::UNSUPP
    );
    // Misaligned, out-of-range, empty or ragged tables: IOERR, nothing done.
    assert_eq!(
        queue.write_zeroes(&[(untouched + 1, 8, 0)]).unwrap(),
        status::IOERR
    );
    assert_eq!(
        queue
            .discard(&[(untouched, 8, 0), (FILE_SIZE / 512, 8, 0)])
            .unwrap(),
        status::IOERR,
        "one bad segment fails the whole request"
    );
    let reply = queue
        .request(request_type::DISCARD, 0, &[0u8; 10], 0)
        .unwrap();
    assert_eq!(reply.status, status::IOERR);
    let reply = queue.request(request_type::DISCARD, 0, &[], 0).unwrap();
    assert_eq!(reply.status, status::IOERR);
    let too_many: Vec<(u64, u32, u32)> = (0..100).map(|i| (untouched + i * 8, 8, 0)).collect();
    assert_eq!(queue.discard(&too_many).unwrap(), status::IOERR);
    assert_eq!(
        read_file_at(&file, untouched * 512, 100 * BLOCK),
        original[(untouched * 512) as usize..(untouched * 512) as usize + 100 * BLOCK]
    );
    let _dir = served.finish(device);
}

#[test]
fn a_read_only_device_refuses_writes() {
    let (mut served, file) = Served::raw(&["--readonly"]);
    let mut device = served.connect(BlkDeviceConfig::default());
    let offered = device.offered_features();
    assert_ne!(offered & features::RO, 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(offered & (features::DISCARD | features::WRITE_ZEROES), 0);
    let mut queue = device.take_queue(0).unwrap();
    let before = fs::read(&file).unwrap();
    assert_eq!(queue.write(0, &pattern(9, BLOCK)).unwrap(), status::IOERR);
    assert_eq!(queue.discard(&[(0, 8, 0)]).unwrap(), status::UNSUPP);
    assert_eq!(queue.write_zeroes(&[(0, 8, 0)]).unwrap(), status::UNSUPP);
    assert_eq!(queue.flush().unwrap(), status::OK);
    assert_eq!(
        queue.read(0, BLOCK as u32).unwrap().unwrap(),
        before[..BLOCK]
    );
    let _dir = served.finish(device);
    assert!(fs::read(&file).unwrap() == before, "the file is unchanged");
}

/// A raw chain: `parts` as (address, length, device-writable), linked in order.
fn chain(parts: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| RawDescriptor {
            addr,
            len,
            flags: if writable { VIRTQ_DESC_F_WRITE } else { 0 }
                | if i + 1 < parts.len() {
                    VIRTQ_DESC_F_NEXT
                } else {
                    0
                },
            next: RawNext::Following,
        })
        .collect()
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    header
}

#[test]
fn out_of_range_and_malformed_requests_get_an_error_status_and_the_daemon_lives() {
    let (mut served, file) = Served::raw(&[]);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let capacity = FILE_SIZE / 512;

    // Out of range, overflowing, misaligned, or crossing the end: IOERR.
    for (sector, len) in [
        (capacity, BLOCK as u32),
        (capacity - SECTORS_PER_BLOCK, 2 * BLOCK as u32),
        (u64::MAX, BLOCK as u32),
        (u64::MAX / 512 + 1, BLOCK as u32),
        (1, BLOCK as u32),
        (0, 512),
    ] {
        assert_eq!(
            queue.read(sector, len).unwrap(),
            Err(status::IOERR),
            "read of {len} at sector {sector}"
        );
        assert_eq!(
            queue.write(sector, &vec![0xee; len as usize]).unwrap(),
            status::IOERR,
            "write of {len} at sector {sector}"
        );
    }

    let ram = queue.ram().clone();
    let buf = queue.allocate_raw_buffer(2 * BLOCK as u32).unwrap().0;
    let status_at = queue.allocate_raw_buffer(16).unwrap().0;
    let put_status = |value: u8| {
        ram.memory()
            .write_obj(value, GuestAddress(status_at))
            .unwrap()
    };
    let get_status = || -> u8 { ram.memory().read_obj(GuestAddress(status_at)).unwrap() };
    let wait = Duration::from_secs(5);

    // A header of 8 bytes: IOERR in the status byte.
    ram.memory()
        .write_slice(&header(request_type::IN, 0), GuestAddress(buf))
        .unwrap();
    put_status(0xff);
    let used = queue
        .raw(&chain(&[(buf, 8, false), (status_at, 1, true)]), wait)
        .unwrap()
        .expect("a short header is answered");
    assert_eq!((get_status(), used.len), (status::IOERR, 1));

    // A read whose data buffer is device-readable (wrong direction): no room to read into,
    // so nothing but a status, and the file is not read into guest memory.
    let data = buf + BLOCK as u64;
    put_status(0xff);
    let used = queue
        .raw(
            &chain(&[(buf, 16, false), (data, 4096, false), (status_at, 1, true)]),
            wait,
        )
        .unwrap()
        .unwrap();
    assert_eq!(get_status(), status::OK, "a zero-length read");
    assert_eq!(used.len, 1);

    // A write whose data is device-writable: the device must not take it as data.
    ram.memory()
        .write_slice(&header(request_type::OUT, 0), GuestAddress(buf))
        .unwrap();
    let before = read_file_at(&file, 0, BLOCK);
    put_status(0xff);
    queue
        .raw(
            &chain(&[(buf, 16, false), (data, 4096, true), (status_at, 1, true)]),
            wait,
        )
        .unwrap()
        .unwrap();
    assert_eq!(get_status(), status::OK, "a zero-length write");
    assert_eq!(read_file_at(&file, 0, BLOCK), before);

    // A device-readable buffer after a device-writable one: IOERR.
    put_status(0xff);
    queue
        .raw(
            &chain(&[
                (buf, 16, false),
                (data, 4096, true),
                (buf, 16, false),
                (status_at, 1, true),
            ]),
            wait,
        )
        .unwrap()
        .unwrap();
    assert_eq!(get_status(), status::IOERR);

    // A data buffer outside guest memory: IOERR, status still written.
    ram.memory()
        .write_slice(&header(request_type::IN, 0), GuestAddress(buf))
        .unwrap();
    put_status(0xff);
    queue
        .raw(
            &chain(&[
                (buf, 16, false),
                (ram.size() + (1 << 30), 4096, true),
                (status_at, 1, true),
            ]),
            wait,
        )
        .unwrap()
        .unwrap();
    assert_eq!(get_status(), status::IOERR);

    // A data buffer of 2 GiB running past guest RAM: IOERR, nothing read past it.
    put_status(0xff);
    queue
        .raw(
            &chain(&[
                (buf, 16, false),
                (buf, 0x8000_0000, true),
                (status_at, 1, true),
            ]),
            wait,
        )
        .unwrap()
        .unwrap();
    assert_eq!(get_status(), status::IOERR);

    // A chain longer than 4 GiB in total (illegal, virtio 1.2 2.7.5.2): its end cannot be
    // found, so it is returned with nothing written.
    put_status(0xff);
    let used = queue
        .raw(
            &chain(&[
                (buf, 16, false),
                (buf, u32::MAX, true),
                (status_at, 1, true),
            ]),
            wait,
        )
        .unwrap()
        .expect("an overlong chain is still returned");
    assert_eq!((used.len, get_status()), (0, 0xff));

    // No device-writable byte at all: returned with nothing written.
    let used = queue
        .raw(&chain(&[(buf, 16, false)]), wait)
        .unwrap()
        .expect("a chain without status is still returned");
    assert_eq!(used.len, 0);

    // A chain whose last descriptor loops back to its head: returned, IOERR where it fits.
    let mut looped = chain(&[(buf, 16, false), (status_at, 1, true)]);
    looped[1].flags |= VIRTQ_DESC_F_NEXT;
    looped[1].next = RawNext::ChainPosition(0);
    put_status(0xff);
    let _ = queue.raw(&looped, wait).unwrap();

    // The daemon is alive and well: a normal request still works.
    served.daemon.assert_alive("after malformed chains");
    let read = queue
        .read(16, BLOCK as u32)
        .expect("the queue still works")
        .expect("status OK");
    assert_eq!(read, read_file_at(&file, 16 * 512, BLOCK));
    let _dir = served.finish(device);
}

#[test]
fn two_queues_serve_at_once() {
    let (mut served, file) = Served::raw(&["--queues", "2"]);
    let mut device = served.connect(BlkDeviceConfig {
        queues: 2,
        ..BlkDeviceConfig::default()
    });
    let queues: Vec<BlkQueue> = (0..2).map(|i| device.take_queue(i).unwrap()).collect();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut queue)| {
            std::thread::spawn(move || {
                // Each queue owns its own 2 MiB half of the first 4 MiB.
                let base = (i as u64) * (2 << 20);
                for round in 0..32u64 {
                    let at = base + round * 64 * 1024;
                    let data = pattern((i as u8) * 64 + round as u8, 64 << 10);
                    assert_eq!(queue.write(at / 512, &data).unwrap(), status::OK);
                    assert_eq!(queue.read(at / 512, 64 << 10).unwrap().unwrap(), data);
                }
                assert_eq!(queue.flush().unwrap(), status::OK);
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a queue thread failed");
    }
    let _dir = served.finish(device);
    for i in 0..2u64 {
        for round in [0u64, 31] {
            let at = i * (2 << 20) + round * 64 * 1024;
            assert_eq!(
                read_file_at(&file, at, 64 << 10),
                pattern((i as u8) * 64 + round as u8, 64 << 10)
            );
        }
    }
}

/// Bytes of data the files below `dir` hold on disk (files a running daemon removes while
/// this walks are left out).
fn allocated_below(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            total += allocated_below(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Bytes that do not compress, so that every chunk of an image of them is stored whole.
fn incompressible(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect()
}

/// Builds a block image of 64 KiB chunks at `image` from the file `source`.
fn build_block_image(source: &Path, image: &Path) {
    let built = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["image", "build", "--block", "--chunk-size", "64K", "--out"])
        .arg(image)
        .arg(source)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
}

/// Serves `image`, fetching chunks into `cache` only as they are read, writes going to
/// `overlay`.
fn serve_image_without_readahead(image: &Path, cache: &Path, overlay: &Path) -> Served {
    let (cache_arg, overlay_arg) = (cache.display().to_string(), overlay.display().to_string());
    Served::start(
        tempfile::tempdir().unwrap(),
        image,
        &[
            "--cache-dir",
            &cache_arg,
            "--readahead",
            "0",
            "--overlay",
            &overlay_arg,
        ],
    )
}

/// Ends a served image after the test wrote to it: the writes are in the non-empty `overlay`,
/// and the `source` file the image was built from still holds `content`.
fn finish_with_writes_in_overlay(
    served: Served,
    device: VhostUserBlk,
    overlay: &Path,
    source: &Path,
    content: &[u8],
) {
    let _dir = served.finish(device);
    assert!(fs::metadata(overlay).unwrap().len() > 0);
    assert_eq!(
        fs::read(source).unwrap(),
        content,
        "the source is untouched"
    );
}

#[test]
fn a_lazily_fetched_image_fetches_only_what_is_read_and_writes_go_to_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.img");
    let size = 32usize << 20;
    // Data that does not compress: every chunk is stored whole.
    let content = incompressible(size);
    fs::write(&source, &content).unwrap();
    let image = dir.path().join("image");
    build_block_image(&source, &image);
    let cache = dir.path().join("cache");
    let overlay = dir.path().join("overlay");
    let mut served = serve_image_without_readahead(&image, &cache, &overlay);
    let mut device = served.connect(BlkDeviceConfig::default());
    assert_eq!(device.config().capacity, (size / 512) as u64);
    let mut queue = device.take_queue(0).unwrap();
    let at = 16usize << 20;
    assert_eq!(
        queue.read((at / 512) as u64, 8192).unwrap().unwrap(),
        content[at..at + 8192]
    );
    let fetched = allocated_below(&cache);
    assert!(
        fetched <= 512 << 10,
        "reading 8 KiB of a 32 MiB image put {fetched} bytes in the cache"
    );
    // A write lands in the overlay, and reads back over the image.
    let data = pattern(5, 3 * BLOCK);
    assert_eq!(queue.write(8, &data).unwrap(), status::OK);
    assert_eq!(queue.read(8, data.len() as u32).unwrap().unwrap(), data);
    assert_eq!(queue.flush().unwrap(), status::OK);
    finish_with_writes_in_overlay(served, device, &overlay, &source, &content);
}

/// The mount options of the mount at `mount_point` in `pid`'s mount namespace.
fn mount_options(pid: u32, mount_point: &Path) -> Option<String> {
    let table = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // The last mount listed at a point is the one on top.
    table.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4).map(Path::new) == Some(mount_point)).then(|| fields[5].to_string())
    })
}

/// Asserts that `server` runs in mount, network and pid namespaces other than the test's.
fn assert_in_namespaces_of_its_own(server: u32) {
    for ns in ["mnt", "net", "pid"] {
        assert_ne!(
            fs::read_link(format!("/proc/{server}/ns/{ns}")).unwrap(),
            fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns} namespace"
        );
    }
}

/// The root directory `server` sees, as the test reaches it.
fn sandbox_root(server: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{server}/root"))
}

/// Where the host path `path` would stand in `server`'s root.
fn in_sandbox(server: u32, path: &Path) -> PathBuf {
    sandbox_root(server).join(path.strip_prefix("/").unwrap())
}

/// What a sandboxed server may see of the host, each path at its own path.
struct Confinement<'a> {
    files: &'a [&'a Path],
    dirs: &'a [&'a Path],
    /// Host paths the server must not reach.
    hidden: &'a [&'a Path],
    read_only_mounts: &'a [&'a Path],
    writable_mounts: &'a [&'a Path],
}

/// Asserts that `server` runs in namespaces of its own and sees the host as `confinement`
/// says: its files and directories, none of its hidden paths, its mounts read-only or
/// writable as listed.
fn assert_confined_to(server: u32, confinement: &Confinement) {
    assert_in_namespaces_of_its_own(server);
    for file in confinement.files {
        assert!(
            in_sandbox(server, file).is_file(),
            "{} is a file in the sandbox",
            file.display()
        );
    }
    for dir in confinement.dirs {
        assert!(
            in_sandbox(server, dir).is_dir(),
            "{} is a directory in the sandbox",
            dir.display()
        );
    }
    for hidden in confinement.hidden {
        assert!(
            !in_sandbox(server, hidden).exists(),
            "{} is reachable from the sandbox",
            hidden.display()
        );
    }
    let mounts = confinement
        .read_only_mounts
        .iter()
        .map(|path| (path, false));
    let mounts = mounts.chain(confinement.writable_mounts.iter().map(|path| (path, true)));
    for (path, writable) in mounts {
        let options = mount_options(server, path)
            .unwrap_or_else(|| panic!("{} is not a mount in the sandbox", path.display()));
        let read_only = options.split(',').any(|o| o == "ro");
        assert_eq!(read_only, !writable, "{}: {options}", path.display());
    }
}

#[test]
fn an_image_is_served_from_a_sandbox_holding_only_its_cache_image_and_overlay() {
    if !security_util::root_or_skip(
        "an_image_is_served_from_a_sandbox_holding_only_its_cache_image_and_overlay",
        "reading the server's root and mount table needs root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = fs::canonicalize(dir.path()).unwrap();
    let source = base.join("source.img");
    let size = 16usize << 20;
    let content = incompressible(size);
    fs::write(&source, &content).unwrap();
    let image = base.join("image");
    build_block_image(&source, &image);
    // The cache directory does not exist yet: the daemon makes it before the sandbox.
    let cache = base.join("cache");
    let overlay_dir = base.join("overlays");
    fs::create_dir(&overlay_dir).unwrap();
    let overlay = overlay_dir.join("disk.ovl");
    fs::write(base.join("secret"), b"not for the daemon").unwrap();
    let mut served = serve_image_without_readahead(&image, &cache, &overlay);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let server = security_util::serving_pid(served.daemon.pid(), true);
    // Chunks are fetched into the cache from inside the sandbox, by path.
    for at in [0usize, 5 << 20, size - 8192] {
        assert_eq!(
            queue.read((at / 512) as u64, 8192).unwrap().unwrap(),
            content[at..at + 8192],
            "the image's bytes at {at}"
        );
    }
    assert!(
        allocated_below(&cache) > 0,
        "fetched chunks are in the cache"
    );
    let data = pattern(9, 2 * BLOCK);
    assert_eq!(queue.write(64, &data).unwrap(), status::OK);
    assert_eq!(queue.flush().unwrap(), status::OK);
    assert_eq!(queue.read(64, data.len() as u32).unwrap().unwrap(), data);

    // In namespaces of its own (a local backend: no network either), the root holds the
    // cache, the image and the overlay's directory at their own paths, and nothing else of
    // the host. The image's directory and the root itself are read-only, the cache and the
    // overlay's directory writable.
    assert_confined_to(
        server,
        &Confinement {
            files: &[&image.join("manifest.json"), &overlay],
            dirs: &[&cache],
            hidden: &[
                &base.join("secret"),
                &source,
                Path::new("/etc/passwd"),
                Path::new("/usr"),
            ],
            read_only_mounts: &[&image, Path::new("/")],
            writable_mounts: &[&cache, &overlay_dir],
        },
    );
    let top: Vec<_> = fs::read_dir(sandbox_root(server))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let first = base.components().nth(1).unwrap().as_os_str().to_owned();
    assert_eq!(top, vec![first], "the root holds only the way to the binds");
    // The queue threads are confined as for a file; the engine's own threads, started
    // inside the sandbox, have no administrative capability either, and run under the
    // block engine's filter (every thread has one).
    let threads = security_util::threads_when(server, |threads| {
        let workers = || threads.iter().filter(|t| is_queue_thread(t));
        threads.iter().any(|t| t.name.starts_with("berth-fetch-bg"))
            && workers().count() > 0
            && workers().all(|t| t.seccomp_mode == 2 && t.cap_eff == 0)
    });
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    assert!(
        threads.iter().all(|t| t.cap_eff & CAP_SYS_ADMIN == 0),
        "{threads:?}"
    );
    assert!(
        threads.iter().any(|t| t.name.starts_with("berth-fetch-bg")),
        "the engine's fetch threads run in the sandbox: {threads:?}"
    );
    assert!(
        threads.iter().all(|t| t.seccomp_mode == 2),
        "every thread, the engine's included, runs under a seccomp filter: {threads:?}"
    );
    let workers: Vec<_> = threads.iter().filter(|t| is_queue_thread(t)).collect();
    assert!(!workers.is_empty(), "{threads:?}");
    assert!(
        workers
            .iter()
            .all(|t| t.seccomp_mode == 2 && t.cap_eff == 0),
        "{workers:?}"
    );
    finish_with_writes_in_overlay(served, device, &overlay, &source, &content);
}

#[test]
fn an_image_that_cannot_be_opened_in_the_sandbox_fails_and_leaves_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    fs::create_dir(&image).unwrap();
    // A manifest, so the target is taken for an image, that does not parse.
    fs::write(image.join("manifest.json"), b"{ not json").unwrap();
    let socket = dir.path().join("blk.sock");
    let cache = dir.path().join("cache");
    let mut daemon = Daemon::spawn([
        "block".to_string(),
        "serve-vhost".into(),
        "--socket-path".into(),
        socket.display().to_string(),
        "--cache-dir".into(),
        cache.display().to_string(),
        image.display().to_string(),
    ]);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits");
    assert!(!status.success(), "{}", daemon.stderr());
    assert!(
        daemon.stderr().contains("cannot load the image"),
        "{}",
        daemon.stderr()
    );
    assert!(!socket.exists(), "the socket is removed");
}

/// A volume whose bucket does not answer keeps its open retrying for a minute; SIGTERM
/// meanwhile ends the daemon at once (exit 0, socket removed), not after the open gives up.
#[test]
fn sigterm_while_a_volume_waits_for_its_bucket_ends_the_daemon_at_once() {
    if !frontend_util::testing_berth() {
        eprintln!("SKIP: volumes are berth's own");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let local = dir.path().join("local");
    let mut daemon = Daemon::spawn_with(
        [
            "block".to_string(),
            "serve-vhost".into(),
            "--socket-path".into(),
            socket.display().to_string(),
            "--volume-dir".into(),
            local.display().to_string(),
            "volume:s3://nobody-answers/vol".into(),
        ],
        |command| {
            // Port 1 on loopback: every request is refused, and retried.
            let refusing =
                berth_testkit::S3Settings::new("http://127.0.0.1:1", "nobody-answers", "vol");
            command.env("RUST_LOG", "info").envs(refusing.env());
        },
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.stderr().contains("retrying") {
        daemon.assert_alive("before its bucket was retried");
        assert!(
            std::time::Instant::now() < deadline,
            "no retry within 30 s:\n{}",
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill with a pid of our own child and a valid signal.
    assert_eq!(
        unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still opening 10 s after SIGTERM:\n{}", daemon.stderr()));
    let log = daemon.stderr();
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        log.contains("Received SIGTERM while opening the target"),
        "{log}"
    );
    assert!(!socket.exists(), "the socket is removed");
}

#[test]
fn flushes_taken_off_the_ring_together_are_answered_by_one_sync_after_the_writes() {
    let metrics_dir = tempfile::tempdir().unwrap();
    let metrics_path = metrics_dir.path().join("blk.prom");
    let metrics_arg = metrics_path.display().to_string();
    let (mut served, file) = Served::raw(&["--metrics-file", &metrics_arg]);
    let device_label = format!("device=\"{}\"", file.display());
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    // A write completed before the batch: every FLUSH of the batch covers it.
    let first = pattern(20, BLOCK);
    assert_eq!(queue.write(0, &first).unwrap(), status::OK);
    // Let the queue thread go idle, so that it finds the whole batch at one kick.
    std::thread::sleep(Duration::from_millis(300));

    // Writes with FLUSHes among them and behind them, published at once.
    let kinds = [
        Some(1u64),
        None,
        Some(2),
        None,
        None,
        Some(3),
        None,
        Some(4),
        None,
        None,
        None,
        None,
    ];
    let flushes = kinds.iter().filter(|k| k.is_none()).count();
    let ram = queue.ram().clone();
    let mem = ram.memory();
    let mut heads = Vec::new();
    let mut statuses = Vec::new();
    for kind in kinds {
        let header_at = queue.allocate_raw_buffer(16).unwrap();
        let status_at = queue.allocate_raw_buffer(1).unwrap();
        mem.write_obj(0xffu8, status_at).unwrap();
        let parts = match kind {
            Some(block) => {
                mem.write_slice(
                    &header(request_type::OUT, block * SECTORS_PER_BLOCK),
                    header_at,
                )
                .unwrap();
                let data_at = queue.allocate_raw_buffer(BLOCK as u32).unwrap();
                mem.write_slice(&pattern(20 + block as u8, BLOCK), data_at)
                    .unwrap();
                vec![
                    (header_at.0, 16, false),
                    (data_at.0, BLOCK as u32, false),
                    (status_at.0, 1, true),
                ]
            }
            None => {
                mem.write_slice(&header(request_type::FLUSH, 0), header_at)
                    .unwrap();
                vec![(header_at.0, 16, false), (status_at.0, 1, true)]
            }
        };
        heads.push(queue.virtqueue().add_raw_chain(&chain(&parts)).unwrap());
        statuses.push(status_at);
    }
    queue.virtqueue().notify().unwrap();
    let mut returned = Vec::new();
    for _ in &kinds {
        let used = queue
            .virtqueue()
            .wait_used(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n--- daemon stderr ---\n{}", served.daemon.stderr()));
        returned.push(used.head);
    }
    returned.sort_unstable();
    heads.sort_unstable();
    assert_eq!(returned, heads, "every chain comes back once");
    for (kind, at) in kinds.iter().zip(&statuses) {
        let status: u8 = mem.read_obj(*at).unwrap();
        assert_eq!(status, status::OK, "{kind:?}");
    }
    for block in 1..=4u64 {
        assert_eq!(
            queue
                .read(block * SECTORS_PER_BLOCK, BLOCK as u32)
                .unwrap()
                .unwrap(),
            pattern(20 + block as u8, BLOCK)
        );
    }

    let _dir = served.finish(device);
    let text = fs::read_to_string(&metrics_path).unwrap();
    let flush_requests = metric(
        &text,
        &format!("berth_block_requests_total{{{device_label},op=\"flush\"}}"),
    );
    assert_eq!(flush_requests, Some(flushes as f64), "{text}");
    let syncs = metric(
        &text,
        &format!("berth_block_flush_syncs_total{{{device_label}}}"),
    )
    .unwrap_or_else(|| panic!("no sync count in:\n{text}"));
    // One flush answers them all (a second if the thread woke before the batch was whole).
    assert!(
        (1.0..=2.0).contains(&syncs),
        "{flushes} FLUSHes took {syncs} flushes of the file"
    );
    assert_eq!(read_file_at(&file, 0, BLOCK), first);
    for block in 1..=4u64 {
        assert_eq!(
            read_file_at(&file, block * BLOCK as u64, BLOCK),
            pattern(20 + block as u8, BLOCK)
        );
    }
}

#[test]
fn print_capabilities_names_a_blk_backend() {
    let output = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["block", "serve-vhost", "--print-capabilities"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["type"], "blk");
}

#[test]
fn the_daemon_serves_from_a_sandbox_with_confined_threads() {
    if !security_util::root_or_skip(
        "the_daemon_serves_from_a_sandbox_with_confined_threads",
        "the capability checks need root",
    ) {
        return;
    }
    let (mut served, file) = Served::raw(&["--queues", "2"]);
    let mut device = served.connect(BlkDeviceConfig {
        queues: 2,
        ..BlkDeviceConfig::default()
    });
    let mut queue = device.take_queue(0).unwrap();
    assert_eq!(queue.flush().unwrap(), status::OK);
    // The namespace sandbox forks: its child serves, in mount and network namespaces of
    // its own, seeing the file's directory as its root.
    let server = security_util::serving_pid(served.daemon.pid(), true);
    assert_in_namespaces_of_its_own(server);
    let root_listing: Vec<_> = fs::read_dir(format!("/proc/{server}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        root_listing.contains(&file.file_name().unwrap().to_owned()),
        "the root is the file's directory: {root_listing:?}"
    );
    // Every thread has a seccomp filter; the queue threads have no capabilities at all.
    let threads = security_util::threads_when(server, |threads| {
        let workers = || threads.iter().filter(|t| is_queue_thread(t));
        threads.iter().all(|t| t.seccomp_mode == 2)
            && workers().count() >= 2
            && workers().all(|t| t.cap_eff == 0)
    });
    assert!(threads.iter().all(|t| t.seccomp_mode == 2), "{threads:?}");
    let workers: Vec<_> = threads.iter().filter(|t| is_queue_thread(t)).collect();
    assert!(workers.len() >= 2, "two queue threads: {threads:?}");
    assert!(workers.iter().all(|t| t.cap_eff == 0), "{workers:?}");
    let _dir = served.finish(device);
}

/// A vhost-user queue thread (or the backend's own vhost thread).
fn is_queue_thread(thread: &security_util::ThreadInfo) -> bool {
    thread.name.starts_with("vring_worker") || thread.name.starts_with("vhost")
}

#[test]
fn an_inherited_listening_socket_serves_as_fd_3() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    fs::write(&file, pattern(3, 1 << 20)).unwrap();
    let socket = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let args = [
        "block".to_string(),
        "serve-vhost".into(),
        "--fd=3".into(),
        file.display().to_string(),
    ];
    let mut daemon = Daemon::spawn_with(&args, |command| {
        // SAFETY: dup2 and fcntl are async-signal-safe; they only rearrange descriptors of
        // the child.
        unsafe {
            command.pre_exec(move || {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                let rc = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    // The listener stays open here too: a daemon that died would leave the connection
    // waiting in its backlog, so check it is serving first.
    std::thread::sleep(Duration::from_millis(300));
    daemon.assert_alive("with an inherited socket");
    let mut device =
        VhostUserBlk::connect(&socket, BlkDeviceConfig::default(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.stderr()));
    let mut queue = device.take_queue(0).unwrap();
    assert_eq!(
        queue.read(8, BLOCK as u32).unwrap().unwrap(),
        pattern(3, 1 << 20)[4096..8192]
    );
    device.disconnect();
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{}", daemon.stderr());
    drop(listener);
}

/// `berth volume ARGS`, which must succeed; its standard output.
fn berth_volume(args: &[&str]) -> String {
    let (berth, _) = frontend_util::daemon_binary();
    let out = Command::new(berth)
        .arg("volume")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berth volume {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_volume_is_served_keeps_acknowledged_writes_across_kill_9_and_reopens_from_its_bucket() {
    if !frontend_util::testing_berth() {
        eprintln!("SKIP: volumes are berth's own");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    fs::create_dir(&bucket).unwrap();
    let location = format!("file://{}/vol", bucket.display());
    berth_volume(&["create", &location, "--size", "8M"]);
    let spec = PathBuf::from(format!("volume:{location}"));
    let volume_dir = dir.path().join("local").display().to_string();
    let extra = ["--volume-dir", volume_dir.as_str()];
    let outside = dir.path().join("outside");
    fs::write(&outside, b"not for the daemon").unwrap();

    let mut served = Served::start(dir, &spec, &extra);
    let mut device = served.connect(BlkDeviceConfig::default());
    if security_util::is_root() {
        // Served from a sandbox holding only its local state and its bucket's directory,
        // at their own paths, in namespaces of its own (a file:// bucket: no network).
        let server = security_util::serving_pid(served.daemon.pid(), true);
        let local_state = Path::new(&volume_dir);
        assert_confined_to(
            server,
            &Confinement {
                files: &[],
                dirs: &[&bucket.join("vol"), local_state],
                hidden: &[&outside, Path::new("/etc/passwd")],
                read_only_mounts: &[],
                writable_mounts: &[&bucket, local_state],
            },
        );
        // The volume's threads (log, uploader, lease) started under the block engine's
        // filter; every thread has one.
        let threads = security_util::threads_when(server, |threads| {
            threads.iter().any(|t| t.name.starts_with("berth-vol-"))
                && threads.iter().any(is_queue_thread)
        });
        assert!(
            threads.iter().all(|t| t.seccomp_mode == 2),
            "every thread, the volume's included, runs under a seccomp filter: {threads:?}"
        );
    }
    let config = *device.config();
    assert_eq!(config.capacity, (8u64 << 20) / 512);
    assert_eq!(
        device.offered_features() & features::RO,
        0,
        "a volume is writable"
    );
    let mut queue = device.take_queue(0).unwrap();
    // A new volume reads as zeros.
    let zeros = queue.read(0, 64 << 10).unwrap().unwrap();
    assert!(zeros.iter().all(|&b| b == 0));
    let flushed = pattern(11, 256 << 10);
    assert_eq!(queue.write((1 << 20) / 512, &flushed).unwrap(), status::OK);
    assert_eq!(queue.flush().unwrap(), status::OK);
    // Acknowledged but not flushed: in the write-ahead log, which a killed process leaves.
    let unflushed = pattern(12, 128 << 10);
    assert_eq!(
        queue.write((5 << 20) / 512, &unflushed).unwrap(),
        status::OK
    );
    // WRITE_ZEROES over part of the flushed range.
    assert_eq!(
        queue
            .write_zeroes(&[((1 << 20) / 512 + 16, 16, 0)])
            .unwrap(),
        status::OK
    );
    let mut expected = flushed.clone();
    expected[16 * 512..32 * 512].fill(0);
    assert_eq!(
        queue.read((1 << 20) / 512, 256 << 10).unwrap().unwrap(),
        expected
    );

    // kill -9, then a new process on the same local state: the log is replayed.
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    assert_eq!(
        unsafe { libc::kill(served.daemon.pid() as libc::pid_t, libc::SIGKILL) },
        0
    );
    served.daemon.wait_exit(Duration::from_secs(10)).unwrap();
    drop(device);
    let Served { dir, socket, .. } = served;
    let _ = fs::remove_file(&socket);
    let mut served = Served::start(dir, &spec, &extra);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    assert_eq!(
        queue.read((1 << 20) / 512, 256 << 10).unwrap().unwrap(),
        expected,
        "the flushed write and the zeroed range after kill -9"
    );
    assert_eq!(
        queue.read((5 << 20) / 512, 128 << 10).unwrap().unwrap(),
        unflushed,
        "the acknowledged, unflushed write after kill -9"
    );
    // A clean exit uploads what is left and gives the lease back.
    let dir = served.finish(device);

    // The local disk lost: a fresh local directory reopens the volume from the bucket alone.
    let fresh_dir = dir.path().join("fresh").display().to_string();
    let mut served = Served::start(dir, &spec, &["--volume-dir", fresh_dir.as_str()]);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    assert_eq!(
        queue.read((1 << 20) / 512, 256 << 10).unwrap().unwrap(),
        expected
    );
    assert_eq!(
        queue.read((5 << 20) / 512, 128 << 10).unwrap().unwrap(),
        unflushed
    );
    let _dir = served.finish(device);
    let info = berth_volume(&["info", &location, "--json"]);
    assert!(info.contains("\"size\""), "{info}");
}

#[test]
fn a_volume_cannot_be_served_read_only_or_with_an_overlay() {
    if !frontend_util::testing_berth() {
        eprintln!("SKIP: volumes are berth's own");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let location = format!("file://{}/vol", dir.path().display());
    let (berth, _) = frontend_util::daemon_binary();
    let out = Command::new(berth)
        .args(["block", "serve-vhost", "--socket-path"])
        .arg(dir.path().join("s.sock"))
        .arg("--readonly")
        .arg(format!("volume:{location}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is a volume: it is served writable"),
        "{stderr}"
    );
}

/// The value of the sample `name{labels}` in a Prometheus text file, if present.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[test]
fn the_metrics_file_counts_requests_bytes_errors_and_latency_from_inside_the_sandbox() {
    // Kept apart from the exported file's directory, which the sandbox makes the root.
    let metrics_dir = tempfile::tempdir().unwrap();
    let metrics_path = metrics_dir.path().join("blk.prom");
    let metrics_arg = metrics_path.display().to_string();
    let (mut served, file) =
        Served::raw(&["--metrics-file", &metrics_arg, "--metrics-interval", "1"]);
    let device_label = format!("device=\"{}\"", file.display());
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();

    for i in 0..3u64 {
        assert!(queue.read(i * SECTORS_PER_BLOCK, 64 << 10).unwrap().is_ok());
    }
    assert_eq!(queue.write(0, &pattern(3, 128 << 10)).unwrap(), status::OK);
    assert_eq!(queue.flush().unwrap(), status::OK);
    assert_eq!(queue.discard(&[(4096, 16, 0)]).unwrap(), status::OK);
    // One read past the end: an error, counted as one.
    let past_end = FILE_SIZE / 512;
    let reply = queue
        .request(request_type::IN, past_end, &[], 4096)
        .unwrap();
    assert_eq!(reply.status, status::IOERR);
    // GET_ID is no block operation: not counted.
    assert_eq!(
        queue
            .request(request_type::GET_ID, 0, &[], 20)
            .unwrap()
            .status,
        status::OK
    );

    // Rewritten while the device serves (every second).
    let reads = format!("berth_block_requests_total{{{device_label},op=\"read\"}}");
    let mut seen = String::new();
    for _ in 0..100 {
        seen = fs::read_to_string(&metrics_path).unwrap_or_default();
        if metric(&seen, &reads) == Some(4.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(&seen, &reads),
        Some(4.0),
        "the metrics file while serving:\n{seen}\n--- daemon stderr ---\n{}",
        served.daemon.stderr()
    );

    let _dir = served.finish(device);
    let text = fs::read_to_string(&metrics_path).unwrap();
    let sample = |name: &str, op: &str| {
        metric(&text, &format!("{name}{{{device_label},op=\"{op}\"}}"))
            .unwrap_or_else(|| panic!("no {name} for {op} in:\n{text}"))
    };
    assert_eq!(sample("berth_block_requests_total", "read"), 4.0);
    assert_eq!(
        sample("berth_block_bytes_total", "read"),
        (3 * (64 << 10)) as f64
    );
    assert_eq!(sample("berth_block_errors_total", "read"), 1.0);
    assert_eq!(sample("berth_block_requests_total", "write"), 1.0);
    assert_eq!(
        sample("berth_block_bytes_total", "write"),
        (128 << 10) as f64
    );
    assert_eq!(sample("berth_block_requests_total", "flush"), 1.0);
    assert_eq!(sample("berth_block_requests_total", "discard"), 1.0);
    assert_eq!(
        sample("berth_block_bytes_total", "discard"),
        (16 * 512) as f64
    );
    // Seven block requests timed; GET_ID is not one.
    let count = metric(
        &text,
        &format!("berth_block_request_seconds_count{{{device_label}}}"),
    );
    assert_eq!(count, Some(7.0), "{text}");
    assert!(
        text.contains(&format!(
            "berth_block_info{{{device_label},transport=\"vhost-user\""
        )),
        "the transport is named:\n{text}"
    );
    assert!(
        !metrics_dir.path().join("blk.prom.tmp").exists(),
        "no temporary file is left"
    );
}

/// One request on `queue`, made available without a kick: its header (and for a WRITE its
/// data) in guest memory, a device-writable tail of `room` data bytes and the status
/// byte. Returns the chain's head, and where its data and status land.
fn add_request(
    queue: &mut BlkQueue,
    kind: u32,
    sector: u64,
    data: Option<&[u8]>,
    room: u32,
) -> (u16, Option<GuestAddress>, GuestAddress) {
    let ram = queue.ram().clone();
    let mem = ram.memory();
    let header_at = queue.allocate_raw_buffer(16).unwrap();
    mem.write_slice(&header(kind, sector), header_at).unwrap();
    let mut parts = vec![(header_at.0, 16, false)];
    if let Some(data) = data {
        let data_at = queue.allocate_raw_buffer(data.len() as u32).unwrap();
        mem.write_slice(data, data_at).unwrap();
        parts.push((data_at.0, data.len() as u32, false));
    }
    let room_at = (room > 0).then(|| queue.allocate_raw_buffer(room).unwrap());
    if let Some(at) = room_at {
        parts.push((at.0, room, true));
    }
    let status_at = queue.allocate_raw_buffer(1).unwrap();
    mem.write_obj(0xffu8, status_at).unwrap();
    parts.push((status_at.0, 1, true));
    let head = queue.virtqueue().add_raw_chain(&chain(&parts)).unwrap();
    (head, room_at, status_at)
}

#[test]
fn a_read_waiting_for_its_bucket_or_a_flush_waiting_for_an_upload_holds_up_no_other_request() {
    if !frontend_util::testing_berth() {
        eprintln!("SKIP: volumes are berth's own");
        return;
    }
    let moto = match berth_testkit::Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            frontend_util::skip(&reason);
            return;
        }
    };
    moto.create_bucket("berth");
    let proxy = berth_testkit::CountingProxy::start(moto.port);
    let s3 = berth_testkit::S3Settings::new(&proxy.endpoint(), "berth", "vol");
    let location = "s3://berth/vol";
    let (berth, _) = frontend_util::daemon_binary();
    let created = Command::new(berth)
        .args(["volume", "create", location, "--size", "8M"])
        .envs(s3.env())
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let serve = |local: &str, dir: tempfile::TempDir| {
        let local = dir.path().join(local).display().to_string();
        let socket = dir.path().join("blk.sock");
        let mut daemon = Daemon::spawn_with(
            [
                "block".to_string(),
                "serve-vhost".into(),
                "--socket-path".into(),
                socket.display().to_string(),
                "--volume-dir".into(),
                local,
                "--durability".into(),
                "object".into(),
                format!("volume:{location}"),
            ],
            |command| {
                command.envs(s3.env());
            },
        );
        daemon.wait_for_socket(&socket);
        Served {
            dir,
            daemon,
            socket,
        }
    };

    // Block 3 reaches the bucket (an object-durability FLUSH waits for the upload).
    let mut served = serve("first", dir);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let old = pattern(40, BLOCK);
    assert_eq!(
        queue.write(3 * SECTORS_PER_BLOCK, &old).unwrap(),
        status::OK
    );
    assert_eq!(queue.flush().unwrap(), status::OK);
    let dir = served.finish(device);

    // Served again from empty local state: block 3 is only in the bucket, and the bucket
    // now answers pack reads and writes after a long delay.
    let mut served = serve("second", dir);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let delay = berth_testkit::FaultAction::Delay(Duration::from_secs(4));
    proxy.add_fault(berth_testkit::FaultRule::on("GET", "packs/", delay.clone()));
    proxy.add_fault(berth_testkit::FaultRule::on("PUT", "packs/", delay));
    let new = pattern(41, BLOCK);
    let (read, read_at, read_status) = add_request(
        &mut queue,
        request_type::IN,
        3 * SECTORS_PER_BLOCK,
        None,
        BLOCK as u32,
    );
    let (write, _, write_status) = add_request(
        &mut queue,
        request_type::OUT,
        5 * SECTORS_PER_BLOCK,
        Some(&new),
        0,
    );
    let (flush, _, flush_status) = add_request(&mut queue, request_type::FLUSH, 0, None, 0);
    queue.virtqueue().notify().unwrap();
    let wait = |queue: &mut BlkQueue, what: &str| {
        queue
            .virtqueue()
            .wait_used(Duration::from_secs(30))
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: {e}\n--- daemon stderr ---\n{}",
                    served.daemon.stderr()
                )
            })
            .head
    };
    // The WRITE behind the READ is answered while the READ waits for its pack.
    assert_eq!(wait(&mut queue, "the write"), write);
    // The FLUSH now waits for the upload of block 5; a request made after it is answered
    // meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    let (get_id, _, get_id_status) = add_request(&mut queue, request_type::GET_ID, 0, None, 20);
    queue.virtqueue().notify().unwrap();
    assert_eq!(
        wait(&mut queue, "GET_ID"),
        get_id,
        "GET_ID waited behind the READ or the FLUSH"
    );
    let mut rest = [wait(&mut queue, "the read"), wait(&mut queue, "the flush")];
    rest.sort_unstable();
    let mut expected = [read, flush];
    expected.sort_unstable();
    assert_eq!(rest, expected, "the READ and the FLUSH come back once each");
    let ram = queue.ram().clone();
    let mem = ram.memory();
    for (what, at) in [
        ("read", read_status),
        ("write", write_status),
        ("flush", flush_status),
        ("get_id", get_id_status),
    ] {
        let status: u8 = mem.read_obj(at).unwrap();
        assert_eq!(status, status::OK, "{what}");
    }
    let mut got = vec![0u8; BLOCK];
    mem.read_slice(&mut got, read_at.unwrap()).unwrap();
    assert_eq!(got, old, "the READ got block 3 from the bucket");
    // The delayed requests were really made: the pack read and the upload of block 5.
    let seen = proxy.requests();
    assert!(
        seen.iter()
            .any(|r| r.method == "GET" && r.path.contains("packs/")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.method == "PUT" && r.path.contains("packs/")),
        "{seen:?}"
    );
    proxy.clear_faults();
    assert_eq!(
        queue
            .read(5 * SECTORS_PER_BLOCK, BLOCK as u32)
            .unwrap()
            .unwrap(),
        new
    );
    let _dir = served.finish(device);
}

/// The first `size` bytes of the device in 1 MiB reads; a failed read panics with the
/// daemon's log.
fn read_whole(queue: &mut BlkQueue, size: u64, daemon: &mut Daemon) -> Vec<u8> {
    let mut got = Vec::with_capacity(size as usize);
    for at in (0..size).step_by(1 << 20) {
        match queue.read(at / 512, 1 << 20).unwrap() {
            Ok(data) => got.extend(data),
            Err(status) => panic!(
                "the read at {at} failed with status {status}\n{}",
                daemon.stderr()
            ),
        }
    }
    got
}

/// The local disk lost: serves the volume `spec` again from an empty local directory and
/// answers what its first `size` bytes read (the bucket alone has them).
fn read_from_bucket_alone(dir: tempfile::TempDir, spec: &Path, size: u64) -> Vec<u8> {
    let fresh = dir.path().join("fresh").display().to_string();
    let mut served = Served::start(dir, spec, &["--volume-dir", fresh.as_str()]);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let got = read_whole(&mut queue, size, &mut served.daemon);
    drop(queue);
    let _dir = served.finish(device);
    got
}

/// Soak: several volumes served at once, each by its own process, each driven by a writer
/// doing random writes (4 KiB to 1 MiB) with frequent FLUSHes and reading back against a
/// model, for `BERTH_VOLUME_SOAK_SECONDS` (default 10). Each process stays within its
/// budgets all along: anonymous memory within `--upload-memory` plus a fixed allowance,
/// descriptors bounded, its local directory within the cache, `--max-dirty` and two log
/// segments. At the end every volume reads back whole as the model says, then again from
/// its bucket alone.
#[test]
fn volumes_under_a_write_soak_keep_every_write_within_memory_descriptor_and_disk_budgets() {
    if !frontend_util::testing_berth() {
        eprintln!("SKIP: volumes are berth's own");
        return;
    }
    const DEVICES: usize = 3;
    const SIZE: u64 = 32 << 20;
    const UPLOAD_MEMORY_MIB: u64 = 24;
    const MAX_DIRTY_MIB: u64 = 48;
    // Anonymous memory allowed beyond the upload budget: the runtime, the queue's reply
    // buffers, the extent maps and the log's checksum buffer.
    const ALLOWANCE_MIB: u64 = 40;
    const FD_BUDGET: usize = 64;
    let seconds = berth_testkit::soak_seconds(10);
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let upload_memory = format!("{UPLOAD_MEMORY_MIB}M");
    let max_dirty = format!("{MAX_DIRTY_MIB}M");

    let writers: Vec<_> = (0..DEVICES)
        .map(|device_index| {
            let (upload_memory, max_dirty) = (upload_memory.clone(), max_dirty.clone());
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let bucket = dir.path().join("bucket");
                fs::create_dir(&bucket).unwrap();
                let location = format!("file://{}/vol", bucket.display());
                berth_volume(&["create", &location, "--size", "32M"]);
                let spec = PathBuf::from(format!("volume:{location}"));
                let local = dir.path().join("local");
                let local_arg = local.display().to_string();
                // As deployed (sandbox and seccomp filters) where the test may set that up.
                let root = security_util::is_root();
                let extra = [
                    "--volume-dir",
                    local_arg.as_str(),
                    "--sandbox",
                    if root { "namespace" } else { "none" },
                    "--upload-interval",
                    "1",
                    "--upload-memory",
                    upload_memory.as_str(),
                    "--max-dirty",
                    max_dirty.as_str(),
                    // Slower than the writers: the backlog reaches the dirty limit and
                    // the uploader works at its memory budget.
                    "--upload-rate",
                    "24M",
                ];
                let mut served = Served::start(dir, &spec, &extra);
                let mut device = served.connect(BlkDeviceConfig::default());
                let pid = security_util::serving_pid(served.daemon.pid(), root);
                let mut queue = device.take_queue(0).unwrap();
                let mut model = vec![0u8; SIZE as usize];
                let mut state = 0x9e37_79b9_u64 + device_index as u64;
                let mut next = || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                let (mut writes, mut flushes, mut rss_peak_kib, mut fd_peak) = (0u64, 0u64, 0, 0);
                let mut disk_peak = 0u64;
                while std::time::Instant::now() < deadline {
                    let len = [4 << 10, 64 << 10, 256 << 10, 1 << 20][(next() % 4) as usize];
                    let offset = (next() % ((SIZE - len) / 4096)) * 4096;
                    // Incompressible: the bytes stored are the bytes written.
                    let data = berth_testkit::pseudo_random(
                        (writes << 8) | device_index as u64,
                        len as usize,
                    );
                    assert_eq!(queue.write(offset / 512, &data).unwrap(), status::OK);
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                    writes += 1;
                    if writes % 8 == 0 {
                        assert_eq!(queue.flush().unwrap(), status::OK);
                        flushes += 1;
                    }
                    if writes % 4 == 0 {
                        // A range written earlier (or never): the latest acknowledged bytes.
                        let at = (next() % ((SIZE - (256 << 10)) / 4096)) * 4096;
                        let got = queue.read(at / 512, 256 << 10).unwrap().unwrap();
                        assert!(
                            got == model[at as usize..at as usize + (256 << 10)],
                            "device {device_index}: 256 KiB at {at} after {writes} writes read back wrong"
                        );
                    }
                    if writes % 16 == 0 {
                        rss_peak_kib = rss_peak_kib.max(security_util::vm_kib(pid, "RssAnon:"));
                        fd_peak = fd_peak.max(security_util::open_fds(pid));
                        disk_peak = disk_peak.max(allocated_below(&local));
                    }
                }
                assert_eq!(queue.flush().unwrap(), status::OK);
                assert!(
                    read_whole(&mut queue, SIZE, &mut served.daemon) == model,
                    "device {device_index}: the volume reads back as the model says"
                );
                let dir = served.finish(device);
                assert!(
                    read_from_bucket_alone(dir, &spec, SIZE) == model,
                    "device {device_index}: the volume reads back from its bucket alone"
                );
                (writes, flushes, rss_peak_kib, fd_peak, disk_peak)
            })
        })
        .collect();
    for (device_index, writer) in writers.into_iter().enumerate() {
        let (writes, flushes, rss_peak_kib, fd_peak, disk_peak) = writer.join().unwrap();
        eprintln!(
            "soak device {device_index}: {writes} writes, {flushes} flushes, peak {} MiB anonymous memory, {fd_peak} descriptors, {} MiB on local disk",
            rss_peak_kib / 1024,
            disk_peak >> 20
        );
        assert!(writes > 16, "device {device_index} wrote ({writes} writes)");
        assert!(
            rss_peak_kib <= (UPLOAD_MEMORY_MIB + ALLOWANCE_MIB) << 10,
            "device {device_index}: {rss_peak_kib} KiB of anonymous memory, over the {} MiB budget",
            UPLOAD_MEMORY_MIB + ALLOWANCE_MIB
        );
        assert!(
            fd_peak <= FD_BUDGET,
            "device {device_index}: {fd_peak} descriptors open, over the {FD_BUDGET} budget"
        );
        // The cache file (the volume's size at most), the dirty limit, two log segments
        // of slack (32 MiB each) and the small metadata files.
        let disk_budget = SIZE + (MAX_DIRTY_MIB << 20) + (64 << 20) + (4 << 20);
        assert!(
            disk_peak <= disk_budget,
            "device {device_index}: {disk_peak} bytes on local disk, over the {disk_budget} budget"
        );
    }
}

/// A served volume whose local directory is a tmpfs smaller than the volume (root only): as
/// deployed, in its sandbox under its seccomp filters, it keeps serving when the disk
/// fills. Data the disk has no room for stays out of the cache, a write the log has no room
/// for waits while cached blocks are evicted (none fails); every acknowledged write reads
/// back, and again from the bucket alone after a clean exit.
#[test]
fn a_served_volume_on_a_full_local_disk_keeps_serving_and_loses_nothing() {
    if !frontend_util::testing_berth() {
        eprintln!("SKIP: volumes are berth's own");
        return;
    }
    if !security_util::root_or_skip(
        "a_served_volume_on_a_full_local_disk_keeps_serving_and_loses_nothing",
        "mounting a small tmpfs needs root",
    ) {
        return;
    }
    const SIZE: u64 = 32 << 20;
    const WRITE: usize = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    fs::create_dir(&bucket).unwrap();
    let location = format!("file://{}/vol", bucket.display());
    berth_volume(&["create", &location, "--size", "32M"]);
    let small = dir.path().join("small");
    fs::create_dir(&small).unwrap();
    let _tmpfs = TmpfsMount::new(&small, Some("20m")).expect("mount a 20 MiB tmpfs");
    let spec = PathBuf::from(format!("volume:{location}"));
    let local = small.join("local").display().to_string();
    let extra = [
        "--volume-dir",
        local.as_str(),
        "--upload-interval",
        "1",
        "--max-dirty",
        "8M",
    ];
    let mut served = Served::start(dir, &spec, &extra);
    let mut device = served.connect(BlkDeviceConfig::default());
    let mut queue = device.take_queue(0).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut state = 0x5eed_f00d_u64;
    let mut refused = 0u32;
    // Three times the volume through a disk of less than its size.
    for step in 0..(3 * SIZE as usize / WRITE) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % (SIZE / WRITE as u64)) * WRITE as u64;
        let data = berth_testkit::pseudo_random(step as u64 + 1, WRITE);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match queue.write(offset / 512, &data).unwrap() {
                status::OK => break,
                other => {
                    assert_eq!(
                        other,
                        status::IOERR,
                        "step {step}: a refused write is IOERR"
                    );
                    refused += 1;
                    assert!(
                        std::time::Instant::now() < deadline,
                        "step {step}: writes kept failing on the full disk\n{}",
                        served.daemon.stderr()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        model[offset as usize..offset as usize + WRITE].copy_from_slice(&data);
        if step % 16 == 0 {
            assert_eq!(queue.flush().unwrap(), status::OK, "step {step}: FLUSH");
        }
    }
    served
        .daemon
        .assert_alive("after writing through a full local disk");
    assert!(
        read_whole(&mut queue, SIZE, &mut served.daemon) == model,
        "every acknowledged write reads back with the local disk full"
    );
    let stderr = served.daemon.stderr();
    eprintln!("full local disk: {refused} writes refused and retried");
    assert!(
        stderr.contains("The local disk is full"),
        "the 20 MiB disk filled (a 32 MiB cache and the log do not fit):\n{stderr}"
    );
    assert_eq!(
        refused, 0,
        "a write waits for room (eviction, retired log segments) rather than fail"
    );
    assert!(
        stderr.contains("is smaller than the write-ahead log may grow"),
        "a 20 MiB disk under an 8 MiB dirty limit and 32 MiB segments is pointed out at open:\n{stderr}"
    );
    let dir = served.finish(device);
    assert!(
        read_from_bucket_alone(dir, &spec, SIZE) == model,
        "every acknowledged write is in the bucket"
    );
}
