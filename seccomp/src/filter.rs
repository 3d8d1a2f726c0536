//! `--seccomp`: per-thread system call allow-lists, compiled to BPF with seccompiler.
//!
//! Each thread installs the filter of its role when it starts. Filters are inherited by the
//! threads a thread creates afterwards and stack (a call must pass every filter), so the main
//! filter, installed first, covers every role's list and each thread narrows it to its own.
//! The lists were built by tracing the daemon (`strace -f`, per thread, after its filter)
//! through the protocol, confinement and /dev/fuse suites, which touch every FUSE operation as
//! root and as a guest user, inline and on the thread pool, plus what the Rust runtime and
//! glibc do rarely (panics, thread exit, memory management, time). The berth binary's tests
//! re-check them under `--seccomp log`: a full workload must leave no audit record.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use crate::Error;

/// What happens to a system call outside the thread's allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompAction {
    /// Install no filter.
    None,
    /// Kill the whole process (SIGSYS).
    #[default]
    Kill,
    /// Allow the call but record it in the audit log.
    Log,
    /// Deliver SIGSYS to the thread (fatal unless handled).
    Trap,
}

impl FromStr for SeccompAction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(SeccompAction::None),
            "kill" => Ok(SeccompAction::Kill),
            "log" => Ok(SeccompAction::Log),
            "trap" => Ok(SeccompAction::Trap),
            other => Err(Error::InvalidValue {
                what: "--seccomp",
                value: other.to_owned(),
                reason: "expected none, kill, log or trap".to_owned(),
            }),
        }
    }
}

/// The kinds of thread the daemon runs; each gets its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// Handles vhost-user messages from the VMM: memory tables, vring set-up, features.
    VhostUserControl,
    /// Waits on a virtqueue's kick and serves its requests inline or hands them to the pool.
    QueueWorker,
    /// Serves filesystem requests handed over by queue workers.
    ThreadPool,
    /// A queue worker of a device with a DAX window: also sends the window's map and unmap
    /// requests to the VMM over the backend request channel and reads their acknowledgements.
    DaxQueueWorker,
    /// A pool thread of a device with a DAX window (as [`ThreadRole::DaxQueueWorker`]).
    DaxThreadPool,
    /// The DAX reclaim thread: reads the fanotify group that marks mapped files, reads their
    /// sizes (fstat on the mapping's descriptor), re-points window ranges past the end over
    /// the backend request channel, and punches the placeholder's pages it let go of.
    DaxWatcher,
    /// Reads requests from /dev/fuse and serves them.
    FuseWorker,
    /// A FUSE-over-io_uring queue thread: serves as a FUSE worker does, with requests and
    /// replies moving through its ring (io_uring_enter). The ring was set up and restricted to
    /// FUSE commands on /dev/fuse before any filter: setting up or registering is not allowed.
    FuseRing,
    /// Registers and closes FUSE passthrough backing files on /dev/fuse for the FUSE workers
    /// (its two ioctls, nothing else); the one thread that keeps CAP_SYS_ADMIN, which the
    /// kernel asks of it.
    FuseBackingRegistrar,
    /// Saves the filesystem's state into the VMM's pipe, or loads it from one, during a live
    /// migration (vhost-user SET_DEVICE_STATE_FD): describes or reopens every inode and open
    /// file the guest holds.
    Migration,
    /// Reads fanotify or inotify events about the shared directory and bumps version-table
    /// slots (shared caching); watches directories created later.
    HostWatcher,
    /// Waits on the version table and writes invalidations to /dev/fuse (shared caching).
    FuseNotifier,
    /// Maps the version table into the VMM's shared memory region 1 over the backend request
    /// channel, each time the VMM hands over a channel (shared caching for virtio-fs guests).
    VersionsMapper,
    /// The main thread and the signal-waiting thread once start-up is over: waiting, shutdown
    /// (unmounting in FUSE mode), accepting connections, logging and exit. Its list covers
    /// every other role's, because the threads it spawns afterwards inherit its filter.
    Main,
    /// The processes left outside the sandbox: the namespace mode's parent, which only waits
    /// for the serving child, forwards termination signals to it and mirrors its exit, and
    /// `berth fuse`'s unmount guard.
    Supervisor,
    /// A ublk queue thread of `berth block`, once its ring is set up: waits on and submits
    /// to its io_uring, moves data between backing files and the kernel's request buffers,
    /// makes writes durable, and fetches missing image chunks.
    UblkQueue,
    /// A vhost-user-blk queue thread of `berth block serve-vhost`: waits on its queue's
    /// kick, moves data between the target's files and guest memory, makes writes durable,
    /// discards, and fetches missing image chunks.
    VhostBlkQueue,
    /// The threads of a block target's cache engine or volume (`berth block serve-vhost
    /// IMAGE|volume:…`): fetching and prefetching chunks, the object-store client and its
    /// runtime (sockets, name resolution, TLS), a volume's log, uploads and lease. Installed
    /// on the main thread before the target opens, so every such thread starts under it;
    /// since every thread started afterwards inherits it too, it also allows what they do
    /// (see [`allowed_syscalls`]), and they narrow it with a filter of their own role.
    /// `berth block add|recover` (ublk) opens its targets on a thread under it, and its main
    /// thread takes it once every device is started.
    BlockEngine,
    /// The control thread of one ublk device of `berth block add|recover`, once the device
    /// is started: waits for the queue threads to end, then stops and deletes the device
    /// through the control ring it set up before (io_uring_enter only, no new ring) and
    /// removes the device's run file.
    UblkControl,
    /// The signal thread of `berth block add|recover`, once its control ring is set up:
    /// waits for a termination signal, then stops every device through that ring
    /// (io_uring_enter only, with control handles opened by the devices' control threads).
    UblkSignals,
}

