//! `--sandbox`: confine the daemon's view of the host filesystem to the shared directory.
//!
//! * `namespace`: new mount, pid and network namespaces (plus a user namespace when not root,
//!   see [`IdMap`] for how its id maps are written). The process forks; the child is pid 1 of
//!   the new pid namespace and goes on to serve, while the parent closes its descriptors,
//!   forwards termination signals and finally exits with the child's status. The child mounts
//!   a fresh /proc, keeps a descriptor to its `/proc/self/fd`, and pivots into a bind mount of
//!   the shared directory, detaching the old root: afterwards the shared directory is `/` and
//!   nothing else of the host is reachable by path.
//! * `chroot`: keeps a descriptor to `/proc/self/fd`, then chroots into the shared directory.
//! * `none`: nothing.

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
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
///
/// An unprivileged process may itself map only its own id, once, with a count of 1; that is
/// what berth does when given nothing else (inside 0 stands for the caller's id). Any other
/// set of maps — ranges, other ids, several lines — is written by the setuid helpers
/// `newuidmap` / `newgidmap` of shadow-utils, run by a process left outside the new user
/// namespace, and holds only where /etc/subuid and /etc/subgid grant the ids to the user.
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
        // The kernel refuses a range reaching id 4294967295 (the invalid id -1).
        if map.inside.checked_add(map.count).is_none()
            || map.outside.checked_add(map.count).is_none()
        {
            return Err(invalid("the range must end below id 4294967295"));
        }
        Ok(map)
    }
}

impl fmt::Display for IdMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ":{}:{}:{}:", self.inside, self.outside, self.count)
    }
}

impl IdMap {
    /// The id inside the namespace that stands for `outside`, if this map covers it.
    fn inside_of(&self, outside: u32) -> Option<u32> {
        let offset = outside.checked_sub(self.outside)?;
        (offset < self.count).then(|| self.inside + offset)
    }

    fn covers_inside(&self, inside: u32) -> bool {
        inside >= self.inside && inside - self.inside < self.count
    }

    /// Whether the half-open ranges `[a, a + a_count)` and `[b, b + b_count)` meet.
    fn ranges_meet(a: u32, a_count: u32, b: u32, b_count: u32) -> bool {
        u64::from(a) < u64::from(b) + u64::from(b_count)
            && u64::from(b) < u64::from(a) + u64::from(a_count)
    }
}

/// Most lines the kernel accepts in one id map.
const MAX_ID_MAP_LINES: usize = 340;

/// Checks the maps given for one option (`--uid-map` or `--gid-map`, named by `option`) the
/// way the kernel will check them, so that a bad set is refused with the option's name before
/// anything starts: at most 340 maps, and no two of them overlapping inside or outside.
pub fn check_id_maps(maps: &[IdMap], option: &'static str) -> Result<(), Error> {
    if maps.len() > MAX_ID_MAP_LINES {
        return Err(Error::InvalidValue {
            what: option,
            value: format!("({} maps)", maps.len()),
            reason: format!("the kernel accepts at most {MAX_ID_MAP_LINES} maps"),
        });
    }
    for (i, a) in maps.iter().enumerate() {
        for b in &maps[i + 1..] {
            let side = if IdMap::ranges_meet(a.inside, a.count, b.inside, b.count) {
                "inside the namespace"
            } else if IdMap::ranges_meet(a.outside, a.count, b.outside, b.count) {
                "on the host"
            } else {
                continue;
            };
            return Err(Error::InvalidValue {
                what: option,
                value: b.to_string(),
                reason: format!("its range overlaps that of {a} {side}"),
            });
        }
    }
    Ok(())
}

/// A host path kept in a [`SandboxRoot::Paths`] root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    /// The path (absolute; a directory or a file, which must exist). It appears at the same
    /// path inside; a symbolic link is followed to what it names.
    pub path: PathBuf,
    /// Whether the process may change what is below it (else it is mounted read-only).
    pub writable: bool,
}

/// What becomes the root of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxRoot {
    /// This directory becomes `/` (the shared directory of the filesystem daemons).
    Dir(PathBuf),
    /// A new, empty and read-only root holding only these host paths, each bind-mounted at
    /// its own absolute path, so that a path named before the sandbox names the same file
    /// inside it (for a process that keeps opening files by path in several places, as a
    /// cache engine does). Namespace mode only.
    Paths(Vec<SandboxPath>),
}

