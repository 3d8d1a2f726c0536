//! Confinement of the berth daemon, applied once at start-up in this order:
//!
//! 1. [`set_rlimit_nofile`]: raise the descriptor limit while still privileged.
//! 2. [`enter_sandbox`]: before any thread exists (it forks and may unshare a user namespace,
//!    whose id maps beyond the caller's own id a process forked outside it writes with
//!    newuidmap/newgidmap).
//!    Afterwards the shared directory is reachable as [`SandboxOutcome::root_dir`] and
//!    `/proc/self/fd` only through [`SandboxOutcome::proc_self_fd`] (namespace and chroot modes).
//!    A root of several host paths ([`SandboxRoot::Paths`], namespace mode) keeps each at its
//!    own path, for a process that goes on opening files by path (an image's cache engine, a
//!    volume).
//!    Descriptors opened before (the vhost-user listener given with `--fd`, `/dev/fuse`) stay open
//!    in the process that serves; the waiting parent of the namespace mode closes its copies.
//! 3. Open the filesystem (root directory, `/proc/self/fd`), the socket and `/dev/fuse`.
//! 4. [`drop_capabilities`]: keep only what serving needs.
//! 5. [`install_filter`]: the main thread installs [`ThreadRole::Main`] before it starts any
//!    other thread; each thread then stacks the filter of its own [`ThreadRole`] before it
//!    serves anything (filters are inherited and stack, so a call must pass both). The
//!    processes left outside the sandbox install [`ThreadRole::Supervisor`].
//!
//! `berth block add|recover` (ublk) has no sandbox (it needs the ublk devices): each queue
//! thread, once its io_uring is set up, drops every capability
//! ([`drop_thread_capabilities`]) and installs [`ThreadRole::UblkQueue`]; targets open on a
//! thread under [`ThreadRole::BlockEngine`], which their engines' threads inherit; each
//! device's control thread installs [`ThreadRole::UblkControl`] once the device runs, and
//! the main thread [`ThreadRole::BlockEngine`] once every device does; the thread that waits
//! for termination signals sets up its control ring first and then installs
//! [`ThreadRole::UblkSignals`], so it stops the devices with submissions alone. `berth block
//! serve-vhost` (vhost-user-blk) follows the order
//! above with one difference: its queue threads are started (by vhost-user-backend) before
//! the main filter, so each drops every capability and installs
//! [`ThreadRole::VhostBlkQueue`] on its own, which allows the block ioctls the main filter
//! lacks.

mod caps;
mod error;
mod filter;
mod rlimit;
mod sandbox;

pub use crate::caps::{
    apply_modcaps, can_register_fuse_backing_files, drop_capabilities, drop_thread_capabilities,
    keep_only_thread_capabilities, CapsNeeded, ModCaps,
};
pub use crate::error::Error;
pub use crate::filter::{allowed_syscalls, install_filter, SeccompAction, ThreadRole};
pub use crate::rlimit::set_rlimit_nofile;
pub use crate::sandbox::{
    check_id_maps, cloexec_pipe, close_all_but, enter_sandbox, id_maps_need_helper, IdMap,
    SandboxConfig, SandboxMode, SandboxOutcome, SandboxPath, SandboxRoot,
};
pub use ::caps::Capability;
