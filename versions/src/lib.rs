//! The shared metadata version table: coherent caching of one shared directory across every
//! berth process serving it, their clients (host FUSE mounts, virtio-fs guests) and the host
//! processes changing it.
//!
//! Place in the data path: beside it, not in it. The passthrough filesystem claims a slot for
//! each inode it hands out ([`VersionTable::slot_for`]), reads the slot's version before it
//! reads the inode's attributes, and bumps the versions a change affects once the change is
//! done ([`VersionTable::bump`]); a [`HostWatcher`] bumps for changes made by host processes.
//! Clients compare: `berth fuse` reads the table's change records ([`ChangeFeed`]) and tells
//! its kernel what to drop, a patched virtio-fs guest maps the versions itself ([`wire`]).
//! Caching stays long until a version moves, so unchanged inodes cost no round trip and
//! changed ones are refetched at the next access.
//!
//! The table is a file (one per shared directory, `MAP_SHARED` by every process serving it)
//! whose layout [`layout`] describes; [`table`] explains why a process killed anywhere cannot
//! corrupt it.

mod error;
pub mod key;
pub mod layout;
pub mod table;
pub mod watch;
pub mod wire;

pub use error::Error;
pub use key::SlotKey;
pub use layout::Geometry;
pub use table::{
    ChangeFeed, Changes, OpenOutcome, Slot, TableOptions, VersionTable, DEFAULT_SLOTS,
};
pub use watch::{HostWatcher, WatchMode};
