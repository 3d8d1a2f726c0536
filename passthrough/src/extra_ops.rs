//! [`FsServer`]: fuse-backend-rs's request dispatcher plus the opcodes it does not know.
//!
//! fuse-backend-rs 0.14 answers COPY_FILE_RANGE, SYNCFS and TMPFILE with ENOSYS and serves
//! SETLKW as a non-blocking SETLK. Those requests are peeked at here and answered by
//! [`PassthroughFs`] directly; everything else goes to the library's server unchanged.

use std::ffi::CStr;
use std::io::{self, Write};
use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    CopyFileRangeIn, CreateIn, EntryOut, InHeader, LkIn, OpenOut, OutHeader, WriteOut,
};
use fuse_backend_rs::api::filesystem::Context;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::ByteValued;

use crate::fs::PassthroughFs;

const OPCODE_SETLKW: u32 = 33;
const OPCODE_COPY_FILE_RANGE: u32 = 47;
const OPCODE_SYNCFS: u32 = 50;
const OPCODE_TMPFILE: u32 = 51;

/// Longest name a TMPFILE request may carry (the kernel sends "").
const MAX_NAME_LEN: usize = 4096;

/// Dispatches decoded FUSE requests to a [`PassthroughFs`].
pub struct FsServer {
    server: Server<Arc<PassthroughFs>>,
    fs: Arc<PassthroughFs>,
}

impl FsServer {
    /// Serves `fs`.
    pub fn new(fs: PassthroughFs) -> Self {
        let fs = Arc::new(fs);
        FsServer {
            server: Server::new(fs.clone()),
            fs,
        }
    }

    /// The filesystem being served.
    pub fn fs(&self) -> &Arc<PassthroughFs> {
        &self.fs
    }

    /// Handles one request read from `r`, writing the reply (if the opcode has one) to `w`.
    ///
    /// Returns the number of reply bytes written. An error means the request could not be
    /// decoded or the reply could not be written; the caller logs it and moves on.
    pub fn handle_message<S: BitmapSlice>(
        &self,
        r: Reader<'_, S>,
        w: Writer<'_, S>,
        vu_req: Option<&mut dyn FsCacheReqHandler>,
    ) -> fuse_backend_rs::Result<usize> {
        let mut peek = r.clone();
        let header: InHeader = match peek.read_obj() {
            Ok(h) => h,
            // Let the library produce its usual decode error.
            Err(_) => return self.server.handle_message(r, w, vu_req, None),
        };
        match header.opcode {
            OPCODE_COPY_FILE_RANGE | OPCODE_SYNCFS | OPCODE_TMPFILE | OPCODE_SETLKW => {
                self.handle_extra(header, peek, w)
            }
            _ => self.server.handle_message(r, w, vu_req, None),
        }
    }

    fn handle_extra<S: BitmapSlice>(
        &self,
        header: InHeader,
        mut r: Reader<'_, S>,
        mut w: Writer<'_, S>,
    ) -> fuse_backend_rs::Result<usize> {
        let ctx = Context {
            uid: header.uid,
            gid: header.gid,
            pid: header.pid as libc::pid_t,
        };
        let result: io::Result<Vec<u8>> = match header.opcode {
            OPCODE_COPY_FILE_RANGE => read_body::<CopyFileRangeIn, S>(&mut r).and_then(|args| {
                let copied = self.fs.copy_file_range(&ctx, header.nodeid, &args)?;
                let out = WriteOut {
                    size: copied,
                    ..Default::default()
                };
                Ok(out.as_slice().to_vec())
            }),
            OPCODE_SYNCFS => self.fs.syncfs(header.nodeid).map(|()| Vec::new()),
            OPCODE_SETLKW => read_body::<LkIn, S>(&mut r).and_then(|args| {
                self.fs
                    .setlk_wait(
                        header.nodeid,
                        args.fh,
                        args.owner,
                        args.lk.into(),
                        args.lk_flags,
                    )
                    .map(|()| Vec::new())
            }),
            OPCODE_TMPFILE => read_body::<CreateIn, S>(&mut r).and_then(|args| {
                // The name is ignored (O_TMPFILE files have none) but must be well formed.
                let mut name = vec![0u8; r.available_bytes().min(MAX_NAME_LEN)];
                io::Read::read_exact(&mut r, &mut name)?;
                CStr::from_bytes_until_nul(&name)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                let (entry, fh, open_flags) = self.fs.tmpfile(&ctx, header.nodeid, &args)?;
                let open_out = OpenOut {
                    fh,
                    open_flags,
                    ..Default::default()
                };
                let mut body = EntryOut::from(entry).as_slice().to_vec();
                body.extend_from_slice(open_out.as_slice());
                Ok(body)
            }),
            _ => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        };
        tracing::trace!(opcode = header.opcode, unique = header.unique, result = ?result.as_ref().map(|b| b.len()), "served a request the library server does not know");
        let (error, body) = match result {
            Ok(body) => (0, body),
            Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), Vec::new()),
        };
        let out = OutHeader {
            len: (size_of::<OutHeader>() + body.len()) as u32,
            error,
            unique: header.unique,
        };
        // One write: on /dev/fuse each write is a whole reply, so header and body must go
        // together.
        let mut reply = Vec::with_capacity(out.len as usize);
        reply.extend_from_slice(out.as_slice());
        reply.extend_from_slice(&body);
        let written = w
            .write(&reply)
            .map_err(fuse_backend_rs::Error::EncodeMessage)?;
        if written != reply.len() {
            return Err(fuse_backend_rs::Error::EncodeMessage(
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        w.commit(None)
            .map_err(fuse_backend_rs::Error::EncodeMessage)?;
        Ok(out.len as usize)
    }
}

fn read_body<T: ByteValued, S: BitmapSlice>(r: &mut Reader<'_, S>) -> io::Result<T> {
    r.read_obj::<T>()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
