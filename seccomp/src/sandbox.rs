//! `--sandbox`: confine the daemon's view of the host filesystem to the shared directory.
//!
//! * `namespace`: new mount, pid and network namespaces (plus a user namespace when not root).
//!   The process forks; the child is pid 1 of the new pid namespace and goes on to serve, while
//!   the parent closes its descriptors, forwards termination signals and finally exits with the
//!   child's status. The child mounts a fresh /proc, keeps a descriptor to its `/proc/self/fd`,
//!   and pivots into a bind mount of the shared directory, detaching the old root: afterwards
//!   the shared directory is `/` and nothing else of the host is reachable by path.
//! * `chroot`: keeps a descriptor to `/proc/self/fd`, then chroots into the shared directory.
//! * `none`: nothing.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::{install_filter, Error, SeccompAction, ThreadRole};

/// How the daemon confines itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// Namespaces and pivot_root into the shared directory (virtiofsd's default).
    #[default]
    Namespace,
    /// chroot into the shared directory (root only).
    Chroot,
    /// No confinement.
    None,
}

impl FromStr for SandboxMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "namespace" => Ok(SandboxMode::Namespace),
            "chroot" => Ok(SandboxMode::Chroot),
            "none" => Ok(SandboxMode::None),
            other => Err(Error::InvalidValue {
                what: "--sandbox",
                value: other.to_owned(),
                reason: "expected namespace, chroot or none".to_owned(),
            }),
        }
    }
}

/// One user or group id mapping of a user namespace, in virtiofsd's `--uid-map` syntax
/// `:inside:outside:count:` (the first character is the separator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First id inside the namespace.
    pub inside: u32,
    /// First id outside (on the host) it maps to.
    pub outside: u32,
    /// How many consecutive ids are mapped.
    pub count: u32,
}

impl FromStr for IdMap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| Error::InvalidValue {
            what: "id map",
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        let separator = s
            .chars()
            .next()
            .ok_or_else(|| invalid("expected :inside:outside:count:"))?;
        let fields: Vec<&str> = s.split(separator).collect();
        // A leading and a trailing separator leave empty first and last fields.
        let [first, inside, outside, count, last] = fields.as_slice() else {
            return Err(invalid("expected :inside:outside:count:"));
        };
        if !first.is_empty() || !last.is_empty() {
            return Err(invalid("expected :inside:outside:count:"));
        }
        let number = |field: &str| {
            field
                .parse::<u32>()
                .map_err(|_| invalid("ids and count must be unsigned 32-bit numbers"))
        };
        let map = IdMap {
            inside: number(inside)?,
            outside: number(outside)?,
            count: number(count)?,
        };
        if map.count == 0 {
            return Err(invalid("count must be at least 1"));
        }
        Ok(map)
    }
}

/// What [`enter_sandbox`] needs.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The confinement.
    pub mode: SandboxMode,
    /// The shared directory, which becomes the root in `namespace` and `chroot` modes.
    pub shared_dir: PathBuf,
    /// User namespace uid mapping (namespace mode, unprivileged only). Default: inside 0 maps
    /// to the current euid.
    pub uid_map: Option<IdMap>,
    /// User namespace gid mapping, like `uid_map`.
    pub gid_map: Option<IdMap>,
    /// The seccomp action of the filter the namespace mode's supervising parent installs
    /// once it has nothing left to do but wait ([`ThreadRole::Supervisor`]).
    pub supervisor_seccomp: SeccompAction,
}

/// Where the sandboxed process finds what it serves.
#[derive(Debug)]
pub struct SandboxOutcome {
    /// The path of the shared directory from now on: `/` when sandboxed, else unchanged.
    pub root_dir: PathBuf,
    /// An `O_PATH` descriptor of this process's `/proc/self/fd`, opened before the root
    /// changed (namespace and chroot modes; `/proc` is not reachable by path afterwards).
    pub proc_self_fd: Option<OwnedFd>,
    /// True in the pid-1 child of the namespace mode.
    pub in_pid_namespace: bool,
}

fn sys_error(step: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Sandbox { step, source }
}

