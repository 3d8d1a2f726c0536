//! Directory handles: OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR.

use std::io;
use std::mem::size_of;

use berth_versions::wire::{VersionExt, VERSION_EXT_SIZE};
use fuse_backend_rs::abi::fuse_abi::{Dirent, EntryOut, FsyncIn, OpenIn, ReadIn, ReleaseIn};
use fuse_backend_rs::api::filesystem::{DirEntry, Entry, FileSystem};
use vm_memory::ByteValued;

use super::buffers::ReplyData;
use super::reply::{self, Answer, Reply};
use super::request::Request;
use super::FsServer;

impl FsServer {
    pub(super) fn opendir(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let OpenIn { flags, .. } = req.read()?;
        let (fh, options) = self.fs.opendir(&req.ctx, req.nodeid(), flags)?;
        reply::open(out, fh.unwrap_or(0), options.bits(), None)?;
        reply::done()
    }

    /// READDIR and READDIRPLUS: entries are written straight into the reply after the header,
    /// as many as `size` holds.
    pub(super) fn readdir(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        plus: bool,
    ) -> io::Result<Answer> {
        let ReadIn {
            fh, offset, size, ..
        } = req.read()?;
        // As fuse-backend-rs: the whole reply room (header included) must hold `size`.
        if out.total_room() < size as usize {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let mut data = out.data();
        let max = size as usize;
        if plus {
            let dir = req.nodeid();
            self.fs
                .readdirplus(&req.ctx, dir, fh, size, offset, &mut |d, e| {
                    let ext = self.version_ext(e.inode, Some(dir));
                    add_dirent(&mut data, max, d, Some((e, ext)))
                })?;
        } else {
            self.fs
                .readdir(&req.ctx, req.nodeid(), fh, size, offset, &mut |d| {
                    add_dirent(&mut data, max, d, None)
                })?;
        }
        reply::done()
    }

    pub(super) fn releasedir(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let ReleaseIn { fh, flags, .. } = req.read()?;
        self.fs.releasedir(&req.ctx, req.nodeid(), flags, fh)?;
        reply::done()
    }

    pub(super) fn fsyncdir(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let FsyncIn {
            fh, fsync_flags, ..
        } = req.read()?;
        self.fs
            .fsyncdir(&req.ctx, req.nodeid(), fsync_flags & 1 != 0, fh)?;
        reply::done()
    }
}

/// Appends one directory entry (with its lookup for READDIRPLUS), padded to 8 bytes, if it
/// fits in `max` bytes of entries; returns its size, or 0 when the reply is full.
fn add_dirent(
    data: &mut ReplyData<'_, '_, '_>,
    max: usize,
    dirent: DirEntry<'_>,
    entry: Option<(Entry, Option<VersionExt>)>,
) -> io::Result<usize> {
    let overflow = || io::Error::from_raw_os_error(libc::EOVERFLOW);
    let namelen = u32::try_from(dirent.name.len()).map_err(|_| overflow())?;
    let dirent_len = size_of::<Dirent>()
        .checked_add(dirent.name.len())
        .ok_or_else(overflow)?;
    let padded_len = dirent_len
        .checked_add(7)
        .map(|len| len & !7)
        .ok_or_else(overflow)?;
    let total = match &entry {
        Some((_, ext)) => {
            let ext_len = if ext.is_some() { VERSION_EXT_SIZE } else { 0 };
            padded_len
                .checked_add(size_of::<EntryOut>() + ext_len)
                .ok_or_else(overflow)?
        }
        None => padded_len,
    };
    if max.saturating_sub(data.written()) < total || data.remaining() < total {
        return Ok(0);
    }
    let header = Dirent {
        ino: dirent.ino,
        off: dirent.offset,
        namelen,
        type_: dirent.type_,
    };
    let padding = [0u8; 8];
    let written = (|| {
        if let Some((entry, ext)) = entry {
            data.append(EntryOut::from(entry).as_slice())?;
            // The version extension sits between the entry and the dirent; both sizes are
            // multiples of 8, so the record's padding stays the dirent's.
            if let Some(ext) = ext {
                data.append(&ext.encode())?;
            }
        }
        data.append(header.as_slice())?;
        data.append(dirent.name)?;
        data.append(&padding[..padded_len - dirent_len])
    })();
    // Cannot fail: the room was checked above.
    written.map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
    Ok(total)
}
