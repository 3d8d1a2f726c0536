//! Every FUSE operation of `berth fuse`, each compared with the same operation on the
//! underlying directory: outcome (errno), content, and attributes.
//!
//! Needs root and /dev/fuse; each test skips with a printed reason otherwise.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use std::fs;
use std::path::Path;

use fuse_mount::*;

const EMPTY: fn(&Path) = |_| {};

/// A small tree every twin starts with.
fn basic_tree(dir: &Path) {
    put(&dir.join("file"), b"hello, berth\n");
    fs::create_dir(dir.join("dir")).unwrap();
    put(&dir.join("dir/inner"), b"inner");
    std::os::unix::fs::symlink("file", dir.join("link")).unwrap();
    std::os::unix::fs::symlink("missing-target", dir.join("dangling")).unwrap();
    fs::create_dir(dir.join("empty")).unwrap();
}

#[test]
fn lookup_reports_the_underlying_attributes() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "lookup", basic_tree);
    for rel in ["", "file", "dir", "dir/inner", "link", "dangling", "empty"] {
        t.op(&format!("lstat {rel}"), 0, |b| lstat(&b.join(rel)));
        t.same("lookup", rel);
    }
    // stat follows the symlink to the file.
    let via = fs::metadata(t.v("link")).unwrap();
    assert_eq!(via.len(), 13, "stat through a symlink on the mount");
    t.op("lstat of a missing name", libc::ENOENT, |b| {
        lstat(&b.join("nope"))
    });
    t.op("lstat below a missing dir", libc::ENOENT, |b| {
        lstat(&b.join("nope/x"))
    });
    t.op("lstat below a file", libc::ENOTDIR, |b| {
        lstat(&b.join("file/x"))
    });
    t.op("lstat via a dangling symlink dir", libc::ENOENT, |b| {
        lstat(&b.join("dangling/x"))
    });
    let longest = "n".repeat(255);
    t.op("create a 255-byte name", 0, |b| {
        fs::write(b.join(&longest), b"x")
    });
    t.same("255-byte name", &longest);
    let too_long = "n".repeat(256);
    t.op("lstat a 256-byte name", libc::ENAMETOOLONG, |b| {
        lstat(&b.join(&too_long))
    });
    fs.finish();
}

#[test]
fn forget_then_lookup_again_sees_the_current_tree() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "forget", |d| {
        for i in 0..200 {
            put(&d.join(format!("f{i}")), format!("{i}").as_bytes());
        }
    });
    for i in 0..200 {
        lstat(&t.v(&format!("f{i}"))).unwrap();
    }
    // Evicting the dentries makes the kernel FORGET these inodes.
    drop_dentry_caches();
    for i in 0..200 {
        t.same("lookup after FORGET", &format!("f{i}"));
        assert_eq!(read_all(&t.v(&format!("f{i}"))), format!("{i}").as_bytes());
    }
    // Change the tree behind the mount's back, forget again, and look up afresh.
    fs::rename(t.u("f1"), t.u("renamed")).unwrap();
    fs::remove_file(t.u("f2")).unwrap();
    put(&t.u("f3"), b"replaced content");
    drop_dentry_caches();
    assert_errno(
        "lstat of a name renamed away",
        &lstat(&t.v("f1")),
        libc::ENOENT,
    );
    assert_errno("lstat of a name removed", &lstat(&t.v("f2")), libc::ENOENT);
    assert_eq!(read_all(&t.v("renamed")), b"1");
    assert_eq!(read_all(&t.v("f3")), b"replaced content");
    assert_same_attrs("replaced file", &t.v("f3"), &t.u("f3"));
    fs.finish();
}

#[test]
fn setattr_chmod_chown_truncate() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "setattr", basic_tree);
    for mode in [0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000] {
        t.op(&format!("chmod {mode:o}"), 0, |b| {
            chmod(&b.join("file"), mode)
        });
        t.same(&format!("chmod {mode:o}"), "file");
    }
    t.op("chmod dir", 0, |b| chmod(&b.join("dir"), 0o711));
    t.same("chmod dir", "dir");
    t.op("chown", 0, |b| lchown(&b.join("file"), 1234, 5678));
    t.same("chown", "file");
    // Changing the owner of a setuid/setgid executable drops those bits.
    t.op("chmod 6755", 0, |b| chmod(&b.join("file"), 0o6755));
    t.op("chown of a setuid file", 0, |b| {
        lchown(&b.join("file"), 4321, 8765)
    });
    t.same("chown clears setuid/setgid", "file");
    t.op("chown group only", 0, |b| {
        lchown(&b.join("file"), u32::MAX, 99)
    });
    t.same("chown group only", "file");
    t.op("lchown of a symlink", 0, |b| {
        lchown(&b.join("link"), 42, 43)
    });
    t.same("lchown symlink", "link");
    t.same("lchown does not follow", "file");
    t.op("chmod 644", 0, |b| chmod(&b.join("file"), 0o644));

    t.op("truncate grow", 0, |b| truncate(&b.join("file"), 100_000));
    t.same("truncate grow", "file");
    let grown = read_all(&t.v("file"));
    assert_eq!(grown.len(), 100_000);
    assert_eq!(&grown[..13], b"hello, berth\n");
    assert!(
        grown[13..].iter().all(|b| *b == 0),
        "grown part reads as zeros"
    );
    t.op("truncate shrink", 0, |b| truncate(&b.join("file"), 5));
    t.same("truncate shrink", "file");
    assert_eq!(read_all(&t.v("file")), b"hello");
    assert_eq!(read_all(&t.u("file")), b"hello");
    let fd = open(&t.v("file"), libc::O_RDWR, 0).unwrap();
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.raw(), 3) }).expect("ftruncate through the mount");
    fd.close().unwrap();
    assert_eq!(read_all(&t.u("file")), b"hel");
    assert_same_attrs("ftruncate", &t.v("file"), &t.u("file"));
    t.op("truncate a directory", libc::EISDIR, |b| {
        truncate(&b.join("dir"), 0)
    });
    t.op("truncate a missing file", libc::ENOENT, |b| {
        truncate(&b.join("nope"), 0)
    });
    fs.finish();
}

#[test]
fn setattr_utimensat_explicit_now_and_omit() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "utimens", basic_tree);
    let explicit = [
        ts(1_000_000_000, 123_456_789),
        ts(1_500_000_000, 987_654_321),
    ];
    t.op("utimensat explicit", 0, |b| {
        utimens(&b.join("file"), explicit, 0)
    });
    let u = lstat(&t.u("file")).unwrap();
    assert_eq!(
        (u.st_atime, u.st_atime_nsec),
        (1_000_000_000, 123_456_789),
        "atime"
    );
    assert_eq!(
        (u.st_mtime, u.st_mtime_nsec),
        (1_500_000_000, 987_654_321),
        "mtime"
    );
    let v = lstat(&t.v("file")).unwrap();
    assert_eq!(
        (v.st_atime, v.st_atime_nsec),
        (1_000_000_000, 123_456_789),
        "mount atime"
    );
    assert_same_attrs("utimensat explicit", &t.v("file"), &t.u("file"));

    let omit_atime = [ts(0, libc::UTIME_OMIT), ts(1_600_000_000, 1)];
    t.op("utimensat omit atime", 0, |b| {
        utimens(&b.join("file"), omit_atime, 0)
    });
    let u = lstat(&t.u("file")).unwrap();
    assert_eq!(
        (u.st_atime, u.st_atime_nsec),
        (1_000_000_000, 123_456_789),
        "omitted atime"
    );
    assert_eq!((u.st_mtime, u.st_mtime_nsec), (1_600_000_000, 1), "mtime");
    assert_same_attrs("utimensat omit", &t.v("file"), &t.u("file"));

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let now = [ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)];
    t.op("utimensat UTIME_NOW", 0, |b| {
        utimens(&b.join("file"), now, 0)
    });
    let u = lstat(&t.u("file")).unwrap();
    assert!(
        (before - 1..=before + 5).contains(&u.st_mtime)
            && (before - 1..=before + 5).contains(&u.st_atime),
        "UTIME_NOW set atime {} mtime {}, expected about {before}",
        u.st_atime,
        u.st_mtime
    );
    let v = lstat(&t.v("file")).unwrap();
    assert_eq!(
        (v.st_atime, v.st_atime_nsec),
        (u.st_atime, u.st_atime_nsec),
        "mount atime"
    );
    assert_same_attrs("utimensat now", &t.v("file"), &t.u("file"));

    t.op("utimensat on a symlink itself", 0, |b| {
        utimens(&b.join("link"), explicit, libc::AT_SYMLINK_NOFOLLOW)
    });
    let u = lstat(&t.u("link")).unwrap();
    assert_eq!(
        (u.st_mtime, u.st_mtime_nsec),
        (1_500_000_000, 987_654_321),
        "symlink mtime"
    );
    assert_same_attrs("utimensat symlink", &t.v("link"), &t.u("link"));
    t.op("utimensat directory", 0, |b| {
        utimens(&b.join("dir"), explicit, 0)
    });
    assert_same_attrs("utimensat dir", &t.v("dir"), &t.u("dir"));
    fs.finish();
}

#[test]
fn readlink_and_symlink() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "symlink", basic_tree);
    let long_target = format!("{}/end", "segment".repeat(140));
    for (name, target) in [
        ("rel", "file"),
        ("abs", "/etc/hostname"),
        ("dots", "../../x/./y"),
        ("long", long_target.as_str()),
    ] {
        t.op(&format!("symlink {name}"), 0, |b| {
            symlink(target, &b.join(name))
        });
        t.same(&format!("symlink {name}"), name);
        assert_eq!(
            readlink(&t.u(name)).unwrap(),
            target.as_bytes(),
            "underlying target"
        );
        assert_eq!(
            readlink(&t.v(name)).unwrap(),
            target.as_bytes(),
            "readlink via mount"
        );
    }
    assert_eq!(readlink(&t.v("link")).unwrap(), b"file");
    t.op("symlink over an existing name", libc::EEXIST, |b| {
        symlink("x", &b.join("file"))
    });
    t.op("readlink of a file", libc::EINVAL, |b| {
        readlink(&b.join("file"))
    });
    t.op("readlink of a missing name", libc::ENOENT, |b| {
        readlink(&b.join("nope"))
    });
    t.same("parent after symlinks", "");
    fs.finish();
}