impl ThreadRole {
    fn name(self) -> &'static str {
        match self {
            ThreadRole::VhostUserControl => "vhost-user control",
            ThreadRole::QueueWorker => "queue worker",
            ThreadRole::ThreadPool => "thread pool",
            ThreadRole::DaxQueueWorker => "queue worker (DAX)",
            ThreadRole::DaxThreadPool => "thread pool (DAX)",
            ThreadRole::DaxWatcher => "DAX reclaim",
            ThreadRole::FuseWorker => "FUSE worker",
            ThreadRole::FuseRing => "FUSE ring",
            ThreadRole::FuseBackingRegistrar => "FUSE backing-file registrar",
            ThreadRole::HostWatcher => "host watcher",
            ThreadRole::Migration => "migration",
            ThreadRole::FuseNotifier => "FUSE notifier",
            ThreadRole::VersionsMapper => "version table mapper",
            ThreadRole::Main => "main",
            ThreadRole::Supervisor => "sandbox supervisor",
            ThreadRole::UblkQueue => "ublk queue",
            ThreadRole::VhostBlkQueue => "vhost-user-blk queue",
            ThreadRole::BlockEngine => "block engine",
            ThreadRole::UblkControl => "ublk control",
            ThreadRole::UblkSignals => "ublk signals",
        }
    }
}

/// What every thread does through the Rust runtime and glibc: memory, locks, time, thread
/// start and exit, logging (to stderr, or to the already connected syslog socket with
/// `--syslog`), panics (which abort via tgkill when they cannot unwind).
const RUNTIME: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_prctl,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    // One datagram per log line on the syslog socket (glibc's send is sendto).
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// A per-thread timer whose signal ends a blocking host lock call that has waited long enough
/// (the migration thread's waits for the locks a migration source still holds).
const LOCK_WAIT_TIMER: &[libc::c_long] = &[
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_settime,
];

/// Serving filesystem requests on the shared directory (the passthrough filesystem): opening
/// by handle or through /proc/self/fd, data and metadata operations, switching the file system
/// identity to the caller's (setfsuid/setfsgid) and the umask per request.
const FILESYSTEM: &[libc::c_long] = &[
    libc::SYS_copy_file_range,
    libc::SYS_fallocate,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_getxattr,
    libc::SYS_linkat,
    libc::SYS_listxattr,
    libc::SYS_lseek,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_name_to_handle_at,
    libc::SYS_newfstatat,
    libc::SYS_open_by_handle_at,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_readlinkat,
    libc::SYS_removexattr,
    libc::SYS_renameat2,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setxattr,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_syncfs,
    libc::SYS_umask,
    libc::SYS_unlinkat,
    // Only unshare(CLONE_FS), for a per-thread umask and working directory (see ARG_RULES).
    libc::SYS_unshare,
    libc::SYS_utimensat,
];

/// Waiting on eventfds (queue kicks) and /dev/fuse with epoll, reading what woke the thread.
const EVENT_LOOP: &[libc::c_long] = &[libc::SYS_epoll_pwait, libc::SYS_epoll_wait, libc::SYS_read];

/// The vhost-user control thread: messages with descriptors over the Unix socket, guest memory
/// mapping (mmap and munmap are in RUNTIME), (un)registering queue kicks with the queue
/// threads' epoll sets, checking that the backend request channel the frontend sends is a Unix
/// stream socket (vhost 0.18 asks getsockopt), and shutting the socket down when the frontend
/// hangs up (vhost-user-backend 0.24 does on the way out).
const VHOST_USER_CONTROL: &[libc::c_long] = &[
    libc::SYS_epoll_ctl,
    libc::SYS_getsockopt,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
];

