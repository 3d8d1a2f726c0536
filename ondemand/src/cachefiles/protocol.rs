//! What the processes of a cachefiles server say to each other (see [`crate::ipc`] for
//! the framing): `berth mount` clients to the server, and the server's supervisor to its
//! worker and back.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What `berth mount` fetches in the background once an image is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    None,
    /// The image's prefetch list.
    #[default]
    List,
    /// The prefetch list, then the whole blob.
    All,
}

/// One image to serve and where to mount it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// The image directory or its manifest (absolute).
    pub image: PathBuf,
    /// Absolute mount point.
    pub mountpoint: PathBuf,
    /// Backend location; `None`: the image's directory.
    pub backend: Option<String>,
    pub prefetch: Prefetch,
    /// erofs `fsid` (the bootstrap's cookie); `None`: derived from the bootstrap digest.
    pub fsid: Option<String>,
    /// erofs `domain_id`: images in one domain share blob cookies (one cache object per
    /// blob). `None`: no domain.
    pub domain_id: Option<String>,
    /// The kernel's read-ahead window on the mount, in bytes (see
    /// [`crate::readahead`]); absent from what older clients and saved state say.
    #[serde(default = "default_kernel_readahead")]
    pub kernel_readahead: u64,
}

fn default_kernel_readahead() -> u64 {
    crate::readahead::DEFAULT_KERNEL_READAHEAD
}

/// A request of a `berth mount` client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Serve and mount an image (a no-op if it is already mounted there).
    Mount(ImageSpec),
    /// Unmount the image at this mount point.
    Unmount { mountpoint: PathBuf },
    /// The images served.
    Status,
}

/// One served image, as [`ClientRequest::Status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub spec: ImageSpec,
    pub fsid: String,
    pub blob_id: String,
    pub mounted: bool,
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerReply {
    /// Mounted (`already`: it was mounted there before this request).
    Mounted {
        fsid: String,
        already: bool,
    },
    Unmounted,
    /// Still in use: nothing was unmounted.
    Busy,
    Status(Vec<ImageStatus>),
    Error(String),
}

/// Supervisor to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Open the image's blob (answer [`FromWorker::ImageAdded`]).
    AddImage {
        key: String,
        manifest: PathBuf,
        backend: Option<String>,
        prefetch: Prefetch,
    },
    /// The image is gone: release its blob unless another image uses it.
    RemoveImage {
        key: String,
    },
    /// The cache object `object_id` holds blob `blob_id`; its anonymous descriptor is
    /// attached.
    Object {
        object_id: u32,
        blob_id: String,
    },
    /// The object was closed.
    DropObject {
        object_id: u32,
    },
    /// Fill and complete READ `msg_id` (answer [`FromWorker::ReadDone`]).
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
    Stop,
}

/// Worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The worker serves.
    Ready,
    /// `error` says why the image's blob cannot be served.
    ImageAdded { key: String, error: Option<String> },
    /// READ `msg_id` is completed (`ok`: with data; otherwise the reader got EIO).
    ReadDone { msg_id: u32, ok: bool },
}
