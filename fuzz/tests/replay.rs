//! Replays the seed corpus and every saved crash input (regressions/<target>/) through the
//! fuzz harnesses, so a fixed crash stays fixed and the seeds stay meaningful. Runs on stable:
//! `cargo test` in this directory.

use std::path::{Path, PathBuf};

use clap::Parser;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    files.sort();
    files
}

#[test]
fn fuse_request_inputs_are_served_without_crashing() {
    let files = inputs("fuse_request");
    assert!(files.len() >= 10, "seed corpus missing: {files:?}");
    let mut replied = 0;
    let mut well_formed = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let answered = berth_fuzz::fuse::serve(&data).is_some_and(|len| len >= 16);
        // The shape_* seeds are malformed chains on purpose (dropped, see below).
        let name = file.file_name().unwrap().to_string_lossy();
        if !name.starts_with("shape_") {
            well_formed += 1;
            replied += usize::from(answered);
        }
    }
    // Every other seed is a well-formed request: the server must answer most of them with at
    // least a reply header (FORGET has no reply).
    assert!(
        replied * 10 >= well_formed * 8,
        "{replied} of {well_formed} answered"
    );
}

#[test]
fn init_seed_gets_a_fuse_init_reply() {
    let data =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/fuse_request/init"))
            .unwrap();
    // fuse_out_header (16) + fuse_init_out (64).
    assert_eq!(berth_fuzz::fuse::serve(&data), Some(80));
}

#[test]
fn malformed_chain_shapes_get_an_error_reply_only_where_one_fits() {
    use berth_fuzz::fuse::Shape;
    let getattr =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/fuse_request/getattr"))
            .unwrap();
    // Well formed, it is answered: header (16) + fuse_attr_out (104).
    assert_eq!(berth_fuzz::fuse::serve(&getattr), Some(120));
    for (bit, reply) in [
        // No device-writable buffer (or none inside guest memory): nowhere to answer.
        (Shape::REPLY_READABLE, 0),
        (Shape::REPLY_OUTSIDE_MEMORY, 0),
        // The request comes after the reply buffer: its unique id is not read.
        (Shape::REPLY_FIRST, 0),
        // Request and reply buffer are there, the chain goes on wrongly: EIO (a bare header).
        (Shape::LOOP, 16),
        (Shape::NEXT_OUT_OF_RANGE, 16),
        // A reply buffer shorter than a reply header.
        (Shape::SHORT_REPLY, 0),
    ] {
        let mut bent = getattr.clone();
        bent[0] |= bit;
        assert_eq!(
            berth_fuzz::fuse::serve(&bent),
            Some(reply),
            "shape {bit:#04x}"
        );
    }
}

#[test]
fn vhost_user_inputs_are_handled_without_crashing() {
    let files = inputs("vhost_user_message");
    assert!(!files.is_empty());
    for file in &files {
        berth_fuzz::vhost_user::serve(&std::fs::read(file).unwrap());
    }
}

#[test]
fn cli_seeds_parse_through_the_real_parser() {
    let files = inputs("cli_options");
    assert!(!files.is_empty());
    let mut accepted = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let Some((&selector, rest)) = data.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(rest).into_owned();
        let mut args: Vec<String> = [
            "berth",
            "--socket-path",
            "/nonexistent/s",
            "--shared-dir",
            "/nonexistent",
        ]
        .map(str::to_owned)
        .to_vec();
        if selector % 2 == 0 {
            args.extend(["-o".to_owned(), text]);
        } else {
            args.extend(text.split('\0').map(str::to_owned));
        }
        if let Ok(cli) = berth_fuzz::cli::Cli::try_parse_from(&args) {
            if cli.resolve().is_ok() {
                accepted += 1;
            }
        }
    }
    assert!(accepted >= 2, "only {accepted} seeds accepted");
}

#[test]
fn manifest_inputs_parse_or_are_refused_without_panicking() {
    let files = inputs("manifest_parse");
    assert!(!files.is_empty(), "seed corpus missing");
    let mut accepted = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if let Ok(manifest) = berth_cache::Manifest::parse(&data) {
            accepted += 1;
            // What is accepted must describe chunks inside the blob.
            for index in 0..manifest.chunk_count() {
                assert!(manifest.chunk_range(index).end <= manifest.blob_size);
            }
        }
    }
    assert!(accepted >= 1, "no seed is a valid manifest");
}

