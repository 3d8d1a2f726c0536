//! `--xattrmap` on a host /dev/fuse mount: extended attributes set, read, listed and removed
//! through the mount, checked against what the underlying directory holds. The examples are
//! virtiofsd's (doc/xattr-mapping.md).
//!
//! Needs root and /dev/fuse; each test skips with a printed reason otherwise.

#[path = "common/fuse_mount.rs"]
mod fuse_mount;

use std::path::Path;
use std::process::Command;

use fuse_mount::*;

/// Example 1: every guest name lives under `user.virtiofs.` on the host; what the host set
/// itself is hidden.
const PREFIX_ALL: &str = "--xattrmap=:prefix:all::user.virtiofs.::bad:all:::";

/// Example 2: `trusted.` names are kept as `user.virtiofs.trusted.` (so the daemon needs no
/// CAP_SYS_ADMIN for them), everything else passes.
const TRUSTED_TO_USER: &str = "--xattrmap=/prefix/all/trusted./user.virtiofs./
    /bad/server//trusted./
    /bad/client/user.virtiofs.//
    /ok/all///";

/// The host's xattr names of `p`, sorted.
fn host_names(p: &Path) -> Vec<String> {
    listxattr(p).unwrap_or_else(|e| panic!("host listxattr {}: {e}", p.display()))
}

/// The size a zero-sized listxattr reports (the guest's size probe).
fn list_size(p: &Path) -> usize {
    listxattr_sized(p, 0)
        .unwrap_or_else(|e| panic!("listxattr size probe {}: {e}", p.display()))
        .len()
}

#[test]
fn prefix_all_stores_guest_names_under_user_virtiofs() {
    let Some(fs) = FuseMount::start(&["--xattr", PREFIX_ALL]) else {
        return;
    };
    put(&fs.under("f"), b"data");
    mkdir(&fs.under("d"), 0o755).unwrap();
    for rel in ["f", "d"] {
        let (v, u) = (fs.via(rel), fs.under(rel));
        setxattr(&v, "user.foo", b"bar", 0).expect("setxattr user.foo through the mount");
        // Names the guest could never write on the host as an unprivileged daemon land in the
        // user namespace too.
        setxattr(&v, "trusted.t", b"tv", 0).expect("setxattr trusted.t through the mount");
        assert_eq!(
            host_names(&u),
            ["user.virtiofs.trusted.t", "user.virtiofs.user.foo"],
            "{rel}: what the host holds"
        );
        assert_eq!(getxattr(&u, "user.virtiofs.user.foo").unwrap(), b"bar");
        assert_eq!(getxattr(&v, "user.foo").unwrap(), b"bar");
        assert_eq!(getxattr(&v, "trusted.t").unwrap(), b"tv");

        // A name the host set itself is hidden: not listed, and reading it through the mount
        // reads user.virtiofs.user.hostonly, which does not exist.
        setxattr(&u, "user.hostonly", b"secret", 0).unwrap();
        assert_eq!(listxattr(&v).unwrap(), ["trusted.t", "user.foo"], "{rel}");
        assert_errno(
            "getxattr of a host-only name",
            &getxattr(&v, "user.hostonly"),
            libc::ENODATA,
        );
        // A prefixed name the host sets appears stripped.
        setxattr(&u, "user.virtiofs.user.fromhost", b"h", 0).unwrap();
        assert_eq!(
            listxattr(&v).unwrap(),
            ["trusted.t", "user.foo", "user.fromhost"]
        );
        assert_eq!(getxattr(&v, "user.fromhost").unwrap(), b"h");

        // The size probe answers the size of the list the guest gets, not the host's; a
        // buffer of exactly that size is enough, one byte less is ERANGE.
        let guest_list = b"trusted.t\0user.foo\0user.fromhost\0".len();
        assert!(list_size(&u) > guest_list);
        assert_eq!(list_size(&v), guest_list, "{rel}: listxattr(size 0)");
        assert_eq!(listxattr_sized(&v, guest_list).unwrap().len(), guest_list);
        assert_errno(
            "listxattr one byte short",
            &listxattr_sized(&v, guest_list - 1),
            libc::ERANGE,
        );
        // GETXATTR sizes are the host value's, through the mapped name.
        assert_eq!(getxattr_sized(&v, "user.foo", 0).unwrap().len(), 3);
        assert_errno(
            "getxattr into a short buffer",
            &getxattr_sized(&v, "user.foo", 2),
            libc::ERANGE,
        );

        // XATTR_CREATE and XATTR_REPLACE see the mapped name.
        assert_errno(
            "XATTR_CREATE of an existing name",
            &setxattr(&v, "user.foo", b"x", libc::XATTR_CREATE),
            libc::EEXIST,
        );
        assert_errno(
            "XATTR_REPLACE of a missing name",
            &setxattr(&v, "user.new", b"x", libc::XATTR_REPLACE),
            libc::ENODATA,
        );
        assert_errno(
            "XATTR_REPLACE of a host-only name",
            &setxattr(&v, "user.hostonly", b"x", libc::XATTR_REPLACE),
            libc::ENODATA,
        );

        removexattr(&v, "user.foo").expect("removexattr through the mount");
        assert_errno(
            "getxattr after removal",
            &getxattr(&u, "user.virtiofs.user.foo"),
            libc::ENODATA,
        );
        assert_errno(
            "removexattr of a host-only name",
            &removexattr(&v, "user.hostonly"),
            libc::ENODATA,
        );
        assert_eq!(
            getxattr(&u, "user.hostonly").unwrap(),
            b"secret",
            "untouched"
        );
        assert_eq!(listxattr(&v).unwrap(), ["trusted.t", "user.fromhost"]);
    }
    // A file with only host names lists as empty.
    put(&fs.under("plain"), b"");
    setxattr(&fs.under("plain"), "user.a", b"1", 0).unwrap();
    assert_eq!(list_size(&fs.via("plain")), 0);
    assert!(listxattr(&fs.via("plain")).unwrap().is_empty());
    fs.finish();
}

