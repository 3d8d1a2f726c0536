//! Byte-range and whole-file locks: GETLK, SETLK, SETLKW.

use std::io;

use fuse_backend_rs::abi::fuse_abi::{LkIn, LkOut};
use fuse_backend_rs::api::filesystem::{FileLock, FileSystem};

use crate::lock_wait::{QueueOrigin, WaitOutcome, WaitingLock};

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
    /// virtqueue, the wait is parked if the queue stops meanwhile; from /dev/fuse it never is.
    /// A FUSE_INTERRUPT of the request ends the wait with EINTR.
    pub(super) fn setlkw(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let LkIn {
            fh,
            owner,
            lk,
            lk_flags,
            ..
        } = req.read()?;
        let origin = req.origin.unwrap_or(QueueOrigin::DEVICE);
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

    /// FUSE_INTERRUPT: a lock wait of the interrupted request stops (other requests finish
    /// soon on their own). Never answered.
    pub(super) fn interrupt(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        if let Ok(unique) = req.read::<u64>() {
            if self.fs.lock_waits.interrupt(unique) {
                tracing::debug!(unique, "Interrupted a lock wait.");
            }
        }
        Ok(Answer::NoReply)
    }
}