/// What [`enter_sandbox`] needs.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The confinement.
    pub mode: SandboxMode,
    /// What becomes the root in `namespace` and `chroot` modes.
    pub root: SandboxRoot,
    /// Namespace mode: stay in the host's network namespace (a process that fetches over the
    /// network) instead of an empty one of its own.
    pub keep_network: bool,
    /// User namespace uid maps (namespace mode, unprivileged only; see [`IdMap`]). Empty: inside
    /// 0 maps to the current euid.
    pub uid_map: Vec<IdMap>,
    /// User namespace gid maps, like `uid_map`.
    pub gid_map: Vec<IdMap>,
    /// The seccomp action of the filter the namespace mode's supervising parent installs
    /// once it has nothing left to do but wait ([`ThreadRole::Supervisor`]).
    pub supervisor_seccomp: SeccompAction,
}

/// Where the sandboxed process finds what it serves.
#[derive(Debug)]
pub struct SandboxOutcome {
    /// The path of the shared directory from now on: `/` when sandboxed, else unchanged
    /// (always `/` for a [`SandboxRoot::Paths`] root, whose paths keep their names).
    pub root_dir: PathBuf,
    /// An `O_PATH` descriptor of this process's `/proc/self/fd`, opened before the root
    /// changed (namespace and chroot modes; `/proc` is not reachable by path afterwards).
    pub proc_self_fd: Option<OwnedFd>,
    /// A descriptor of this process's `/proc/self/fdinfo` (namespace and chroot modes), where
    /// the kernel lists the locks each descriptor holds; `None` if it could not be opened.
    pub proc_self_fdinfo: Option<OwnedFd>,
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

/// A detached bind mount of `path` (`open_tree(OPEN_TREE_CLONE)`), if the kernel allows it.
fn open_tree_clone(path: &CStr) -> Option<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the returned descriptor is checked before being owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
    if (!cfg.uid_map.is_empty() || !cfg.gid_map.is_empty())
        && (root || cfg.mode != SandboxMode::Namespace)
    {
        return Err(Error::SandboxNotPermitted(
            "uid/gid maps can only be used by an unprivileged user in namespace sandbox mode",
        ));
    }
    check_id_maps(&cfg.uid_map, "--uid-map")?;
    check_id_maps(&cfg.gid_map, "--gid-map")?;
    if cfg.mode == SandboxMode::Chroot && !root {
        return Err(Error::SandboxNotPermitted(
            "sandbox mode 'chroot' can only be used by root (use 'namespace' instead)",
        ));
    }
    if cfg.mode == SandboxMode::None {
        return Ok(SandboxOutcome {
            root_dir: match &cfg.root {
                SandboxRoot::Dir(dir) => dir.clone(),
                SandboxRoot::Paths(_) => PathBuf::from("/"),
            },
            proc_self_fd: None,
            proc_self_fdinfo: None,
            in_pid_namespace: false,
        });
    }
    let new_root = match &cfg.root {
        SandboxRoot::Dir(dir) => {
            let shared_dir = dir.canonicalize().map_err(|source| Error::SharedDir {
                path: dir.clone(),
                source,
            })?;
            if !shared_dir.is_dir() {
                return Err(Error::SharedDir {
                    path: shared_dir,
                    source: io::Error::from_raw_os_error(libc::ENOTDIR),
                });
            }
            NewRoot::Dir(shared_dir)
        }
        SandboxRoot::Paths(paths) => {
            if cfg.mode != SandboxMode::Namespace {
                return Err(Error::SandboxNotPermitted(
                    "a root made of several paths needs the namespace sandbox (--sandbox namespace)",
                ));
            }
            NewRoot::Binds(plan_binds(paths)?)
        }
    };
    if root {
        // Root may switch to any guest uid/gid; supplementary groups of the launcher must not
        // tag along into those identities.
        // SAFETY: a zero-length list with a null pointer is valid for setgroups.
        check("dropping supplementary groups", unsafe {
            libc::setgroups(0, std::ptr::null())
        })?;
    }
    match (cfg.mode, &new_root) {
        (SandboxMode::Chroot, NewRoot::Dir(shared_dir)) => enter_chroot(shared_dir),
        (SandboxMode::Namespace, _) => enter_namespaces(cfg, &new_root, root),
        _ => unreachable!("refused above"),
    }
}