/// DAX window requests to the VMM: SHMEM_MAP with the file's descriptor (sendmsg), and the
/// VMM's acknowledgement (recvmsg) on the backend request channel.
const DAX_CHANNEL: &[libc::c_long] = &[libc::SYS_recvmsg, libc::SYS_sendmsg];

/// Threads that map window ranges mark each mapped file in the reclaim thread's fanotify
/// group (by descriptor) and punch placeholder pages a removed range leaves behind.
const DAX_MAPPING: &[libc::c_long] = &[libc::SYS_fanotify_mark, libc::SYS_fallocate];

/// The DAX reclaim thread, besides DAX_CHANNEL and DAX_MAPPING: waiting on its fanotify group
/// (read) and reading mapped files' sizes.
const DAX_RECLAIM: &[libc::c_long] = &[
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_read,
    libc::SYS_statx,
];

/// Setting up a DAX window (after the main filter is in place): its placeholder memfd
/// (created, sized, sealed) and the reclaim thread's fanotify group.
const DAX_SETUP: &[libc::c_long] = &[
    libc::SYS_fanotify_init,
    libc::SYS_fcntl,
    libc::SYS_ftruncate,
    libc::SYS_memfd_create,
];

/// The main and signal threads after start-up: accepting the frontend, spawning the control
/// thread (and, in FUSE mode, nothing more), creating the queue threads' epoll sets and exit
/// events, waiting for a signal, removing the socket or unmounting, and exiting.
const MAIN: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    // Threads started under the main filter narrow it with a filter of their own role.
    libc::SYS_seccomp,
    libc::SYS_umount2,
    libc::SYS_unlink,
];

/// The processes left outside the sandbox, which handle no guest input: the namespace mode's
/// parent (waiting for the child, forwarding signals to it, mirroring its end with raise) and
/// `berth fuse`'s unmount guard (waiting on a pipe, unmounting, answering on another pipe).
const SUPERVISOR: &[libc::c_long] = &[
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_kill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_read,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_tgkill,
    libc::SYS_umount2,
    libc::SYS_wait4,
    libc::SYS_write,
];

/// The host watcher's inotify fallback adds a watch for each new directory.
const HOST_WATCH: &[libc::c_long] = &[libc::SYS_inotify_add_watch];

/// Block-device ioctls a block queue thread (ublk or vhost-user-blk) may issue on a raw target
/// (include/uapi/linux/fs.h): BLKDISCARD and BLKZEROOUT, nothing else.
const BLKDISCARD: u64 = 0x1277;
const BLKZEROOUT: u64 = 0x127f;

/// A ublk queue thread: its io_uring (enter for requests and target I/O, register for the
/// per-request buffer registration of the zero-copy fallback), the target's data and
/// durability calls (an overlay's map writes, FLUSH, DISCARD as a punched hole), reading the
/// blob objects of a local image store while fetching chunks, and the two block ioctls (see
/// ARG_RULES), and eventfd2 for the completion of a FLUSH a target finishes on another thread
/// (waited for on the ring). No sockets: remote backends fetch on the cache engine's own
/// runtime threads.
const UBLK_QUEUE: &[libc::c_long] = &[
    libc::SYS_eventfd2,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    // A volume's free-space check before it preallocates a log segment.
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    // glibc reads /proc/sys/vm/overcommit_memory (openat, read) when a thread's malloc arena
    // is trimmed at thread exit.
    libc::SYS_read,
    libc::SYS_statx,
];

/// A ublk device's control thread once the device runs: its control ring's commands (stop,
/// delete) and the run file libublk keeps per device (checked, then removed).
const UBLK_CONTROL: &[libc::c_long] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// `berth block add`'s signal thread: waiting for SIGTERM/SIGINT/SIGHUP (sigwait), then
/// submitting the stop of each device to its control ring.
const UBLK_SIGNALS: &[libc::c_long] = &[libc::SYS_rt_sigtimedwait, libc::SYS_io_uring_enter];

/// A FUSE ring thread's ring: submitting and waiting. Its ring is restricted to FUSE
/// commands on /dev/fuse and a poll of the stop event (fuse_uring.rs), so the calls io_uring
/// could otherwise make past this filter are out of its reach.
const FUSE_RING: &[libc::c_long] = &[libc::SYS_io_uring_enter];
/// What a FUSE ring thread does before its own filter, under the main one: pin itself to its
/// queue's CPU.
const FUSE_RING_START: &[libc::c_long] = &[libc::SYS_sched_setaffinity];

