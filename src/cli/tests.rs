//! The command line's parsing and resolution, against virtiofsd's and berth's flags.

use std::path::PathBuf;
use std::time::Duration;

use berth_passthrough::{
    CachePolicy, DaxPolicy, InodeFileHandles, MigrationMode, MigrationOnError,
    Negotiation as FsNegotiation, XattrMap,
};
use berth_seccomp::{IdMap, ModCaps, SandboxMode, SeccompAction};

use super::*;
use clap::error::ErrorKind;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
}

fn resolve(args: &[&str]) -> Result<Mode, CliError> {
    parse(args)
        .unwrap_or_else(|e| panic!("{args:?} should parse: {e}"))
        .resolve()
}

fn vhost_user(args: &[&str]) -> VhostUserSettings {
    match resolve(args) {
        Ok(Mode::VhostUser(s)) => s,
        other => panic!("{args:?} should select vhost-user mode, got {other:?}"),
    }
}

fn isolation(sandbox: SandboxMode, uid_map: Vec<IdMap>) -> IsolationSettings {
    IsolationSettings {
        sandbox,
        seccomp: SeccompAction::Kill,
        modcaps: ModCaps::default(),
        uid_map,
        gid_map: Vec::new(),
        max_inodes: None,
        max_handles: None,
    }
}

#[test]
fn unprivileged_fuse_maps_its_own_ids_to_themselves() {
    let own = |id| IdMap {
        inside: id,
        outside: id,
        count: 1,
    };
    // No map given: the namespace sandbox gets the identity of the caller's ids.
    let mut i = isolation(SandboxMode::Namespace, Vec::new());
    fuse_id_maps(&mut i, 1000, 1001).unwrap();
    assert_eq!(i.uid_map, [own(1000)]);
    assert_eq!(i.gid_map, [own(1001)]);
    // The same map given explicitly is fine; without a namespace nothing is added.
    let mut i = isolation(SandboxMode::Namespace, vec![own(1000)]);
    fuse_id_maps(&mut i, 1000, 1001).unwrap();
    let mut i = isolation(SandboxMode::Chroot, Vec::new());
    fuse_id_maps(&mut i, 1000, 1001).unwrap();
    assert!(i.uid_map.is_empty());
    // Root is left to the sandbox's own checks.
    let mut i = isolation(SandboxMode::Namespace, Vec::new());
    fuse_id_maps(&mut i, 0, 0).unwrap();
    assert!(i.uid_map.is_empty());
    // The own id under another number (the vhost-user default), another id, or a range:
    // FUSE's host ids would be read as other users.
    for bad in [
        IdMap {
            inside: 0,
            outside: 1000,
            count: 1,
        },
        own(1234),
        IdMap {
            inside: 1000,
            outside: 1000,
            count: 10,
        },
    ] {
        let mut i = isolation(SandboxMode::Namespace, vec![bad]);
        let err = fuse_id_maps(&mut i, 1000, 1001).unwrap_err().to_string();
        assert!(
            err.contains("--uid-map") && err.contains("host ids"),
            "{err}"
        );
    }
}

#[test]
fn kata_go_invocation() {
    let s = vhost_user(&[
        "--syslog",
        "--cache=auto",
        "--shared-dir=/run/kata/shared",
        "--fd=3",
        "--thread-pool-size=1",
        "--announce-submounts",
    ]);
    assert_eq!(s.listener, ListenerSource::Fd(3));
    assert!(s.process.syslog);
    assert_eq!(s.fs.root_dir, PathBuf::from("/run/kata/shared"));
    assert_eq!(s.fs.cache, CachePolicy::Auto);
    assert!(s.fs.announce_submounts);
    assert_eq!(s.thread_pool_size, 1);
    assert!(!s.fs.xattr);
    assert!(s.process.warnings.is_empty());
}

#[test]
fn kata_runtime_rs_invocation() {
    let s = vhost_user(&[
        "--socket-path",
        "/run/kata/vfs.sock",
        "--shared-dir",
        "/run/kata/shared",
        "--cache",
        "auto",
        "--thread-pool-size=1",
        "-o",
        "announce_submounts",
        "--xattr",
    ]);
    assert_eq!(
        s.listener,
        ListenerSource::Path {
            path: "/run/kata/vfs.sock".into(),
            group: None
        }
    );
    assert!(s.fs.xattr);
    assert!(s.fs.announce_submounts);
    assert_eq!(s.process.log_level, None);
    assert_eq!(s.process.warnings.len(), 1, "the -o deprecation warning");
}

