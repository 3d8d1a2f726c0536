//! berth's host cache: blobs fetched lazily, chunk by chunk, from a backend
//! (local directory, S3-compatible store or HTTP) into sparse local files with a
//! crash-consistent chunk map ([`engine`], [`chunkmap`], [`backend`]); and its first
//! consumer, erofs images ([`image`], [`manifest`], [`erofs`]) whose data blob is filled
//! on demand through fanotify pre-content events ([`mount`] in process, [`supervise`] as
//! `berth mount` runs it: a supervisor and a worker process, failing closed when either
//! dies).

pub mod backend;
pub mod chunkmap;
pub mod engine;
pub mod erofs;
pub mod error;
pub mod image;
pub mod manifest;
pub mod metrics;
pub mod mount;
pub mod supervise;

pub use backend::{open_backend, BlobBackend, LocalDirBackend, ObjectStoreBackend, S3Config};
pub use engine::{BlobHandle, CacheConfig, CacheEngine, VerifyOnOpen};
pub use error::{CacheError, Result};
pub use image::{build_image, BuildOptions, BuildReport};
pub use manifest::{Compression, Manifest, PrefetchEntry};
pub use metrics::{Metrics, MetricsWriter};
pub use mount::{mount_image, MountHandle, MountOptions};
