//! Byte-range and whole-file locks: GETLK, SETLK, SETLKW.

use std::io;

use fuse_backend_rs::abi::fuse_abi::{LkIn, LkOut};
use fuse_backend_rs::api::filesystem::FileSystem;

use super::reply::{self, Answer, Reply};
use super::request::Request;
use super::FsServer;

impl FsServer {
    pub(super) fn getlk(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let LkIn {
            fh,
            owner,
            lk,
            lk_flags,
            ..
        } = req.read()?;
        let lock = self
            .fs
            .getlk(&req.ctx, req.nodeid(), fh, owner, lk.into(), lk_flags)?;
        reply::with(out, &LkOut { lk: lock.into() })
    }

    pub(super) fn setlk(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let LkIn {
            fh,
            owner,
            lk,
            lk_flags,
            ..
        } = req.read()?;
        self.fs
            .setlk(&req.ctx, req.nodeid(), fh, owner, lk.into(), lk_flags)?;
        reply::done()
    }

    /// SETLKW waits for the lock: the thread serving the request blocks meanwhile.
    pub(super) fn setlkw(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let LkIn {
            fh,
            owner,
            lk,
            lk_flags,
            ..
        } = req.read()?;
        self.fs
            .setlk_wait(req.nodeid(), fh, owner, lk.into(), lk_flags)?;
        reply::done()
    }
}