#[test]
fn mknod_fifo_socket_and_char_device() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "mknod", EMPTY);
    t.op("mknod fifo", 0, |b| {
        mknod(&b.join("fifo"), libc::S_IFIFO | 0o640, 0)
    });
    t.same("mknod fifo", "fifo");
    t.op("mknod socket", 0, |b| {
        mknod(&b.join("sock"), libc::S_IFSOCK | 0o600, 0)
    });
    t.same("mknod socket", "sock");
    let null_dev = libc::makedev(1, 3);
    t.op("mknod char device 1:3", 0, |b| {
        mknod(&b.join("null"), libc::S_IFCHR | 0o666, null_dev)
    });
    t.same("mknod char device", "null");
    assert_eq!(
        lstat(&t.u("null")).unwrap().st_rdev,
        null_dev,
        "device number"
    );
    t.op("mknod regular", 0, |b| {
        mknod(&b.join("reg"), libc::S_IFREG | 0o644, 0)
    });
    t.same("mknod regular", "reg");
    t.op("mknod existing", libc::EEXIST, |b| {
        mknod(&b.join("fifo"), libc::S_IFIFO | 0o640, 0)
    });
    fs.finish();
}

#[test]
fn mkdir_and_rmdir() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "mkdir", basic_tree);
    for (name, mode) in [
        ("a", 0o755),
        ("b", 0o700),
        ("sticky", 0o1777),
        ("sgid", 0o2775),
    ] {
        t.op(&format!("mkdir {name}"), 0, |b| mkdir(&b.join(name), mode));
        t.same(&format!("mkdir {name}"), name);
    }
    t.same("parent nlink after mkdir", "");
    t.op("mkdir nested", 0, |b| mkdir(&b.join("a/b"), 0o755));
    t.same("mkdir nested", "a/b");
    t.op("mkdir existing", libc::EEXIST, |b| {
        mkdir(&b.join("a"), 0o755)
    });
    t.op("mkdir over a file", libc::EEXIST, |b| {
        mkdir(&b.join("file"), 0o755)
    });
    t.op("mkdir below a file", libc::ENOTDIR, |b| {
        mkdir(&b.join("file/x"), 0o755)
    });
    t.op("mkdir below missing", libc::ENOENT, |b| {
        mkdir(&b.join("nope/x"), 0o755)
    });
    t.op("rmdir non-empty", libc::ENOTEMPTY, |b| {
        rmdir(&b.join("dir"))
    });
    t.op("rmdir a file", libc::ENOTDIR, |b| rmdir(&b.join("file")));
    t.op("rmdir missing", libc::ENOENT, |b| rmdir(&b.join("nope")));
    t.op("rmdir nested", 0, |b| rmdir(&b.join("a/b")));
    t.op("rmdir empty", 0, |b| rmdir(&b.join("empty")));
    t.same("rmdir empty", "empty");
    t.same("parent nlink after rmdir", "");
    assert!(
        !t.u("empty").exists(),
        "rmdir through the mount removed the directory"
    );
    fs.finish();
}

#[test]
fn unlink_removes_the_underlying_name() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "unlink", basic_tree);
    for name in ["file", "link", "dangling", "dir/inner"] {
        t.op(&format!("unlink {name}"), 0, |b| unlink(&b.join(name)));
        t.same(&format!("unlink {name}"), name);
        assert!(lstat(&t.u(name)).is_err(), "{name} still exists underneath");
    }
    t.op("unlink again", libc::ENOENT, |b| unlink(&b.join("file")));
    t.op("unlink a directory", libc::EISDIR, |b| {
        unlink(&b.join("dir"))
    });
    t.same("parent after unlinks", "");
    fs.finish();
}

#[test]
fn rename_moves_and_replaces() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "rename", |d| {
        basic_tree(d);
        put(&d.join("other"), b"other content");
        fs::create_dir(d.join("full")).unwrap();
        put(&d.join("full/x"), b"x");
    });
    t.op("rename in one dir", 0, |b| {
        rename2(&b.join("file"), &b.join("moved"), 0)
    });
    t.same("rename source", "file");
    t.same("rename target", "moved");
    t.op("rename across dirs", 0, |b| {
        rename2(&b.join("moved"), &b.join("dir/moved"), 0)
    });
    t.same("rename across dirs", "dir/moved");
    assert_eq!(read_all(&t.u("dir/moved")), b"hello, berth\n");
    t.op("rename over a file", 0, |b| {
        rename2(&b.join("other"), &b.join("dir/moved"), 0)
    });
    assert_eq!(read_all(&t.u("dir/moved")), b"other content");
    assert_eq!(read_all(&t.v("dir/moved")), b"other content");
    t.same("rename over a file", "dir/moved");
    t.op("rename a dir", 0, |b| {
        rename2(&b.join("empty"), &b.join("dir/sub"), 0)
    });
    t.same("rename a dir", "dir/sub");
    t.same("source parent", "");
    t.same("target parent", "dir");
    t.op("rename dir over non-empty dir", libc::ENOTEMPTY, |b| {
        rename2(&b.join("dir/sub"), &b.join("full"), 0)
    });
    t.op("rename dir over a file", libc::ENOTDIR, |b| {
        rename2(&b.join("dir/sub"), &b.join("dir/moved"), 0)
    });
    t.op("rename file over a dir", libc::EISDIR, |b| {
        rename2(&b.join("dir/moved"), &b.join("dir/sub"), 0)
    });
    t.op("rename missing", libc::ENOENT, |b| {
        rename2(&b.join("nope"), &b.join("x"), 0)
    });
    t.op("rename dir into itself", libc::EINVAL, |b| {
        rename2(&b.join("dir"), &b.join("dir/sub/dir"), 0)
    });
    fs.finish();
}

#[test]
fn renameat2_noreplace_and_exchange() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "rename2", |d| {
        basic_tree(d);
        put(&d.join("other"), b"other content");
    });
    t.op(
        "RENAME_NOREPLACE onto an existing name",
        libc::EEXIST,
        |b| rename2(&b.join("file"), &b.join("other"), libc::RENAME_NOREPLACE),
    );
    assert_eq!(
        read_all(&t.u("other")),
        b"other content",
        "target untouched"
    );
    t.op("RENAME_NOREPLACE onto a free name", 0, |b| {
        rename2(&b.join("other"), &b.join("free"), libc::RENAME_NOREPLACE)
    });
    t.same("RENAME_NOREPLACE", "free");
    t.op("RENAME_EXCHANGE two files", 0, |b| {
        rename2(&b.join("file"), &b.join("free"), libc::RENAME_EXCHANGE)
    });
    assert_eq!(read_all(&t.u("file")), b"other content");
    assert_eq!(read_all(&t.u("free")), b"hello, berth\n");
    assert_eq!(read_all(&t.v("file")), b"other content");
    assert_eq!(read_all(&t.v("free")), b"hello, berth\n");
    t.same("exchange", "file");
    t.same("exchange", "free");
    t.op("RENAME_EXCHANGE a file and a dir", 0, |b| {
        rename2(&b.join("file"), &b.join("dir"), libc::RENAME_EXCHANGE)
    });
    t.same("exchange file/dir", "file");
    t.same("exchange file/dir", "dir");
    assert_eq!(read_all(&t.v("file/inner")), b"inner");
    t.op("RENAME_EXCHANGE with a missing target", libc::ENOENT, |b| {
        rename2(&b.join("free"), &b.join("nope"), libc::RENAME_EXCHANGE)
    });
    t.op("RENAME_EXCHANGE|RENAME_NOREPLACE", libc::EINVAL, |b| {
        rename2(
            &b.join("free"),
            &b.join("dir"),
            libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE,
        )
    });
    fs.finish();
}

#[test]
fn renameat2_whiteout_leaves_a_whiteout_device() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "whiteout", basic_tree);
    t.op("RENAME_WHITEOUT", 0, |b| {
        rename2(&b.join("file"), &b.join("moved"), libc::RENAME_WHITEOUT)
    });
    let u = lstat(&t.u("file")).unwrap();
    assert_eq!(
        u.st_mode & libc::S_IFMT,
        libc::S_IFCHR,
        "whiteout is a char device"
    );
    assert_eq!(u.st_rdev, 0, "whiteout is device 0:0");
    t.same("whiteout source", "file");
    t.same("whiteout target", "moved");
    assert_eq!(read_all(&t.v("moved")), b"hello, berth\n");
    fs.finish();
}

#[test]
fn link_shares_the_inode() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "link", basic_tree);
    t.op("link", 0, |b| link(&b.join("file"), &b.join("dir/hard")));
    t.same("link source", "file");
    t.same("link target", "dir/hard");
    let (a, b) = (
        lstat(&t.v("file")).unwrap(),
        lstat(&t.v("dir/hard")).unwrap(),
    );
    assert_eq!(a.st_nlink, 2, "nlink through the mount");
    assert_eq!(
        a.st_ino, b.st_ino,
        "both names are one inode through the mount"
    );
    t.op("link onto an existing name", libc::EEXIST, |b| {
        link(&b.join("file"), &b.join("link"))
    });
    t.op("link a directory", libc::EPERM, |b| {
        link(&b.join("dir"), &b.join("d2"))
    });
    t.op("link a missing file", libc::ENOENT, |b| {
        link(&b.join("nope"), &b.join("x"))
    });
    t.op("link a symlink itself", 0, |b| {
        link(&b.join("link"), &b.join("link2"))
    });
    t.same("hard link of a symlink", "link2");
    fs.finish();
}

#[test]
fn open_create_excl_trunc_append() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "open", basic_tree);
    let create_excl = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    t.op("O_CREAT|O_EXCL new", 0, |b| {
        open(&b.join("new"), create_excl, 0o640)
    });
    t.same("create", "new");
    t.same("parent after create", "");
    t.op("O_CREAT|O_EXCL existing", libc::EEXIST, |b| {
        open(&b.join("file"), create_excl, 0o640)
    });
    t.op("O_CREAT|O_EXCL on a symlink", libc::EEXIST, |b| {
        open(&b.join("dangling"), create_excl, 0o640)
    });
    t.op("O_CREAT existing keeps mode", 0, |b| {
        open(&b.join("new"), libc::O_CREAT | libc::O_RDWR, 0o777)
    });
    t.same("O_CREAT existing", "new");
    t.op("O_CREAT through a dangling symlink", 0, |b| {
        open(&b.join("dangling"), libc::O_CREAT | libc::O_WRONLY, 0o600)
    });
    t.same("created symlink target", "missing-target");

    let fd = open(&t.v("file"), libc::O_WRONLY | libc::O_TRUNC, 0).unwrap();
    fd.close().unwrap();
    assert_eq!(read_all(&t.u("file")), b"", "O_TRUNC emptied the file");
    assert_same_attrs("O_TRUNC", &t.v("file"), &t.u("file"));

    let fd = open(&t.v("file"), libc::O_WRONLY | libc::O_APPEND, 0).unwrap();
    for part in [&b"one "[..], b"two ", b"three"] {
        // SAFETY: part is valid for part.len() bytes.
        let n = cvt(unsafe { libc::write(fd.raw(), part.as_ptr().cast(), part.len()) }).unwrap();
        assert_eq!(n as usize, part.len());
    }
    fd.close().unwrap();
    assert_eq!(read_all(&t.u("file")), b"one two three", "O_APPEND writes");
    // O_APPEND must append even when someone else grew the file underneath.
    put(&t.u("file"), b"0123456789");
    let fd = open(&t.v("file"), libc::O_WRONLY | libc::O_APPEND, 0).unwrap();
    // SAFETY: the literal is valid for 3 bytes.
    cvt(unsafe { libc::write(fd.raw(), b"abc".as_ptr().cast(), 3) }).unwrap();
    fd.close().unwrap();
    assert_eq!(read_all(&t.u("file")), b"0123456789abc");

    t.op("O_DIRECTORY on a file", libc::ENOTDIR, |b| {
        open(&b.join("file"), libc::O_RDONLY | libc::O_DIRECTORY, 0)
    });
    t.op("O_WRONLY on a directory", libc::EISDIR, |b| {
        open(&b.join("dir"), libc::O_WRONLY, 0)
    });
    t.op("open a missing file", libc::ENOENT, |b| {
        open(&b.join("nope"), libc::O_RDONLY, 0)
    });
    t.op("O_NOFOLLOW on a symlink", libc::ELOOP, |b| {
        open(&b.join("link"), libc::O_RDONLY | libc::O_NOFOLLOW, 0)
    });
    fs.finish();
}