/// FUSE passthrough's requests on /dev/fuse (include/uapi/linux/fuse.h):
/// `FUSE_DEV_IOC_BACKING_OPEN` and `FUSE_DEV_IOC_BACKING_CLOSE`.
const FUSE_DEV_IOC_BACKING_OPEN: u64 = 0x4010_e501;
const FUSE_DEV_IOC_BACKING_CLOSE: u64 = 0x4004_e502;

/// The FUSE backing-file registrar: ioctl, with the two requests of [`ioctl_requests`] only.
const FUSE_PASSTHROUGH: &[libc::c_long] = &[libc::SYS_ioctl];
/// A vhost-user-blk queue thread: the block engine's data and durability calls (as a ublk
/// queue's, without io_uring: `preadv`/`pwritev` straight between the target's files and
/// guest memory), reading the blob objects of a local image store and writing the cache's
/// chunk files while fetching, the two block ioctls (see ARG_RULES) for a block-device
/// target, and eventfd2 for a FLUSH a target finishes on another thread. No sockets: remote
/// backends fetch on the cache engine's own threads.
const VHOST_BLK_QUEUE: &[libc::c_long] = &[
    libc::SYS_eventfd2,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    // A volume's free-space check before it preallocates a log segment.
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_statx,
];

/// A block engine's object-store client (HTTP over TCP, TLS, its async runtime) and name
/// resolution (glibc's resolver: a datagram socket per query, poll, FIONREAD).
const NETWORK_CLIENT: &[libc::c_long] = &[
    libc::SYS_connect,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_getpeername,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_ioctl,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socket,
    libc::SYS_uname,
];

/// What else starts under a block engine's filter: the engine's path-based calls (Rust's
/// `create_dir` and `rename` are mkdir and rename), reading the process's identity, and the
/// queue threads dropping their capabilities before their own filter (capset can only lower
/// what a thread holds: no_new_privs is set and the bounding set is empty).
const BLOCK_ENGINE_EXTRA: &[libc::c_long] = &[
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getuid,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_rmdir,
];

/// `FIONBIO` and `FIONREAD` (include/uapi/asm-generic/ioctls.h): a socket made non-blocking
/// after it was created, and the resolver asking how long a pending answer is.
const FIONBIO: u64 = 0x5421;
const FIONREAD: u64 = 0x541b;

/// Calls allowed only with these arguments: (call, argument index, required value). Several
/// entries for one call are alternatives. ioctl's requests depend on the role
/// ([`ioctl_requests`]).
const ARG_RULES: &[(libc::c_long, u8, u64)] = &[(libc::SYS_unshare, 0, libc::CLONE_FS as u64)];

/// The ioctl requests `role` may make (on any descriptor: the request numbers are specific to
/// the device they are meant for).
fn ioctl_requests(role: ThreadRole) -> &'static [u64] {
    match role {
        ThreadRole::UblkQueue | ThreadRole::VhostBlkQueue => &[BLKDISCARD, BLKZEROOUT],
        ThreadRole::BlockEngine => &[BLKDISCARD, BLKZEROOUT, FIONBIO, FIONREAD],
        ThreadRole::FuseBackingRegistrar => {
            &[FUSE_DEV_IOC_BACKING_OPEN, FUSE_DEV_IOC_BACKING_CLOSE]
        }
        _ => &[],
    }
}