fn check(step: &'static str, ret: libc::c_int) -> Result<libc::c_int, Error> {
    if ret < 0 {
        Err(sys_error(step)(io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

fn cstring(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::SharedDir {
        path: path.to_owned(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn mount(
    step: &'static str,
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> Result<(), Error> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call; mount
    // reads no data argument.
    let ret = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            std::ptr::null(),
        )
    };
    check(step, ret).map(drop)
}

fn open_path(step: &'static str, path: &CStr, flags: libc::c_int) -> Result<OwnedFd, Error> {
    // SAFETY: `path` is NUL-terminated; the returned descriptor is checked before being owned.
    let fd = check(step, unsafe {
        libc::open(path.as_ptr(), flags | libc::O_CLOEXEC)
    })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn getegid() -> u32 {
    // SAFETY: getegid has no preconditions.
    unsafe { libc::getegid() }
}

/// Confines the process as `cfg.mode` says. Call it before any thread exists: the namespace
/// mode forks (only the calling thread survives in the child) and may unshare a user namespace,
/// which the kernel refuses to multi-threaded processes.
///
/// In namespace mode this returns only in the child; the parent never returns (it exits with
/// the child's status, or dies of the child's signal). In every mode the descriptors opened
/// before the call stay open in the returning process.
pub fn enter_sandbox(cfg: &SandboxConfig) -> Result<SandboxOutcome, Error> {
    let root = geteuid() == 0;
    if (cfg.uid_map.is_some() || cfg.gid_map.is_some())
        && (root || cfg.mode != SandboxMode::Namespace)
    {
        return Err(Error::SandboxNotPermitted(
            "uid/gid maps can only be used by an unprivileged user in namespace sandbox mode",
        ));
    }
    if cfg.mode == SandboxMode::Chroot && !root {
        return Err(Error::SandboxNotPermitted(
            "sandbox mode 'chroot' can only be used by root (use 'namespace' instead)",
        ));
    }
    if cfg.mode == SandboxMode::None {
        return Ok(SandboxOutcome {
            root_dir: cfg.shared_dir.clone(),
            proc_self_fd: None,
            in_pid_namespace: false,
        });
    }
    let shared_dir = cfg
        .shared_dir
        .canonicalize()
        .map_err(|source| Error::SharedDir {
            path: cfg.shared_dir.clone(),
            source,
        })?;
    if !shared_dir.is_dir() {
        return Err(Error::SharedDir {
            path: shared_dir,
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    if root {
        // Root may switch to any guest uid/gid; supplementary groups of the launcher must not
        // tag along into those identities.
        // SAFETY: a zero-length list with a null pointer is valid for setgroups.
        check("dropping supplementary groups", unsafe {
            libc::setgroups(0, std::ptr::null())
        })?;
    }
    match cfg.mode {
        SandboxMode::Chroot => enter_chroot(&shared_dir),
        SandboxMode::Namespace => enter_namespaces(cfg, &shared_dir, root),
        SandboxMode::None => unreachable!("handled above"),
    }
}

fn enter_chroot(shared_dir: &Path) -> Result<SandboxOutcome, Error> {
    let proc_self_fd = open_path(
        "opening /proc/self/fd",
        c"/proc/self/fd",
        libc::O_PATH | libc::O_DIRECTORY,
    )?;
    let dir = cstring(shared_dir)?;
    // SAFETY: `dir` is NUL-terminated.
    check("chroot", unsafe { libc::chroot(dir.as_ptr()) })?;
    // SAFETY: the literal is NUL-terminated.
    check("chdir to the new root", unsafe {
        libc::chdir(c"/".as_ptr())
    })?;
    Ok(SandboxOutcome {
        root_dir: PathBuf::from("/"),
        proc_self_fd: Some(proc_self_fd),
        in_pid_namespace: false,
    })
}

/// The line written to `/proc/self/{uid,gid}_map` for `map` (default: inside 0 is the
/// current id). Without privilege in the parent namespace the kernel accepts only the writer's
/// own id, once: checked here so that the error names the option.
fn id_map_line(map: Option<IdMap>, current: u32, option: &'static str) -> Result<String, Error> {
    let map = map.unwrap_or(IdMap {
        inside: 0,
        outside: current,
        count: 1,
    });
    if map.outside != current || map.count != 1 {
        return Err(Error::InvalidValue {
            what: option,
            value: format!(":{}:{}:{}:", map.inside, map.outside, map.count),
            reason: format!(
                "an unprivileged user can map only its own id {current}, with a count of 1 \
                 (ranges need newuidmap/newgidmap, which berth does not run)"
            ),
        });
    }
    Ok(format!("{} {} {}\n", map.inside, map.outside, map.count))
}

fn write_id_maps(uid_line: &str, gid_line: &str) -> Result<(), Error> {
    let write = |path: &str, content: &str, step: &'static str| {
        File::options()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(content.as_bytes()))
            .map_err(sys_error(step))
    };
    // An unprivileged writer must give up setgroups before it may write a gid map.
    write(
        "/proc/self/setgroups",
        "deny",
        "writing /proc/self/setgroups",
    )?;
    write("/proc/self/uid_map", uid_line, "writing /proc/self/uid_map")?;
    write("/proc/self/gid_map", gid_line, "writing /proc/self/gid_map")?;
    Ok(())
}

fn enter_namespaces(
    cfg: &SandboxConfig,
    shared_dir: &Path,
    root: bool,
) -> Result<SandboxOutcome, Error> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET;
    let id_lines = if root {
        None
    } else {
        flags |= libc::CLONE_NEWUSER;
        Some((
            id_map_line(cfg.uid_map, geteuid(), "--uid-map")?,
            id_map_line(cfg.gid_map, getegid(), "--gid-map")?,
        ))
    };
    // SAFETY: unshare only changes this process's namespaces.
    check("unshare", unsafe { libc::unshare(flags) })?;
    if let Some((uid_line, gid_line)) = id_lines {
        // The euid/egid seen from inside are the outside ones until the maps exist.
        let (uid, gid) = (geteuid(), getegid());
        write_id_maps(&uid_line, &gid_line)?;
        let inside_uid = cfg.uid_map.map_or(0, |m| m.inside);
        let inside_gid = cfg.gid_map.map_or(0, |m| m.inside);
        tracing::debug!("user namespace: uid {uid} is {inside_uid}, gid {gid} is {inside_gid}");
        // SAFETY: plain id switches within the namespace just mapped.
        check("setresgid in the user namespace", unsafe {
            libc::setresgid(inside_gid, inside_gid, inside_gid)
        })?;
        // SAFETY: as above.
        check("setresuid in the user namespace", unsafe {
            libc::setresuid(inside_uid, inside_uid, inside_uid)
        })?;
    }
    // SAFETY: the process is single-threaded (documented precondition), so the child may run
    // arbitrary code.
    let child = check("fork", unsafe { libc::fork() })?;
    if child > 0 {
        supervise_child(child, cfg.supervisor_seccomp);
    }
    // Only the child gets here: it is pid 1 of the new pid namespace. If the supervising parent
    // dies, even by SIGKILL, which it cannot forward, the daemon must not live on unseen.
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets this process's parent-death signal.
    check("setting the parent-death signal", unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    // (The parent lives outside this pid namespace, so getppid() reads 0 either way and
    // cannot tell whether it died in the instant before the prctl.)
    let proc_self_fd = setup_mounts(shared_dir)?;
    Ok(SandboxOutcome {
        root_dir: PathBuf::from("/"),
        proc_self_fd: Some(proc_self_fd),
        in_pid_namespace: true,
    })
}

/// Builds the child's filesystem view; returns the `/proc/self/fd` descriptor.
fn setup_mounts(shared_dir: &Path) -> Result<OwnedFd, Error> {
    // Nothing done from here on may propagate back to the host's mount namespace, while host
    // mounts appearing under the shared directory still propagate in.
    mount(
        "making mounts slave",
        None,
        c"/",
        None,
        libc::MS_SLAVE | libc::MS_REC,
    )?;
    // A fresh proc for the new pid namespace: the old one shows the host's processes.
    mount(
        "mounting /proc",
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOSUID | libc::MS_RELATIME,
    )?;
    // Over /proc goes just our fd directory: `..` from the descriptor cannot climb to the rest
    // of proc once the old root is detached.
    mount(
        "bind-mounting /proc/self/fd",
        Some(c"/proc/self/fd"),
        c"/proc",
        None,
        libc::MS_BIND,
    )?;
    let proc_self_fd = open_path(
        "opening /proc/self/fd",
        c"/proc",
        libc::O_PATH | libc::O_DIRECTORY,
    )?;

    if shared_dir == Path::new("/") {
        // Already the root: there is nothing to pivot into.
        return Ok(proc_self_fd);
    }
    let dir = cstring(shared_dir)?;
    // pivot_root needs the new root to be a mount point.
    mount(
        "bind-mounting the shared directory",
        Some(&dir),
        &dir,
        None,
        libc::MS_BIND | libc::MS_REC,
    )?;
    // SAFETY: `dir` is NUL-terminated.
    check("chdir to the shared directory", unsafe {
        libc::chdir(dir.as_ptr())
    })?;
    // pivot_root(".", ".") stacks the old root on top of the new one, so unmounting "." then
    // removes exactly the old root.
    // SAFETY: both arguments are NUL-terminated strings.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    if ret < 0 {
        return Err(sys_error("pivot_root")(io::Error::last_os_error()));
    }
    // SAFETY: the literal is NUL-terminated.
    check("unmounting the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: the literal is NUL-terminated.
    check("chdir to the new root", unsafe {
        libc::chdir(c"/".as_ptr())
    })?;
    Ok(proc_self_fd)
}

/// The namespace mode's parent: waits for the serving child and mirrors its end.
fn supervise_child(child: libc::pid_t, seccomp: SeccompAction) -> ! {
    // The parent needs none of its descriptors; closing them makes the child the only holder
    // of the listening socket, so a second connection attempt fails instead of hanging.
    // SAFETY: closing descriptors this process no longer uses; no Rust object in this process
    // uses them again because the process only waits and exits below.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    // From here on the parent only waits, signals and exits.
    if let Err(e) = install_filter(ThreadRole::Supervisor, seccomp) {
        eprintln!("error: {e}");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child, libc::SIGKILL) };
        std::process::exit(1);
    }

    // Termination signals aimed at the parent (the VMM knows only its pid) go to the child.
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset manipulation on a local set; sigprocmask affects only this thread, the
    // process's only one.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let waited = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if waited == child {
            mirror_exit(status);
        }
        if waited < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            exit_now(1);
        }
        // SAFETY: `set` is initialised; a null info pointer is allowed.
        let signal = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if signal > 0 && signal != libc::SIGCHLD {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(child, signal) };
        }
    }
}

fn mirror_exit(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // Die of the same signal so the launcher sees what happened to the server.
        // SAFETY: restoring the default action and unblocking the signal, then raising it.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(signal);
        }
        exit_now(128 + signal);
    }
    exit_now(libc::WEXITSTATUS(status));
}