#[test]
fn defaults_match_virtiofsd() {
    let s = vhost_user(&["--shared-dir", "/d", "--socket-path", "/s"]);
    assert_eq!(s.fs.cache, CachePolicy::Auto);
    assert_eq!(s.fs.inode_file_handles, InodeFileHandles::Prefer);
    assert!(s.fs.announce_submounts);
    assert!(s.fs.readdirplus);
    assert!(!s.fs.killpriv_v2 && !s.fs.posix_lock && !s.fs.flock && !s.fs.readonly);
    assert_eq!(s.max_request_queues, 16);
    assert_eq!(s.thread_pool_size, 0);
    assert_eq!(s.tag, None);
    assert_eq!(s.dax_window, 0);
}

#[test]
fn dax_policy_defaults_to_always_with_a_window_and_never_without() {
    let base = ["--shared-dir", "/d", "--socket-path", "/s"];
    let no_window = vhost_user(&base);
    assert_eq!(no_window.fs.dax_policy, DaxPolicy::Never);
    assert!(no_window.process.warnings.is_empty());
    let window = vhost_user(&[&base[..], &["--dax-window", "64M"]].concat());
    assert_eq!(window.fs.dax_policy, DaxPolicy::Always);
    let sized = vhost_user(
        &[
            &base[..],
            &["--dax-window", "64M", "--dax-policy", "size:2M"],
        ]
        .concat(),
    );
    assert_eq!(sized.fs.dax_policy, DaxPolicy::MinSize(2 << 20));
    let idle = vhost_user(&[&base[..], &["--dax-policy", "xattr"]].concat());
    assert_eq!(idle.fs.dax_policy, DaxPolicy::Never);
    assert!(
        idle.process
            .warnings
            .iter()
            .any(|w| w.contains("--dax-policy")),
        "a policy without a window is reported: {:?}",
        idle.process.warnings
    );
    let bad = parse(&[&base[..], &["--dax-policy", "size:lots"]].concat())
        .expect_err("size:lots refused");
    assert_eq!(bad.kind(), ErrorKind::ValueValidation);
    assert!(bad.to_string().contains("needs a size in bytes"), "{bad}");
}