#[test]
fn xattrmap_inputs_parse_or_are_refused_without_panicking() {
    use berth_fuzz::xattrmap::{check, Outcome};
    let files = inputs("xattrmap_parse");
    assert!(files.len() >= 10, "seed corpus missing: {files:?}");
    let outcomes: Vec<Outcome> = files
        .iter()
        .map(|file| check(&std::fs::read(file).unwrap()))
        .collect();
    let accepted = outcomes.iter().filter(|o| **o == Outcome::Accepted).count();
    let refused = outcomes.iter().filter(|o| **o == Outcome::Refused).count();
    // The seeds are virtiofsd's documented examples and a few malformed maps.
    assert!(accepted >= 10, "only {accepted} seeds accepted");
    assert!(refused >= 4, "only {refused} seeds refused");
}

#[test]
fn dax_window_inputs_keep_the_window_manager_and_its_model_in_step() {
    let files = inputs("dax_window");
    assert!(files.len() >= 3, "seed corpus missing: {files:?}");
    let mut total = berth_fuzz::dax::Outcome::default();
    for file in &files {
        let outcome = berth_fuzz::dax::check(&std::fs::read(file).unwrap());
        total.accepted += outcome.accepted;
        total.refused += outcome.refused;
        total.repointed += outcome.repointed;
    }
    // The seeds reach every path: accepted and refused requests, and re-pointed ranges.
    assert!(total.accepted >= 6, "{total:?}");
    assert!(total.refused >= 6, "{total:?}");
    assert!(total.repointed >= 3, "{total:?}");
}

#[test]
fn dax_window_random_operations_stay_in_step() {
    // A deterministic stream of operations beyond the seeds (xorshift64*).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(4 * 2_000);
    while bytes.len() < 4 * 2_000 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    let outcome = berth_fuzz::dax::check(&bytes);
    assert!(
        outcome.accepted > 300 && outcome.repointed > 100,
        "{outcome:?}"
    );
}

#[test]
fn vhost_blk_request_inputs_are_served_without_crashing() {
    let files = inputs("vhost_blk_request");
    assert!(files.len() >= 10, "seed corpus missing: {files:?}");
    let mut answered = 0;
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if berth_fuzz::blk_request::serve(&data).is_some_and(|a| a.status.is_some()) {
            answered += 1;
        }
    }
    // Only the two seeds without a usable status byte go unanswered.
    assert!(
        answered + 2 >= files.len(),
        "{answered} of {} answered",
        files.len()
    );
}

#[test]
fn vhost_blk_seeds_get_the_status_the_spec_asks_for() {
    let seed = |name: &str| {
        let data = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("corpus/vhost_blk_request")
                .join(name),
        )
        .unwrap();
        berth_fuzz::blk_request::serve(&data).expect("the seed fits the harness")
    };
    const OK: Option<u8> = Some(0);
    const IOERR: Option<u8> = Some(1);
    const UNSUPP: Option<u8> = Some(2);
    // A 4 KiB read: the data and the status byte are written.
    let read = seed("read");
    assert_eq!((read.status, read.used_len), (OK, 4097));
    assert_eq!(seed("read_split_room").status, OK);
    assert_eq!(seed("read_header_split").status, OK);
    assert_eq!(seed("write").status, OK);
    assert_eq!(seed("write_three_parts").status, OK);
    assert_eq!(seed("flush").status, OK);
    let id = seed("get_id");
    assert_eq!((id.status, id.used_len), (OK, 21));
    assert_eq!(seed("discard").status, OK);
    assert_eq!(seed("write_zeroes_unmap").status, OK);
    assert_eq!(seed("discard_with_unmap").status, UNSUPP);
    assert_eq!(seed("write_read_only").status, IOERR);
    assert_eq!(seed("read_out_of_range").status, IOERR);
    assert_eq!(seed("read_overflowing_sector").status, IOERR);
    assert_eq!(seed("unknown_type").status, UNSUPP);
    assert_eq!(seed("short_header").status, IOERR);
    assert_eq!(seed("readable_after_writable").status, IOERR);
    // Nowhere to put a status: returned with nothing written.
    for name in ["no_status", "status_outside_memory"] {
        let answer = seed(name);
        assert_eq!((answer.status, answer.used_len), (None, 0), "{name}");
    }
}
