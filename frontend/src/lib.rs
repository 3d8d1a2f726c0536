//! A minimal vhost-user-fs frontend: the VMM side of virtio-fs, without a VM.
//!
//! [`VhostUserFs`] connects to a backend socket, negotiates features, shares a memfd as guest
//! RAM and starts the hiprio queue plus N request queues. Each [`FsQueue`] is a FUSE client
//! over one split virtqueue, owned by one thread: a typed API (`lookup`, `read`, ...), a
//! pipelined API (`submit` / `notify` / `next_completion`) for queue depths above one, and a
//! raw API (`submit_raw` / `wait_raw`) to hand-craft descriptor chains.
//!
//! [`blk::VhostUserBlk`] is the same for vhost-user-blk: a virtio-blk driver per queue.

pub mod abi;
pub mod blk;
pub mod device;
pub mod dirty_log;
pub mod fuse;
pub mod memory;
pub mod queue;
pub mod shmem;
pub mod virtqueue;

use std::time::Duration;

pub use blk::{BlkConfig, BlkDeviceConfig, BlkQueue, BlkReply, VhostUserBlk};
pub use device::{DeviceConfig, Negotiated, VhostUserFs, HIPRIO_QUEUE};
pub use dirty_log::DirtyLog;
pub use fuse::{DirEntry, DirEntryPlus};
pub use memory::GuestRam;
pub use queue::{Completion, EntryOut, FsQueue, QueueConfig, Request, Ticket};
pub use shmem::{ShmemMapping, ShmemRegions, ShmemWindow};
pub use virtqueue::{Buffer, RawDescriptor, RawNext, SplitQueue, UsedElement};

/// Everything that can go wrong in the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Invalid configuration: {0}.")]
    InvalidConfig(String),
    #[error("Invalid request: {0}.")]
    InvalidRequest(String),
    #[error("The memfd name contains a NUL byte.")]
    MemfdName,
    #[error("Could not create the guest memory file: {0}.")]
    Memfd(#[source] std::io::Error),
    #[error("Could not map guest memory: {0}.")]
    MapMemory(String),
    #[error("Guest memory is exhausted: {requested} more bytes were requested.")]
    OutOfGuestMemory { requested: u64 },
    #[error("Guest address {0:#x} is outside guest memory.")]
    AddressOutOfRange(u64),
    #[error("Guest memory access failed: {0}.")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("Could not connect to {path}: {source}.")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Could not configure the vhost-user socket: {0}.")]
    Socket(#[source] std::io::Error),
    #[error("A vhost-user request failed: {0}.")]
    Vhost(#[from] vhost::Error),
    #[error("Feature negotiation failed: {0}.")]
    Negotiation(String),
    #[error("The backend supports {offered} queues but {wanted} are needed.")]
    NotEnoughQueues { wanted: u64, offered: u64 },
    #[error("Eventfd operation failed: {0}.")]
    EventFd(#[source] std::io::Error),
    #[error("Queue {queue} has {free} free descriptors or slots but {needed} are needed.")]
    QueueFull {
        queue: u16,
        needed: usize,
        free: usize,
    },
    #[error("Queue {queue} got no reply within {waited:?}.")]
    Timeout { queue: u16, waited: Duration },
    #[error(
        "Queue {queue} returned used element with head {head} (len {len}) that is not in flight."
    )]
    BadUsedElement { queue: u16, head: u32, len: u32 },
    #[error(
        "The {opcode} reply (unique {unique:#x}) is {len} bytes, shorter than a reply header."
    )]
    ShortReply {
        opcode: &'static str,
        unique: u64,
        len: u32,
    },
    #[error("Reply does not match its request: {0}.")]
    ReplyMismatch(String),
    #[error("Malformed reply: {0}.")]
    MalformedReply(String),
    #[error("{opcode} failed with errno {errno} ({}).", std::io::Error::from_raw_os_error(*errno))]
    Fuse { opcode: &'static str, errno: i32 },
}

impl Error {
    /// The errno of a FUSE error reply, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Fuse { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