#[test]
fn dax_window_takes_whole_2mib_units() {
    let base = ["--shared-dir", "/d", "--socket-path", "/s", "--dax-window"];
    let with = |size: &str| {
        let mut args = base.to_vec();
        args.push(size);
        parse(&args)
    };
    assert_eq!(
        vhost_user(&[&base[..], &["1G"]].concat()).dax_window,
        1 << 30
    );
    assert_eq!(
        vhost_user(&[&base[..], &["64M"]].concat()).dax_window,
        64 << 20
    );
    assert_eq!(vhost_user(&[&base[..], &["0"]].concat()).dax_window, 0);
    for bad in ["3M", "4097", "1T", "2x"] {
        let err = with(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
    }
}

#[test]
fn legacy_options_map_to_config() {
    let s = vhost_user(&[
        "--fd=4",
        "-o",
        "source=/srv,cache=always,xattr,no_readdirplus,writeback,posix_lock,flock",
        "-o",
        "killpriv_v2,allow_direct_io,no_announce_submounts,log_level=debug,timeout=2.5",
    ]);
    assert_eq!(s.fs.root_dir, PathBuf::from("/srv"));
    assert_eq!(s.fs.cache, CachePolicy::Always);
    assert!(s.fs.xattr && s.fs.writeback && s.fs.posix_lock && s.fs.flock);
    assert!(s.fs.killpriv_v2 && s.fs.allow_direct_io);
    assert!(!s.fs.readdirplus && !s.fs.announce_submounts);
    assert_eq!(s.process.log_level, Some(LogLevel::Debug));
    assert_eq!(s.fs.entry_timeout, Some(Duration::from_millis(2500)));
    assert_eq!(s.fs.attr_timeout, Some(Duration::from_millis(2500)));
}

#[test]
fn legacy_virtiofsd_spellings() {
    let s = vhost_user(&[
        "--fd=4",
        "-o",
        "source=/srv,cache=none,loglevel=err,no_posix_lock,no_flock,sandbox=none",
    ]);
    assert_eq!(s.fs.cache, CachePolicy::Never);
    assert!(!s.fs.readdirplus, "cache=none turns READDIRPLUS off");
    assert_eq!(s.process.log_level, Some(LogLevel::Error));
    assert!(!s.fs.posix_lock && !s.fs.flock);
}

#[test]
fn unknown_or_bad_legacy_options_are_errors() {
    let base = ["--fd=3", "--shared-dir=/d", "-o"];
    let run = |opt: &str| {
        let mut args = base.to_vec();
        args.push(opt);
        resolve(&args).err()
    };
    assert_eq!(
        run("frobnicate"),
        Some(CliError::UnknownCompatOption("frobnicate".into()))
    );
    assert_eq!(
        run("color=blue"),
        Some(CliError::UnknownCompatOption("color=blue".into()))
    );
    assert!(matches!(
        run("cache=sometimes"),
        Some(CliError::BadCompatValue { .. })
    ));
    assert!(matches!(
        run("timeout=-1"),
        Some(CliError::BadCompatValue { .. })
    ));
    assert!(matches!(
        run("log_level=loud"),
        Some(CliError::BadCompatValue { .. })
    ));
    assert_eq!(run("sandbox=chroot"), None);
    assert_eq!(run("modcaps=+sys_admin"), None);
    assert!(matches!(
        run("sandbox=jail"),
        Some(CliError::InvalidChoice {
            flag: "sandbox",
            ..
        })
    ));
    assert!(matches!(
        run("modcaps=+nonsense"),
        Some(CliError::BadModcaps(_))
    ));
}

#[test]
fn flag_and_legacy_option_disagreeing_is_a_conflict() {
    let err = resolve(&["--fd=3", "--shared-dir=/a", "-o", "source=/b"]).unwrap_err();
    assert!(matches!(err, CliError::Conflict(_)), "{err}");
    let err = resolve(&[
        "--fd=3",
        "--shared-dir=/a",
        "--cache=never",
        "-o",
        "cache=always",
    ])
    .unwrap_err();
    assert!(matches!(err, CliError::Conflict(_)), "{err}");
    let err = resolve(&["--fd=3", "--shared-dir=/a", "--xattr", "-o", "no_xattr"]).unwrap_err();
    assert!(matches!(err, CliError::Conflict(_)), "{err}");
    // Agreement is fine.
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/a",
        "-o",
        "source=/a,announce_submounts",
    ]);
    assert_eq!(s.fs.root_dir, PathBuf::from("/a"));
}

#[test]
fn isolation_flags_and_legacy_options_must_agree() {
    let conflict = |args: &[&str]| match resolve(args) {
        Err(CliError::Conflict(message)) => message,
        other => panic!("{args:?} should be a conflict, got {other:?}"),
    };
    let message = conflict(&[
        "--fd=3",
        "--shared-dir=/d",
        "--sandbox=namespace",
        "-o",
        "sandbox=chroot",
    ]);
    assert!(message.contains("--sandbox namespace"), "{message}");
    assert!(message.contains("sandbox=chroot"), "{message}");
    conflict(&[
        "--fd=3",
        "--shared-dir=/d",
        "--sandbox=none",
        "-o",
        "sandbox=namespace",
    ]);
    let message = conflict(&[
        "--fd=3",
        "--shared-dir=/d",
        "--modcaps=+sys_admin",
        "-o",
        "modcaps=-mknod",
    ]);
    assert!(message.contains("modcaps"), "{message}");
    // Agreement, or only one of the two, is fine.
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--sandbox=chroot",
        "-o",
        "sandbox=chroot",
    ]);
    assert_eq!(s.isolation.sandbox, SandboxMode::Chroot);
    let s = vhost_user(&["--fd=3", "--shared-dir=/d", "-o", "sandbox=none"]);
    assert_eq!(s.isolation.sandbox, SandboxMode::None);
    let s = vhost_user(&["--fd=3", "--shared-dir=/d"]);
    assert_eq!(s.isolation.sandbox, SandboxMode::Namespace);
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--modcaps=+sys_admin",
        "-o",
        "modcaps=+sys_admin",
    ]);
    assert_eq!(s.isolation.modcaps.add.len(), 1);
    let s = vhost_user(&["--fd=3", "--shared-dir=/d", "-o", "modcaps=+sys_admin"]);
    assert_eq!(s.isolation.modcaps.add.len(), 1);
}