#[test]
fn o_tmpfile_then_linkat() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "tmpfile", EMPTY);
    let before = list_names(&t.u(""));
    let fd = t
        .op_result("O_TMPFILE", 0, |b| {
            open(b, libc::O_TMPFILE | libc::O_RDWR, 0o640)
        })
        .unwrap();
    fd.pwrite_all(b"anonymous data", 0).unwrap();
    assert_eq!(
        list_names(&t.u("")),
        before,
        "an O_TMPFILE file has no name yet"
    );
    assert_eq!(
        fd.fstat().unwrap().st_nlink,
        0,
        "nlink of an unnamed O_TMPFILE"
    );
    let proc_path = format!("/proc/self/fd/{}", fd.raw());
    let (src, dst) = (cstr(&proc_path), cpath(&t.v("named")));
    // SAFETY: both are valid NUL-terminated paths.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .expect("linkat of an O_TMPFILE file into the mount");
    assert_eq!(read_all(&t.u("named")), b"anonymous data");
    assert_eq!(fd.fstat().unwrap().st_nlink, 1, "nlink after linkat");
    let direct = open(&t.d(""), libc::O_TMPFILE | libc::O_RDWR, 0o640).unwrap();
    let twin_stat = direct.fstat().unwrap();
    let fused_stat = lstat(&t.u("named")).unwrap();
    assert_eq!(
        (twin_stat.st_mode, twin_stat.st_uid, twin_stat.st_gid),
        (fused_stat.st_mode, fused_stat.st_uid, fused_stat.st_gid),
        "mode/owner of an O_TMPFILE file"
    );
    assert_same_attrs("linked O_TMPFILE", &t.v("named"), &t.u("named"));
    t.op("O_TMPFILE on a file", libc::ENOTDIR, |b| {
        fs::write(b.join("plain"), b"").unwrap();
        open(&b.join("plain"), libc::O_TMPFILE | libc::O_RDWR, 0o600)
    });
    fs.finish();
}

#[test]
fn read_and_write_at_offsets() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "rw", EMPTY);
    let mut expected = vec![0u8; 0];
    let fd = open(&t.v("data"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
    for (i, (off, len)) in [
        (0usize, 4097usize),
        (100_000, 65_539),
        (8191, 10),
        (300_001, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let chunk = pattern(i as u64 + 1, len);
        fd.pwrite_all(&chunk, off as i64).unwrap();
        if expected.len() < off + len {
            expected.resize(off + len, 0);
        }
        expected[off..off + len].copy_from_slice(&chunk);
    }
    assert_eq!(
        fd.pread_vec(expected.len() + 100, 0).unwrap(),
        expected,
        "read back via fd"
    );
    assert_eq!(
        fd.pread_vec(10, expected.len() as i64 + 5).unwrap(),
        b"",
        "read past EOF"
    );
    assert_eq!(
        fd.pread_vec(100, 99_990).unwrap(),
        &expected[99_990..100_090],
        "read across a hole/data boundary"
    );
    fd.close().unwrap();
    assert_eq!(read_all(&t.u("data")), expected, "underlying content");
    assert_eq!(
        read_all(&t.v("data")),
        expected,
        "content read through a new open"
    );
    assert_same_attrs("after writes", &t.v("data"), &t.u("data"));
    // Changes made underneath are seen by a new open (close-to-open consistency).
    put(&t.u("data"), b"changed underneath");
    assert_eq!(read_all(&t.v("data")), b"changed underneath");
    let ro = open(&t.v("data"), libc::O_RDONLY, 0).unwrap();
    assert_errno("write to an O_RDONLY fd", &ro.pwrite(b"x", 0), libc::EBADF);
    fs.finish();
}

#[test]
fn o_direct_read_and_write_with_allow_direct_io() {
    let Some(fs) = FuseMount::start(&["--allow-direct-io"]) else {
        return;
    };
    let t = Twin::new(&fs, "direct", EMPTY);
    let fd = open(
        &t.v("data"),
        libc::O_CREAT | libc::O_RDWR | libc::O_DIRECT,
        0o644,
    )
    .expect("open O_DIRECT through the mount");
    let mut buf = AlignedBuf::new(1 << 20, 4096);
    fill_pattern(7, buf.as_mut_slice());
    fd.pwrite_all(buf.as_slice(), 0)
        .expect("O_DIRECT write of 1 MiB");
    fd.pwrite_all(&buf.as_slice()[..8192], 3 * 4096)
        .expect("O_DIRECT write at 12 KiB");
    let mut expected = buf.as_slice().to_vec();
    expected[3 * 4096..5 * 4096].copy_from_slice(&buf.as_slice()[..8192]);
    let mut back = AlignedBuf::new(1 << 20, 4096);
    let n = fd.pread(back.as_mut_slice(), 0).expect("O_DIRECT read");
    assert_eq!(n, 1 << 20, "O_DIRECT read length");
    assert!(
        back.as_slice() == expected.as_slice(),
        "O_DIRECT read content"
    );
    // SAFETY: fcntl F_GETFL on an fd we own.
    let flags = cvt(unsafe { libc::fcntl(fd.raw(), libc::F_GETFL) }).unwrap();
    assert_ne!(flags & libc::O_DIRECT, 0, "the fd keeps O_DIRECT");
    // berth's own descriptor on the file bypasses the host page cache too.
    let daemon_flags = fs.daemon_fd_flags(&t.u("data"));
    assert!(
        !daemon_flags.is_empty() && daemon_flags.iter().all(|f| f & libc::O_DIRECT != 0),
        "the daemon's descriptors on the file keep O_DIRECT: {daemon_flags:?}"
    );
    // Misaligned O_DIRECT I/O fails as it does on the host: the guest gets the host's EINVAL.
    put(&t.d("data"), &expected);
    let direct = open(&t.d("data"), libc::O_RDWR | libc::O_DIRECT, 0).unwrap();
    for (what, offset, len) in [
        ("unaligned offset", 100, 4096),
        ("unaligned length", 4096, 100),
    ] {
        let host = direct.pwrite(&buf.as_slice()[..len], offset);
        let guest = fd.pwrite(&buf.as_slice()[..len], offset);
        assert_errno(
            &format!("O_DIRECT write, {what}, on the host"),
            &host,
            libc::EINVAL,
        );
        assert_errno(
            &format!("O_DIRECT write, {what}, through the mount"),
            &guest,
            libc::EINVAL,
        );
        let mut back = AlignedBuf::new(4096, 4096);
        let host = direct.pread(&mut back.as_mut_slice()[..len], offset);
        let guest = fd.pread(&mut back.as_mut_slice()[..len], offset);
        assert_errno(
            &format!("O_DIRECT read, {what}, on the host"),
            &host,
            libc::EINVAL,
        );
        assert_errno(
            &format!("O_DIRECT read, {what}, through the mount"),
            &guest,
            libc::EINVAL,
        );
    }
    fd.close().unwrap();
    assert!(
        read_all(&t.u("data")) == expected,
        "underlying content after O_DIRECT writes (the refused ones changed nothing)"
    );
    assert_same_attrs("O_DIRECT file", &t.v("data"), &t.u("data"));
    fs.finish();
}

#[test]
fn o_direct_is_not_passed_on_without_allow_direct_io() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.under("plain"), b"");
    let fd = open(&fs.via("plain"), libc::O_RDWR | libc::O_DIRECT, 0).expect("open O_DIRECT");
    let daemon_flags = fs.daemon_fd_flags(&fs.under("plain"));
    assert!(!daemon_flags.is_empty(), "the daemon holds the open file");
    assert!(
        daemon_flags.iter().all(|f| f & libc::O_DIRECT == 0),
        "as virtiofsd, O_DIRECT is dropped unless --allow-direct-io: {daemon_flags:?}"
    );
    // The host file is cached, so even misaligned direct I/O from the guest succeeds.
    assert_eq!(fd.pwrite(b"not aligned", 3).unwrap(), 11);
    fd.close().unwrap();
    assert_eq!(read_all(&fs.under("plain")), b"\0\0\0not aligned");
    fs.finish();
}

/// Maps `len` bytes of `fd` shared and read-write; the error if the kernel refuses.
fn map_shared(fd: &Fd, len: usize) -> Result<*mut libc::c_void, i32> {
    // SAFETY: a fresh mapping of a descriptor we own; the caller unmaps it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.raw(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ptr)
    }
}

#[test]
fn allow_mmap_lets_cache_never_files_be_mapped_shared() {
    const LEN: usize = 8192;
    {
        // The classic path: a passthrough open maps the host file itself, coherently, and
        // needs no --allow-mmap.
        let Some(fs) = FuseMount::start(&["--cache", "never", "--passthrough=never"]) else {
            return;
        };
        put(&fs.under("mapped"), &vec![b'.'; LEN]);
        let fd = open(&fs.via("mapped"), libc::O_RDWR, 0).unwrap();
        assert_eq!(
            map_shared(&fd, LEN).err(),
            Some(libc::ENODEV),
            "a DIRECT_IO file cannot be mapped shared without --allow-mmap"
        );
        fd.close().unwrap();
        fs.finish();
    }
    let Some(fs) = FuseMount::start(&["--cache", "never", "--allow-mmap"]) else {
        return;
    };
    put(&fs.under("mapped"), &vec![b'.'; LEN]);
    let fd = open(&fs.via("mapped"), libc::O_RDWR, 0).unwrap();
    let ptr = map_shared(&fd, LEN)
        .unwrap_or_else(|e| panic!("mmap with --allow-mmap: {}", errno_name(e)));
    let data = pattern(3, LEN);
    // SAFETY: the mapping is LEN bytes long and nothing else aliases it in this process.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.cast::<u8>(), LEN) };
    // SAFETY: ptr/LEN is our mapping.
    assert_eq!(unsafe { libc::msync(ptr, LEN, libc::MS_SYNC) }, 0);
    // SAFETY: ptr/LEN is our mapping, unmapped once.
    unsafe { libc::munmap(ptr, LEN) };
    fd.close().unwrap();
    assert!(
        read_all(&fs.under("mapped")) == data,
        "the mapping's writes reached the file"
    );
    fs.finish();
}