/// The system calls `role` may make, sorted and without duplicates (some only with the
/// arguments [`ARG_RULES`] names).
pub fn allowed_syscalls(role: ThreadRole) -> Vec<libc::c_long> {
    let groups: &[&[libc::c_long]] = match role {
        ThreadRole::VhostUserControl => &[RUNTIME, VHOST_USER_CONTROL],
        ThreadRole::QueueWorker => &[RUNTIME, EVENT_LOOP, FILESYSTEM],
        ThreadRole::ThreadPool => &[RUNTIME, FILESYSTEM],
        ThreadRole::DaxQueueWorker => &[RUNTIME, EVENT_LOOP, FILESYSTEM, DAX_CHANNEL, DAX_MAPPING],
        ThreadRole::DaxThreadPool => &[RUNTIME, FILESYSTEM, DAX_CHANNEL, DAX_MAPPING],
        ThreadRole::DaxWatcher => &[RUNTIME, DAX_CHANNEL, DAX_MAPPING, DAX_RECLAIM],
        ThreadRole::FuseWorker => &[RUNTIME, EVENT_LOOP, FILESYSTEM],
        ThreadRole::FuseRing => &[RUNTIME, EVENT_LOOP, FILESYSTEM, FUSE_RING],
        // Started before the main thread's filter, so not under it.
        ThreadRole::FuseBackingRegistrar => &[RUNTIME, FUSE_PASSTHROUGH],
        ThreadRole::HostWatcher => &[RUNTIME, EVENT_LOOP, FILESYSTEM, HOST_WATCH],
        ThreadRole::FuseNotifier => &[RUNTIME],
        ThreadRole::VersionsMapper => &[RUNTIME, DAX_CHANNEL],
        // Reads the pipe (loading) with read; writes go through RUNTIME's write. Waits for
        // the locks the source still holds in the kernel, bounded by a timer of its own.
        ThreadRole::Migration => &[RUNTIME, FILESYSTEM, &[libc::SYS_read], LOCK_WAIT_TIMER],
        // Threads inherit their creator's filter and filters stack, so the thread that spawns
        // all others must allow everything they do.
        ThreadRole::Main => &[
            RUNTIME,
            MAIN,
            VHOST_USER_CONTROL,
            EVENT_LOOP,
            FILESYSTEM,
            LOCK_WAIT_TIMER,
            HOST_WATCH,
            DAX_MAPPING,
            DAX_RECLAIM,
            DAX_SETUP,
            FUSE_RING,
            FUSE_RING_START,
        ],
        ThreadRole::Supervisor => &[SUPERVISOR],
        ThreadRole::UblkQueue => &[RUNTIME, UBLK_QUEUE],
        ThreadRole::UblkControl => &[RUNTIME, UBLK_CONTROL],
        ThreadRole::UblkSignals => &[RUNTIME, UBLK_SIGNALS],
        // EVENT_LOOP: its kick and the library's exit event, waited on with epoll.
        ThreadRole::VhostBlkQueue => &[RUNTIME, EVENT_LOOP, VHOST_BLK_QUEUE],
        // Every thread of the process started after it inherits it (main's, the control
        // thread's and the queues' filters stack on it), so it covers theirs; what it adds
        // is the network client. Not exec, ptrace, mount, module or identity calls, and no
        // listening or accepting sockets beyond main's vhost-user accept.
        ThreadRole::BlockEngine => &[
            RUNTIME,
            MAIN,
            VHOST_USER_CONTROL,
            EVENT_LOOP,
            FILESYSTEM,
            VHOST_BLK_QUEUE,
            NETWORK_CLIENT,
            BLOCK_ENGINE_EXTRA,
        ],
    };
    let mut calls: Vec<libc::c_long> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    calls.sort_unstable();
    calls.dedup();
    calls
}

fn rules_for(role: ThreadRole, nr: libc::c_long) -> Result<Vec<SeccompRule>, String> {
    let ioctls = ioctl_requests(role)
        .iter()
        .map(|&request| (libc::SYS_ioctl, 1u8, request));
    ARG_RULES
        .iter()
        .copied()
        .chain(ioctls)
        .filter(|(call, _, _)| *call == nr)
        .map(|(_, index, value)| {
            let condition =
                SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                    .map_err(|e| e.to_string())?;
            SeccompRule::new(vec![condition]).map_err(|e| e.to_string())
        })
        .collect()
}

fn target_arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())
}

fn compile(role: ThreadRole, action: SeccompAction) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match action {
        SeccompAction::None => return Ok(None),
        SeccompAction::Kill => seccompiler::SeccompAction::KillProcess,
        SeccompAction::Log => seccompiler::SeccompAction::Log,
        SeccompAction::Trap => seccompiler::SeccompAction::Trap,
    };
    let build_error = |reason: String| Error::BuildFilter {
        role: role.name(),
        reason,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(role)
        .into_iter()
        .map(|nr| Ok((nr, rules_for(role, nr)?)))
        .collect::<Result<_, String>>()
        .map_err(build_error)?;
    let filter = SeccompFilter::new(
        rules,
        mismatch,
        seccompiler::SeccompAction::Allow,
        target_arch().map_err(build_error)?,
    )
    .map_err(|e| build_error(e.to_string()))?;
    let program = BpfProgram::try_from(filter).map_err(|e| build_error(e.to_string()))?;
    Ok(Some(program))
}

