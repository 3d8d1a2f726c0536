//! berth's host cache engine: blobs fetched lazily, chunk by chunk, from a backend
//! (local directory, S3-compatible store or HTTP) into sparse local files with a
//! crash-consistent chunk map.
//!
//! It is the bottom layer of every lazily fetched path (after nydus-storage's three
//! layers): [`backend`] is where blobs come from, [`engine`] with [`chunkmap`] is the
//! cache (fetch scheduling, single-flight, verification, read-ahead, prefetch,
//! eviction, [`metrics`]), and its API — "read this blob range", "make this range
//! present" — is what consumers above it use: erofs images through fanotify or
//! cachefiles (`berth-ondemand`) and block images (`berth-blockdev`). [`manifest`]
//! describes a blob and [`blob_writer`] produces one; neither knows what filesystem or
//! disk the blob holds. [`check`] verifies a whole blob where it is stored, caching
//! nothing.

pub mod backend;
pub mod blob_writer;
pub mod check;
pub mod chunkmap;
pub mod engine;
pub mod error;
pub mod manifest;
pub mod metrics;
mod pending;

pub use backend::{
    open_backend, BlobBackend, ListedObject, LocalDirBackend, ObjectStoreBackend, ObjectVersion,
    S3Config,
};
pub use blob_writer::{stage_blob_file, BlobLayout, BlobWriter, StagedBlob};
pub use engine::{BlobHandle, CacheConfig, CacheEngine, VerifyOnOpen};
pub use error::{CacheError, Result};
pub use manifest::{Compression, Manifest, PrefetchEntry};
pub use metrics::{Metrics, MetricsWriter};