/// A POSIX ACL xattr value (version 2): `(tag, perm, id)` entries.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut value = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        value.extend_from_slice(&tag.to_le_bytes());
        value.extend_from_slice(&perm.to_le_bytes());
        value.extend_from_slice(&id.to_le_bytes());
    }
    value
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// Runs `script` in `sh` with umask 077 (in a child: the umask is per process).
fn with_umask_077(script: &str, dir: &Path) {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("umask 077 && {script}"))
        .current_dir(dir)
        .status()
        .expect("run sh");
    assert!(status.success(), "{script} in {}", dir.display());
}

#[test]
fn posix_acl_default_acls_are_inherited_despite_the_umask() {
    let Some(fs) = FuseMount::start(&["--posix-acl"]) else {
        return;
    };
    let t = Twin::new(&fs, "acl", EMPTY);
    // A default ACL granting everyone rwx, plus a named user: new files inherit it, and the
    // creator's umask does not apply (only the ACL and the requested mode do).
    let default_acl = acl_xattr(&[
        (ACL_USER_OBJ, 7, ACL_UNDEFINED_ID),
        (ACL_USER, 7, 4242),
        (ACL_GROUP_OBJ, 7, ACL_UNDEFINED_ID),
        (ACL_MASK, 7, ACL_UNDEFINED_ID),
        (ACL_OTHER, 7, ACL_UNDEFINED_ID),
    ]);
    t.op("set the default ACL", 0, |base| {
        setxattr(base, "system.posix_acl_default", &default_acl, 0)
    });
    assert_eq!(
        getxattr(&t.u(""), "system.posix_acl_default").unwrap(),
        getxattr(&t.d(""), "system.posix_acl_default").unwrap(),
        "the default ACL set through the mount is on the underlying directory"
    );
    with_umask_077(": > file && mkdir sub", &t.d(""));
    with_umask_077(": > file && mkdir sub", &t.v(""));
    for name in ["file", "sub"] {
        let direct = lstat(&t.d(name)).unwrap();
        let under = lstat(&t.u(name)).unwrap();
        assert_eq!(
            under.st_mode, direct.st_mode,
            "{name}: mode {:o} through the mount, {:o} on the host",
            under.st_mode, direct.st_mode
        );
        assert_eq!(
            direct.st_mode & 0o777,
            if name == "file" { 0o666 } else { 0o777 }
        );
        assert_eq!(
            getxattr(&t.u(name), "system.posix_acl_access").ok(),
            getxattr(&t.d(name), "system.posix_acl_access").ok(),
            "{name}: inherited access ACL"
        );
        assert!(
            getxattr(&t.d(name), "system.posix_acl_access").is_ok(),
            "{name}: the named user entry makes the inherited ACL an extended one"
        );
        assert_eq!(
            getxattr(&t.v(name), "system.posix_acl_access").ok(),
            getxattr(&t.u(name), "system.posix_acl_access").ok(),
            "{name}: the ACL read back through the mount"
        );
    }
    assert_eq!(
        getxattr(&t.u("sub"), "system.posix_acl_default").unwrap(),
        default_acl,
        "a new directory inherits the default ACL"
    );
    // An access ACL written through the mount changes the underlying mode as on the host.
    let access = acl_xattr(&[
        (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
        (ACL_OTHER, 0, ACL_UNDEFINED_ID),
    ]);
    t.op("set an access ACL", 0, |base| {
        setxattr(&base.join("file"), "system.posix_acl_access", &access, 0)
    });
    t.same("after the access ACL", "file");
    assert_eq!(lstat(&t.u("file")).unwrap().st_mode & 0o777, 0o640);
    fs.finish();
}

#[test]
fn acl_attributes_need_posix_acl() {
    let Some(fs) = FuseMount::start(&["--xattr"]) else {
        return;
    };
    put(&fs.under("f"), b"");
    let acl = acl_xattr(&[
        (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
        (ACL_OTHER, 4, ACL_UNDEFINED_ID),
    ]);
    assert_errno(
        "setting an ACL without --posix-acl",
        &setxattr(&fs.via("f"), "system.posix_acl_access", &acl, 0),
        libc::EOPNOTSUPP,
    );
    assert!(getxattr(&fs.under("f"), "system.posix_acl_access").is_err());
    // Ordinary attributes still work.
    setxattr(&fs.via("f"), "user.plain", b"v", 0).unwrap();
    assert_eq!(getxattr(&fs.under("f"), "user.plain").unwrap(), b"v");
    fs.finish();
}

#[test]
fn statfs_matches_the_underlying_filesystem() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let before = statvfs(fs.shared()).unwrap();
    let via = statvfs(fs.mnt()).expect("statvfs through the mount");
    let after = statvfs(fs.shared()).unwrap();
    assert_eq!(
        via.f_blocks * via.f_frsize,
        before.f_blocks * before.f_frsize,
        "total size"
    );
    assert_eq!(via.f_files, before.f_files, "f_files");
    assert_eq!(via.f_namemax, before.f_namemax, "f_namemax");
    assert_eq!(via.f_bsize, before.f_bsize, "f_bsize");
    // Free counts move as other tests write to the same disk: allow 4 GiB / 100 000 inodes.
    let slack_blocks = (4u64 << 30) / before.f_frsize.max(1);
    let within =
        |v: u64, a: u64, b: u64, slack: u64| v + slack >= a.min(b) && v <= a.max(b) + slack;
    assert!(
        within(via.f_bfree, before.f_bfree, after.f_bfree, slack_blocks),
        "f_bfree {} vs underlying {}..{}",
        via.f_bfree,
        before.f_bfree,
        after.f_bfree
    );
    assert!(
        within(via.f_bavail, before.f_bavail, after.f_bavail, slack_blocks),
        "f_bavail {} vs underlying {}..{}",
        via.f_bavail,
        before.f_bavail,
        after.f_bavail
    );
    assert!(
        within(via.f_ffree, before.f_ffree, after.f_ffree, 100_000),
        "f_ffree {} vs underlying {}..{}",
        via.f_ffree,
        before.f_ffree,
        after.f_ffree
    );
    fs.finish();
}

#[test]
fn fsync_fdatasync_and_flush_on_close() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "sync", EMPTY);
    let fd = open(&t.v("f"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
    fd.pwrite_all(b"synced data", 0).unwrap();
    // SAFETY: plain syscalls on an fd we own.
    cvt(unsafe { libc::fsync(fd.raw()) }).expect("fsync through the mount");
    assert_eq!(read_all(&t.u("f")), b"synced data", "after fsync");
    fd.pwrite_all(b"more", 11).unwrap();
    // SAFETY: as above.
    cvt(unsafe { libc::fdatasync(fd.raw()) }).expect("fdatasync through the mount");
    assert_eq!(read_all(&t.u("f")), b"synced datamore", "after fdatasync");
    fd.pwrite_all(b"!", 15).unwrap();
    fd.close().expect("close (FLUSH) through the mount");
    assert_eq!(read_all(&t.u("f")), b"synced datamore!", "after close");
    assert_same_attrs("after close", &t.v("f"), &t.u("f"));
    let ro = open(&t.v("f"), libc::O_RDONLY, 0).unwrap();
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::fsync(ro.raw()) }).expect("fsync of a read-only fd");
    ro.close().unwrap();
    // fsyncdir.
    let dir = open(&t.v(""), libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
    // SAFETY: plain syscalls on an fd we own.
    cvt(unsafe { libc::fsync(dir.raw()) }).expect("fsync of a directory (FSYNCDIR)");
    // SAFETY: as above.
    cvt(unsafe { libc::fdatasync(dir.raw()) }).expect("fdatasync of a directory");
    dir.close().expect("close of a directory");
    // syncfs on the mount.
    let any = open(&t.v("f"), libc::O_RDONLY, 0).unwrap();
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::syncfs(any.raw()) }).expect("syncfs through the mount");
    fs.finish();
}

#[test]
fn xattrs_get_set_list_remove() {
    // trusted.* needs CAP_SYS_ADMIN, which the confined daemon only keeps when asked to.
    let Some(fs) = FuseMount::start(&["--xattr", "--modcaps=+sys_admin"]) else {
        return;
    };
    let t = Twin::new(&fs, "xattr", basic_tree);
    let big = pattern(3, 3000);
    for rel in ["file", "dir"] {
        t.op("setxattr", 0, |b| {
            setxattr(&b.join(rel), "user.berth", b"value-1", 0)
        });
        assert_eq!(
            getxattr(&t.u(rel), "user.berth").unwrap(),
            b"value-1",
            "underlying"
        );
        assert_eq!(
            getxattr(&t.v(rel), "user.berth").unwrap(),
            b"value-1",
            "via mount"
        );
        t.op("setxattr big", 0, |b| {
            setxattr(&b.join(rel), "user.big", &big, 0)
        });
        assert_eq!(
            getxattr(&t.v(rel), "user.big").unwrap(),
            big,
            "big value via mount"
        );
        t.op("setxattr empty value", 0, |b| {
            setxattr(&b.join(rel), "user.empty", b"", 0)
        });
        assert_eq!(
            getxattr(&t.v(rel), "user.empty").unwrap(),
            b"",
            "empty value"
        );
        let size = t.op_result("getxattr size query", 0, |b| {
            getxattr_sized(&b.join(rel), "user.berth", 0)
        });
        assert_eq!(size.unwrap().len(), 7, "size query answer");
        t.op("getxattr small buffer", libc::ERANGE, |b| {
            getxattr_sized(&b.join(rel), "user.berth", 3)
        });
        t.op("getxattr missing", libc::ENODATA, |b| {
            getxattr(&b.join(rel), "user.nope")
        });
        t.op("XATTR_CREATE existing", libc::EEXIST, |b| {
            setxattr(&b.join(rel), "user.berth", b"x", libc::XATTR_CREATE)
        });
        t.op("XATTR_REPLACE missing", libc::ENODATA, |b| {
            setxattr(&b.join(rel), "user.nope", b"x", libc::XATTR_REPLACE)
        });
        t.op("XATTR_REPLACE existing", 0, |b| {
            setxattr(&b.join(rel), "user.berth", b"value-2", libc::XATTR_REPLACE)
        });
        assert_eq!(getxattr(&t.u(rel), "user.berth").unwrap(), b"value-2");
        let names = listxattr(&t.v(rel)).expect("listxattr via mount");
        assert_eq!(names, listxattr(&t.u(rel)).unwrap(), "listxattr names");
        for n in ["user.berth", "user.big", "user.empty"] {
            assert!(
                names.iter().any(|x| x == n),
                "listxattr lacks {n}: {names:?}"
            );
        }
        let len = listxattr_sized(&t.v(rel), 0).unwrap().len();
        assert_eq!(
            len,
            listxattr_sized(&t.u(rel), 0).unwrap().len(),
            "listxattr size"
        );
        t.op("listxattr small buffer", libc::ERANGE, |b| {
            listxattr_sized(&b.join(rel), 4)
        });
        t.op("removexattr", 0, |b| {
            removexattr(&b.join(rel), "user.berth")
        });
        assert_errno(
            "after removexattr",
            &getxattr(&t.u(rel), "user.berth"),
            libc::ENODATA,
        );
        t.op("removexattr again", libc::ENODATA, |b| {
            removexattr(&b.join(rel), "user.berth")
        });
        t.same("after xattr changes", rel);
    }
    // Set underneath, read through the mount.
    setxattr(&t.u("dir/inner"), "user.host", b"from host", 0).unwrap();
    assert_eq!(
        getxattr(&t.v("dir/inner"), "user.host").unwrap(),
        b"from host"
    );
    t.op("user.* xattr on a symlink", libc::EPERM, |b| {
        setxattr(&b.join("link"), "user.x", b"1", 0)
    });
    t.op("getxattr of a missing file", libc::ENOENT, |b| {
        getxattr(&b.join("nope"), "user.x")
    });
    t.op("trusted.* setxattr as root", 0, |b| {
        setxattr(&b.join("file"), "trusted.berth", b"t", 0)
    });
    assert_eq!(getxattr(&t.u("file"), "trusted.berth").unwrap(), b"t");
    fs.finish();
}

