//! erofs images whose data is fetched on demand, and the kernel interfaces that serve
//! them: the consumer layer above `berth_cache`'s engine.
//!
//! An image is an erofs bootstrap (metadata, kept local) plus one data blob in the
//! cache crate's chunked format. [`image`] builds one (`berth image build`; the blob
//! itself is cut by `berth_cache::blob_writer`), [`erofs`] reads just enough of the
//! format to find a file's data in the blob. Serving: [`mount`] mounts the bootstrap
//! file-backed with the blob's sparse cache file as its device and fills missing ranges
//! from fanotify pre-content events (Linux 6.14+); [`supervise`] is how `berth mount`
//! runs that, in a supervisor and a worker process that fail closed when either dies.
//! [`cachefiles`] serves the same images through cachefiles' on-demand mode, for
//! kernels (5.19 to 7.1) without pre-content events. [`readahead`] widens the kernel's
//! read-ahead window of every erofs mount berth makes.
//! Every read of image data ends in `BlobHandle::ensure_present`: the engine fetches,
//! verifies and persists, and only then is the kernel told to go on.

pub mod cachefiles;
pub mod erofs;
pub mod error;
pub mod image;
pub mod ipc;
pub mod mount;
pub mod readahead;
pub mod supervise;

pub use error::{OndemandError, Result};
pub use image::{build_image, BuildOptions, BuildReport};
pub use mount::{mount_image, MountHandle, MountOptions};
