//! FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING: the virtio-fs DAX window.
//!
//! The window belongs to the transport (a vhost-user device maps file ranges into the VMM's
//! shared memory region), so the server only decodes the requests and hands them to the
//! [`DaxWindow`] the transport passes with each request. Without one they are ENOSYS, as
//! virtiofsd answers.

use std::io;
use std::mem::size_of;

use fuse_backend_rs::api::filesystem::Context;

use super::abi::{RemoveMappingIn, RemoveMappingOne, SetupMappingIn, MAX_BUFFER_SIZE};
use super::reply::{self, Answer};
use super::request::Request;
use super::FsServer;

/// A DAX window a transport offers for FUSE_SETUPMAPPING / FUSE_REMOVEMAPPING.
pub trait DaxWindow: Send + Sync {
    /// Maps the range `mapping` describes of `nodeid`'s open file into the window.
    fn setup_mapping(&self, ctx: &Context, nodeid: u64, mapping: &SetupMappingIn)
        -> io::Result<()>;

    /// Unmaps `ranges` of the window.
    fn remove_mappings(
        &self,
        ctx: &Context,
        nodeid: u64,
        ranges: &[RemoveMappingOne],
    ) -> io::Result<()>;

    /// The FUSE session starts (INIT) or ends (DESTROY): nothing the guest mapped before
    /// stays mapped.
    fn end_session(&self) {}

    /// `nodeid`'s file is about to be cut to `new_size` bytes by this request (SETATTR with a
    /// size, OPEN with O_TRUNC, FALLOCATE collapsing a range): window ranges past that size
    /// must stop showing the file before it shrinks, or the VMM faults on them.
    fn resizing(&self, _nodeid: u64, _new_size: u64) {}

    /// `nodeid`'s file may have changed size (the request that may have changed it is done,
    /// successfully or not): window ranges follow the size it has now.
    fn resized(&self, _nodeid: u64) {}
}

impl FsServer {
    pub(super) fn setupmapping(
        &self,
        req: &mut Request<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let window = dax.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS))?;
        let mapping: SetupMappingIn = req.read()?;
        window.setup_mapping(&req.ctx, req.nodeid(), &mapping)?;
        reply::done()
    }

    pub(super) fn removemapping(
        &self,
        req: &mut Request<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let window = dax.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSYS))?;
        let RemoveMappingIn { count } = req.read()?;
        let size = (count as usize)
            .checked_mul(size_of::<RemoveMappingOne>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        if size > MAX_BUFFER_SIZE as usize {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        if size > req.remaining() {
            return Err(super::request::einval());
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            ranges.push(req.read::<RemoveMappingOne>()?);
        }
        window.remove_mappings(&req.ctx, req.nodeid(), &ranges)?;
        reply::done()
    }
}