#[test]
fn negotiated_features_keep_their_mode() {
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "-o",
        "posix_acl,security_label",
    ]);
    assert_eq!(s.fs.posix_acl, FsNegotiation::Always);
    assert_eq!(s.fs.security_label, FsNegotiation::Always);
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--posix-acl=auto",
        "-o",
        "posix_acl",
    ]);
    assert_eq!(
        s.fs.posix_acl,
        FsNegotiation::Auto,
        "the flag's mode wins when both agree"
    );
    let err = resolve(&[
        "--fd=3",
        "--shared-dir=/d",
        "--posix-acl=always",
        "-o",
        "no_posix_acl",
    ])
    .unwrap_err();
    assert!(matches!(err, CliError::Conflict(_)), "{err}");
    let s = vhost_user(&["--fd=3", "--shared-dir=/d", "--allow-mmap", "--cache=never"]);
    assert!(s.fs.allow_mmap);
    assert!(!vhost_user(&["--fd=3", "--shared-dir=/d"]).fs.allow_mmap);
}

#[test]
fn conflicting_socket_flags_are_usage_errors() {
    let err = parse(&["--fd=3", "--socket-path=/s", "--shared-dir=/d"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
    assert_eq!(err.exit_code(), 2);
    let err = parse(&["--fd=3", "--socket-group=kvm", "--shared-dir=/d"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
}

#[test]
fn bad_values_are_usage_errors() {
    for args in [
        &["--fd=3", "--shared-dir=/d", "--cache=sometimes"][..],
        &["--fd=3", "--shared-dir=/d", "--inode-file-handles=often"],
        &["--fd=3", "--shared-dir=/d", "--log-level=loud"],
        &["--fd=x", "--shared-dir=/d"],
        &["--fd=3", "--shared-dir=/d", "--max-request-queues=0"],
        &["--fd=3", "--shared-dir=/d", "--max-request-queues=64"],
        &["--fd=3", "--shared-dir=/d", "--tag="],
        &[
            "--fd=3",
            "--shared-dir=/d",
            "--tag=0123456789012345678901234567890123456",
        ],
        &["--fd=3", "--shared-dir=/d", "--no-such-flag"],
    ] {
        let err = parse(args).expect_err(&format!("{args:?} must be rejected"));
        assert_eq!(err.exit_code(), 2, "{args:?}");
    }
}

#[test]
fn missing_shared_dir_or_socket() {
    assert_eq!(
        resolve(&["--socket-path=/s"]).unwrap_err(),
        CliError::MissingSharedDir
    );
    assert_eq!(
        resolve(&["--shared-dir=/d"]).unwrap_err(),
        CliError::MissingSocket
    );
}

#[test]
fn isolation_flags_parse_as_virtiofsd_spells_them() {
    let base = ["--fd=3", "--shared-dir=/d"];
    let with = |extra: &str| {
        let mut args = base.to_vec();
        args.push(extra);
        resolve(&args)
    };
    let settings = |extra: &str| match with(extra) {
        Ok(Mode::VhostUser(s)) => s,
        other => panic!("{extra}: {other:?}"),
    };
    assert_eq!(
        settings("--sandbox=none").isolation.sandbox,
        SandboxMode::None
    );
    assert_eq!(
        settings("--sandbox=namespace").isolation.sandbox,
        SandboxMode::Namespace
    );
    assert_eq!(
        settings("--sandbox=chroot").isolation.sandbox,
        SandboxMode::Chroot
    );
    assert_eq!(
        settings("--seccomp=kill").isolation.seccomp,
        SeccompAction::Kill
    );
    assert_eq!(
        settings("--seccomp=log").isolation.seccomp,
        SeccompAction::Log
    );
    assert!(
        settings("--modcaps=+sys_admin:-chown")
            .isolation
            .modcaps
            .add
            .len()
            == 1
    );
    assert!(matches!(
        with("--sandbox=jail").unwrap_err(),
        CliError::InvalidChoice {
            flag: "sandbox",
            ..
        }
    ));
    assert!(matches!(
        with("--seccomp=maybe").unwrap_err(),
        CliError::InvalidChoice {
            flag: "seccomp",
            ..
        }
    ));
    assert!(matches!(
        with("--modcaps=+no_such_cap").unwrap_err(),
        CliError::BadModcaps(_)
    ));
    assert!(matches!(
        with("--migration-mode=by-magic").unwrap_err(),
        CliError::InvalidChoice {
            flag: "migration-mode",
            ..
        }
    ));
    assert!(matches!(
        with("--migration-on-error=ignore").unwrap_err(),
        CliError::InvalidChoice {
            flag: "migration-on-error",
            ..
        }
    ));
}

#[test]
fn migration_flags_take_virtiofsd_values() {
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--migration-mode=file-handles",
        "--migration-on-error=guest-error",
        "--migration-verify-handles",
        "--migration-confirm-paths",
    ]);
    assert_eq!(s.fs.migration.mode, MigrationMode::FileHandles);
    assert_eq!(s.fs.migration.on_error, MigrationOnError::GuestError);
    assert!(s.fs.migration.verify_handles && s.fs.migration.confirm_paths);
    let s = vhost_user(&["--fd=3", "--shared-dir=/d"]);
    assert_eq!(s.fs.migration.mode, MigrationMode::FindPaths);
    assert_eq!(s.fs.migration.on_error, MigrationOnError::Abort);
    assert!(capabilities_json().contains("migrate-precopy"));
}

#[test]
fn guest_limits_and_id_maps_parse() {
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--max-inodes=1000",
        "--max-handles=10",
        "--uid-map=:0:1000:1:",
        "--uid-map=:1:200000:65536:",
        "--gid-map=/5/1000/1/",
    ]);
    assert_eq!(s.isolation.max_inodes, Some(1000));
    assert_eq!(s.isolation.max_handles, Some(10));
    assert_eq!(
        s.isolation.uid_map,
        [
            IdMap {
                inside: 0,
                outside: 1000,
                count: 1
            },
            IdMap {
                inside: 1,
                outside: 200000,
                count: 65536
            }
        ]
    );
    assert_eq!(
        s.isolation
            .gid_map
            .iter()
            .map(|m| m.inside)
            .collect::<Vec<_>>(),
        [5]
    );
    // Overlapping ranges are refused before anything starts, naming the option.
    let err = resolve(&[
        "--fd=3",
        "--shared-dir=/d",
        "--gid-map=:0:1000:1:",
        "--gid-map=:0:200000:10:",
    ])
    .unwrap_err();
    assert!(
        matches!(&err, CliError::BadIdMaps(m) if m.contains("--gid-map") && m.contains("overlaps")),
        "{err}"
    );
    for bad in [
        "--max-inodes=1",
        "--max-handles=0",
        "--max-handles=lots",
        "--uid-map=0:1000:1",
        "--gid-map=:0:1000:0:",
    ] {
        let err = parse(&["--fd=3", "--shared-dir=/d", bad]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{bad}");
    }
    match resolve(&[
        "fuse",
        "--shared-dir=/d",
        "--mountpoint=/m",
        "--seccomp=log",
        "-o",
        "sandbox=chroot,modcaps=-mknod",
    ]) {
        Ok(Mode::Fuse(s)) => {
            assert_eq!(s.isolation.sandbox, SandboxMode::Chroot);
            assert_eq!(s.isolation.seccomp, SeccompAction::Log);
            assert_eq!(s.isolation.modcaps.remove.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        resolve(&[
            "--fd=3",
            "--shared-dir=/d",
            "--sandbox=none",
            "--uid-map=:0:1:1:"
        ]),
        Err(CliError::Conflict(_))
    ));
}

#[test]
fn virtiofsd_value_forms() {
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--inode-file-handles=mandatory",
        "--posix-acl",
        "--security-label=auto",
        "--no-announce-submounts",
        "--killpriv-v2",
        "--log-level=trace",
        "--rlimit-nofile=4096",
        "--tag=myfs",
        "--max-request-queues=4",
    ]);
    assert_eq!(s.fs.inode_file_handles, InodeFileHandles::Mandatory);
    assert_eq!(s.fs.posix_acl, FsNegotiation::Always);
    assert_eq!(s.fs.security_label, FsNegotiation::Auto);
    assert!(s.fs.xattr);
    assert!(!s.fs.announce_submounts && s.fs.killpriv_v2);
    assert_eq!(s.process.log_level, Some(LogLevel::Trace));
    assert_eq!(s.process.rlimit_nofile, Some(4096));
    assert_eq!(s.tag.as_deref(), Some("myfs"));
    assert_eq!(s.max_request_queues, 4);

    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--inode-file-handles",
        "fallback",
    ]);
    assert_eq!(s.fs.inode_file_handles, InodeFileHandles::Prefer);
    assert_eq!(s.process.warnings.len(), 1);

    let s = vhost_user(&["--fd=3", "--shared-dir=/d", "--posix-acl=never", "-d", "-f"]);
    assert!(s.fs.posix_acl == FsNegotiation::Never && !s.fs.xattr);
    assert_eq!(s.process.log_level, Some(LogLevel::Debug));
    assert_eq!(s.process.warnings.len(), 2);
}