#[test]
fn xattrs_are_refused_without_the_flag() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    put(&fs.under("f"), b"x");
    setxattr(&fs.under("f"), "user.host", b"1", 0).unwrap();
    assert_errno(
        "setxattr without --xattr",
        &setxattr(&fs.via("f"), "user.x", b"1", 0),
        libc::EOPNOTSUPP,
    );
    assert_errno(
        "getxattr without --xattr",
        &getxattr(&fs.via("f"), "user.host"),
        libc::EOPNOTSUPP,
    );
    assert_errno(
        "setxattr left no trace",
        &getxattr(&fs.under("f"), "user.x"),
        libc::ENODATA,
    );
    fs.finish();
}

fn typed_tree(d: &Path) {
    basic_tree(d);
    mknod(&d.join("fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    mknod(&d.join("sock"), libc::S_IFSOCK | 0o600, 0).unwrap();
    mknod(&d.join("chr"), libc::S_IFCHR | 0o600, libc::makedev(1, 3)).unwrap();
    mknod(&d.join("blk"), libc::S_IFBLK | 0o600, libc::makedev(7, 200)).unwrap();
    for i in 0..40 {
        put(&d.join(format!("{}{i}", "x".repeat(i * 6 + 1))), b"");
    }
}

fn check_readdir(flags: &[&str]) {
    let Some(fs) = FuseMount::start(flags) else {
        return;
    };
    let t = Twin::new(&fs, "readdir", typed_tree);
    let under = read_dir_types(&t.u("")).unwrap();
    let via = read_dir_types(&t.v("")).expect("readdir through the mount");
    assert_eq!(via.len(), under.len(), "entry count");
    assert_eq!(
        via, under,
        "names and d_type through the mount (left) vs underlying"
    );
    let kinds: Vec<u8> = via.iter().map(|(_, k)| *k).collect();
    for k in [
        libc::DT_REG,
        libc::DT_DIR,
        libc::DT_LNK,
        libc::DT_FIFO,
        libc::DT_SOCK,
        libc::DT_CHR,
        libc::DT_BLK,
    ] {
        assert!(kinds.contains(&k), "d_type {k} missing");
    }
    assert_eq!(
        read_dir_types(&t.v("empty")).unwrap(),
        vec![],
        "empty directory"
    );
    assert_eq!(
        read_dir_types(&t.v("dir")).unwrap(),
        read_dir_types(&t.u("dir")).unwrap(),
        "subdirectory"
    );
    // Entries stat like the underlying ones (readdirplus fills attributes).
    for (name, _) in &via {
        let n = String::from_utf8(name.clone()).unwrap();
        assert_same_attrs("entry after readdir", &t.v(&n), &t.u(&n));
    }
    t.op("opendir on a file", libc::ENOTDIR, |b| {
        read_dir_types(&b.join("file"))
    });
    t.op("opendir on a missing dir", libc::ENOENT, |b| {
        read_dir_types(&b.join("nope"))
    });
    fs.finish();
}

#[test]
fn readdir_names_and_types_with_readdirplus() {
    check_readdir(&[]);
}

#[test]
fn readdir_names_and_types_without_readdirplus() {
    check_readdir(&["--no-readdirplus"]);
}

#[test]
fn readdir_sees_changes_between_rewinds() {
    let Some(fs) = FuseMount::start(&["--cache", "never"]) else {
        return;
    };
    let t = Twin::new(&fs, "rewind", basic_tree);
    let first = list_names(&t.v(""));
    put(&t.u("added"), b"");
    fs::remove_file(t.u("file")).unwrap();
    let second = list_names(&t.v(""));
    assert_ne!(first, second);
    assert_eq!(
        second,
        list_names(&t.u("")),
        "listing after underlying changes"
    );
    fs.finish();
}

#[test]
fn access_as_root() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "access", |d| {
        basic_tree(d);
        put(&d.join("exec"), b"#!/bin/sh\n");
        chmod(&d.join("exec"), 0o700).unwrap();
        chmod(&d.join("file"), 0o644).unwrap();
        put(&d.join("none"), b"");
        chmod(&d.join("none"), 0o000).unwrap();
    });
    t.op("access F_OK", 0, |b| {
        faccessat(&b.join("file"), libc::F_OK, 0)
    });
    t.op("access R_OK|W_OK", 0, |b| {
        faccessat(&b.join("file"), libc::R_OK | libc::W_OK, 0)
    });
    t.op("root X_OK on 0644", libc::EACCES, |b| {
        faccessat(&b.join("file"), libc::X_OK, 0)
    });
    t.op("root X_OK on 0700", 0, |b| {
        faccessat(&b.join("exec"), libc::X_OK, 0)
    });
    t.op("root R_OK|W_OK on 0000", 0, |b| {
        faccessat(&b.join("none"), libc::R_OK | libc::W_OK, 0)
    });
    t.op("root X_OK on a dir", 0, |b| {
        faccessat(&b.join("dir"), libc::X_OK, 0)
    });
    t.op("access missing", libc::ENOENT, |b| {
        faccessat(&b.join("nope"), libc::F_OK, 0)
    });
    t.op("AT_EACCESS", 0, |b| {
        faccessat(&b.join("file"), libc::R_OK, libc::AT_EACCESS)
    });
    fs.finish();
}

/// Runs faccessat(path, mode, flags) in a forked child that became uid/gid 65534 and returns
/// the errno (0 for success).
fn access_as_nobody(path: &Path, mode: libc::c_int, flags: libc::c_int) -> i32 {
    const NOBODY: u32 = 65534;
    let c = cpath(path);
    // SAFETY: the child only makes async-signal-safe calls (setgroups, setres[ug]id,
    // faccessat, _exit) and touches no locks or allocator state.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above; we are the single-threaded child.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                libc::_exit(255);
            }
            let rc = libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, flags);
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            });
        }
    }
    let mut status = 0;
    // SAFETY: pid is our child; status is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid");
    assert!(libc::WIFEXITED(status), "child did not exit normally");
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 255, "the child could not drop privileges");
    code
}

#[test]
fn access_as_an_unprivileged_user() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "access_user", |d| {
        chmod(d, 0o755).unwrap();
        for (name, mode, owner) in [
            ("private", 0o600, 0),
            ("public", 0o644, 0),
            ("writable", 0o666, 0),
            ("mine_ro", 0o400, 65534),
            ("exec", 0o755, 0),
        ] {
            put(&d.join(name), b"data");
            chmod(&d.join(name), mode).unwrap();
            lchown(&d.join(name), owner, owner).unwrap();
        }
        fs::create_dir(d.join("locked")).unwrap();
        chmod(&d.join("locked"), 0o700).unwrap();
        put(&d.join("locked/inside"), b"");
    });
    let cases: [(&str, libc::c_int, libc::c_int); 10] = [
        ("private", libc::R_OK, libc::EACCES),
        ("public", libc::R_OK, 0),
        ("public", libc::W_OK, libc::EACCES),
        ("writable", libc::W_OK, 0),
        ("mine_ro", libc::R_OK, 0),
        ("mine_ro", libc::W_OK, libc::EACCES),
        ("exec", libc::X_OK, 0),
        ("public", libc::X_OK, libc::EACCES),
        ("locked/inside", libc::F_OK, libc::EACCES),
        ("nope", libc::F_OK, libc::ENOENT),
    ];
    for flags in [0, libc::AT_EACCESS] {
        for (rel, mode, expected) in cases {
            let direct = access_as_nobody(&t.d(rel), mode, flags);
            let via = access_as_nobody(&t.v(rel), mode, flags);
            assert_eq!(
                direct, expected,
                "uid 65534 faccessat({rel}, {mode}, {flags:#x}) on the underlying dir"
            );
            assert_eq!(
                via,
                expected,
                "uid 65534 faccessat({rel}, {mode}, {flags:#x}) through the mount: expected {}, got {} (mount options: {:?})",
                errno_name(expected),
                errno_name(via),
                mount_options(fs.mnt())
            );
        }
    }
    fs.finish();
}

