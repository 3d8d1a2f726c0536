//! File semantics that span several operations, through `berth fuse`: hard links across
//! directories, renames over open files, unlinked-but-open files and shared mappings.
//!
//! Needs root and /dev/fuse; each test skips with a printed reason otherwise.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use std::fs;

use fuse_mount::*;

#[test]
fn hard_links_across_directories_share_one_inode() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    for d in ["a", "b", "c"] {
        fs::create_dir(fs.via(d)).unwrap();
    }
    put(&fs.via("a/orig"), b"first");
    link(&fs.via("a/orig"), &fs.via("b/second")).expect("link across directories");
    link(&fs.via("b/second"), &fs.via("c/third")).expect("link of a link");
    let names = ["a/orig", "b/second", "c/third"];
    let inos: Vec<u64> = names
        .iter()
        .map(|n| lstat(&fs.via(n)).unwrap().st_ino)
        .collect();
    assert!(
        inos.iter().all(|i| *i == inos[0]),
        "inode numbers through the mount: {inos:?}"
    );
    let host_inos: Vec<u64> = names
        .iter()
        .map(|n| lstat(&fs.under(n)).unwrap().st_ino)
        .collect();
    assert!(
        host_inos.iter().all(|i| *i == host_inos[0]),
        "one inode underneath"
    );
    for n in names {
        assert_eq!(
            lstat(&fs.via(n)).unwrap().st_nlink,
            3,
            "nlink of {n} through the mount"
        );
        assert_same_attrs("hard link", &fs.via(n), &fs.under(n));
    }
    // A write through one name is read through the others.
    let fd = open(&fs.via("b/second"), libc::O_WRONLY, 0).unwrap();
    fd.pwrite_all(b"SECOND", 0).unwrap();
    fd.close().unwrap();
    for n in names {
        assert_eq!(read_all(&fs.via(n)), b"SECOND", "content through {n}");
    }
    unlink(&fs.via("a/orig")).unwrap();
    for n in ["b/second", "c/third"] {
        assert_eq!(
            lstat(&fs.via(n)).unwrap().st_nlink,
            2,
            "nlink after unlink, {n}"
        );
        assert_same_attrs("after unlink", &fs.via(n), &fs.under(n));
    }
    // Forgetting the inode and looking it up by another name still finds it.
    drop_dentry_caches();
    assert_eq!(read_all(&fs.via("c/third")), b"SECOND");
    fs.finish();
}

#[test]
fn rename_over_an_open_target_keeps_the_old_data_for_its_fd() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.via("target"), b"old target data");
    put(&fs.via("source"), b"new data");
    let old = open(&fs.via("target"), libc::O_RDWR, 0).unwrap();
    rename2(&fs.via("source"), &fs.via("target"), 0).expect("rename over an existing file");
    assert_eq!(read_all(&fs.via("target")), b"new data");
    assert_eq!(read_all(&fs.under("target")), b"new data");
    assert_errno(
        "source after rename",
        &lstat(&fs.via("source")),
        libc::ENOENT,
    );
    assert_eq!(
        old.pread_vec(100, 0).unwrap(),
        b"old target data",
        "old fd reads old data"
    );
    assert_eq!(
        old.fstat().unwrap().st_nlink,
        0,
        "the replaced file is unlinked"
    );
    old.pwrite_all(b"OLD", 0)
        .expect("write to the replaced file's fd");
    assert_eq!(old.pread_vec(100, 0).unwrap(), b"OLD target data");
    assert_eq!(
        read_all(&fs.via("target")),
        b"new data",
        "new file untouched by old fd"
    );
    old.close().unwrap();
    fs.finish();
}