#[test]
fn contradicting_flag_pairs_are_usage_errors() {
    for pair in [
        ["--no-announce-submounts", "--announce-submounts"],
        ["--killpriv-v2", "--no-killpriv-v2"],
    ] {
        let err = parse(&["--fd=3", "--shared-dir=/d", pair[0], pair[1]]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{pair:?}");
    }
    // Repeating a flag is not a contradiction: the last value wins.
    let s = vhost_user(&[
        "--fd=3",
        "--shared-dir=/d",
        "--cache=never",
        "--cache=always",
    ]);
    assert_eq!(s.fs.cache, CachePolicy::Always);
}

#[test]
fn deprecated_socket_alias() {
    let s = vhost_user(&["--socket=/s", "--shared-dir=/d", "--socket-group=kvm"]);
    assert_eq!(
        s.listener,
        ListenerSource::Path {
            path: "/s".into(),
            group: Some("kvm".into())
        }
    );
    assert_eq!(s.process.warnings.len(), 1);
}

#[test]
fn xattrmap_flag_and_legacy_option() {
    let base = ["--fd=3", "--shared-dir=/d"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        resolve(&args)
    };
    let settings = |extra: &[&str]| match with(extra) {
        Ok(Mode::VhostUser(s)) => s,
        other => panic!("{extra:?}: expected vhost-user mode, got {other:?}"),
    };
    let expected = XattrMap::parse(":map::user.virtiofs.:").unwrap();
    // Both spellings, and the map implies --xattr (as virtiofsd).
    for extra in [
        &["--xattrmap=:map::user.virtiofs.:"][..],
        &["--xattrmap", ":map::user.virtiofs.:"],
        &["-o", "xattrmap=:map::user.virtiofs.:"],
        &["-o", "xattrmap=:map::user.virtiofs.:,cache=auto"],
    ] {
        let s = settings(extra);
        assert_eq!(s.fs.xattrmap.as_ref(), Some(&expected), "{extra:?}");
        assert!(s.fs.xattr, "{extra:?} turns xattrs on");
    }
    assert!(settings(&[]).fs.xattrmap.is_none());
    // Rules with whitespace and newlines between them, and `=` inside a -o value.
    let s = settings(&[
        "--xattrmap",
        "/prefix/all/a=b./user.x./
  /ok/all///",
    ]);
    assert_eq!(s.fs.xattrmap.unwrap().rules().len(), 2);
    let s = settings(&["-o", "xattrmap=/prefix/all/a=b./user.x./ /ok/all///"]);
    assert_eq!(s.fs.xattrmap.unwrap().rules().len(), 2);
    // The same rules twice agree; different rules conflict.
    let same = settings(&[
        "--xattrmap=:map::user.virtiofs.:",
        "-o",
        "xattrmap=/map//user.virtiofs./",
    ]);
    assert_eq!(same.fs.xattrmap, Some(expected));
    for extra in [
        &["--xattrmap=:map::user.a.:", "-o", "xattrmap=:map::user.b.:"][..],
        &[
            "-o",
            "xattrmap=:map::user.a.:",
            "-o",
            "xattrmap=:map::user.b.:",
        ],
        &["--xattrmap=:ok:all:::", "-o", "no_xattr"],
    ] {
        let err = with(extra).unwrap_err();
        assert!(matches!(err, CliError::Conflict(_)), "{extra:?}: {err}");
    }
    assert!(
        settings(&["--xattrmap=:ok:all:::", "--xattrmap=/ok/all///"])
            .fs
            .xattrmap
            .is_some()
    );
    let err = with(&["--xattrmap=:ok:all:::", "--xattrmap=:bad:all:::"]).unwrap_err();
    assert!(matches!(err, CliError::Conflict(_)), "{err}");
    // Malformed rules name the rule and what is wrong with it.
    let err = with(&["--xattrmap=:ok:all::: :prefix:client:trusted."]).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, CliError::BadXattrMap(_)), "{message}");
    assert!(
        message.starts_with("invalid --xattrmap: xattr map rule 2"),
        "{message}"
    );
    assert!(message.contains(":prefix:client:trusted."), "{message}");
    let err = with(&["-o", "xattrmap=:nonsense:all:::"]).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, CliError::BadCompatValue { .. }), "{message}");
    assert!(message.contains("unknown type 'nonsense'"), "{message}");
    assert_eq!(
        with(&["--xattrmap= \n "]).unwrap_err(),
        CliError::BadXattrMap(XattrMapError::NoRules)
    );
    // The fuse subcommand takes it too.
    match resolve(&[
        "fuse",
        "--shared-dir=/d",
        "--mountpoint=/m",
        "--xattrmap=:ok:all:::",
    ]) {
        Ok(Mode::Fuse(s)) => assert!(s.fs.xattrmap.is_some() && s.fs.xattr),
        other => panic!("expected fuse mode, got {other:?}"),
    }
}