/// The root [`enter_sandbox`] builds, its paths checked and made canonical.
enum NewRoot {
    /// Pivot into this directory.
    Dir(PathBuf),
    /// A tmpfs holding these binds, in mounting order.
    Binds(Vec<Bind>),
}

/// One bind mount of a [`SandboxRoot::Paths`] root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bind {
    /// What is mounted (the canonical host path).
    source: PathBuf,
    /// Where, inside the new root (the path as given, absolute and without `..`).
    target: PathBuf,
    writable: bool,
    dir: bool,
}

/// Checks `paths` and orders them for mounting: each bind's source exists, its target is
/// absolute and outside /proc (where the root is assembled), one target is mounted once
/// (writable if any of its entries is), and a path comes after the paths it is below.
fn plan_binds(paths: &[SandboxPath]) -> Result<Vec<Bind>, Error> {
    let mut binds: Vec<Bind> = Vec::new();
    for entry in paths {
        let invalid = |source: io::Error| Error::SharedDir {
            path: entry.path.clone(),
            source,
        };
        let target = &entry.path;
        if !target.is_absolute()
            || target.starts_with("/proc")
            || target
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let source = target.canonicalize().map_err(invalid)?;
        if source.starts_with("/proc") {
            return Err(invalid(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let dir = source.is_dir();
        let target: PathBuf = target.components().collect();
        match binds.iter_mut().find(|b| b.target == target) {
            Some(bind) => bind.writable |= entry.writable,
            None => binds.push(Bind {
                source,
                target,
                writable: entry.writable,
                dir,
            }),
        }
    }
    binds.sort_by_key(|b| b.target.components().count());
    Ok(binds)
}

fn enter_chroot(shared_dir: &Path) -> Result<SandboxOutcome, Error> {
    let proc_self_fd = open_path(
        "opening /proc/self/fd",
        c"/proc/self/fd",
        libc::O_PATH | libc::O_DIRECTORY,
    )?;
    let proc_self_fdinfo = open_path(
        "opening /proc/self/fdinfo",
        c"/proc/self/fdinfo",
        libc::O_PATH | libc::O_DIRECTORY,
    )
    .ok();
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
        proc_self_fdinfo,
        in_pid_namespace: false,
    })
}

/// Whether `maps`, given for an id whose current value is `own`, need newuidmap/newgidmap:
/// anything but `own` once with a count of 1 (no maps means that default) does.
pub fn id_maps_need_helper(maps: &[IdMap], own: u32) -> bool {
    IdMapPlan::new(IdKind::User, maps, own).needs_helper()
}

/// Which of the two id maps of a user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    User,
    Group,
}

impl IdKind {
    fn option(self) -> &'static str {
        match self {
            IdKind::User => "--uid-map",
            IdKind::Group => "--gid-map",
        }
    }

    /// The shadow-utils helper that writes this map with the privilege the caller lacks.
    fn helper(self) -> &'static str {
        match self {
            IdKind::User => "newuidmap",
            IdKind::Group => "newgidmap",
        }
    }

    fn map_file(self) -> &'static str {
        match self {
            IdKind::User => "uid_map",
            IdKind::Group => "gid_map",
        }
    }

    fn id_name(self) -> &'static str {
        match self {
            IdKind::User => "uid",
            IdKind::Group => "gid",
        }
    }

    /// Where the helper looks up which ids the user may map.
    fn subordinate_ids_file(self) -> &'static str {
        match self {
            IdKind::User => "/etc/subuid",
            IdKind::Group => "/etc/subgid",
        }
    }
}

/// One id map of the user namespace to be created, and how it gets written.
#[derive(Debug, Clone)]
struct IdMapPlan {
    kind: IdKind,
    maps: Vec<IdMap>,
    /// The caller's own id (euid or egid) outside.
    own: u32,
}

