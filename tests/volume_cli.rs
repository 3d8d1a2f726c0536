//! `berth volume` against a real S3-compatible server (moto) on loopback, behind the
//! counting proxy: create (empty and from an image), info (text and JSON), snapshot, clone
//! (sharing packs: no pack is copied), gc, compact, the lease and its break procedure, and the
//! errors a user meets. Then the volume as a block target in a `berth` process killed with
//! SIGKILL mid-stream: every write acknowledged by a FLUSH is there after reopening, with
//! `--durability local` (from the local log) and `object` (from the bucket alone).

#[path = "common/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_blockdev::target::read_at;
use berth_cache::{BlobBackend, ObjectStoreBackend, S3Config};
use berth_testkit::{pseudo_random, CountingProxy, Moto};
use berth_volume::{Location, Store, Volume, VolumeOptions};
use serde_json::Value;

/// The test server, its bucket `berth`, and the proxy every command goes through.
struct Bucket {
    // Dropped after the proxy (fields drop in order): the proxy forwards to it.
    proxy: CountingProxy,
    moto: Moto,
}

fn start_bucket() -> Option<Bucket> {
    let moto = match Moto::start(None) {
        Ok(moto) => moto,
        Err(reason) => {
            skip::skip(&reason);
            return None;
        }
    };
    moto.create_bucket("berth");
    let proxy = CountingProxy::start(moto.port);
    Some(Bucket { proxy, moto })
}

