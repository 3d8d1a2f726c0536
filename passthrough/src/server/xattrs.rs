//! Extended attributes: SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR.

use std::io;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{GetxattrIn, GetxattrOut};
use fuse_backend_rs::api::filesystem::{FileSystem, GetxattrReply, ListxattrReply};

use super::abi::XATTR_SIZE_MAX;
use super::reply::{self, Answer, Reply};
use super::request::{self, einval, le_u32, split_cstr, Request};
use super::FsServer;

impl FsServer {
    /// SETXATTR, with the 16-byte header when SETXATTR_EXT was negotiated (it carries
    /// SETXATTR_ACL_KILL_SGID) and the old 8-byte one otherwise.
    pub(super) fn setxattr(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let body = req.bounded_body(0, super::entries::MAX_LABELLED_BODY)?;
        let fixed = if self.fs.setxattr_ext_enabled() {
            16
        } else {
            8
        };
        let args = body.get(..fixed).ok_or_else(einval)?;
        let size = le_u32(args, 0) as usize;
        let flags = le_u32(args, 4);
        let setxattr_flags = if fixed == 16 { le_u32(args, 8) } else { 0 };
        let (name, rest) = split_cstr(&body[fixed..])?;
        if size > XATTR_SIZE_MAX {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let value = rest.get(..size).ok_or_else(einval)?;
        self.fs
            .do_setxattr(req.nodeid(), name, value, flags, setxattr_flags)?;
        reply::done()
    }

    pub(super) fn getxattr(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let GetxattrIn { size, .. } = req.read()?;
        let body = req.body(size_of::<GetxattrIn>())?;
        let name = request::name(&body)?;
        match self.fs.getxattr(&req.ctx, req.nodeid(), name, size)? {
            GetxattrReply::Value(value) => {
                out.append(&value)?;
                reply::done()
            }
            GetxattrReply::Count(count) => reply::with(
                out,
                &GetxattrOut {
                    size: count,
                    ..Default::default()
                },
            ),
        }
    }

    pub(super) fn listxattr(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let GetxattrIn { size, .. } = req.read()?;
        match self.fs.listxattr(&req.ctx, req.nodeid(), size)? {
            ListxattrReply::Names(names) => {
                out.append(&names)?;
                reply::done()
            }
            ListxattrReply::Count(count) => reply::with(
                out,
                &GetxattrOut {
                    size: count,
                    ..Default::default()
                },
            ),
        }
    }

    pub(super) fn removexattr(&self, req: &mut Request<'_, '_>) -> io::Result<Answer> {
        let body = req.body(0)?;
        self.fs
            .removexattr(&req.ctx, req.nodeid(), request::name(&body)?)?;
        reply::done()
    }
}