fn flock_struct(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain-old-data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

fn fcntl_lock(fd: &Fd, cmd: libc::c_int, fl: &mut libc::flock) -> std::io::Result<()> {
    // SAFETY: fl is a valid flock for the duration of the call.
    cvt(unsafe { libc::fcntl(fd.raw(), cmd, fl as *mut libc::flock) }).map(|_| ())
}

#[test]
fn posix_locks_conflict_with_host_locks() {
    let Some(fs) = FuseMount::start(&["--posix-lock"]) else {
        return;
    };
    put(&fs.under("locked"), &[0u8; 200]);
    // This process's lock on the underlying file stands for another program on the host.
    let host = open(&fs.under("locked"), libc::O_RDWR, 0).unwrap();
    fcntl_lock(
        &host,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 0, 100),
    )
    .unwrap();

    let via = open(&fs.via("locked"), libc::O_RDWR, 0).unwrap();
    let r = fcntl_lock(
        &via,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 50, 10),
    );
    assert_errno(
        "F_SETLK through the mount on a host-locked range",
        &r,
        libc::EAGAIN,
    );
    let r = fcntl_lock(&via, libc::F_SETLK, &mut flock_struct(libc::F_RDLCK, 0, 1));
    assert_errno(
        "F_SETLK read lock on a host write-locked range",
        &r,
        libc::EAGAIN,
    );
    let mut probe = flock_struct(libc::F_WRLCK, 50, 10);
    fcntl_lock(&via, libc::F_GETLK, &mut probe).expect("F_GETLK through the mount");
    assert_eq!(
        probe.l_type,
        libc::F_WRLCK as libc::c_short,
        "F_GETLK reports the host lock"
    );
    assert_eq!(
        (probe.l_start, probe.l_len),
        (0, 100),
        "F_GETLK range of the host lock"
    );
    let mut free = flock_struct(libc::F_WRLCK, 150, 10);
    fcntl_lock(&via, libc::F_GETLK, &mut free).unwrap();
    assert_eq!(
        free.l_type,
        libc::F_UNLCK as libc::c_short,
        "F_GETLK on a free range"
    );
    fcntl_lock(
        &via,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 150, 10),
    )
    .expect("F_SETLK of a range the host does not hold");

    // Host releases; the mount takes the range; now the host sees the mount's lock.
    fcntl_lock(
        &host,
        libc::F_SETLK,
        &mut flock_struct(libc::F_UNLCK, 0, 100),
    )
    .unwrap();
    fcntl_lock(
        &via,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 50, 10),
    )
    .expect("F_SETLK after the host released its lock");
    let mut seen = flock_struct(libc::F_WRLCK, 0, 100);
    fcntl_lock(&host, libc::F_GETLK, &mut seen).unwrap();
    assert_eq!(
        seen.l_type,
        libc::F_WRLCK as libc::c_short,
        "the mount's lock is a host lock"
    );
    let r = fcntl_lock(
        &host,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 55, 1),
    );
    assert_errno(
        "host F_SETLK on a range locked through the mount",
        &r,
        libc::EAGAIN,
    );
    // Unlock through the mount, then the host can lock again.
    fcntl_lock(&via, libc::F_SETLK, &mut flock_struct(libc::F_UNLCK, 0, 0)).unwrap();
    fcntl_lock(
        &host,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 0, 200),
    )
    .expect("host F_SETLK after the mount unlocked");
    fcntl_lock(&host, libc::F_SETLK, &mut flock_struct(libc::F_UNLCK, 0, 0)).unwrap();
    // Closing the mount fd drops its locks too.
    fcntl_lock(&via, libc::F_SETLK, &mut flock_struct(libc::F_WRLCK, 0, 10)).unwrap();
    via.close().unwrap();
    let mut after_close = flock_struct(libc::F_WRLCK, 0, 10);
    fcntl_lock(&host, libc::F_GETLK, &mut after_close).unwrap();
    assert_eq!(
        after_close.l_type,
        libc::F_UNLCK as libc::c_short,
        "lock left after close"
    );
    drop(host);
    fs.finish();
}

/// Reads one byte from `fd` (a pipe); false at EOF.
fn read_byte(fd: libc::c_int) -> bool {
    let mut b = 0u8;
    // SAFETY: b is a valid one-byte buffer.
    unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) == 1 }
}

/// A mount serving `flags` with a file `contended` whose bytes 0..10 the returned descriptor
/// holds a write lock on, and the file's path through the mount.
fn contended_mount(flags: &[&str]) -> Option<(FuseMount, std::ffi::CString, Fd)> {
    let fs = FuseMount::start(flags)?;
    put(&fs.under("contended"), &[0u8; 64]);
    let path = cpath(&fs.via("contended"));
    let holder = open(&fs.via("contended"), libc::O_RDWR, 0).unwrap();
    fcntl_lock(
        &holder,
        libc::F_SETLK,
        &mut flock_struct(libc::F_WRLCK, 0, 10),
    )
    .expect("the holder's lock");
    Some((fs, path, holder))
}

extern "C" fn on_alarm(_: libc::c_int) {}

/// A child process that waits in F_SETLKW for a write lock on bytes 0..10 of `path`, then
/// writes one byte to the pipe (`y` granted, `n` refused) and exits with 0 or the errno,
/// letting go of the lock. Its copy of the pipe's read end is closed. With `alarm` > 0 a
/// SIGALRM (handled, without SA_RESTART) comes after that many seconds.
fn fork_lock_waiter(
    path: &std::ffi::CString,
    (read_end, write_end): (libc::c_int, libc::c_int),
    alarm: u32,
) -> i32 {
    // SAFETY: the child makes only async-signal-safe calls (close, sigaction, alarm, open,
    // fcntl, write, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: single-threaded child; the buffers are valid.
        unsafe {
            libc::close(read_end);
            if alarm > 0 {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as usize;
                libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut());
                libc::alarm(alarm);
            }
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_len = 10;
            let rc = if fd < 0 {
                -1
            } else {
                libc::fcntl(fd, libc::F_SETLKW, &mut fl)
            };
            let (byte, code) = if rc == 0 {
                (b'y', 0)
            } else {
                (b'n', *libc::__errno_location())
            };
            libc::write(write_end, (&byte as *const u8).cast(), 1);
            libc::_exit(code);
        }
    }
    pid
}

fn pipe() -> (libc::c_int, libc::c_int) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid two-int array.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).unwrap();
    (fds[0], fds[1])
}

