//! Start-up and shutdown of `berth fuse`: signals and external unmounts end the daemon cleanly.
//!
//! Needs root and /dev/fuse; each test skips with a printed reason otherwise.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use fuse_mount::*;

fn stop_with(signal: libc::c_int) {
    let Some(mut fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.via("written-before-stop"), b"persisted");
    fs.signal(signal);
    let status = fs.wait_exit(DAEMON_TIMEOUT);
    let status =
        status.unwrap_or_else(|| panic!("no exit within {DAEMON_TIMEOUT:?} of signal {signal}"));
    assert!(
        status.success(),
        "after signal {signal} the daemon exited with {status}, expected 0; output:\n{}",
        fs.log()
    );
    assert!(!fs.is_mounted(), "still mounted after the daemon exited");
    assert_eq!(read_all(&fs.under("written-before-stop")), b"persisted");
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    stop_with(libc::SIGTERM);
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    stop_with(libc::SIGINT);
}

#[test]
fn sigterm_while_a_file_is_open_still_exits_zero() {
    let Some(mut fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.under("f"), b"x");
    // The kernel cannot unmount a busy mount; the daemon must still shut down (lazily).
    let fd = open(&fs.via("f"), libc::O_RDONLY, 0).unwrap();
    fs.signal(libc::SIGTERM);
    let status = fs.wait_exit(DAEMON_TIMEOUT);
    drop(fd);
    let status = status.expect("the daemon did not exit with a file open on the mount");
    assert!(
        status.success(),
        "exit status {status}; output:\n{}",
        fs.log()
    );
    assert!(!fs.is_mounted(), "still mounted after the daemon exited");
}

#[test]
fn external_umount_makes_the_daemon_exit_zero() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    assert!(fs.is_mounted());
    fs.unmount_externally_for_log();
}

#[test]
fn mounts_as_a_fuse_filesystem_showing_the_shared_dir() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.under("visible"), b"yes");
    assert_eq!(read_all(&fs.via("visible")), b"yes");
    assert_same_attrs("mount root", fs.mnt(), fs.shared());
    fs.finish();
}