impl Bucket {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.proxy.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ]
    }

    /// The whole bucket, straight to the server (for checks the commands do not make).
    fn backend(&self) -> Arc<dyn BlobBackend> {
        Arc::new(
            ObjectStoreBackend::s3(&S3Config {
                bucket: "berth".into(),
                prefix: String::new(),
                endpoint: Some(self.moto.endpoint()),
                region: Some("us-east-1".into()),
                access_key_id: Some("testing".into()),
                secret_access_key: Some("testing".into()),
                allow_http: true,
            })
            .unwrap(),
        )
    }

    fn objects(&self, prefix: &str) -> Vec<String> {
        self.backend()
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
        command
            .arg("volume")
            .args(args)
            .args(["--log-level", "warn"])
            .envs(self.env())
            .env_remove("RUST_LOG");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "berth volume {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "berth volume {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn info(&self, location: &str) -> Value {
        serde_json::from_str(&self.ok(&["info", location, "--json"])).unwrap()
    }

    /// Opens a volume in this process, on the server directly, with local state in
    /// `cache_dir`.
    fn open(&self, location: &str, cache_dir: &Path) -> Volume {
        let location = Location::parse(location).unwrap();
        let store = Store::with_backend(&location, self.backend());
        let options = VolumeOptions {
            cache_dir: cache_dir.to_path_buf(),
            gc_interval: None,
            gc_after_released_bytes: None,
            open_timeout: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            ..VolumeOptions::default()
        };
        Volume::open_with_store(store, options).unwrap().0
    }
}

#[test]
fn volume_commands_create_snapshot_clone_gc_and_explain_their_errors() {
    let Some(bucket) = start_bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // An image with data in [1 MiB, 4 MiB) and zeros around it.
    let image = dir.path().join("disk.img");
    let data = pseudo_random(5, 3 << 20);
    let mut bytes = vec![0u8; 8 << 20];
    bytes[1 << 20..4 << 20].copy_from_slice(&data);
    std::fs::write(&image, &bytes).unwrap();

    let source = "s3://berth/vols/source";
    let created = bucket.ok(&[
        "create",
        source,
        "--size",
        "64M",
        "--from",
        image.to_str().unwrap(),
    ]);
    assert!(created.contains("Created volume"), "{created}");
    let err = bucket.fails(&["create", source, "--size", "64M"]);
    assert!(err.contains("already exists"), "{err}");

    let info = bucket.info(source);
    assert_eq!(info["config"]["size"], 64 << 20);
    assert_eq!(info["config"]["block_size"], 4096);
    assert_eq!(info["manifest_version"], 1);
    assert_eq!(
        info["mapped_bytes"],
        3 << 20,
        "only the image's non-zero blocks are stored"
    );
    let import_packs = bucket.objects("vols/source/packs");
    assert!(!import_packs.is_empty(), "the import uploaded packs");
    assert_eq!(info["pack_objects"], import_packs.len());
    assert_eq!(
        info["dead_bytes_in_use"], 0,
        "an imported volume's packs are all in use"
    );
    let text = bucket.ok(&["info", source]);
    for line in [
        "volume     s3://berth/vols/source",
        "snapshots  none",
        "lease      free",
    ] {
        assert!(text.contains(line), "`{line}` in:\n{text}");
    }

    let snapshot = bucket.ok(&["snapshot", source, "s1"]);
    assert!(snapshot.contains("manifest version 1"), "{snapshot}");
    // Taking it again of the same state is a no-op; of a newer state, refused.
    bucket.ok(&["snapshot", source, "s1"]);
    let wrote = bucket.ok(&[
        "exercise",
        source,
        "--writes",
        "8",
        "--blocks",
        "4",
        "--volume-dir",
        dir.path().join("source").to_str().unwrap(),
    ]);
    assert!(wrote.ends_with("acked 8\ndone\n"), "{wrote}");
    let err = bucket.fails(&["snapshot", source, "s1"]);
    assert!(err.contains("The snapshot `s1` already exists"), "{err}");
    let info = bucket.info(source);
    assert!(
        info["manifest_version"].as_u64().unwrap() > 1,
        "the writes made new versions"
    );
    let source_packs = bucket.objects("vols/source/packs");

    // The clone copies no pack: no PUT of a pack object, none under its prefix.
    let before = bucket.proxy.count();
    let clone = "s3://berth/vols/clone";
    bucket.ok(&["clone", source, clone, "--snapshot", "s1"]);
    assert!(
        bucket.proxy.matching("PUT", "/packs/", before).is_empty(),
        "cloning uploaded a pack"
    );
    assert!(bucket.objects("vols/clone/packs").is_empty());
    assert_eq!(
        bucket.objects("vols/source/packs"),
        source_packs,
        "the source's packs are untouched"
    );
    let clone_info = bucket.info(clone);
    assert_eq!(
        clone_info["packs_in_use"],
        import_packs.len(),
        "the clone uses the packs of the snapshot"
    );
    assert_eq!(clone_info["pack_objects"], 0);
    assert_eq!(clone_info["mapped_bytes"], 3 << 20);
    assert_eq!(clone_info["config"]["parent"]["snapshot"], "s1");
    assert_eq!(bucket.info(source)["clones"][0]["prefix"], "vols/clone");
    // And it reads the source's data through them.
    {
        let volume = bucket.open(clone, &dir.path().join("host-a"));
        let mut got = vec![0u8; data.len()];
        read_at(&volume, 1 << 20, &mut got).unwrap();
        assert!(got == data, "the clone reads the image's data");
        volume.close().unwrap();
    }
    let err = bucket.fails(&["snapshot", source, "s1", "--delete"]);
    assert!(err.contains("source of clones"), "{err}");
    let err = bucket.fails(&[
        "clone",
        source,
        "s3://berth/vols/other",
        "--snapshot",
        "nope",
    ]);
    assert!(err.contains("The snapshot `nope` does not exist"), "{err}");
    let err = bucket.fails(&["clone", source, clone, "--snapshot", "s1"]);
    assert!(err.contains("already exists"), "{err}");

    // gc: four flushes with `object` durability each upload a pack holding all four
    // blocks, so the first three packs end up unreferenced.
    let churn = "s3://berth/vols/churn";
    bucket.ok(&["create", churn, "--size", "1M"]);
    let exercise = bucket.ok(&[
        "exercise",
        churn,
        "--writes",
        "16",
        "--blocks",
        "4",
        "--flush-every",
        "4",
        "--durability",
        "object",
        "--volume-dir",
        dir.path().join("churn").to_str().unwrap(),
    ]);
    assert!(exercise.ends_with("acked 16\ndone\n"), "{exercise}");
    let packs = bucket.objects("vols/churn/packs").len();
    assert!(packs >= 4, "each object flush uploaded a pack ({packs})");
    let dry: Value =
        serde_json::from_str(&bucket.ok(&["gc", churn, "--dry-run", "--json", "--grace", "0"]))
            .unwrap();
    assert_eq!(dry["dry_run"], true);
    assert!(dry["packs_deleted"].as_u64().unwrap() >= 3, "{dry}");
    assert_eq!(
        bucket.objects("vols/churn/packs").len(),
        packs,
        "a dry run deletes nothing"
    );
    let report: Value =
        serde_json::from_str(&bucket.ok(&["gc", churn, "--json", "--grace", "0"])).unwrap();
    assert_eq!(report["packs_deleted"], dry["packs_deleted"]);
    let left = bucket.objects("vols/churn/packs").len();
    assert_eq!(
        left as u64,
        packs as u64 - dry["packs_deleted"].as_u64().unwrap()
    );
    assert_eq!(
        bucket.info(churn)["packs_in_use"],
        left,
        "only live packs remain"
    );
    // The survivors hold the last generation of every block.
    {
        let volume = bucket.open(churn, &dir.path().join("host-b"));
        for block in 0..4u64 {
            let mut got = vec![0u8; 4096];
            read_at(&volume, block * 4096, &mut got).unwrap();
            let generation = u64::from_le_bytes(got[16..24].try_into().unwrap());
            assert!(
                generation > 12,
                "block {block} is at generation {generation}"
            );
            assert!(got == exercise_block(block, generation, 4096));
        }
        volume.close().unwrap();
    }
    let gc_text = bucket.ok(&["gc", source]);
    assert!(gc_text.contains("deleted 0 packs"), "{gc_text}");

    // A directory standing in for the bucket works the same way.
    let local = format!("file://{}/vol", dir.path().join("local-bucket").display());
    std::fs::create_dir(dir.path().join("local-bucket")).unwrap();
    bucket.ok(&["create", &local, "--size", "1M"]);
    assert_eq!(bucket.info(&local)["config"]["size"], 1 << 20);

    // Errors.
    let err = bucket.fails(&["info", "s3://berth/vols/missing"]);
    assert!(
        err.contains("There is no volume at s3://berth/vols/missing"),
        "{err}"
    );
    let err = bucket.fails(&["info", "s3://no-such-bucket/v"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = bucket.fails(&["info", "s3://berth"]);
    assert!(err.contains("give a prefix"), "{err}");
    let unreachable = format!("http://127.0.0.1:{}", berth_testkit::free_port());
    let started = Instant::now();
    let out = bucket
        .command(&["info", source, "--timeout", "2"])
        .env("AWS_ENDPOINT", &unreachable)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot reach the bucket"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "--timeout bounds the wait for an unreachable bucket"
    );
}

/// A one-shot command ends on SIGTERM even while it retries a bucket that does not
/// answer (the signals every berth command starts with blocked are given back).
/// `berth volume compact` on a volume no host serves: its sparse packs are rewritten and
/// collected, the bucket shrinks, the data stays; a second run finds nothing to do; a
/// served volume is refused by its lease.
#[test]
fn compact_rewrites_the_sparse_packs_of_a_volume_no_host_serves() {
    let Some(bucket) = start_bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sparse = "s3://berth/vols/sparse";
    bucket.ok(&["create", sparse, "--size", "1M"]);
    // A FLUSH every 8 writes (object durability) uploads a pack of the blocks written
    // since the last; the stream comes back to its 60 blocks in groups that do not line up
    // with the packs', so earlier packs keep only some of theirs. No compaction while it
    // writes.
    let exercise = bucket.ok(&[
        "exercise",
        sparse,
        "--writes",
        "256",
        "--blocks",
        "60",
        "--flush-every",
        "8",
        "--durability",
        "object",
        "--compact-below",
        "0",
        "--volume-dir",
        dir.path().join("writer").to_str().unwrap(),
    ]);
    assert!(exercise.ends_with("acked 256\ndone\n"), "{exercise}");
    let before = bucket.info(sparse);
    assert!(
        before["dead_bytes_in_use"].as_u64().unwrap() > 0,
        "the overwrites left dead blocks in packs: {before}"
    );
    let read_all = |cache: &str| -> Vec<u8> {
        let volume = bucket.open(sparse, &dir.path().join(cache));
        let mut data = vec![0u8; 60 * 4096];
        read_at(&volume, 0, &mut data).unwrap();
        volume.close().unwrap();
        data
    };
    let data = read_all("reader-a");

    let report: Value = serde_json::from_str(&bucket.ok(&[
        "compact",
        sparse,
        "--below",
        "1",
        "--json",
        "--volume-dir",
        dir.path().join("compact").to_str().unwrap(),
    ]))
    .unwrap();
    eprintln!("compact: {report}");
    assert!(report["steps"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["dead_bytes_after"], 0,
        "every pack with a dead block was rewritten: {report}"
    );
    assert!(
        report["gc"]["packs_deleted"].as_u64().unwrap() > 0
            && report["pack_bytes_after"].as_u64() < report["pack_bytes_before"].as_u64(),
        "the old packs are gone and the bucket shrank: {report}"
    );
    assert!(
        read_all("reader-b") == data,
        "the volume reads the same after compaction"
    );
    let again = bucket.ok(&[
        "compact",
        sparse,
        "--volume-dir",
        dir.path().join("compact").to_str().unwrap(),
    ]);
    assert!(
        again.contains(": 0 compaction steps moved 0 bytes"),
        "nothing is left to do: {again}"
    );

    // Served elsewhere: the lease refuses the command.
    let served = bucket.open(sparse, &dir.path().join("server"));
    let err = bucket.fails(&[
        "compact",
        sparse,
        "--volume-dir",
        dir.path().join("compact").to_str().unwrap(),
    ]);
    assert!(err.contains("is in use by"), "{err}");
    served.close().unwrap();
    let err = bucket.fails(&["compact", sparse, "--below", "0"]);
    assert!(err.contains("--below must be above 0"), "{err}");
}

#[test]
fn a_volume_command_waiting_for_its_bucket_ends_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["volume", "info", "s3://nobody-answers/vol"])
        // Port 1 on loopback: every request is refused, and retried for a minute.
        .envs(berth_testkit::S3Settings::new("http://127.0.0.1:1", "nobody-answers", "vol").env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains("retrying") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ended before retrying:\n{}",
            log()
        );
        assert!(
            Instant::now() < deadline,
            "no retry within 30 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill with the pid of our own child and a valid signal.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("still running 10 s after SIGTERM:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}:\n{}", log());
}

/// A host with no trusted CA certificate cannot make an HTTP client: the error says so and
/// what to do, rather than that the location is not understood.
#[test]
fn no_ca_certificate_is_named_as_the_reason_an_s3_client_cannot_be_made() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["volume", "info", "s3://nobody-answers/vol"])
        .envs(berth_testkit::S3Settings::new("http://127.0.0.1:1", "nobody-answers", "vol").env())
        .env("SSL_CERT_FILE", "/nonexistent/bundle.pem")
        .env("SSL_CERT_DIR", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Cannot set up the HTTP client for s3://nobody-answers")
            && stderr.contains("CA certificate")
            && stderr.contains("SSL_CERT_FILE"),
        "{stderr}"
    );
    assert!(!stderr.contains("not understood"), "{stderr}");
}