/// More processes waiting in F_SETLKW than berth has /dev/fuse workers: a worker that waited
/// for the lock itself would not read the holder's unlock, and these waits would stop the
/// mount for good.
#[test]
fn more_lock_waits_than_workers_do_not_stop_the_mount() {
    const WAITERS: usize = 6;
    let Some((fs, path, holder)) =
        contended_mount(&["--posix-lock", "--threads", "2", "--io-uring", "never"])
    else {
        return;
    };
    let (done_r, done_w) = pipe();
    let mut children = Vec::new();
    for _ in 0..WAITERS {
        children.push(fork_lock_waiter(&path, (done_r, done_w), 0));
    }
    // SAFETY: closing our copy of the write end, so that reads end when the children do.
    unsafe { libc::close(done_w) };
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Every waiter is in the daemon now; the mount still serves, and the holder lets go.
    let started = std::time::Instant::now();
    let serving = std::thread::spawn({
        let probe = fs.via("contended");
        move || {
            let _ = std::fs::metadata(&probe);
            fcntl_lock(
                &holder,
                libc::F_SETLK,
                &mut flock_struct(libc::F_UNLCK, 0, 10),
            )
        }
    });
    while !serving.is_finished() && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stopped = !serving.is_finished();
    if stopped {
        for pid in &children {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
    assert!(
        !stopped,
        "with {WAITERS} lock waits the mount stopped serving:\n{}",
        fs.log()
    );
    serving.join().unwrap().expect("the holder's unlock");
    let mut granted = 0;
    for _ in 0..WAITERS {
        let mut byte = 0u8;
        // SAFETY: valid one-byte buffer.
        if unsafe { libc::read(done_r, (&mut byte as *mut u8).cast(), 1) } == 1 && byte == b'y' {
            granted += 1;
        }
    }
    for pid in children {
        let mut status = 0;
        // SAFETY: pid is our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    // SAFETY: closing the last pipe end we own.
    unsafe { libc::close(done_r) };
    assert_eq!(granted, WAITERS, "every waiter got the lock in turn");
    fs.finish();
}

/// A process waiting in F_SETLKW that gets a signal (a handler, no SA_RESTART) returns EINTR:
/// the kernel sends FUSE_INTERRUPT and berth stops waiting, without taking the lock for a
/// request nobody waits for any more.
#[test]
fn a_signal_interrupts_a_lock_wait() {
    let Some((fs, path, holder)) = contended_mount(&["--posix-lock", "--io-uring", "never"]) else {
        return;
    };
    let (done_r, done_w) = pipe();
    let pid = fork_lock_waiter(&path, (done_r, done_w), 1);
    // SAFETY: our copy of the write end.
    unsafe { libc::close(done_w) };
    let mut ready = libc::pollfd {
        fd: done_r,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: a valid pollfd.
    let answered = unsafe { libc::poll(&mut ready, 1, 10_000) } == 1;
    if !answered {
        // SAFETY: our own child, stuck waiting.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    // SAFETY: the last pipe end we own.
    unsafe { libc::close(done_r) };
    assert!(
        answered,
        "F_SETLKW went on waiting after the signal:\n{}",
        fs.log()
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        libc::EINTR,
        "F_SETLKW returned {}",
        errno_name(libc::WEXITSTATUS(status))
    );
    // The interrupted wait took nothing: once the holder lets go, the range is free.
    fcntl_lock(
        &holder,
        libc::F_SETLK,
        &mut flock_struct(libc::F_UNLCK, 0, 10),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let other = open(&fs.via("contended"), libc::O_RDWR, 0).unwrap();
    let mut probe = flock_struct(libc::F_WRLCK, 0, 10);
    fcntl_lock(&other, libc::F_OFD_GETLK, &mut probe).unwrap();
    assert_eq!(
        probe.l_type,
        libc::F_UNLCK as libc::c_short,
        "the range is free"
    );
    drop(other);
    drop(holder);
    fs.finish();
}

#[test]
fn posix_locks_conflict_between_processes_and_setlkw_waits() {
    let Some(fs) = FuseMount::start(&["--posix-lock"]) else {
        return;
    };
    put(&fs.under("shared-lock"), &[0u8; 64]);
    let path = cpath(&fs.via("shared-lock"));
    let (ready_r, ready_w) = pipe();
    let (go_r, go_w) = pipe();
    // SAFETY: the child makes only async-signal-safe calls (open, fcntl, read, write, _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: single-threaded child; buffers are valid.
        unsafe {
            // Drop the parent's ends, or closing go_w in the parent would not wake us.
            libc::close(ready_r);
            libc::close(go_w);
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_len = 10;
            let ok = fd >= 0 && libc::fcntl(fd, libc::F_SETLK, &mut fl) == 0;
            let byte = if ok { b'y' } else { b'n' };
            libc::write(ready_w, (&byte as *const u8).cast(), 1);
            let mut b = 0u8;
            libc::read(go_r, (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of the child's pipe ends.
    unsafe {
        libc::close(ready_w);
        libc::close(go_r);
    }
    let mut status_byte = 0u8;
    // SAFETY: valid one-byte buffer.
    unsafe { libc::read(ready_r, (&mut status_byte as *mut u8).cast(), 1) };
    assert_eq!(
        status_byte, b'y',
        "the child could not F_SETLK through the mount"
    );
    let fd = open(&fs.via("shared-lock"), libc::O_RDWR, 0).unwrap();
    let r = fcntl_lock(&fd, libc::F_SETLK, &mut flock_struct(libc::F_WRLCK, 5, 1));
    assert_errno("F_SETLK against another process's lock", &r, libc::EAGAIN);
    let mut probe = flock_struct(libc::F_RDLCK, 0, 64);
    fcntl_lock(&fd, libc::F_GETLK, &mut probe).unwrap();
    assert_eq!(
        probe.l_type,
        libc::F_WRLCK as libc::c_short,
        "F_GETLK sees the child's lock"
    );
    fcntl_lock(&fd, libc::F_SETLK, &mut flock_struct(libc::F_WRLCK, 10, 5))
        .expect("F_SETLK on a range next to the child's");
    // Let the child exit; its lock goes with it.
    // SAFETY: closing our write end of the go pipe wakes the child.
    unsafe { libc::close(go_w) };
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let r = fcntl_lock(&fd, libc::F_SETLK, &mut flock_struct(libc::F_WRLCK, 0, 10));
        if r.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the exited child's lock was never released: {r:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: closing the last pipe end we own.
    unsafe { libc::close(ready_r) };

    // F_SETLKW: a second process waits for our lock, and gets it once we unlock.
    let (done_r, done_w) = pipe();
    let waiter = fork_lock_waiter(&path, (done_r, done_w), 0);
    // SAFETY: our copy of the write end.
    unsafe { libc::close(done_w) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut status = 0;
    // SAFETY: waiter is our child.
    let early = unsafe { libc::waitpid(waiter, &mut status, libc::WNOHANG) };
    assert_eq!(
        early,
        0,
        "F_SETLKW through the mount returned before the lock was free (exit status {})",
        if early == waiter {
            errno_name(libc::WEXITSTATUS(status))
        } else {
            "?".into()
        }
    );
    fcntl_lock(&fd, libc::F_SETLK, &mut flock_struct(libc::F_UNLCK, 0, 0)).unwrap();
    let mut fds = libc::pollfd {
        fd: done_r,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: fds is a valid pollfd.
    let ready = unsafe { libc::poll(&mut fds, 1, 5000) };
    if ready != 1 {
        // SAFETY: killing our own stuck child.
        unsafe { libc::kill(waiter, libc::SIGKILL) };
    }
    // SAFETY: waiter is our child.
    unsafe { libc::waitpid(waiter, &mut status, 0) };
    assert_eq!(
        ready, 1,
        "F_SETLKW was not granted within 5 s of the unlock"
    );
    assert!(read_byte(done_r));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "F_SETLKW failed: {}",
        errno_name(libc::WEXITSTATUS(status))
    );
    // SAFETY: closing the last pipe end.
    unsafe { libc::close(done_r) };
    fs.finish();
}

fn flock(fd: &Fd, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::flock(fd.raw(), op) }).map(|_| ())
}

#[test]
fn flock_conflicts_with_host_and_other_opens() {
    let Some(fs) = FuseMount::start(&["--flock"]) else {
        return;
    };
    put(&fs.under("f"), b"x");
    let host = open(&fs.under("f"), libc::O_RDONLY, 0).unwrap();
    let via = open(&fs.via("f"), libc::O_RDONLY, 0).unwrap();
    let via2 = open(&fs.via("f"), libc::O_RDONLY, 0).unwrap();
    flock(&host, libc::LOCK_EX).unwrap();
    assert_errno(
        "flock LOCK_EX|LOCK_NB through the mount while the host holds LOCK_EX",
        &flock(&via, libc::LOCK_EX | libc::LOCK_NB),
        libc::EWOULDBLOCK,
    );
    assert_errno(
        "flock LOCK_SH|LOCK_NB through the mount while the host holds LOCK_EX",
        &flock(&via, libc::LOCK_SH | libc::LOCK_NB),
        libc::EWOULDBLOCK,
    );
    flock(&host, libc::LOCK_UN).unwrap();
    flock(&via, libc::LOCK_EX | libc::LOCK_NB).expect("flock after the host unlocked");
    assert_errno(
        "host flock while the mount holds LOCK_EX",
        &flock(&host, libc::LOCK_EX | libc::LOCK_NB),
        libc::EWOULDBLOCK,
    );
    assert_errno(
        "second open through the mount",
        &flock(&via2, libc::LOCK_EX | libc::LOCK_NB),
        libc::EWOULDBLOCK,
    );
    flock(&via, libc::LOCK_UN).unwrap();
    flock(&via2, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    flock(&host, libc::LOCK_SH | libc::LOCK_NB).expect("shared locks coexist");
    flock(&host, libc::LOCK_UN).unwrap();
    // Closing the holder releases the lock.
    via2.close().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while flock(&host, libc::LOCK_EX | libc::LOCK_NB).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "closing the mount fd did not release its flock"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    fs.finish();
}

fn fallocate(fd: &Fd, mode: libc::c_int, off: i64, len: i64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::fallocate(fd.raw(), mode, off, len) }).map(|_| ())
}

#[test]
fn fallocate_and_punch_hole() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "falloc", EMPTY);
    let fd = open(&t.v("f"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
    fallocate(&fd, 0, 0, 1 << 20).expect("fallocate 1 MiB through the mount");
    let u = lstat(&t.u("f")).unwrap();
    assert_eq!(u.st_size, 1 << 20, "size after fallocate");
    assert!(
        u.st_blocks * 512 >= 1 << 20,
        "blocks after fallocate: {}",
        u.st_blocks
    );
    assert_same_attrs("fallocate", &t.v("f"), &t.u("f"));
    let data = pattern(11, 1 << 20);
    fd.pwrite_all(&data, 0).unwrap();
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::fsync(fd.raw()) }).unwrap();
    let blocks_full = lstat(&t.u("f")).unwrap().st_blocks;
    fallocate(
        &fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 << 10,
        256 << 10,
    )
    .expect("PUNCH_HOLE|KEEP_SIZE through the mount");
    let mut expected = data.clone();
    expected[256 << 10..512 << 10].fill(0);
    assert!(
        fd.pread_vec(1 << 20, 0).unwrap() == expected,
        "content after punch via mount"
    );
    assert!(
        read_all(&t.u("f")) == expected,
        "underlying content after punch"
    );
    let u = lstat(&t.u("f")).unwrap();
    assert_eq!(u.st_size, 1 << 20, "KEEP_SIZE kept the size");
    assert!(
        u.st_blocks < blocks_full,
        "punch freed blocks: {} -> {}",
        blocks_full,
        u.st_blocks
    );
    assert_same_attrs("punch hole", &t.v("f"), &t.u("f"));
    fallocate(&fd, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).expect("KEEP_SIZE beyond EOF");
    assert_eq!(
        lstat(&t.u("f")).unwrap().st_size,
        1 << 20,
        "KEEP_SIZE beyond EOF"
    );
    fallocate(&fd, libc::FALLOC_FL_ZERO_RANGE, 0, 4096).expect("ZERO_RANGE");
    expected[..4096].fill(0);
    assert!(read_all(&t.u("f")) == expected, "after ZERO_RANGE");
    assert_same_attrs("after fallocate modes", &t.v("f"), &t.u("f"));
    assert_errno(
        "PUNCH_HOLE without KEEP_SIZE",
        &fallocate(&fd, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        libc::EOPNOTSUPP,
    );
    let ro = open(&t.v("f"), libc::O_RDONLY, 0).unwrap();
    assert_errno(
        "fallocate on an O_RDONLY fd",
        &fallocate(&ro, 0, 0, 10),
        libc::EBADF,
    );
    fs.finish();
}

fn lseek(fd: &Fd, off: i64, whence: libc::c_int) -> std::io::Result<i64> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::lseek(fd.raw(), off, whence) })
}

#[test]
fn lseek_data_and_hole_match_the_underlying_file() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "lseek", EMPTY);
    const MIB: i64 = 1 << 20;
    let fd = open(&t.v("sparse"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.raw(), 4 * MIB) }).unwrap();
    fd.pwrite_all(&pattern(1, 8192), 0).unwrap();
    fd.pwrite_all(&pattern(2, 8192), 2 * MIB).unwrap();
    // SAFETY: as above.
    cvt(unsafe { libc::fsync(fd.raw()) }).unwrap();
    let host = open(&t.u("sparse"), libc::O_RDONLY, 0).unwrap();
    let first_hole = lseek(&host, 0, libc::SEEK_HOLE).unwrap();
    assert!(
        first_hole < 4 * MIB,
        "the underlying filesystem reports no hole: test is moot"
    );
    for off in [
        0,
        4096,
        8191,
        8192,
        65536,
        2 * MIB - 1,
        2 * MIB,
        2 * MIB + 8192,
        3 * MIB,
        4 * MIB - 1,
        4 * MIB,
        5 * MIB,
    ] {
        for (whence, name) in [
            (libc::SEEK_DATA, "SEEK_DATA"),
            (libc::SEEK_HOLE, "SEEK_HOLE"),
        ] {
            let expected = lseek(&host, off, whence);
            let got = lseek(&fd, off, whence);
            assert_eq!(
                got.as_ref().map_err(|e| e.raw_os_error()),
                expected.as_ref().map_err(|e| e.raw_os_error()),
                "lseek({off}, {name}) through the mount (left) vs underlying (right)"
            );
        }
    }
    assert_eq!(lseek(&fd, 100, libc::SEEK_SET).unwrap(), 100);
    assert_eq!(lseek(&fd, 0, libc::SEEK_END).unwrap(), 4 * MIB);
    fs.finish();
}

#[test]
fn copy_file_range_copies_content() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "cfr", EMPTY);
    let data = pattern(21, (3 << 20) + 123);
    put(&t.u("src"), &data);
    let src = open(&t.v("src"), libc::O_RDONLY, 0).unwrap();
    let dst = open(&t.v("dst"), libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (100, 7);
    let want = data.len() - 100;
    let mut copied = 0usize;
    while copied < want {
        // SAFETY: fds are ours; offsets are valid in/out pointers.
        let n = cvt(unsafe {
            libc::copy_file_range(
                src.raw(),
                &mut off_in,
                dst.raw(),
                &mut off_out,
                want - copied,
                0,
            )
        })
        .expect("copy_file_range through the mount");
        assert!(n > 0, "copy_file_range returned 0 before the end");
        copied += n as usize;
    }
    assert_eq!(off_in as usize, data.len(), "source offset advanced");
    dst.close().unwrap();
    let mut expected = vec![0u8; 7];
    expected.extend_from_slice(&data[100..]);
    assert!(read_all(&t.u("dst")) == expected, "underlying copy content");
    assert!(
        read_all(&t.v("dst")) == expected,
        "copy content through the mount"
    );
    assert_same_attrs("copy target", &t.v("dst"), &t.u("dst"));
    fs.finish();
}

