//! berth's block engine: what a ublk request or a vhost-user-blk request ends in.
//!
//! Data path: a transport (the ublk server in [`ublk`], or vhost-user-blk wired by the
//! `berth` binary) decodes a request, checks it with [`target::validate`], asks the
//! device's [`target::BlockTarget`] where its bytes live and moves them. Targets:
//! [`raw::RawTarget`] (a local file or block device), [`image::ImageTarget`] (a chunked,
//! digested blob read lazily through the cache engine, `berth_cache`), and
//! [`overlay::OverlayTarget`] (a crash-consistent copy-on-write file over either).
//! [`metrics::DeviceMetrics`] counts what each device serves. This crate knows nothing of
//! the command line; the binary wires it.

pub mod build;
pub mod error;
pub mod export;
pub mod image;
pub mod metrics;
pub mod overlay;
pub mod raw;
pub mod target;
pub mod ublk;

pub use error::{BlockError, Result};
pub use image::ImageTarget;
pub use metrics::DeviceMetrics;
pub use overlay::{OverlayDescription, OverlayOptions, OverlayRecovery, OverlayTarget};
pub use raw::{RawOptions, RawTarget};
pub use target::{
    BlockTarget, Completion, Extent, FetchReply, Op, Progress, ReadMapping, ReadPin, SharedTarget,
    Source, TargetInfo, Waker, WriteTicket,
};