#[test]
fn print_capabilities_needs_nothing_else() {
    assert!(matches!(
        resolve(&["--print-capabilities"]),
        Ok(Mode::PrintCapabilities)
    ));
    let json: serde_json::Value = serde_json::from_str(&capabilities_json()).unwrap();
    assert_eq!(json["type"], "fs");
    assert!(json["features"].is_array());
}

#[test]
fn fuse_subcommand() {
    match resolve(&[
        "fuse",
        "--shared-dir=/d",
        "--mountpoint=/m",
        "--threads=2",
        "--readonly",
        "-o",
        "xattr",
    ]) {
        Ok(Mode::Fuse(s)) => {
            assert_eq!(s.mountpoint, PathBuf::from("/m"));
            assert_eq!(s.threads, 2);
            assert!(s.fs.readonly && s.fs.xattr);
        }
        other => panic!("expected fuse mode, got {other:?}"),
    }
    let err = parse(&["fuse", "--shared-dir=/d"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    let err = parse(&["fuse", "--shared-dir=/d", "--mountpoint=/m", "--fd=3"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    // Serve flags before the subcommand are not silently dropped.
    let err = parse(&["--fd=3", "fuse", "--shared-dir=/d", "--mountpoint=/m"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn fuse_passthrough_modes() {
    use berth_passthrough::PassthroughMode;
    let mode = |extra: &[&str]| {
        let mut args = vec!["fuse", "--shared-dir=/d", "--mountpoint=/m"];
        args.extend_from_slice(extra);
        match resolve(&args) {
            Ok(Mode::Fuse(s)) => s.passthrough,
            other => panic!("expected fuse mode, got {other:?}"),
        }
    };
    assert_eq!(mode(&[]), PassthroughMode::Auto);
    assert_eq!(mode(&["--passthrough=never"]), PassthroughMode::Never);
    assert_eq!(mode(&["--passthrough", "always"]), PassthroughMode::Always);
    let err = parse(&[
        "fuse",
        "--shared-dir=/d",
        "--mountpoint=/m",
        "--passthrough=on",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("expected auto, always or never"), "{err}");
    // vhost-user mode has no such flag.
    assert!(parse(&["--socket-path=/s", "--shared-dir=/d", "--passthrough=never"]).is_err());
}

#[test]
fn fuse_io_uring_modes() {
    let mode = |extra: &[&str]| {
        let mut args = vec!["fuse", "--shared-dir=/d", "--mountpoint=/m"];
        args.extend_from_slice(extra);
        match resolve(&args) {
            Ok(Mode::Fuse(s)) => s.io_uring,
            other => panic!("expected fuse mode, got {other:?}"),
        }
    };
    assert_eq!(mode(&[]), IoUringMode::Auto);
    assert_eq!(mode(&["--io-uring=never"]), IoUringMode::Never);
    assert_eq!(mode(&["--io-uring", "always"]), IoUringMode::Always);
    assert!(parse(&[
        "fuse",
        "--shared-dir=/d",
        "--mountpoint=/m",
        "--io-uring=on"
    ])
    .is_err());
    // vhost-user mode has no such flag.
    assert!(parse(&["--socket-path=/s", "--shared-dir=/d", "--io-uring=always"]).is_err());
}