impl IdMapPlan {
    fn new(kind: IdKind, given: &[IdMap], own: u32) -> Self {
        let maps = if given.is_empty() {
            vec![IdMap {
                inside: 0,
                outside: own,
                count: 1,
            }]
        } else {
            given.to_vec()
        };
        IdMapPlan { kind, maps, own }
    }

    /// Anything but the caller's own id, once, needs the setuid helper: the kernel lets an
    /// unprivileged writer map nothing else.
    fn needs_helper(&self) -> bool {
        !matches!(self.maps.as_slice(), [only] if only.outside == self.own && only.count == 1)
    }

    /// The id the process takes inside: root if the namespace has one (credential switching
    /// for the guest's users needs it), else the one standing for the caller's own id, else the
    /// first mapped.
    fn inside_id(&self) -> u32 {
        if self.maps.iter().any(|m| m.covers_inside(0)) {
            return 0;
        }
        self.maps
            .iter()
            .find_map(|m| m.inside_of(self.own))
            .unwrap_or(self.maps[0].inside)
    }

    fn content(&self) -> String {
        self.maps
            .iter()
            .map(|m| format!("{} {} {}\n", m.inside, m.outside, m.count))
            .collect()
    }

    /// Writes the map into `/proc/<process>/` (`self` or a pid) directly, which the kernel
    /// allows an unprivileged writer only for its own id.
    fn write_directly(&self, process: &str) -> Result<(), String> {
        let write = |file: &str, content: &str| {
            let path = format!("/proc/{process}/{file}");
            File::options()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(content.as_bytes()))
                .map_err(|e| format!("cannot write {content:?} to {path}: {e}"))
        };
        if self.kind == IdKind::Group {
            // An unprivileged writer must give up setgroups before it may write a gid map.
            write("setgroups", "deny")?;
        }
        write(self.kind.map_file(), &self.content())
    }

    /// Has the helper write the map of process `pid` (run from outside its user namespace).
    /// The helper leaves setgroups allowed when /etc/subgid grants the ranges, and denies it
    /// otherwise, as the kernel requires for an unprivileged gid map.
    fn write_with_helper(&self, pid: libc::pid_t) -> Result<(), String> {
        let helper = self.kind.helper();
        let mut args = vec![pid.to_string()];
        for map in &self.maps {
            args.extend([map.inside, map.outside, map.count].map(|n| n.to_string()));
        }
        let command_line = format!("{helper} {}", args.join(" "));
        let output = Command::new(helper)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    format!(
                        "{helper} is not installed (Debian and Ubuntu: package uidmap; Fedora: \
                         shadow-utils); without it an unprivileged user can map only its own \
                         {}, with a count of 1",
                        self.kind.id_name()
                    )
                } else {
                    format!("cannot run {helper}: {e}")
                }
            })?;
        if output.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&output.stderr);
        let said = said.trim();
        let hint = if no_new_privs() {
            "no_new_privs is set on berth (by whatever started it), so the setuid helper ran \
             without its privilege"
                .to_owned()
        } else {
            format!(
                "the ids must be granted to this user (uid {}) in {}",
                real_uid(),
                self.kind.subordinate_ids_file()
            )
        };
        Err(format!(
            "`{command_line}` {}{}{said}; {hint}",
            exit_description(output.status),
            if said.is_empty() { "" } else { ": " },
        ))
    }
}

fn exit_description(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

fn real_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS only reads this thread's flag.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    cloexec_pipe().map_err(sys_error("creating a pipe"))
}

