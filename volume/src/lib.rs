//! berth's writable volumes on object storage: a block device whose home is an
//! S3-compatible bucket, served at local-disk speed.
//!
//! Place in the data path: a transport (ublk, vhost-user-blk) asks the volume, a
//! [`berth_blockdev::BlockTarget`], where a request's bytes are. Writes land in a local
//! write-ahead log ([`wal`]) and are acknowledged from there; FLUSH makes them durable
//! on local disk or, with `object` durability, in the bucket. The uploader packs them into
//! immutable packs ([`pack`]) and writes the next manifest version ([`format`]) with a
//! create-only request, then applies them to the local cache ([`local`]). Reads come from
//! the log, the cache, or the bucket (fetched, checked, cached). A lease ([`lease`]) keeps
//! one writer per volume; snapshots, clones (sharing packs) and garbage collection work
//! from any host ([`admin`]). The bucket is reached through `berth_cache`'s backends.

pub mod admin;
mod buffer;
mod compact;
pub mod error;
pub mod extent_map;
pub mod failpoint;
mod fetch;
pub mod format;
mod janitor;
pub mod lease;
pub mod local;
pub mod mapping;
pub mod metrics;
pub mod pack;
pub mod pins;
pub mod store;
mod upload;
pub mod volume;
pub mod wal;

pub use error::{Result, VolumeError};
pub use store::{Location, Store};
pub use volume::{Durability, OpenReport, Volume, VolumeOptions};
