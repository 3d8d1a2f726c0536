//! Open files: OPEN, READ, WRITE, RELEASE and the other requests on a file handle.

use std::io;

use fuse_backend_rs::abi::fuse_abi::{
    BmapIn, BmapOut, CopyFileRangeIn, FallocateIn, FlushIn, FsyncIn, IoctlIn, IoctlOut, LseekIn,
    LseekOut, OpenIn, PollIn, PollOut, ReadIn, ReleaseIn, WriteIn, WriteOut, READ_LOCKOWNER,
    RELEASE_FLOCK_UNLOCK, RELEASE_FLUSH, WRITE_CACHE, WRITE_LOCKOWNER,
};
use fuse_backend_rs::api::filesystem::{FileSystem, IoctlData};

use super::dax::DaxWindow;
use super::reply::{self, Answer, Reply};
use super::request::Request;
use super::FsServer;

impl FsServer {
    pub(super) fn open(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let OpenIn { flags, fuse_flags } = req.read()?;
        let nodeid = req.nodeid();
        // O_TRUNC: window ranges of the file leave it before it is cut (see DaxWindow).
        let truncating = dax.filter(|_| flags & libc::O_TRUNC as u32 != 0);
        if let Some(window) = truncating {
            window.resizing(nodeid, 0);
        }
        let result = self.fs.open(&req.ctx, nodeid, flags, fuse_flags);
        if let Some(window) = truncating {
            window.resized(nodeid);
        }
        let (fh, options, _) = result?;
        let fh = fh.unwrap_or(0);
        let (open_flags, backing_id) = self.open_path(nodeid, fh, flags, options.bits());
        reply::open(out, fh, open_flags, backing_id)?;
        reply::done()
    }

    /// READ: the host file is read straight into the reply segments after the header.
    pub(super) fn read(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let ReadIn {
            fh,
            offset,
            size,
            read_flags,
            lock_owner,
            flags,
            ..
        } = req.read()?;
        let owner = (read_flags & READ_LOCKOWNER != 0).then_some(lock_owner);
        let mut data = out.data();
        let count = self.fs.read(
            &req.ctx,
            req.nodeid(),
            fh,
            &mut data,
            size,
            offset,
            owner,
            flags,
        )?;
        debug_assert!(count <= data.written());
        reply::done()
    }

    /// WRITE: the request's data segments are written to the host file as they are.
    pub(super) fn write(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let WriteIn {
            fh,
            offset,
            size,
            fuse_flags,
            lock_owner,
            flags,
            ..
        } = req.read()?;
        let owner = (fuse_flags & WRITE_LOCKOWNER != 0).then_some(lock_owner);
        let delayed_write = fuse_flags & WRITE_CACHE != 0;
        let ctx = req.ctx;
        let nodeid = req.nodeid();
        let count = self.fs.write(
            &ctx,
            nodeid,
            fh,
            &mut req.data(),
            size,
            offset,
            owner,
            delayed_write,
            flags,
            fuse_flags,
        );
        // A guest extends a DAX-mapped file with WRITE (its DAX path does not write past the
        // end through the window): the pages the file now reaches show it again.
        if let Some(window) = dax {
            window.resized(nodeid);
        }
        let count = count?;
        reply::with(
            out,
            &WriteOut {
                size: count as u32,
                ..Default::default()
            },
        )
    }

    pub(super) fn release(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let ReleaseIn {
            fh,
            flags,
            release_flags,
            lock_owner,
        } = req.read()?;
        let flush = release_flags & RELEASE_FLUSH != 0;
        let flock_release = release_flags & RELEASE_FLOCK_UNLOCK != 0;
        let lock_owner = (flush || flock_release).then_some(lock_owner);
        let released = self.fs.release(
            &req.ctx,
            req.nodeid(),
            flags,
            fh,
            flush,
            flock_release,
            lock_owner,
        );
        // The kernel is done with the open either way: its backing id goes with it.
        if let Some(backing) = self.backing.get() {
            backing.release(req.nodeid(), fh);
        }
        released?;
        reply::done()
    }

    pub(super) fn flush(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let FlushIn { fh, lock_owner, .. } = req.read()?;
        self.fs.flush(&req.ctx, req.nodeid(), fh, lock_owner)?;
        reply::done()
    }

    pub(super) fn fsync(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let FsyncIn {
            fh, fsync_flags, ..
        } = req.read()?;
        self.fs
            .fsync(&req.ctx, req.nodeid(), fsync_flags & 1 != 0, fh)?;
        reply::done()
    }

    pub(super) fn fallocate(
        &self,
        req: &mut Request<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let FallocateIn {
            fh,
            offset,
            length,
            mode,
            ..
        } = req.read()?;
        let nodeid = req.nodeid();
        // Collapsing a range shifts what follows it down and shrinks the file: the window's
        // ranges from `offset` on leave the file first (punching holes shrinks nothing; holes
        // read as zeros through a mapping).
        if let Some(window) = dax {
            if mode as i32 & libc::FALLOC_FL_COLLAPSE_RANGE != 0 {
                window.resizing(nodeid, offset);
            }
        }
        let result = self
            .fs
            .fallocate(&req.ctx, nodeid, fh, mode, offset, length);
        if let Some(window) = dax {
            window.resized(nodeid);
        }
        result?;
        reply::done()
    }

    pub(super) fn lseek(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let LseekIn {
            fh, offset, whence, ..
        } = req.read()?;
        let offset = self.fs.lseek(&req.ctx, req.nodeid(), fh, offset, whence)?;
        reply::with(out, &LseekOut { offset })
    }

    pub(super) fn copy_file_range(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let args: CopyFileRangeIn = req.read()?;
        let copied = self.fs.copy_file_range(&req.ctx, req.nodeid(), &args);
        if let Some(window) = dax {
            window.resized(args.nodeid_out);
        }
        let copied = copied?;
        reply::with(
            out,
            &WriteOut {
                size: copied,
                ..Default::default()
            },
        )
    }

    pub(super) fn syncfs(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        self.fs.syncfs(req.nodeid())?;
        reply::done()
    }

    pub(super) fn ioctl(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let IoctlIn {
            fh,
            flags,
            cmd,
            in_size,
            out_size,
            ..
        } = req.read()?;
        let in_size = in_size as usize;
        if in_size > req.remaining() {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        let input = req.rest(in_size);
        let data = IoctlData {
            data: (!input.is_empty()).then_some(&input[..]),
            ..Default::default()
        };
        let result = self
            .fs
            .ioctl(&req.ctx, req.nodeid(), fh, flags, cmd, data, out_size)?;
        out.put(&IoctlOut {
            result: result.result,
            ..Default::default()
        })?;
        if let Some(data) = result.data {
            out.append(data)?;
        }
        reply::done()
    }

    pub(super) fn poll(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let PollIn {
            fh,
            kh,
            flags,
            events,
        } = req.read()?;
        let revents = self
            .fs
            .poll(&req.ctx, req.nodeid(), fh, kh, flags, events)?;
        reply::with(
            out,
            &PollOut {
                revents,
                padding: 0,
            },
        )
    }

    pub(super) fn bmap(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let BmapIn {
            block, blocksize, ..
        } = req.read()?;
        let block = self.fs.bmap(&req.ctx, req.nodeid(), block, blocksize)?;
        reply::with(out, &BmapOut { block })
    }

    pub(super) fn notify_reply(&self) -> io::Result<Answer> {
        self.fs.notify_reply()?;
        Ok(Answer::NoReply)
    }
}