/// Ends the supervisor without the runtime's exit-time cleanup, which its filter does not
/// allow (and which it does not need: it holds no buffers or files).
fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit only ends this process.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_virtiofsd() {
        assert_eq!(
            "namespace".parse::<SandboxMode>().unwrap(),
            SandboxMode::Namespace
        );
        assert_eq!(
            "chroot".parse::<SandboxMode>().unwrap(),
            SandboxMode::Chroot
        );
        assert_eq!("none".parse::<SandboxMode>().unwrap(), SandboxMode::None);
        let err = "jail".parse::<SandboxMode>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --sandbox 'jail': expected namespace, chroot or none"
        );
    }

    #[test]
    fn id_maps_parse_virtiofsd_syntax() {
        let map: IdMap = ":0:1000:1:".parse().unwrap();
        assert_eq!(
            map,
            IdMap {
                inside: 0,
                outside: 1000,
                count: 1
            }
        );
        // Any separator character works, as long as it frames the fields.
        let map: IdMap = "/5/100000/65536/".parse().unwrap();
        assert_eq!(map.count, 65536);
        for bad in [
            "",
            ":0:1000:1",
            "0:1000:1:",
            ":0:1000:",
            ":a:1:1:",
            ":0:1:0:",
            ":0:1:1:2:",
        ] {
            assert!(bad.parse::<IdMap>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn none_mode_changes_nothing() {
        let cfg = SandboxConfig {
            mode: SandboxMode::None,
            shared_dir: PathBuf::from("/nonexistent/dir"),
            uid_map: None,
            gid_map: None,
            supervisor_seccomp: SeccompAction::None,
        };
        let outcome = enter_sandbox(&cfg).unwrap();
        assert_eq!(outcome.root_dir, PathBuf::from("/nonexistent/dir"));
        assert!(outcome.proc_self_fd.is_none());
        assert!(!outcome.in_pid_namespace);
    }

    #[test]
    fn id_maps_are_refused_where_virtiofsd_refuses_them() {
        let map = Some(IdMap {
            inside: 0,
            outside: 0,
            count: 1,
        });
        let cfg = SandboxConfig {
            mode: SandboxMode::Chroot,
            shared_dir: PathBuf::from("/"),
            uid_map: map,
            gid_map: None,
            supervisor_seccomp: SeccompAction::None,
        };
        let err = enter_sandbox(&cfg).unwrap_err().to_string();
        assert!(err.contains("uid/gid maps"), "{err}");
    }
}
