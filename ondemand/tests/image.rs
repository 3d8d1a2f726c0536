//! The image builder without mounting (no root needed): where files land in the blob,
//! the prefetch list, the bootstrap digest, tar input.

#[path = "../../cache/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use berth_cache::{BlobBackend, LocalDirBackend, Manifest};
use berth_ondemand::erofs::ErofsImage;
use berth_ondemand::{build_image, BuildOptions};
use common::pseudo_random;

fn have_mkfs() -> bool {
    std::process::Command::new("mkfs.erofs")
        .arg("--help")
        .output()
        .is_ok()
}

fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = [
        ("a/small", 1000usize),
        ("a/b/big", 3 << 20),
        ("a/b/odd", 1_234_567),
        ("c/empty", 0),
        ("c/exact", 1 << 20),
        ("top", 77_777),
    ]
    .iter()
    .enumerate()
    .map(|(i, (name, len))| (name.to_string(), pseudo_random(i as u64 + 7, *len)))
    .collect();
    for (name, data) in &files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    files
}

#[test]
fn erofs_reader_finds_every_file_in_the_blob_and_the_prefetch_list_is_resolved() {
    if !have_mkfs() {
        common::skip("mkfs.erofs (erofs-utils) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    let files = tree(&source);
    let list = dir.path().join("prefetch.txt");
    std::fs::write(&list, "# hot first\n/top\n\na/b\n").unwrap();
    let backend: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(dir.path().join("store")));
    let mut options = BuildOptions::new(&source, dir.path().join("image"), backend);
    options.prefetch_list = Some(list.clone());
    let report = build_image(&options).unwrap();
    let raw = std::fs::read(report.raw_blob_path.as_ref().unwrap()).unwrap();
    let image = ErofsImage::open(&report.bootstrap_path).unwrap();
    for (name, data) in &files {
        let ranges = image.data_ranges(name).unwrap().expect(name);
        let mut content = Vec::new();
        for range in &ranges {
            content.extend_from_slice(&raw[range.start as usize..range.end as usize]);
        }
        assert!(content.len() >= data.len(), "{name}: {ranges:?}");
        assert!(
            content[..data.len()] == data[..],
            "{name} is not where the reader says"
        );
    }
    assert!(image.data_ranges("missing").unwrap().is_none());
    assert!(image.data_ranges("top/below").unwrap().is_none());

    let manifest = Manifest::load(&report.manifest_path).unwrap();
    assert_eq!(
        manifest.bootstrap_digest.as_deref(),
        Some(
            berth_ondemand::image::file_digest(&report.bootstrap_path)
                .unwrap()
                .as_str()
        )
    );
    let paths: Vec<&str> = manifest.prefetch.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["/top", "a/b"]);
    let expected: Vec<[u64; 2]> = ["a/b/big", "a/b/odd"]
        .iter()
        .flat_map(|n| image.data_ranges(n).unwrap().unwrap())
        .map(|r| [r.start, r.end.min(manifest.blob_size)])
        .collect();
    let mut got = manifest.prefetch[1].ranges.clone();
    let mut want = expected;
    got.sort();
    want.sort();
    assert_eq!(got, want, "a directory stands for the files below it");

    // A path the image lacks is refused with the line it is on.
    std::fs::write(&list, "/top\n/nope\n").unwrap();
    let err = build_image(&options).unwrap_err();
    assert!(
        err.to_string().contains("line 2") && err.to_string().contains("/nope"),
        "{err}"
    );
}

#[test]
fn tar_input_gives_the_same_image_as_the_directory() {
    if !have_mkfs() {
        common::skip("mkfs.erofs (erofs-utils) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    let files = tree(&source);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(source.join("top"), std::fs::Permissions::from_mode(0o751)).unwrap();
    let archive = dir.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .args(["--xattrs", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&source)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let backend: Arc<dyn BlobBackend> = Arc::new(LocalDirBackend::new(dir.path().join("store")));
    let from_tar = build_image(&BuildOptions::new(
        &archive,
        dir.path().join("t"),
        backend.clone(),
    ))
    .unwrap();
    let from_dir = build_image(&BuildOptions::new(&source, dir.path().join("d"), backend)).unwrap();
    // The same contents, byte for byte: tar and directory input give the same blob.
    assert_eq!(from_tar.manifest.blob_id, from_dir.manifest.blob_id);
    let image = ErofsImage::open(&from_tar.bootstrap_path).unwrap();
    let raw = std::fs::read(from_tar.raw_blob_path.unwrap()).unwrap();
    for (name, data) in &files {
        let ranges = image.data_ranges(name).unwrap().expect(name);
        let content: Vec<u8> = ranges
            .iter()
            .flat_map(|r| raw[r.start as usize..r.end as usize].to_vec())
            .collect();
        assert!(content[..data.len()] == data[..], "{name}");
    }
    assert!(
        !dir.path().join("t/.rootfs").exists(),
        "the extraction is cleaned up"
    );
}