#[test]
fn setfattr_and_getfattr_work_through_the_mapping() {
    for tool in ["setfattr", "getfattr"] {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(&format!("{tool} (Debian's attr) is not installed"));
            return;
        }
    }
    let Some(fs) = FuseMount::start(&["--xattr", PREFIX_ALL]) else {
        return;
    };
    put(&fs.under("f"), b"data");
    setxattr(&fs.under("f"), "user.hostonly", b"secret", 0).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run the attr tool");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    run(Command::new("setfattr")
        .args(["-n", "user.tool", "-v", "hello"])
        .arg(fs.via("f")));
    assert_eq!(
        getxattr(&fs.under("f"), "user.virtiofs.user.tool").unwrap(),
        b"hello"
    );
    let dump = run(Command::new("getfattr")
        .args(["--absolute-names", "-d", "-m", "-"])
        .arg(fs.via("f")));
    assert!(dump.contains("user.tool=\"hello\""), "{dump}");
    assert!(
        !dump.contains("hostonly") && !dump.contains("virtiofs"),
        "{dump}"
    );
    let value = run(Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-n", "user.tool"])
        .arg(fs.via("f")));
    assert_eq!(value, "hello");
    run(Command::new("setfattr")
        .args(["-x", "user.tool"])
        .arg(fs.via("f")));
    assert!(getxattr(&fs.under("f"), "user.virtiofs.user.tool").is_err());
    fs.finish();
}

