//! Names and inodes: LOOKUP, FORGET, attributes, and creating, linking, renaming and removing
//! directory entries.

use std::io;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{stat64, InHeader};
use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, CreateIn, ForgetIn, ForgetOne, GetattrIn, Kstatfs, LinkIn, MkdirIn,
    MknodIn, Rename2In, RenameIn, SetattrIn, SetattrValid, FATTR_FH, GETATTR_FH,
};
use fuse_backend_rs::api::filesystem::FileSystem;

use super::abi::{BUFFER_HEADER_SIZE, MAX_BUFFER_SIZE};
use super::dax::DaxWindow;
use super::reply::{self, Answer, Reply};
use super::request::{
    self, einval, parse_security_context, split_cstr, split_extensions, struct_at, Request,
    SecContext,
};
use super::FsServer;

/// Most request bytes read for a labelled CREATE, MKDIR, MKNOD or SYMLINK: two names (or a
/// name and a link target) and a security context fit with room to spare.
pub(super) const MAX_LABELLED_BODY: usize = 2 * 4096 + super::XATTR_SIZE_MAX + 4096;
/// Longest name a TMPFILE request may carry (the kernel sends "").
const MAX_TMPFILE_NAME: usize = 4096;

impl FsServer {
    pub(super) fn lookup(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let body = req.body(0)?;
        let name = request::name(&body)?;
        let entry = self.fs.lookup(&req.ctx, req.nodeid(), name)?;
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        reply::entry(out, entry)?;
        reply::version_ext(out, ext)?;
        reply::done()
    }

    pub(super) fn forget(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        // No reply either way: a FORGET that does not decode is ignored.
        if let Ok(ForgetIn { nlookup }) = req.read::<ForgetIn>() {
            self.fs.forget(&req.ctx, req.nodeid(), nlookup);
        }
        Ok(Answer::NoReply)
    }