/// A pipe whose two ends (read, write) close on exec: for a helper process forked before
/// confinement to talk to berth.
pub fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Closes every descriptor above stderr except `keep`: for a forked helper process, so it
/// holds nothing of berth's but what it needs.
pub fn close_all_but(keep: &[RawFd]) {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    let mut from = 3u32;
    for fd in keep {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd > from {
            // SAFETY: closing descriptors nothing in this (forked) process uses any more.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = from.max(fd + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// A process forked before `unshare`, so left in the parent user namespace, that writes the
/// new namespace's id maps with newuidmap/newgidmap once asked to: a process inside cannot
/// use the setuid helpers (their owner, host root, is not mapped there).
///
/// It runs before any seccomp filter exists and is reaped before the sandbox goes on.
struct OutsideMapWriter {
    pid: libc::pid_t,
    /// One byte asks for the maps; closing it unwritten sends the writer away.
    go: Option<File>,
    /// The writer's report: nothing on success, else why it failed; EOF when it exits.
    report: File,
}

impl OutsideMapWriter {
    /// Forks the writer for the maps of this process. Call it while single-threaded.
    fn spawn(plans: [IdMapPlan; 2]) -> Result<Self, Error> {
        // SAFETY: getpid has no preconditions.
        let target = unsafe { libc::getpid() };
        let (go_read, go_write) = pipe()?;
        let (report_read, report_write) = pipe()?;
        // SAFETY: the process is single-threaded (precondition of enter_sandbox), so the child
        // may run arbitrary code; it never returns from write_maps_from_outside.
        let pid = check("forking the id map writer", unsafe { libc::fork() })?;
        if pid == 0 {
            drop((go_write, report_read));
            write_maps_from_outside(target, &plans, go_read.into(), report_write.into());
        }
        drop((go_read, report_write));
        Ok(OutsideMapWriter {
            pid,
            go: Some(go_write.into()),
            report: report_read.into(),
        })
    }

    /// Asks for the maps (the caller has unshared its user namespace) and waits until they are
    /// written or the writer failed.
    fn write_maps(mut self) -> Result<(), Error> {
        let mut failure = String::new();
        let asked = match self.go.take() {
            Some(mut go) => go.write_all(&[1]),
            None => Err(io::Error::from_raw_os_error(libc::EPIPE)),
        };
        // Read even when the word could not be sent: the writer may have said why it left.
        let read = (&self.report).read_to_string(&mut failure);
        let status = self.reap();
        if !failure.is_empty() {
            return Err(Error::UserNamespaceMaps(failure));
        }
        asked.map_err(sys_error("asking the id map writer to start"))?;
        read.map_err(sys_error("reading the id map writer's report"))?;
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(Error::UserNamespaceMaps(format!(
                "the process writing them {} without saying why",
                exit_description(status)
            ))),
            None => Err(Error::UserNamespaceMaps(
                "the process writing them could not be waited for".into(),
            )),
        }
    }

    fn reap(&mut self) -> Option<ExitStatus> {
        let pid = std::mem::take(&mut self.pid);
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child; `status` is a valid out pointer.
            let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
            if waited == pid {
                return Some(ExitStatus::from_raw(status));
            }
            if waited < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
    }
}

impl Drop for OutsideMapWriter {
    /// Never asked (the unshare failed): the writer sees its pipe close, exits, and is reaped.
    fn drop(&mut self) {
        self.go = None;
        if self.pid > 0 {
            self.reap();
        }
    }
}

/// The outside writer's life: wait for the word, write both maps of `target`, report, exit.
fn write_maps_from_outside(
    target: libc::pid_t,
    plans: &[IdMapPlan; 2],
    mut go: File,
    mut report: File,
) -> ! {
    // The helpers must not inherit the daemon's socket or /dev/fuse.
    close_all_but(&[go.as_raw_fd(), report.as_raw_fd()]);
    let mut byte = [0u8];
    let asked = loop {
        match go.read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break matches!(other, Ok(1)),
        }
    };
    if !asked {
        exit_now(0);
    }
    let process = target.to_string();
    for plan in plans {
        let written = if plan.needs_helper() {
            plan.write_with_helper(target)
        } else {
            plan.write_directly(&process)
        };
        if let Err(reason) = written {
            let _ = write!(report, "{}: {reason}", plan.kind.option());
            exit_now(1);
        }
    }
    exit_now(0);
}

/// Writes the maps of the user namespace this process just unshared: itself when both map only
/// its own ids, else through the outside writer spawned before the unshare.
fn write_user_namespace_maps(
    plans: &[IdMapPlan; 2],
    outside: Option<OutsideMapWriter>,
) -> Result<(), Error> {
    if let Some(writer) = outside {
        return writer.write_maps();
    }
    for plan in plans {
        plan.write_directly("self").map_err(|reason| {
            Error::UserNamespaceMaps(format!("{}: {reason}", plan.kind.option()))
        })?;
    }
    Ok(())
}

/// Takes the ids chosen inside the freshly mapped namespace. Where setgroups is still allowed
/// (newgidmap granted ranges), the launcher's supplementary groups are dropped first: the
/// daemon acts for the guest's users, who must not inherit them.
fn become_inside_ids(uid_plan: &IdMapPlan, gid_plan: &IdMapPlan) -> Result<(), Error> {
    let setgroups = std::fs::read_to_string("/proc/self/setgroups")
        .map_err(sys_error("reading /proc/self/setgroups"))?;
    if setgroups.trim() == "allow" {
        // SAFETY: a zero-length list with a null pointer is valid for setgroups.
        check("dropping supplementary groups", unsafe {
            libc::setgroups(0, std::ptr::null())
        })?;
    } else if uid_plan
        .maps
        .iter()
        .map(|m| u64::from(m.count))
        .sum::<u64>()
        > 1
    {
        // SAFETY: a zero-length query of the supplementary group count.
        let supplementary = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if supplementary > 0 {
            tracing::warn!(
                "The launcher's {supplementary} supplementary groups stay with every guest user \
                 (setgroups is denied in the user namespace, so they cannot be dropped); map the \
                 gids with a --gid-map range granted in /etc/subgid to have them dropped."
            );
        }
    }
    let (uid, gid) = (uid_plan.inside_id(), gid_plan.inside_id());
    // SAFETY: plain id switches within the namespace just mapped.
    check("setresgid in the user namespace", unsafe {
        libc::setresgid(gid, gid, gid)
    })?;
    // SAFETY: as above.
    check("setresuid in the user namespace", unsafe {
        libc::setresuid(uid, uid, uid)
    })?;
    tracing::debug!(
        "user namespace: running as uid {uid}, gid {gid} inside; uid map {:?}, gid map {:?}",
        uid_plan.content(),
        gid_plan.content()
    );
    Ok(())
}

fn enter_namespaces(
    cfg: &SandboxConfig,
    new_root: &NewRoot,
    root: bool,
) -> Result<SandboxOutcome, Error> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    if !cfg.keep_network {
        flags |= libc::CLONE_NEWNET;
    }
    let plans = if root {
        None
    } else {
        flags |= libc::CLONE_NEWUSER;
        Some([
            IdMapPlan::new(IdKind::User, &cfg.uid_map, geteuid()),
            IdMapPlan::new(IdKind::Group, &cfg.gid_map, getegid()),
        ])
    };
    // The writer must exist before the unshare to stay outside the new user namespace.
    let outside = match &plans {
        Some(plans) if plans.iter().any(IdMapPlan::needs_helper) => {
            Some(OutsideMapWriter::spawn(plans.clone())?)
        }
        _ => None,
    };
    // SAFETY: unshare only changes this process's namespaces.
    check("unshare", unsafe { libc::unshare(flags) })?;
    if let Some(plans) = &plans {
        write_user_namespace_maps(plans, outside)?;
        become_inside_ids(&plans[0], &plans[1])?;
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
    let (proc_self_fd, proc_self_fdinfo) = setup_mounts(new_root)?;
    Ok(SandboxOutcome {
        root_dir: PathBuf::from("/"),
        proc_self_fd: Some(proc_self_fd),
        proc_self_fdinfo,
        in_pid_namespace: true,
    })
}

/// Builds the child's filesystem view; returns the `/proc/self/fd` descriptor and, where the
/// kernel can clone a mount without a mount point, a `/proc/self/fdinfo` one.
fn setup_mounts(new_root: &NewRoot) -> Result<(OwnedFd, Option<OwnedFd>), Error> {
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
    // A detached copy of just our fdinfo directory, for the lock state a live migration
    // carries: `..` from its root stays in it. Without it migration reports that it cannot
    // read the locks, so a kernel without open_tree loses nothing else.
    let proc_self_fdinfo = open_tree_clone(c"/proc/self/fdinfo");
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

    let dir = match new_root {
        NewRoot::Dir(shared_dir) if shared_dir == Path::new("/") => {
            // Already the root: there is nothing to pivot into.
            return Ok((proc_self_fd, proc_self_fdinfo));
        }
        NewRoot::Dir(shared_dir) => {
            let dir = cstring(shared_dir)?;
            // pivot_root needs the new root to be a mount point.
            mount(
                "bind-mounting the shared directory",
                Some(&dir),
                &dir,
                None,
                libc::MS_BIND | libc::MS_REC,
            )?;
            dir
        }
        NewRoot::Binds(binds) => {
            assemble_root(binds)?;
            CString::from(ASSEMBLY_POINT)
        }
    };
    // SAFETY: `dir` is NUL-terminated.
    check("chdir to the new root", unsafe {
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
    if matches!(new_root, NewRoot::Binds(_)) {
        // Nothing can be created in the root itself, only below the writable binds.
        mount(
            "making the new root read-only",
            None,
            c"/",
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | TMPFS_FLAGS,
        )?;
    }
    Ok((proc_self_fd, proc_self_fdinfo))
}

/// Where a [`SandboxRoot::Paths`] root is put together: the /proc mount point, which by then
/// holds only this process's fd directory (the descriptor to it is open) and which no
/// bind's source can be below, so that every source is still reachable by its host path.
const ASSEMBLY_POINT: &CStr = c"/proc";

/// The flags of the new root's tmpfs.
const TMPFS_FLAGS: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// The mount flags a bind of `path` must keep when remounted (a user namespace may not drop
/// the ones its mounts were given by the host).
fn locked_flags(path: &CStr) -> Result<libc::c_ulong, Error> {
    // SAFETY: an all-zero statvfs is a valid out value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid out pointer.
    check("statvfs of a bind", unsafe {
        libc::statvfs(path.as_ptr(), &mut stat)
    })?;
    let mut flags = 0;
    for (st, ms) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if stat.f_flag & st != 0 {
            flags |= ms;
        }
    }
    Ok(flags)
}

/// Mounts a tmpfs on [`ASSEMBLY_POINT`] and bind-mounts each of `binds` into it at its
/// target path, creating the directories (and, for a file, the empty file) it is mounted on.
fn assemble_root(binds: &[Bind]) -> Result<(), Error> {
    mount(
        "mounting the new root's tmpfs",
        Some(c"tmpfs"),
        ASSEMBLY_POINT,
        Some(c"tmpfs"),
        TMPFS_FLAGS,
    )?;
    let base = Path::new(OsStr::from_bytes(ASSEMBLY_POINT.to_bytes()));
    for bind in binds {
        let relative = bind.target.strip_prefix("/").unwrap_or(&bind.target);
        let at = base.join(relative);
        // A target below an earlier bind already exists there (its source does); anything
        // else is created in the tmpfs.
        if !at.exists() {
            let made = if bind.dir {
                std::fs::create_dir_all(&at)
            } else {
                at.parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| File::create(&at).map(drop))
            };
            made.map_err(sys_error("creating a bind's mount point"))?;
        }
        let (source, at) = (cstring(&bind.source)?, cstring(&at)?);
        mount(
            "bind-mounting a path into the new root",
            Some(&source),
            &at,
            None,
            libc::MS_BIND | libc::MS_REC,
        )?;
        if !bind.writable {
            let flags = locked_flags(&at)?;
            mount(
                "making a bind read-only",
                None,
                &at,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
            )?;
        }
    }
    Ok(())
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
            ":4294967295:0:1:",
            ":0:4294967000:1000:",
        ] {
            assert!(bad.parse::<IdMap>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn none_mode_changes_nothing() {
        let cfg = SandboxConfig {
            mode: SandboxMode::None,
            root: SandboxRoot::Dir(PathBuf::from("/nonexistent/dir")),
            keep_network: false,
            uid_map: Vec::new(),
            gid_map: Vec::new(),
            supervisor_seccomp: SeccompAction::None,
        };
        let outcome = enter_sandbox(&cfg).unwrap();
        assert_eq!(outcome.root_dir, PathBuf::from("/nonexistent/dir"));
        assert!(outcome.proc_self_fd.is_none());
        assert!(!outcome.in_pid_namespace);
    }

    #[test]
    fn id_maps_are_refused_where_virtiofsd_refuses_them() {
        let map = vec![IdMap {
            inside: 0,
            outside: 0,
            count: 1,
        }];
        let cfg = SandboxConfig {
            mode: SandboxMode::Chroot,
            root: SandboxRoot::Dir(PathBuf::from("/")),
            keep_network: false,
            uid_map: map,
            gid_map: Vec::new(),
            supervisor_seccomp: SeccompAction::None,
        };
        let err = enter_sandbox(&cfg).unwrap_err().to_string();
        assert!(err.contains("uid/gid maps"), "{err}");
    }

    #[test]
    fn binds_are_merged_and_ordered_parents_first_and_bad_paths_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("a/b")).unwrap();
        std::fs::write(base.join("a/file"), b"x").unwrap();
        let path = |rel: &str, writable| SandboxPath {
            path: base.join(rel),
            writable,
        };
        let binds = plan_binds(&[
            path("a/b", false),
            path("a/file", false),
            path("a", false),
            path("a/b", true),
        ])
        .unwrap();
        let order: Vec<_> = binds
            .iter()
            .map(|b| {
                (
                    b.target.strip_prefix(&base).unwrap().to_owned(),
                    b.writable,
                    b.dir,
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                (PathBuf::from("a"), false, true),
                (PathBuf::from("a/b"), true, true),
                (PathBuf::from("a/file"), false, false),
            ]
        );
        for bad in [
            PathBuf::from("relative/dir"),
            PathBuf::from("/proc/self"),
            base.join("a/../a"),
            base.join("missing"),
        ] {
            let entry = SandboxPath {
                path: bad.clone(),
                writable: false,
            };
            assert!(plan_binds(&[entry]).is_err(), "{} accepted", bad.display());
        }
    }

    fn map(inside: u32, outside: u32, count: u32) -> IdMap {
        IdMap {
            inside,
            outside,
            count,
        }
    }

    #[test]
    fn overlapping_or_too_many_maps_are_refused() {
        assert!(check_id_maps(&[map(0, 1000, 1), map(1, 200000, 65536)], "--uid-map").is_ok());
        let err = check_id_maps(&[map(0, 1000, 10), map(5, 200000, 10)], "--uid-map")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid --uid-map ':5:200000:10:': its range overlaps that of :0:1000:10: inside \
             the namespace"
        );
        let err = check_id_maps(&[map(0, 1000, 1), map(1, 1000, 1)], "--gid-map")
            .unwrap_err()
            .to_string();
        assert!(err.contains("on the host"), "{err}");
        let many: Vec<IdMap> = (0..341).map(|i| map(i, 100000 + i, 1)).collect();
        let err = check_id_maps(&many, "--uid-map").unwrap_err().to_string();
        assert!(err.contains("at most 340"), "{err}");
    }

    #[test]
    fn only_the_own_id_once_is_written_without_the_helper() {
        let plan = |given: &[IdMap]| IdMapPlan::new(IdKind::User, given, 1000);
        assert!(!plan(&[]).needs_helper());
        assert_eq!(plan(&[]).content(), "0 1000 1\n");
        assert!(!plan(&[map(5, 1000, 1)]).needs_helper());
        assert!(plan(&[map(0, 1000, 2)]).needs_helper());
        assert!(plan(&[map(0, 1001, 1)]).needs_helper());
        let two = plan(&[map(0, 1000, 1), map(1, 200000, 65536)]);
        assert!(two.needs_helper());
        assert_eq!(two.content(), "0 1000 1\n1 200000 65536\n");
    }

    #[test]
    fn the_process_becomes_root_inside_if_mapped_else_its_own_id() {
        let plan = |given: &[IdMap]| IdMapPlan::new(IdKind::Group, given, 1000);
        assert_eq!(plan(&[]).inside_id(), 0);
        assert_eq!(plan(&[map(5, 1000, 1)]).inside_id(), 5);
        assert_eq!(
            plan(&[map(7, 1000, 1), map(0, 200000, 7)]).inside_id(),
            0,
            "root inside, so that guest users can be switched to"
        );
        assert_eq!(plan(&[map(10, 990, 20)]).inside_id(), 20);
        assert_eq!(plan(&[map(3, 200000, 2)]).inside_id(), 3);
    }
}
