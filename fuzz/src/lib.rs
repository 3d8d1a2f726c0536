//! Harnesses shared by the fuzz targets and by the regression tests that replay their crashes.

pub mod fuse;
pub mod vhost_user;

/// The binary's command-line module, compiled here as is: it only depends on std, clap,
/// thiserror, serde_json and berth-passthrough. (Moving it into a library crate would make this path
/// include unnecessary.)
#[allow(dead_code)]
#[path = "../../src/cli.rs"]
pub mod cli;
