//! berth's host-directory filesystem.
//!
//! This crate sits in the middle of berth's file data path: a transport (vhost-user virtqueues
//! or /dev/fuse) hands over a FUSE request as byte segments, [`FsServer`] decodes and dispatches
//! it, and [`PassthroughFs`] turns it into syscalls on the shared host directory. It knows
//! nothing about vhost-user, virtqueues or ublk.
//!
//! Inodes are keyed by (device, inode number, mount id) and, where the host filesystem allows,
//! held by file handle rather than by an open descriptor, so that a guest looking up a million
//! files does not pin a million descriptors.

mod coherence;
mod config;
mod error;
mod fd_cache;
mod file_handle;
mod fs;
mod handle_table;
mod host_file;
mod inode_store;
mod lock_state;
mod lock_wait;
mod migration;
pub mod server;
mod util;
pub mod xattr_map;

pub use coherence::{Invalidation, SharedCache};
pub use config::{
    CachePolicy, Config, DaxPolicy, DaxPolicyError, InodeFileHandles, MigrationConfig,
    MigrationMode, MigrationOnError, Negotiation, DAX_XATTR,
};
pub use error::Error;
pub use fs::PassthroughFs;
pub use lock_state::LOCK_RETRY_INTERVAL;
pub use lock_wait::{QueueOrigin, WaitingLock};
pub use migration::{read_stream, MigrationError, STATE_FORMAT_VERSION, STATE_MAGIC};
pub use server::{
    BackingFiles, BackingRegistrar, DaxWindow, DropReason, FsServer, IoSegment, IoUringInit,
    PassthroughError, PassthroughMode, RemoveMappingOne, Served, SetupMappingIn,
};
pub use xattr_map::{XattrMap, XattrMapError};