/// Confines the calling thread (only it: no TSYNC) to `role`'s system calls; calls outside go
/// to `action`. `SeccompAction::None` installs nothing. Sets no_new_privs, which the kernel
/// requires of unprivileged filters and which berth never needs to lift.
pub fn install_filter(role: ThreadRole, action: SeccompAction) -> Result<(), Error> {
    let Some(program) = compile(role, action)? else {
        return Ok(());
    };
    seccompiler::apply_filter(&program).map_err(|e| Error::InstallFilter {
        role: role.name(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_like_virtiofsd() {
        assert_eq!(
            "none".parse::<SeccompAction>().unwrap(),
            SeccompAction::None
        );
        assert_eq!(
            "kill".parse::<SeccompAction>().unwrap(),
            SeccompAction::Kill
        );
        assert_eq!("log".parse::<SeccompAction>().unwrap(), SeccompAction::Log);
        assert_eq!(
            "trap".parse::<SeccompAction>().unwrap(),
            SeccompAction::Trap
        );
        let err = "allow".parse::<SeccompAction>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid --seccomp 'allow': expected none, kill, log or trap"
        );
    }

    const ALL_ROLES: [ThreadRole; 18] = [
        ThreadRole::FuseRing,
        ThreadRole::VersionsMapper,
        ThreadRole::VhostUserControl,
        ThreadRole::DaxWatcher,
        ThreadRole::Migration,
        ThreadRole::QueueWorker,
        ThreadRole::ThreadPool,
        ThreadRole::DaxQueueWorker,
        ThreadRole::DaxThreadPool,
        ThreadRole::FuseWorker,
        ThreadRole::FuseBackingRegistrar,
        ThreadRole::Main,
        ThreadRole::Supervisor,
        ThreadRole::UblkQueue,
        ThreadRole::VhostBlkQueue,
        ThreadRole::BlockEngine,
        ThreadRole::UblkControl,
        ThreadRole::UblkSignals,
    ];

    #[test]
    fn every_role_compiles_for_every_action() {
        for role in ALL_ROLES {
            assert!(compile(role, SeccompAction::None).unwrap().is_none());
            for action in [SeccompAction::Kill, SeccompAction::Log, SeccompAction::Trap] {
                let program = compile(role, action).unwrap().unwrap();
                // At least one comparison per allowed call.
                assert!(program.len() > allowed_syscalls(role).len(), "{role:?}");
            }
        }
    }

    #[test]
    fn roles_get_what_they_need_and_not_more() {
        let has = |role, nr| allowed_syscalls(role).contains(&nr);
        // Only the control thread talks to the VMM socket, and it touches no files.
        assert!(has(ThreadRole::VhostUserControl, libc::SYS_recvmsg));
        assert!(!has(ThreadRole::VhostUserControl, libc::SYS_openat));
        assert!(!has(
            ThreadRole::VhostUserControl,
            libc::SYS_open_by_handle_at
        ));
        assert!(!has(ThreadRole::QueueWorker, libc::SYS_recvmsg));
        assert!(!has(ThreadRole::ThreadPool, libc::SYS_sendmsg));
        // Only a device with a DAX window talks to the VMM from its request threads.
        for role in [ThreadRole::DaxQueueWorker, ThreadRole::DaxThreadPool] {
            assert!(has(role, libc::SYS_sendmsg) && has(role, libc::SYS_recvmsg));
            assert!(!has(role, libc::SYS_accept4));
        }
        assert!(!has(ThreadRole::FuseWorker, libc::SYS_accept4));
        // Only DAX threads mark files for the reclaim thread; it reads sizes, re-points
        // ranges and opens, writes or truncates no file.
        for role in [ThreadRole::DaxQueueWorker, ThreadRole::DaxThreadPool] {
            assert!(has(role, libc::SYS_fanotify_mark));
        }
        assert!(!has(ThreadRole::QueueWorker, libc::SYS_fanotify_mark));
        assert!(!has(ThreadRole::FuseWorker, libc::SYS_fanotify_mark));
        for nr in [libc::SYS_fstat, libc::SYS_read, libc::SYS_sendmsg] {
            assert!(has(ThreadRole::DaxWatcher, nr), "DAX reclaim lacks {nr}");
        }
        for nr in [
            libc::SYS_openat,
            libc::SYS_open_by_handle_at,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_fanotify_init,
            libc::SYS_memfd_create,
        ] {
            assert!(!has(ThreadRole::DaxWatcher, nr), "DAX reclaim allows {nr}");
        }
        // Every request-serving role can reopen inodes and act as the guest caller.
        for role in [
            ThreadRole::QueueWorker,
            ThreadRole::ThreadPool,
            ThreadRole::FuseWorker,
        ] {
            for nr in [
                libc::SYS_openat,
                libc::SYS_open_by_handle_at,
                libc::SYS_setfsuid,
                libc::SYS_setfsgid,
                libc::SYS_umask,
                libc::SYS_unshare,
            ] {
                assert!(has(role, nr), "{role:?} lacks {nr}");
            }
            // Nothing spawns threads or talks to sockets while serving.
            for nr in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_accept4] {
                assert!(!has(role, nr), "{role:?} allows {nr}");
            }
        }
        // The pool is handed requests in memory: it waits on nothing but futexes.
        assert!(!has(ThreadRole::ThreadPool, libc::SYS_epoll_wait));
        // Threads spawned by main inherit its filter: it must not block what they need.
        let main = allowed_syscalls(ThreadRole::Main);
        for role in [
            ThreadRole::VhostUserControl,
            ThreadRole::Migration,
            ThreadRole::QueueWorker,
            ThreadRole::ThreadPool,
            ThreadRole::DaxQueueWorker,
            ThreadRole::DaxThreadPool,
            ThreadRole::DaxWatcher,
            ThreadRole::FuseWorker,
        ] {
            for nr in allowed_syscalls(role) {
                assert!(main.contains(&nr), "main lacks {nr} of {role:?}");
            }
        }
        // The supervisor only waits, signals and exits.
        for nr in [
            libc::SYS_openat,
            libc::SYS_mmap,
            libc::SYS_clone,
            libc::SYS_mount,
        ] {
            assert!(!has(ThreadRole::Supervisor, nr), "supervisor allows {nr}");
        }
        // Nobody may exec, ptrace, mount, change identity or open sockets after start-up
        // (but a block engine's object-store client connects, and the queue threads
        // started under it drop their capabilities).
        for role in ALL_ROLES {
            let sockets: &[libc::c_long] = if role == ThreadRole::BlockEngine {
                &[]
            } else {
                &[libc::SYS_socket, libc::SYS_connect, libc::SYS_capset]
            };
            for &forbidden in sockets.iter().chain(&[
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
                libc::SYS_mount,
                libc::SYS_pivot_root,
                libc::SYS_chroot,
                libc::SYS_setns,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_setuid,
                libc::SYS_setresuid,
                libc::SYS_setgroups,
                libc::SYS_init_module,
                libc::SYS_bpf,
                libc::SYS_keyctl,
                libc::SYS_perf_event_open,
            ]) {
                assert!(!has(role, forbidden), "{role:?} allows {forbidden}");
            }
            // ioctl only where a block queue or FUSE passthrough needs it, and only with
            // their two requests each.
            assert_eq!(
                has(role, libc::SYS_ioctl),
                matches!(
                    role,
                    ThreadRole::UblkQueue
                        | ThreadRole::VhostBlkQueue
                        | ThreadRole::FuseBackingRegistrar
                        | ThreadRole::BlockEngine
                ),
                "{role:?}"
            );
            let ioctl_rules = rules_for(role, libc::SYS_ioctl).unwrap();
            assert_eq!(ioctl_rules.len(), ioctl_requests(role).len(), "{role:?}");
        }
    }

    #[test]
    fn the_ublk_signal_thread_waits_and_submits_but_opens_nothing_and_sets_up_no_ring() {
        let signals = allowed_syscalls(ThreadRole::UblkSignals);
        for nr in [
            libc::SYS_rt_sigtimedwait,
            libc::SYS_io_uring_enter,
            libc::SYS_write,
        ] {
            assert!(signals.contains(&nr), "the signal thread lacks {nr}");
        }
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ioctl,
            libc::SYS_unlink,
            libc::SYS_execve,
        ] {
            assert!(!signals.contains(&nr), "the signal thread allows {nr}");
        }
    }

    #[test]
    fn a_ublk_control_thread_submits_to_its_ring_but_opens_nothing_and_sets_up_no_ring() {
        let control = allowed_syscalls(ThreadRole::UblkControl);
        for nr in [libc::SYS_io_uring_enter, libc::SYS_unlink, libc::SYS_futex] {
            assert!(control.contains(&nr), "the ublk control thread lacks {nr}");
        }
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ioctl,
            libc::SYS_pwrite64,
        ] {
            assert!(
                !control.contains(&nr),
                "the ublk control thread allows {nr}"
            );
        }
    }

    #[test]
    fn the_block_engine_covers_every_thread_started_under_it_and_adds_a_network_client() {
        let engine = allowed_syscalls(ThreadRole::BlockEngine);
        // Filters stack: main, the control thread and the queues start under it.
        for role in [ThreadRole::VhostBlkQueue, ThreadRole::VhostUserControl] {
            for nr in allowed_syscalls(role) {
                assert!(
                    engine.contains(&nr),
                    "{role:?} needs {nr}, the engine lacks it"
                );
            }
            for request in ioctl_requests(role) {
                assert!(ioctl_requests(ThreadRole::BlockEngine).contains(request));
            }
        }
        for nr in MAIN {
            assert!(engine.contains(nr), "main needs {nr}, the engine lacks it");
        }
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_sendmmsg,
            libc::SYS_recvfrom,
            libc::SYS_renameat2,
            libc::SYS_fdatasync,
        ] {
            assert!(engine.contains(&nr), "the block engine lacks {nr}");
        }
        // No io_uring (the vhost-user-blk path has none) and no server sockets.
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_listen,
            libc::SYS_bind,
        ] {
            assert!(!engine.contains(&nr), "the block engine allows {nr}");
        }
    }

    #[test]
    fn vhost_blk_queue_threads_get_their_kick_and_data_calls_only() {
        let queue = allowed_syscalls(ThreadRole::VhostBlkQueue);
        for nr in [
            libc::SYS_epoll_wait,
            libc::SYS_read,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_openat,
        ] {
            assert!(queue.contains(&nr), "the vhost-user-blk queue lacks {nr}");
        }
        // No vhost-user messages, no sockets, no threads, no renaming files: the control
        // thread talks to the VMM and the cache engine's own threads fetch remotely.
        for nr in [
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_io_uring_setup,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
        ] {
            assert!(!queue.contains(&nr), "the vhost-user-blk queue allows {nr}");
        }
    }

    #[test]
    fn ublk_queue_threads_get_their_ring_and_data_calls_only() {
        let queue = allowed_syscalls(ThreadRole::UblkQueue);
        for nr in [
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_eventfd2,
        ] {
            assert!(queue.contains(&nr), "the ublk queue lacks {nr}");
        }
        // Setting up rings and devices is done before the filter.
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_sched_setaffinity,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
        ] {
            assert!(!queue.contains(&nr), "the ublk queue allows {nr}");
        }
        assert_eq!(
            ioctl_requests(ThreadRole::UblkQueue),
            &[BLKDISCARD, BLKZEROOUT],
            "BLKDISCARD and BLKZEROOUT only"
        );
    }

    #[test]
    fn fuse_ring_threads_may_enter_their_ring_but_not_make_one() {
        let ring = allowed_syscalls(ThreadRole::FuseRing);
        let worker = allowed_syscalls(ThreadRole::FuseWorker);
        assert!(ring.contains(&libc::SYS_io_uring_enter));
        for nr in &worker {
            assert!(
                ring.contains(nr),
                "a FUSE ring thread lacks the worker's {nr}"
            );
        }
        assert_eq!(ring.len(), worker.len() + 1, "io_uring_enter only");
        for nr in [
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_register,
            libc::SYS_sched_setaffinity,
            libc::SYS_ioctl,
        ] {
            assert!(!ring.contains(&nr), "a FUSE ring thread may call {nr}");
        }
        // The main filter, which every thread inherits, never allows setting up a ring.
        let main = allowed_syscalls(ThreadRole::Main);
        assert!(main.contains(&libc::SYS_io_uring_enter));
        assert!(!main.contains(&libc::SYS_io_uring_setup));
        assert!(!main.contains(&libc::SYS_io_uring_register));
    }

    #[test]
    fn unshare_is_only_allowed_for_a_private_fs_struct() {
        let rules = rules_for(ThreadRole::FuseWorker, libc::SYS_unshare).unwrap();
        assert_eq!(rules.len(), 1);
        assert!(rules_for(ThreadRole::FuseWorker, libc::SYS_openat)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn only_the_registrar_registers_backing_files() {
        let requests = [FUSE_DEV_IOC_BACKING_OPEN, FUSE_DEV_IOC_BACKING_CLOSE];
        assert_eq!(ioctl_requests(ThreadRole::FuseBackingRegistrar), &requests);
        for role in [ThreadRole::FuseWorker, ThreadRole::Main] {
            assert!(
                !allowed_syscalls(role).contains(&libc::SYS_ioctl),
                "{role:?}"
            );
            assert!(ioctl_requests(role).is_empty(), "{role:?}");
        }
        // The registrar touches no file, opens nothing and waits on nothing but its channel.
        let registrar = allowed_syscalls(ThreadRole::FuseBackingRegistrar);
        for nr in [
            libc::SYS_openat,
            libc::SYS_open_by_handle_at,
            libc::SYS_pread64,
            libc::SYS_epoll_pwait,
            libc::SYS_clone3,
        ] {
            assert!(!registrar.contains(&nr), "the registrar allows {nr}");
        }
    }
}