#[test]
fn trusted_names_are_kept_as_user_virtiofs_names() {
    // No --modcaps=+sys_admin: the daemon could not write trusted.* itself.
    let Some(fs) = FuseMount::start(&["--xattr", TRUSTED_TO_USER]) else {
        return;
    };
    put(&fs.under("f"), b"data");
    let (v, u) = (fs.via("f"), fs.under("f"));
    setxattr(&v, "trusted.overlay.opaque", b"y", 0).expect("setxattr trusted.* through the mount");
    setxattr(&v, "user.plain", b"p", 0).expect("setxattr user.plain through the mount");
    assert_eq!(
        host_names(&u),
        ["user.plain", "user.virtiofs.trusted.overlay.opaque"]
    );
    assert_eq!(getxattr(&v, "trusted.overlay.opaque").unwrap(), b"y");
    // The guest cannot reach the prefixed names directly (that would bypass the trusted.*
    // access check): EPERM, and ENODATA for reads, as virtiofsd.
    assert_errno(
        "setxattr user.virtiofs.*",
        &setxattr(&v, "user.virtiofs.trusted.overlay.opaque", b"n", 0),
        libc::EPERM,
    );
    assert_errno(
        "getxattr user.virtiofs.*",
        &getxattr(&v, "user.virtiofs.trusted.overlay.opaque"),
        libc::ENODATA,
    );
    assert_errno(
        "removexattr user.virtiofs.*",
        &removexattr(&v, "user.virtiofs.trusted.overlay.opaque"),
        libc::EPERM,
    );
    assert_eq!(
        getxattr(&u, "user.virtiofs.trusted.overlay.opaque").unwrap(),
        b"y"
    );
    // The host's own trusted.* names are hidden (the test runs as root, so it may set them).
    setxattr(&u, "trusted.hostonly", b"h", 0).unwrap();
    assert_eq!(
        listxattr(&v).unwrap(),
        ["trusted.overlay.opaque", "user.plain"]
    );
    assert_eq!(list_size(&v), b"trusted.overlay.opaque\0user.plain\0".len());
    removexattr(&v, "trusted.overlay.opaque").unwrap();
    assert_eq!(host_names(&u), ["trusted.hostonly", "user.plain"]);
    fs.finish();
}

#[test]
fn readonly_mapped_names_read_but_do_not_change() {
    let Some(fs) = FuseMount::start(&["--xattr", "--readonly", TRUSTED_TO_USER]) else {
        return;
    };
    put(&fs.under("f"), b"data");
    let (v, u) = (fs.via("f"), fs.under("f"));
    setxattr(&u, "user.virtiofs.trusted.a", b"1", 0).unwrap();
    assert_eq!(getxattr(&v, "trusted.a").unwrap(), b"1");
    assert_eq!(listxattr(&v).unwrap(), ["trusted.a"]);
    for (what, result) in [
        ("setxattr", setxattr(&v, "trusted.a", b"2", 0)),
        (
            "setxattr of a refused name",
            setxattr(&v, "user.virtiofs.x", b"2", 0),
        ),
        ("removexattr", removexattr(&v, "trusted.a")),
    ] {
        assert_errno(what, &result, libc::EROFS);
    }
    assert_eq!(getxattr(&u, "user.virtiofs.trusted.a").unwrap(), b"1");
    fs.finish();
}

#[test]
fn unsupported_rule_hides_security_selinux() {
    // virtiofsd's example for `unsupported`: the guest falls back to its policy's default
    // label. --modcaps=+sys_admin so that other security.* names can be written.
    let Some(fs) = FuseMount::start(&[
        "--xattr",
        "--modcaps=+sys_admin",
        "--xattrmap=/unsupported/all/security.selinux/security.selinux//ok/all///",
    ]) else {
        return;
    };
    put(&fs.under("f"), b"data");
    let (v, u) = (fs.via("f"), fs.under("f"));
    setxattr(&u, "security.selinux", b"system_u:object_r:etc_t:s0\0", 0).unwrap();
    setxattr(&u, "user.a", b"1", 0).unwrap();
    assert_errno(
        "getxattr security.selinux",
        &getxattr(&v, "security.selinux"),
        libc::EOPNOTSUPP,
    );
    assert_errno(
        "setxattr security.selinux",
        &setxattr(&v, "security.selinux", b"x\0", 0),
        libc::EOPNOTSUPP,
    );
    assert_errno(
        "removexattr security.selinux",
        &removexattr(&v, "security.selinux"),
        libc::EOPNOTSUPP,
    );
    assert_eq!(listxattr(&v).unwrap(), ["user.a"]);
    assert_eq!(list_size(&v), b"user.a\0".len());
    // ENOTSUP for one name does not turn xattrs off for the mount (only ENOSYS would).
    assert_eq!(getxattr(&v, "user.a").unwrap(), b"1");
    setxattr(&v, "security.berth", b"b", 0).expect("other security.* names pass");
    assert_eq!(getxattr(&u, "security.berth").unwrap(), b"b");
    assert_eq!(
        getxattr(&u, "security.selinux").unwrap(),
        b"system_u:object_r:etc_t:s0\0",
        "the host label is untouched"
    );
    fs.finish();
}