#[test]
fn errno_parity_for_common_failures() {
    let Some(fs) = FuseMount::start(&[]) else {
        return;
    };
    let t = Twin::new(&fs, "errno", basic_tree);
    t.op("stat missing", libc::ENOENT, |b| lstat(&b.join("missing")));
    t.op("open missing", libc::ENOENT, |b| {
        open(&b.join("missing"), libc::O_RDONLY, 0)
    });
    t.op("unlink missing", libc::ENOENT, |b| {
        unlink(&b.join("missing"))
    });
    t.op("follow dangling symlink", libc::ENOENT, |b| {
        open(&b.join("dangling"), libc::O_RDONLY, 0)
    });
    t.op("mkdir existing", libc::EEXIST, |b| {
        mkdir(&b.join("dir"), 0o755)
    });
    t.op("O_EXCL existing", libc::EEXIST, |b| {
        open(
            &b.join("file"),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
            0o644,
        )
    });
    t.op("link onto existing", libc::EEXIST, |b| {
        link(&b.join("file"), &b.join("dir/inner"))
    });
    t.op("symlink onto existing", libc::EEXIST, |b| {
        symlink("x", &b.join("dir"))
    });
    t.op("path through a file", libc::ENOTDIR, |b| {
        lstat(&b.join("file/x"))
    });
    t.op("rmdir a file", libc::ENOTDIR, |b| rmdir(&b.join("file")));
    t.op("O_DIRECTORY file", libc::ENOTDIR, |b| {
        open(&b.join("file"), libc::O_RDONLY | libc::O_DIRECTORY, 0)
    });
    t.op("open dir for writing", libc::EISDIR, |b| {
        open(&b.join("dir"), libc::O_RDWR, 0)
    });
    t.op("unlink a dir", libc::EISDIR, |b| unlink(&b.join("dir")));
    t.op("rmdir non-empty", libc::ENOTEMPTY, |b| {
        rmdir(&b.join("dir"))
    });
    t.op("O_NOFOLLOW symlink", libc::ELOOP, |b| {
        open(&b.join("link"), libc::O_RDONLY | libc::O_NOFOLLOW, 0)
    });
    t.op("symlink loop", libc::ELOOP, |b| {
        symlink("loop", &b.join("loop")).unwrap();
        open(&b.join("loop"), libc::O_RDONLY, 0)
    });
    t.op("read a directory", libc::EISDIR, |b| {
        let fd = open(&b.join("dir"), libc::O_RDONLY, 0).unwrap();
        fd.pread_vec(10, 0)
    });
    t.op("create below a missing dir", libc::ENOENT, |b| {
        open(&b.join("missing/x"), libc::O_CREAT | libc::O_RDWR, 0o644)
    });
    t.op("rename dir into descendant", libc::EINVAL, |b| {
        rename2(&b.join("dir"), &b.join("dir/x"), 0)
    });
    fs.finish();
}

#[test]
fn readonly_refuses_every_change_with_erofs() {
    let Some(fs) = FuseMount::start(&["--readonly", "--xattr"]) else {
        return;
    };
    basic_tree(fs.shared());
    setxattr(&fs.under("file"), "user.a", b"1", 0).unwrap();
    let v = |rel: &str| fs.via(rel);
    assert_eq!(
        read_all(&v("file")),
        b"hello, berth\n",
        "reads work read-only"
    );
    assert_eq!(
        list_names(fs.mnt()),
        list_names(fs.shared()),
        "readdir works read-only"
    );
    assert_eq!(
        getxattr(&v("file"), "user.a").unwrap(),
        b"1",
        "getxattr works read-only"
    );
    let checks: Vec<(&str, std::io::Result<()>)> = vec![
        (
            "create",
            open(&v("new"), libc::O_CREAT | libc::O_WRONLY, 0o644).map(drop),
        ),
        (
            "open O_WRONLY",
            open(&v("file"), libc::O_WRONLY, 0).map(drop),
        ),
        ("open O_RDWR", open(&v("file"), libc::O_RDWR, 0).map(drop)),
        (
            "open O_TRUNC",
            open(&v("file"), libc::O_RDONLY | libc::O_TRUNC, 0).map(drop),
        ),
        (
            "O_TMPFILE",
            open(fs.mnt(), libc::O_TMPFILE | libc::O_RDWR, 0o600).map(drop),
        ),
        ("mkdir", mkdir(&v("newdir"), 0o755)),
        ("mknod", mknod(&v("fifo"), libc::S_IFIFO | 0o644, 0)),
        ("symlink", symlink("file", &v("sl"))),
        ("link", link(&v("file"), &v("hard"))),
        ("unlink", unlink(&v("file"))),
        ("rmdir", rmdir(&v("empty"))),
        ("rename", rename2(&v("file"), &v("renamed"), 0)),
        ("chmod", chmod(&v("file"), 0o600)),
        ("chown", lchown(&v("file"), 1, 1)),
        ("truncate", truncate(&v("file"), 0)),
        ("utimensat", utimens(&v("file"), [ts(1, 0), ts(1, 0)], 0)),
        ("setxattr", setxattr(&v("file"), "user.b", b"1", 0)),
        ("removexattr", removexattr(&v("file"), "user.a")),
    ];
    for (what, r) in &checks {
        assert_errno(&format!("{what} with --readonly"), r, libc::EROFS);
    }
    assert_eq!(
        read_all(&fs.under("file")),
        b"hello, berth\n",
        "file unchanged"
    );
    assert_eq!(
        list_names(fs.shared()).len(),
        5,
        "no entry created underneath"
    );
    fs.finish();
}

fn round_trip_in_mode(flags: &[&str]) {
    let Some(fs) = FuseMount::start(flags) else {
        return;
    };
    let t = Twin::new(&fs, "mode", basic_tree);
    let data = pattern(77, 300_001);
    t.op("write a file", 0, |b| fs::write(b.join("new"), &data));
    assert!(
        read_all(&t.v("new")) == data,
        "{flags:?}: content through the mount"
    );
    assert!(
        read_all(&t.u("new")) == data,
        "{flags:?}: underlying content"
    );
    t.op("append", 0, |b| {
        use std::io::Write;
        fs::OpenOptions::new()
            .append(true)
            .open(b.join("new"))?
            .write_all(b"tail")
    });
    assert_eq!(
        &read_all(&t.u("new"))[300_001..],
        b"tail",
        "{flags:?}: appended"
    );
    t.op("chmod", 0, |b| chmod(&b.join("new"), 0o600));
    t.op("rename", 0, |b| {
        rename2(&b.join("new"), &b.join("dir/moved"), 0)
    });
    t.op("truncate", 0, |b| truncate(&b.join("dir/moved"), 1000));
    // Without writeback caching the mount and the disk agree at once; with it, after fsync.
    let fd = open(&t.v("dir/moved"), libc::O_RDONLY, 0).unwrap();
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::fsync(fd.raw()) }).unwrap();
    drop(fd);
    if flags.contains(&"--writeback") {
        // With writeback caching the kernel keeps its own ctime (the host cannot be told one),
        // so ctime may differ slightly; everything else must match.
        let v = Attrs::from(&lstat(&t.v("dir/moved")).unwrap());
        let u = Attrs::from(&lstat(&t.u("dir/moved")).unwrap());
        let ctime_gap = (v.ctime.0 - u.ctime.0).abs();
        assert!(
            ctime_gap <= 1,
            "writeback: ctime {:?} vs underlying {:?}",
            v.ctime,
            u.ctime
        );
        assert_eq!(
            Attrs { ctime: (0, 0), ..v },
            Attrs { ctime: (0, 0), ..u },
            "writeback: attributes through the mount (left) vs underlying (right), ctime aside"
        );
    } else {
        t.same(
            &format!("{flags:?}: after write/chmod/rename/truncate"),
            "dir/moved",
        );
    }
    t.same(&format!("{flags:?}: parent"), "dir");
    t.op("unlink", 0, |b| unlink(&b.join("dir/moved")));
    t.same(&format!("{flags:?}: after unlink"), "dir/moved");
    fs.finish();
}

#[test]
fn round_trip_with_cache_never() {
    round_trip_in_mode(&["--cache", "never"]);
}

#[test]
fn round_trip_with_cache_metadata() {
    round_trip_in_mode(&["--cache", "metadata"]);
}

#[test]
fn round_trip_with_cache_always() {
    round_trip_in_mode(&["--cache", "always"]);
}

#[test]
fn round_trip_with_writeback_cache() {
    round_trip_in_mode(&["--writeback"]);
}

/// In a child that became uid/gid 65534: open `path` with `flags`, write one byte unless
/// O_TRUNC is asked, and return the errno (0 for success).
fn write_as_nobody(path: &Path, flags: libc::c_int) -> i32 {
    const NOBODY: u32 = 65534;
    let c = cpath(path);
    // SAFETY: the child only makes async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: single-threaded child; buffers are valid.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                libc::_exit(255);
            }
            let fd = libc::open(c.as_ptr(), flags);
            if fd < 0 {
                libc::_exit(*libc::__errno_location());
            }
            if flags & libc::O_TRUNC == 0 && libc::pwrite(fd, b"X".as_ptr().cast(), 1, 0) != 1 {
                libc::_exit(*libc::__errno_location());
            }
            if libc::close(fd) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    let code = libc::WEXITSTATUS(status);
    assert_ne!(code, 255, "the child could not drop privileges");
    code
}

fn unprivileged_write_clears_setuid(flags: &[&str]) {
    let Some(fs) = FuseMount::start(flags) else {
        return;
    };
    let t = Twin::new(&fs, "killpriv", |d| {
        for name in ["w", "t"] {
            put(&d.join(name), b"#!/bin/sh\n");
            chmod(&d.join(name), 0o6777).unwrap();
        }
    });
    for (name, open_flags, what) in [
        ("w", libc::O_WRONLY, "write"),
        ("t", libc::O_WRONLY | libc::O_TRUNC, "O_TRUNC"),
    ] {
        assert_eq!(
            write_as_nobody(&t.d(name), open_flags),
            0,
            "direct {what} as nobody"
        );
        assert_eq!(
            write_as_nobody(&t.v(name), open_flags),
            0,
            "{what} as nobody via mount"
        );
        let direct = lstat(&t.d(name)).unwrap().st_mode;
        let fused = lstat(&t.u(name)).unwrap().st_mode;
        assert_eq!(
            direct & 0o7777,
            0o777,
            "test premise: an unprivileged {what} clears setuid/setgid on the host"
        );
        assert_eq!(
            fused & 0o7777,
            direct & 0o7777,
            "{flags:?}: mode after an unprivileged {what} through the mount (left) vs directly (right)"
        );
        assert_same_attrs(&format!("{flags:?} {what}"), &t.v(name), &t.u(name));
    }
    fs.finish();
}

#[test]
fn unprivileged_write_clears_setuid_and_setgid() {
    unprivileged_write_clears_setuid(&[]);
}

#[test]
fn unprivileged_write_clears_setuid_and_setgid_with_killpriv_v2() {
    unprivileged_write_clears_setuid(&["--killpriv-v2"]);
}
