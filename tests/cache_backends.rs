//! How the cache engine reads a local-directory backend depends on the filesystem the
//! directory lies on: a local disk is read a chunk at a time, a directory on FUSE (as a
//! virtio-fs share is in a guest) or a network filesystem in merged reads, as a remote
//! store. Checked here through a `berth fuse` mount.
//!
//! Needs root and /dev/fuse; skips with a printed reason otherwise.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use berth_cache::{BlobBackend, LocalDirBackend};
use fuse_mount::*;

#[test]
fn a_local_directory_on_a_fuse_mount_is_read_like_a_remote_store() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    std::fs::create_dir(fs.shared().join("blobs")).unwrap();
    std::fs::write(fs.shared().join("blobs/object"), vec![7u8; 8192]).unwrap();
    let on_disk = LocalDirBackend::new(fs.shared());
    let through_fuse = LocalDirBackend::new(fs.mnt());
    assert_eq!(
        through_fuse.read_range("blobs/object", 0..8192).unwrap(),
        vec![7u8; 8192],
        "the object reads back through the mount"
    );
    assert_eq!(
        through_fuse.merge_limit("blobs/object"),
        None,
        "a directory on FUSE is read in the engine's merged reads"
    );
    assert_eq!(
        on_disk.merge_limit("blobs/object"),
        Some(1 << 20),
        "the same directory on its own filesystem is read a chunk (1 MiB) at a time"
    );
}
