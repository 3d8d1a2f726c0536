//! Harnesses shared by the fuzz targets and by the regression tests that replay their crashes.

pub mod fuse;
pub mod vhost_user;
pub mod xattrmap;

/// The binary's command-line module, compiled here as is: it only depends on std, clap,
/// thiserror, serde_json and berth's library crates. (Moving it into a library crate would make
/// this path include unnecessary.)
#[allow(dead_code)]
#[path = "../../src/cli.rs"]
pub mod cli;

/// The `image build` / `mount` flags, which the command line's subcommands name.
pub mod image {
    #[allow(dead_code)]
    #[path = "../../../src/image/args.rs"]
    pub mod args;
}

/// The binary's request thread pool, which `device` uses.
#[allow(dead_code)]
#[path = "../../src/pool.rs"]
pub mod pool;

/// berth's vhost-user-fs device (`FsBackend`, descriptor chains into request segments, request
/// serving), compiled here as is so that the fuzzers drive the code the daemon runs.
#[allow(dead_code)]
#[path = "../../src/vhost_user/mod.rs"]
pub mod device;
