//! Harnesses shared by the fuzz targets and by the regression tests that replay their crashes.

pub mod blk_request;
pub mod dax;
pub mod fuse;
pub mod vhost_user;
pub mod xattrmap;

/// The binary's command-line module, compiled here as is: it only depends on std, clap,
/// thiserror, serde_json and berth's library crates. (Moving it into a library crate would make
/// this path include unnecessary.)
#[allow(dead_code)]
#[path = "../../src/cli/mod.rs"]
pub mod cli;

/// The `image build` / `mount` and `block` flags, which the command line's subcommands name.
/// (A `#[path]` inside an inline module resolves through a directory named after the module,
/// which does not exist here, so the files are compiled at the top level and re-exported under
/// the names `cli` uses.)
#[allow(dead_code)]
#[path = "../../src/image/args.rs"]
pub mod image_args;
pub mod image {
    pub use crate::image_args as args;
}
#[allow(dead_code)]
#[path = "../../src/block/args.rs"]
pub mod block_args;
pub mod block {
    pub use crate::block_args as args;
    pub use crate::block_args::BlockCommand;
}

/// `berth volume`'s flags, and how `berth block` serves a volume.
#[allow(dead_code)]
#[path = "../../src/volume/args.rs"]
pub mod volume_args;
pub mod volume {
    pub use crate::volume_args as args;
    pub use crate::volume_args::VolumeCommand;
}

/// `berth block serve-vhost`'s flags (named by the block subcommands) and its request
/// path: one virtio-blk request in a descriptor chain against the block engine.
#[allow(dead_code)]
#[path = "../../src/vhost_blk/args.rs"]
pub mod vhost_blk_args;
#[allow(dead_code)]
#[path = "../../src/vhost_blk/request.rs"]
pub mod vhost_blk_request;
pub mod vhost_blk {
    pub use crate::vhost_blk_args as args;
}

/// `--shared-cache` and its table options, flattened into `berth fuse`'s arguments.
#[allow(dead_code)]
#[path = "../../src/shared_cache.rs"]
pub mod shared_cache;

/// The binary's request thread pool, which `device` uses.
#[allow(dead_code)]
#[path = "../../src/pool.rs"]
pub mod pool;

/// What the vhost-user devices share about their queue threads, which `device` uses.
#[allow(dead_code)]
#[path = "../../src/vring_events.rs"]
pub mod vring_events;

/// The daemon's `--metrics-file` writer, which `device` uses.
#[allow(dead_code)]
#[path = "../../src/metrics_file.rs"]
pub mod metrics_file;

/// berth's vhost-user-fs device (`FsBackend`, descriptor chains into request segments, request
/// serving), compiled here as is so that the fuzzers drive the code the daemon runs.
#[allow(dead_code)]
#[path = "../../src/vhost_user/mod.rs"]
pub mod device;
