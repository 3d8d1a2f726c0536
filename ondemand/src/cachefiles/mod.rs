//! Serving erofs images through cachefiles in on-demand mode (Linux 5.19 to 7.1 with
//! `CONFIG_CACHEFILES_ONDEMAND` and `CONFIG_EROFS_FS_ONDEMAND`), the interface the 6.6
//! and 6.12 LTS kernels offer where fanotify pre-content events do not exist yet.
//!
//! erofs mounts the image as `mount -t erofs none MNT -o fsid=..,device=<blob id>`; the
//! kernel asks the daemon bound to `/dev/cachefiles` ([`device`]) to fill missing ranges
//! of the bootstrap and the blob cache objects. One daemon serves a host: [`server`]
//! (supervisor) with [`worker`] (cache engine), driven by `berth mount` processes through
//! [`client`] over [`protocol`] messages, recoverable across restarts through a service
//! manager's descriptor store ([`fdstore`]).

pub mod aligned;
pub mod client;
pub mod device;
pub mod fdstore;
pub mod protocol;
pub mod server;
pub mod worker;

pub use protocol::{ImageSpec, Prefetch};