#[test]
fn a_held_lease_refuses_a_second_writer_until_broken() {
    let Some(bucket) = start_bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let location = "s3://berth/vols/leased";
    bucket.ok(&["create", location, "--size", "4M"]);
    let host_a = dir.path().join("host-a");
    let mut writer = spawn_exercise(&bucket, location, &host_a, "local", 100_000, 5);
    wait_for_acks(&mut writer, 1);
    kill(writer.child);

    let text = bucket.ok(&["info", location]);
    assert!(text.contains("lease      held by"), "{text}");
    let host_b = dir.path().join("host-b");
    let out = bucket
        .command(&[
            "exercise",
            location,
            "--writes",
            "4",
            "--volume-dir",
            host_b.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second host must be refused");
    assert!(err.contains("is in use by host"), "{err}");
    assert!(
        err.contains(&format!("berth volume break-lease {location}")),
        "the refusal names the break procedure: {err}"
    );

    let broke = bucket.ok(&["break-lease", location]);
    assert!(broke.contains("Broke the lease"), "{broke}");
    let out = bucket.ok(&[
        "exercise",
        location,
        "--writes",
        "4",
        "--volume-dir",
        host_b.to_str().unwrap(),
    ]);
    assert!(out.ends_with("done\n"), "{out}");
    let text = bucket.ok(&["info", location]);
    assert!(
        text.contains("lease      free"),
        "released on close: {text}"
    );
}

/// The same content as `berth volume exercise` writes (src/volume/mod.rs), recomputed
/// here independently of the binary.
fn exercise_block(block: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    data.extend_from_slice(b"BERTHEX1");
    data.extend_from_slice(&block.to_le_bytes());
    data.extend_from_slice(&generation.to_le_bytes());
    let mut state = block.rotate_left(32) ^ generation;
    while data.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        data.extend_from_slice(&z.to_le_bytes());
    }
    data.truncate(len);
    data
}

fn exercise_block_of(index: u64, blocks: u64) -> u64 {
    index.wrapping_mul(0x9e37_79b1) % blocks
}

struct Writer {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    acked: u64,
}

fn spawn_exercise(
    bucket: &Bucket,
    location: &str,
    volume_dir: &Path,
    durability: &str,
    writes: u64,
    pause_ms: u64,
) -> Writer {
    let mut child = bucket
        .command(&[
            "exercise",
            location,
            "--writes",
            &writes.to_string(),
            "--blocks",
            &BLOCKS.to_string(),
            "--flush-every",
            "5",
            "--pause-ms",
            &pause_ms.to_string(),
            "--durability",
            durability,
            "--volume-dir",
            volume_dir.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Writer {
        child,
        lines,
        acked: 0,
    }
}

/// Reads the writer's `acked N` lines until N reaches `at_least`.
fn wait_for_acks(writer: &mut Writer, at_least: u64) {
    while writer.acked < at_least {
        let line = writer
            .lines
            .next()
            .expect("the writer ended before enough acknowledgements")
            .unwrap();
        if let Some(n) = line.strip_prefix("acked ") {
            writer.acked = n.parse().unwrap();
        }
    }
}

fn kill(mut child: Child) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "SIGKILL the writer");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the writer was killed, not finished");
}

const BLOCKS: u64 = 64;

/// Checks that every block holds its last acknowledged write or a later one of the stream
/// (in flight when the writer died), never older data, zeros or a torn mix.
fn verify_acknowledged(volume: &Volume, acked: u64, total: u64) {
    let mut last_acked = vec![0u64; BLOCKS as usize];
    for index in 0..acked {
        last_acked[exercise_block_of(index, BLOCKS) as usize] = index + 1;
    }
    for block in 0..BLOCKS {
        let mut got = vec![0u8; 4096];
        read_at(volume, block * 4096, &mut got).unwrap();
        let expected = last_acked[block as usize];
        if got.iter().all(|&b| b == 0) {
            assert_eq!(
                expected, 0,
                "block {block} lost acknowledged write {expected}"
            );
            continue;
        }
        assert_eq!(&got[..8], b"BERTHEX1", "block {block} holds foreign data");
        let named = u64::from_le_bytes(got[8..16].try_into().unwrap());
        let generation = u64::from_le_bytes(got[16..24].try_into().unwrap());
        assert_eq!(named, block, "block {block} holds block {named}'s data");
        assert!(
            generation >= expected,
            "block {block} went back to write {generation}, before the acknowledged {expected}"
        );
        assert!(
            generation <= total && exercise_block_of(generation - 1, BLOCKS) == block,
            "block {block} holds write {generation}, which never went there"
        );
        assert!(
            got == exercise_block(block, generation, 4096),
            "block {block} is torn (write {generation})"
        );
    }
}

#[test]
fn sigkill_mid_write_stream_keeps_every_acknowledged_write() {
    let Some(bucket) = start_bucket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    const TOTAL: u64 = 100_000;
    // (durability, acknowledged writes to wait for before SIGKILL)
    let rounds = [("local", 5), ("local", 160), ("local", 420), ("object", 60)];
    for (round, &(durability, kill_after)) in rounds.iter().enumerate() {
        let location = format!("s3://berth/vols/crash-{round}");
        bucket.ok(&["create", &location, "--size", "4M"]);
        let host = dir.path().join(format!("host-{round}"));
        let mut writer = spawn_exercise(&bucket, &location, &host, durability, TOTAL, 1);
        wait_for_acks(&mut writer, kill_after);
        kill(writer.child);
        let acked = writer.acked;

        if durability == "local" {
            // The same host reopens: the log replays, the lease passes to the successor.
            let volume = bucket.open(&location, &host);
            verify_acknowledged(&volume, acked, TOTAL);
            // Closing uploads everything; a host without the local state sees it too.
            volume.close().unwrap();
            drop(volume);
            let volume = bucket.open(&location, &dir.path().join(format!("fresh-{round}")));
            verify_acknowledged(&volume, acked, TOTAL);
            volume.close().unwrap();
        } else {
            // `object`: every acknowledged write is in the bucket; the local disk is lost.
            std::fs::remove_dir_all(&host).unwrap();
            bucket.ok(&["break-lease", &location]);
            let volume = bucket.open(&location, &dir.path().join(format!("fresh-{round}")));
            verify_acknowledged(&volume, acked, TOTAL);
            volume.close().unwrap();
        }
        eprintln!(
            "round {round} ({durability}): killed after {acked} acknowledged writes, all there"
        );
    }
}