    pub(super) fn batch_forget(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let Ok(BatchForgetIn { count, .. }) = req.read::<BatchForgetIn>() else {
            return Ok(Answer::NoReply);
        };
        let limit = (MAX_BUFFER_SIZE + BUFFER_HEADER_SIZE) as usize
            - size_of::<BatchForgetIn>()
            - size_of::<InHeader>();
        let fits = (count as usize)
            .checked_mul(size_of::<ForgetOne>())
            .is_some_and(|size| size <= limit && size <= req.remaining());
        if !fits {
            // As before: a batch longer than a request can be, or than this one is, is
            // ignored as a whole.
            return Ok(Answer::NoReply);
        }
        let mut forgets = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match req.read::<ForgetOne>() {
                Ok(one) => forgets.push((one.nodeid, one.nlookup)),
                Err(_) => return Ok(Answer::NoReply),
            }
        }
        self.fs.batch_forget(&req.ctx, forgets);
        Ok(Answer::NoReply)
    }

    pub(super) fn getattr(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let GetattrIn { flags, fh, .. } = req.read()?;
        let handle = (flags & GETATTR_FH != 0).then_some(fh);
        let (st, timeout) = self.fs.getattr(&req.ctx, req.nodeid(), handle)?;
        let flags = self.fs.attr_flags_of(req.nodeid(), &st);
        reply::attr(out, st, flags, timeout)?;
        reply::version_ext(out, self.version_ext(req.nodeid(), None))?;
        reply::done()
    }

    pub(super) fn setattr(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let setattr: SetattrIn = req.read()?;
        let handle = (setattr.valid & FATTR_FH != 0).then_some(setattr.fh);
        let valid = SetattrValid::from_bits_truncate(setattr.valid);
        let new_size = setattr.size;
        let st: stat64 = setattr.into();
        let nodeid = req.nodeid();
        // Window ranges past the new size leave the file before it shrinks (see DaxWindow).
        let resizing = dax.filter(|_| valid.contains(SetattrValid::SIZE));
        if let Some(window) = resizing {
            window.resizing(nodeid, new_size);
        }
        let result = self.fs.setattr(&req.ctx, nodeid, st, handle, valid);
        if let Some(window) = resizing {
            window.resized(nodeid);
        }
        let (st, timeout) = result?;
        let flags = self.fs.attr_flags_of(nodeid, &st);
        reply::attr(out, st, flags, timeout)?;
        reply::version_ext(out, self.version_ext(req.nodeid(), None))?;
        reply::done()
    }

    pub(super) fn readlink(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let target = self.fs.readlink(&req.ctx, req.nodeid())?;
        out.append(&target)?;
        reply::done()
    }

    pub(super) fn symlink(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let (body, secctx) = self.creation_body(req, 0)?;
        let (name, linkname) = request::two_names(&body)?;
        let entry = self
            .fs
            .do_symlink(&req.ctx, linkname, req.nodeid(), name, secctx.as_ref())?;
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        reply::entry(out, entry)?;
        reply::version_ext(out, ext)?;
        reply::done()
    }

    pub(super) fn mknod(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let (body, secctx) = self.creation_body(req, size_of::<MknodIn>())?;
        let args: MknodIn = struct_at(&body)?;
        let name = request::name(&body[size_of::<MknodIn>()..])?;
        let entry = self.fs.do_mknod(
            &req.ctx,
            req.nodeid(),
            name,
            args.mode,
            args.rdev,
            args.umask,
            secctx.as_ref(),
        )?;
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        reply::entry(out, entry)?;
        reply::version_ext(out, ext)?;
        reply::done()
    }

    pub(super) fn mkdir(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let (body, secctx) = self.creation_body(req, size_of::<MkdirIn>())?;
        let args: MkdirIn = struct_at(&body)?;
        let name = request::name(&body[size_of::<MkdirIn>()..])?;
        let entry = self.fs.do_mkdir(
            &req.ctx,
            req.nodeid(),
            name,
            args.mode,
            args.umask,
            secctx.as_ref(),
        )?;
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        reply::entry(out, entry)?;
        reply::version_ext(out, ext)?;
        reply::done()
    }

    pub(super) fn create(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
        dax: Option<&dyn DaxWindow>,
    ) -> io::Result<Answer> {
        let (body, secctx) = self.creation_body(req, size_of::<CreateIn>())?;
        let args: CreateIn = struct_at(&body)?;
        let name = request::name(&body[size_of::<CreateIn>()..])?;
        let (entry, fh, options) =
            self.fs
                .do_create(&req.ctx, req.nodeid(), name, &args, secctx.as_ref())?;
        // CREATE of an existing file with O_TRUNC names its parent, not the file: the file's
        // ranges can only follow once the truncation is done (see DaxWindow).
        if let Some(window) = dax.filter(|_| args.flags & libc::O_TRUNC as u32 != 0) {
            window.resized(entry.inode);
        }
        let (open_flags, backing_id) = self.open_path(entry.inode, fh, args.flags, options.bits());
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        created(out, entry, fh, open_flags, backing_id, ext)
    }

    pub(super) fn tmpfile(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let args: CreateIn = req.read()?;
        let secctx = if self.fs.security_ctx_enabled() {
            let body = labelled_body(req, size_of::<CreateIn>())?;
            let (rest, extensions) = split_extensions(&req.header, &body)?;
            // The name is ignored (O_TMPFILE files have none) but must be well formed.
            split_cstr(rest)?;
            parse_security_context(extensions)?
        } else {
            let name = req.rest(MAX_TMPFILE_NAME);
            split_cstr(&name)?;
            None
        };
        let (entry, fh, open_flags) =
            self.fs
                .tmpfile(&req.ctx, req.nodeid(), &args, secctx.as_ref())?;
        let (open_flags, backing_id) = self.open_path(entry.inode, fh, args.flags, open_flags);
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        created(out, entry, fh, open_flags, backing_id, ext)
    }

    /// The body of a request that creates a node: its arguments (`fixed` bytes) and name(s)
    /// and, when security labels were negotiated, the security context the guest appends.
    /// Without labels the body is everything after the fixed arguments as the header's length
    /// counts it, as fuse-backend-rs read it; with labels the extensions are split off first.
    fn creation_body(
        &self,
        req: &mut Request<'_, '_>,
        fixed: usize,
    ) -> io::Result<(Vec<u8>, Option<SecContext>)> {
        if !self.fs.security_ctx_enabled() {
            let body = req.body(0)?;
            if body.len() < fixed {
                return Err(einval());
            }
            return Ok((body, None));
        }
        let body = labelled_body(req, 0)?;
        let (args, extensions) = split_extensions(&req.header, &body)?;
        let secctx = parse_security_context(extensions)?;
        let args = args.to_vec();
        Ok((args, secctx))
    }

    pub(super) fn unlink(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let body = req.body(0)?;
        self.fs
            .unlink(&req.ctx, req.nodeid(), request::name(&body)?)?;
        reply::done()
    }

    pub(super) fn rmdir(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let body = req.body(0)?;
        self.fs
            .rmdir(&req.ctx, req.nodeid(), request::name(&body)?)?;
        reply::done()
    }

    pub(super) fn rename(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let RenameIn { newdir } = req.read()?;
        self.do_rename(req, size_of::<RenameIn>(), newdir, 0)
    }

    pub(super) fn rename2(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let Rename2In { newdir, flags, .. } = req.read()?;
        let flags =
            flags & (libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE | libc::RENAME_WHITEOUT);
        self.do_rename(req, size_of::<Rename2In>(), newdir, flags)
    }

    fn do_rename(
        &self,
        req: &mut Request<'_, '_>,
        fixed: usize,
        newdir: u64,
        flags: u32,
    ) -> io::Result<Answer> {
        let body = req.body(fixed)?;
        let (oldname, newname) = request::two_names(&body)?;
        self.fs
            .rename(&req.ctx, req.nodeid(), oldname, newdir, newname, flags)?;
        reply::done()
    }

    pub(super) fn link(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let LinkIn { oldnodeid } = req.read()?;
        let body = req.body(size_of::<LinkIn>())?;
        let name = request::name(&body)?;
        let entry = self.fs.link(&req.ctx, oldnodeid, req.nodeid(), name)?;
        let ext = self.version_ext(entry.inode, Some(req.nodeid()));
        reply::entry(out, entry)?;
        reply::version_ext(out, ext)?;
        reply::done()
    }

    pub(super) fn statfs(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let st = self.fs.statfs(&req.ctx, req.nodeid())?;
        reply::with(out, &Kstatfs::from(st))
    }

    pub(super) fn access(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let AccessIn { mask, .. } = req.read()?;
        self.fs.access(&req.ctx, req.nodeid(), mask)?;
        reply::done()
    }
}

/// The reply to CREATE and TMPFILE: the new entry, then the open file, then the version
/// extension when negotiated.
fn created(
    out: &mut Reply<'_, '_>,
    entry: fuse_backend_rs::api::filesystem::Entry,
    fh: u64,
    open_flags: u32,
    backing_id: Option<u32>,
    ext: Option<berth_versions::wire::VersionExt>,
) -> io::Result<Answer> {
    reply::entry(out, entry)?;
    reply::open(out, fh, open_flags, backing_id)?;
    reply::version_ext(out, ext)?;
    reply::done()
}

/// Everything after the header and `consumed` bytes already read, as long as the header says,
/// for requests that may carry a security context (bounded: a name and a label at most).
fn labelled_body(req: &mut Request<'_, '_>, consumed: usize) -> io::Result<Vec<u8>> {
    req.bounded_body(consumed, MAX_LABELLED_BODY)
}