#[test]
fn unlinked_open_file_stays_readable_and_writable() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.via("doomed"), b"still here");
    let fd = open(&fs.via("doomed"), libc::O_RDWR, 0).unwrap();
    unlink(&fs.via("doomed")).unwrap();
    assert_errno(
        "lstat after unlink",
        &lstat(&fs.via("doomed")),
        libc::ENOENT,
    );
    assert_errno(
        "underlying after unlink",
        &lstat(&fs.under("doomed")),
        libc::ENOENT,
    );
    assert_eq!(fd.pread_vec(100, 0).unwrap(), b"still here");
    let tail = pattern(5, 200_000);
    fd.pwrite_all(&tail, 10).expect("write to an unlinked file");
    let all = fd.pread_vec(300_000, 0).unwrap();
    assert_eq!(all.len(), 200_010);
    assert_eq!(&all[..10], b"still here");
    assert!(all[10..] == tail[..], "content written after unlink");
    let st = fd.fstat().expect("fstat of an unlinked file");
    assert_eq!(
        (st.st_nlink, st.st_size),
        (0, 200_010),
        "nlink and size after unlink"
    );
    // SAFETY: plain syscalls on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.raw(), 4) }).expect("ftruncate of an unlinked file");
    assert_eq!(fd.pread_vec(100, 0).unwrap(), b"stil");
    // SAFETY: as above.
    cvt(unsafe { libc::fsync(fd.raw()) }).expect("fsync of an unlinked file");
    // A new file of the same name is a different file.
    put(&fs.via("doomed"), b"new");
    assert_eq!(fd.pread_vec(100, 0).unwrap(), b"stil");
    fd.close().unwrap();
    fs.finish();
}

#[test]
fn mmap_shared_writes_reach_read_and_the_underlying_file() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    const LEN: usize = 3 * 4096 + 100;
    put(&fs.via("mapped"), &vec![b'.'; LEN]);
    let fd = open(&fs.via("mapped"), libc::O_RDWR, 0).unwrap();
    // SAFETY: mapping LEN bytes of a file we opened read-write; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.raw(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap MAP_SHARED: {}",
        std::io::Error::last_os_error()
    );
    let data = pattern(9, LEN);
    // SAFETY: the mapping is LEN bytes long and nothing else aliases it in this process.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.cast::<u8>(), LEN) };
    // SAFETY: ptr/LEN is our mapping.
    let rc = unsafe { libc::msync(ptr, LEN, libc::MS_SYNC) };
    assert_eq!(rc, 0, "msync: {}", std::io::Error::last_os_error());
    assert!(
        fd.pread_vec(LEN, 0).unwrap() == data,
        "read() on the mapped fd after msync"
    );
    assert!(
        read_all(&fs.via("mapped")) == data,
        "read() through a new open after msync"
    );
    assert!(
        read_all(&fs.under("mapped")) == data,
        "underlying file after msync"
    );
    // And the other way: a write() is seen in the mapping.
    fd.pwrite_all(b"WRITTEN", 4096).unwrap();
    // SAFETY: offsets 4096..4103 lie inside the mapping.
    let seen = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>().add(4096), 7) }.to_vec();
    assert_eq!(seen, b"WRITTEN", "write() visible in the shared mapping");
    // SAFETY: ptr/LEN is our mapping, unmapped once.
    unsafe { libc::munmap(ptr, LEN) };
    fd.close().unwrap();
    fs.finish();
}

/// A program running from the mount keeps its file, as on a local filesystem: every open
/// that would write it, `O_RDONLY | O_TRUNC` included, fails with ETXTBSY, and nothing of
/// it is cut. (With FUSE's atomic O_TRUNC the client kernel sends O_TRUNC in OPEN before it
/// checks for a running program: the daemon would cut the file, and the program die of
/// SIGBUS, before the open failed.)
#[test]
fn a_running_program_is_never_opened_for_writing_nor_truncated() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let original = ["/usr/bin/sleep", "/bin/sleep"]
        .iter()
        .find_map(|path| fs::read(path).ok())
        .expect("a sleep binary to run");
    let program = fs.via("sleeper");
    fs::write(&program, &original).unwrap();
    fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // spawn returns once the exec succeeded: the kernel refuses writers from then on.
    let mut child = std::process::Command::new(&program)
        .arg("60")
        .spawn()
        .expect("run the program from the mount");
    for (flags, name) in [
        (libc::O_WRONLY, "O_WRONLY"),
        (libc::O_RDWR, "O_RDWR"),
        (libc::O_RDONLY | libc::O_TRUNC, "O_RDONLY | O_TRUNC"),
        (libc::O_WRONLY | libc::O_TRUNC, "O_WRONLY | O_TRUNC"),
    ] {
        let opened = open(&program, flags, 0);
        assert_eq!(
            errno_of(&opened),
            libc::ETXTBSY,
            "open({name}) of a running program: {}",
            errno_name(errno_of(&opened))
        );
    }
    let still_running = child.try_wait().expect("wait for the program").is_none();
    let _ = child.kill();
    let status = child.wait().expect("reap the program");
    assert!(
        still_running,
        "the program died while others tried to open it: {status}"
    );
    assert!(
        fs::read(fs.under("sleeper")).unwrap() == original,
        "the running program's file changed on the host"
    );
}
