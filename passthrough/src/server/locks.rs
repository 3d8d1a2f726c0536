//! Byte-range and whole-file locks: GETLK, SETLK, SETLKW.

use std::io;

use fuse_backend_rs::abi::fuse_abi::{LkIn, LkOut};
use fuse_backend_rs::api::filesystem::{FileLock, FileSystem};

use crate::lock_wait::{WaitOutcome, WaitingLock};

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

    /// SETLKW waits for the lock: the thread serving the request blocks meanwhile. From a
    /// virtqueue, the wait is parked if the queue stops meanwhile.
    pub(super) fn setlkw(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let LkIn {
            fh,
            owner,
            lk,
            lk_flags,
            ..
        } = req.read()?;
        let Some(origin) = req.origin else {
            self.fs
                .setlk_wait(req.nodeid(), fh, owner, lk.into(), lk_flags)?;
            return reply::done();
        };
        let lock: FileLock = lk.into();
        let waiting = WaitingLock {
            origin,
            avail: 0,
            unique: req.header.unique,
            nodeid: req.nodeid(),
            fh,
            owner,
            start: lock.start,
            end: lock.end,
            lock_type: lock.lock_type,
            pid: lock.pid,
            lk_flags,
        };
        match self.fs.setlk_wait_parkable(waiting, false) {
            WaitOutcome::Answered(result) => {
                result?;
                reply::done()
            }
            // (Gone is only for resumed waits.)
            WaitOutcome::Parked | WaitOutcome::Gone => Ok(Answer::Parked),
        }
    }
}
