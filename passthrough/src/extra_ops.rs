//! [`FsServer`]: fuse-backend-rs's request dispatcher plus what it does not know.
//!
//! fuse-backend-rs 0.14 answers COPY_FILE_RANGE, SYNCFS and TMPFILE with ENOSYS and serves
//! SETLKW as a non-blocking SETLK. Its INIT cannot negotiate flags its `FsOptions` lacks
//! (SETXATTR_EXT, SECURITY_CTX, DIRECT_IO_ALLOW_MMAP), its SETXATTR decoder knows only the old
//! 8-byte header (and drops a malformed request without a reply), and it cannot read the
//! security context a guest appends to CREATE, MKDIR, MKNOD and SYMLINK. Those requests are
//! peeked at here and answered by [`PassthroughFs`] directly; everything else goes to the
//! library's server unchanged.

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    CopyFileRangeIn, CreateIn, EntryOut, FsOptions, InHeader, InitIn, InitIn2, InitOut, LkIn,
    MkdirIn, MknodIn, OpenOut, OutHeader, WriteOut, FUSE_COMPAT_22_INIT_OUT_SIZE,
    FUSE_COMPAT_INIT_OUT_SIZE, KERNEL_MINOR_VERSION, KERNEL_MINOR_VERSION_INIT_22_OUT_SIZE,
    KERNEL_MINOR_VERSION_INIT_OUT_SIZE, KERNEL_VERSION,
};
use fuse_backend_rs::api::filesystem::Context;
use fuse_backend_rs::api::server::{Server, MAX_REQ_PAGES};
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::ByteValued;

use crate::fs::PassthroughFs;

const OPCODE_SYMLINK: u32 = 6;
const OPCODE_MKNOD: u32 = 8;
const OPCODE_MKDIR: u32 = 9;
const OPCODE_SETXATTR: u32 = 21;
const OPCODE_INIT: u32 = 26;
const OPCODE_SETLKW: u32 = 33;
const OPCODE_CREATE: u32 = 35;
const OPCODE_COPY_FILE_RANGE: u32 = 47;
const OPCODE_SYNCFS: u32 = 50;
const OPCODE_TMPFILE: u32 = 51;

/// Longest name a TMPFILE request may carry (the kernel sends "").
const MAX_NAME_LEN: usize = 4096;
/// Largest extended attribute value Linux stores (`XATTR_SIZE_MAX`).
pub(crate) const XATTR_SIZE_MAX: usize = 65536;
/// Largest list of attribute names Linux returns (`XATTR_LIST_MAX`).
pub(crate) const XATTR_LIST_MAX: usize = 65536;
/// Longest attribute name (`XATTR_NAME_MAX`).
const XATTR_NAME_MAX: usize = 255;
/// Most request bytes after the header berth reads for the opcodes decoded here: a name, a
/// symlink target and a security context all fit with room to spare.
const MAX_DECODED_BODY: usize = 2 * 4096 + XATTR_SIZE_MAX + 4096;

/// `setxattr_flags` bit: the guest asks for setgid to be cleared along with an ACL write.
pub(crate) const SETXATTR_ACL_KILL_SGID: u32 = 1;

/// FUSE_INIT flag bits, as 64-bit values (`flags | flags2 << 32`), including those
/// fuse-backend-rs 0.14 has no name for.
pub(crate) mod init_flags {
    pub const DONT_MASK: u64 = 1 << 6;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const SETXATTR_EXT: u64 = 1 << 29;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const SECURITY_CTX: u64 = 1 << 32;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;

    /// Names of the flags among DONT_MASK, POSIX_ACL and SETXATTR_EXT set in `flags`.
    pub fn describe(flags: u64) -> String {
        let names: Vec<&str> = [
            (POSIX_ACL, "POSIX_ACL"),
            (DONT_MASK, "DONT_MASK"),
            (SETXATTR_EXT, "SETXATTR_EXT"),
        ]
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

/// The security context a guest sends with a new node (FUSE_SECURITY_CTX): an xattr name in
/// the `security.` namespace and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecContext {
    pub name: CString,
    pub value: Vec<u8>,
}

/// Dispatches decoded FUSE requests to a [`PassthroughFs`].
pub struct FsServer {
    server: Server<Arc<PassthroughFs>>,
    fs: Arc<PassthroughFs>,
    /// Requests served per opcode (for the log at exit and the benchmarks).
    served: [std::sync::atomic::AtomicU64; 64],
}

impl FsServer {
    /// Serves `fs`.
    pub fn new(fs: PassthroughFs) -> Self {
        let fs = Arc::new(fs);
        FsServer {
            server: Server::new(fs.clone()),
            fs,
            served: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Requests served so far, as `NAME=count` pairs of the opcodes seen (LOOKUP, GETATTR,
    /// READ… by number where berth has no name for them).
    pub fn request_counts(&self) -> String {
        const NAMES: &[(usize, &str)] = &[
            (1, "LOOKUP"),
            (2, "FORGET"),
            (3, "GETATTR"),
            (4, "SETATTR"),
            (5, "READLINK"),
            (14, "OPEN"),
            (15, "READ"),
            (16, "WRITE"),
            (17, "STATFS"),
            (18, "RELEASE"),
            (25, "FLUSH"),
            (27, "OPENDIR"),
            (28, "READDIR"),
            (29, "RELEASEDIR"),
            (35, "CREATE"),
            (42, "BATCH_FORGET"),
            (44, "READDIRPLUS"),
        ];
        let mut total = 0;
        let mut parts = Vec::new();
        for (op, count) in self.served.iter().enumerate() {
            let n = count.load(std::sync::atomic::Ordering::Relaxed);
            if n == 0 {
                continue;
            }
            total += n;
            match NAMES.iter().find(|(o, _)| *o == op) {
                Some((_, name)) => parts.push(format!("{name}={n}")),
                None => parts.push(format!("op{op}={n}")),
            }
        }
        format!("total={total} {}", parts.join(" "))
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
        if let Some(count) = self.served.get(header.opcode as usize) {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let labelled = self.fs.security_ctx_enabled();
        let served = match header.opcode {
            OPCODE_COPY_FILE_RANGE
            | OPCODE_SYNCFS
            | OPCODE_TMPFILE
            | OPCODE_SETLKW
            | OPCODE_INIT
            | OPCODE_SETXATTR => self.handle_extra(header, peek, w),
            OPCODE_CREATE | OPCODE_MKDIR | OPCODE_MKNOD | OPCODE_SYMLINK if labelled => {
                self.handle_extra(header, peek, w)
            }
            _ => self.server.handle_message(r, w, vu_req, None),
        };
        // The reply is written: shared caching settles what it handed out.
        self.fs.reply_sent();
        served
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
            OPCODE_INIT => self.init(&mut r),
            OPCODE_SETXATTR => self.setxattr(&header, &mut r),
            OPCODE_CREATE | OPCODE_MKDIR | OPCODE_MKNOD | OPCODE_SYMLINK => {
                self.create_labelled(&ctx, &header, &mut r)
            }
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
            OPCODE_TMPFILE => self.tmpfile(&ctx, &header, &mut r),
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

    /// FUSE_INIT, negotiated on all 64 flag bits (fuse-backend-rs drops those it has no name
    /// for); the reply is laid out as the library's.
    fn init<S: BitmapSlice>(&self, r: &mut Reader<'_, S>) -> io::Result<Vec<u8>> {
        let init: InitIn = read_body(r)?;
        if init.major < KERNEL_VERSION {
            tracing::error!(
                "The client speaks FUSE {}.{}; berth needs major version {KERNEL_VERSION}.",
                init.major,
                init.minor
            );
            return Err(io::Error::from_raw_os_error(libc::EPROTO));
        }
        if init.major > KERNEL_VERSION {
            // The client answers with an INIT of our major version.
            let out = InitOut {
                major: KERNEL_VERSION,
                minor: KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            return Ok(out.as_slice().to_vec());
        }
        let mut capable = u64::from(init.flags);
        if capable & init_flags::INIT_EXT != 0 {
            let init2: InitIn2 = read_body(r)?;
            capable |= u64::from(init2.flags2) << 32;
        }
        let enabled = self.fs.negotiate(capable)?;
        tracing::info!(
            "FUSE_INIT {}.{}: the client offered {capable:#x}, berth enabled {enabled:#x}.",
            init.major,
            init.minor
        );
        let page_size = fuse_backend_rs::transport::pagesize() as u32;
        let max_pages = FsOptions::MAX_PAGES.bits();
        let big_writes = FsOptions::BIG_WRITES.bits();
        let mut out = InitOut {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: init.max_readahead,
            flags: enabled as u32,
            max_background: u16::MAX,
            congestion_threshold: (u16::MAX / 4) * 3,
            // fuse-backend-rs's minimum read buffer less its header room.
            max_write: 8192 - 4096,
            time_gran: 1,
            flags2: (enabled >> 32) as u32,
            ..Default::default()
        };
        if enabled & (big_writes | max_pages) != 0 {
            out.max_write = u32::from(MAX_REQ_PAGES) * page_size;
        }
        if enabled & max_pages != 0 {
            out.max_pages = MAX_REQ_PAGES;
        }
        let bytes = out.as_slice();
        let len = if init.minor < KERNEL_MINOR_VERSION_INIT_OUT_SIZE {
            FUSE_COMPAT_INIT_OUT_SIZE
        } else if init.minor < KERNEL_MINOR_VERSION_INIT_22_OUT_SIZE {
            FUSE_COMPAT_22_INIT_OUT_SIZE
        } else {
            bytes.len()
        };
        Ok(bytes[..len].to_vec())
    }

    /// SETXATTR, with the 16-byte header when SETXATTR_EXT was negotiated (it carries
    /// SETXATTR_ACL_KILL_SGID) and the old 8-byte one otherwise.
    fn setxattr<S: BitmapSlice>(
        &self,
        header: &InHeader,
        r: &mut Reader<'_, S>,
    ) -> io::Result<Vec<u8>> {
        let body = read_request_body(header, r)?;
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
            .do_setxattr(header.nodeid, name, value, flags, setxattr_flags)
            .map(|()| Vec::new())
    }

    /// CREATE, MKDIR, MKNOD and SYMLINK with the security context extension.
    fn create_labelled<S: BitmapSlice>(
        &self,
        ctx: &Context,
        header: &InHeader,
        r: &mut Reader<'_, S>,
    ) -> io::Result<Vec<u8>> {
        let body = read_request_body(header, r)?;
        let (args, extensions) = split_extensions(header, &body)?;
        let secctx = parse_security_context(extensions)?;
        let secctx = secctx.as_ref();
        let parent = header.nodeid;
        let entry = match header.opcode {
            OPCODE_CREATE => {
                let create: CreateIn = struct_at(args)?;
                let (name, _) = split_cstr(&args[size_of::<CreateIn>()..])?;
                let (entry, fh, options) = self.fs.do_create(ctx, parent, name, &create, secctx)?;
                let open = OpenOut {
                    fh,
                    open_flags: options.bits(),
                    ..Default::default()
                };
                let mut out = EntryOut::from(entry).as_slice().to_vec();
                out.extend_from_slice(open.as_slice());
                return Ok(out);
            }
            OPCODE_MKDIR => {
                let mkdir: MkdirIn = struct_at(args)?;
                let (name, _) = split_cstr(&args[size_of::<MkdirIn>()..])?;
                self.fs
                    .do_mkdir(ctx, parent, name, mkdir.mode, mkdir.umask, secctx)?
            }
            OPCODE_MKNOD => {
                let mknod: MknodIn = struct_at(args)?;
                let (name, _) = split_cstr(&args[size_of::<MknodIn>()..])?;
                self.fs.do_mknod(
                    ctx,
                    parent,
                    name,
                    mknod.mode,
                    mknod.rdev,
                    mknod.umask,
                    secctx,
                )?
            }
            OPCODE_SYMLINK => {
                let (name, rest) = split_cstr(args)?;
                let (linkname, _) = split_cstr(rest)?;
                self.fs.do_symlink(ctx, linkname, parent, name, secctx)?
            }
            _ => return Err(io::Error::from_raw_os_error(libc::ENOSYS)),
        };
        Ok(EntryOut::from(entry).as_slice().to_vec())
    }

    fn tmpfile<S: BitmapSlice>(
        &self,
        ctx: &Context,
        header: &InHeader,
        r: &mut Reader<'_, S>,
    ) -> io::Result<Vec<u8>> {
        let args: CreateIn = read_body(r)?;
        let secctx = if self.fs.security_ctx_enabled() {
            let body = read_request_body_after(header, r, size_of::<CreateIn>())?;
            let (rest, extensions) = split_extensions(header, &body)?;
            // The name is ignored (O_TMPFILE files have none) but must be well formed.
            split_cstr(rest)?;
            parse_security_context(extensions)?
        } else {
            let mut name = vec![0u8; r.available_bytes().min(MAX_NAME_LEN)];
            r.read_exact(&mut name)?;
            split_cstr(&name)?;
            None
        };
        let (entry, fh, open_flags) =
            self.fs
                .tmpfile(ctx, header.nodeid, &args, secctx.as_ref())?;
        let open_out = OpenOut {
            fh,
            open_flags,
            ..Default::default()
        };
        let mut body = EntryOut::from(entry).as_slice().to_vec();
        body.extend_from_slice(open_out.as_slice());
        Ok(body)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn read_body<T: ByteValued, S: BitmapSlice>(r: &mut Reader<'_, S>) -> io::Result<T> {
    r.read_obj::<T>().map_err(|_| einval())
}

/// Everything after the request header, as long as the header says and the request holds.
fn read_request_body<S: BitmapSlice>(
    header: &InHeader,
    r: &mut Reader<'_, S>,
) -> io::Result<Vec<u8>> {
    read_request_body_after(header, r, 0)
}

/// The request bytes after the header and `consumed` bytes already read.
fn read_request_body_after<S: BitmapSlice>(
    header: &InHeader,
    r: &mut Reader<'_, S>,
    consumed: usize,
) -> io::Result<Vec<u8>> {
    let len = (header.len as usize)
        .checked_sub(size_of::<InHeader>() + consumed)
        .ok_or_else(einval)?;
    // The length is the guest's word: never allocate more than the request can hold.
    if len > MAX_DECODED_BODY || len > r.available_bytes() {
        return Err(einval());
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|_| einval())?;
    Ok(body)
}

/// Splits a request body into its arguments and the extensions the header's `total_extlen`
/// (the low 16 bits of the former padding word, in 8-byte units) says follow them.
fn split_extensions<'a>(header: &InHeader, body: &'a [u8]) -> io::Result<(&'a [u8], &'a [u8])> {
    let ext_len = (header.padding & 0xffff) as usize * 8;
    let args_len = body.len().checked_sub(ext_len).ok_or_else(einval)?;
    Ok(body.split_at(args_len))
}

/// The security context in a request's extensions: a `fuse_secctx_header` (total size and
/// count), then per context a `fuse_secctx` (value size), the NUL-terminated xattr name and
/// the value. Linux sends at most one. No extension at all means no label.
fn parse_security_context(extensions: &[u8]) -> io::Result<Option<SecContext>> {
    if extensions.is_empty() {
        return Ok(None);
    }
    if extensions.len() < 8 {
        return Err(einval());
    }
    let total = le_u32(extensions, 0) as usize;
    let count = le_u32(extensions, 4);
    if total < 8 || total > extensions.len() {
        return Err(einval());
    }
    match count {
        0 => return Ok(None),
        1 => {}
        _ => return Err(einval()),
    }
    let record = &extensions[8..total];
    if record.len() < 8 {
        return Err(einval());
    }
    let value_len = le_u32(record, 0) as usize;
    let (name, rest) = split_cstr(&record[8..])?;
    if name.to_bytes().len() > XATTR_NAME_MAX || !name.to_bytes().starts_with(b"security.") {
        return Err(einval());
    }
    if value_len == 0 || value_len > XATTR_SIZE_MAX {
        return Err(einval());
    }
    let value = rest.get(..value_len).ok_or_else(einval)?;
    Ok(Some(SecContext {
        name: name.to_owned(),
        value: value.to_vec(),
    }))
}

/// The NUL-terminated string at the start of `bytes`, and what follows its NUL.
fn split_cstr(bytes: &[u8]) -> io::Result<(&CStr, &[u8])> {
    let name = CStr::from_bytes_until_nul(bytes).map_err(|_| einval())?;
    let rest = &bytes[name.to_bytes_with_nul().len()..];
    Ok((name, rest))
}

/// A little-endian u32 at `offset` (callers check the length).
fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

/// A `T` from the start of `bytes`.
fn struct_at<T: ByteValued>(bytes: &[u8]) -> io::Result<T> {
    T::from_slice(bytes.get(..size_of::<T>()).ok_or_else(einval)?)
        .copied()
        .ok_or_else(einval)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secctx_extension(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut record = Vec::new();
        record.extend_from_slice(&(value.len() as u32).to_le_bytes());
        record.extend_from_slice(&0u32.to_le_bytes());
        record.extend_from_slice(name);
        record.push(0);
        record.extend_from_slice(value);
        while !record.len().is_multiple_of(8) {
            record.push(0);
        }
        let mut ext = Vec::new();
        ext.extend_from_slice(&((8 + record.len()) as u32).to_le_bytes());
        ext.extend_from_slice(&1u32.to_le_bytes());
        ext.extend_from_slice(&record);
        ext
    }

    #[test]
    fn parses_the_security_context_linux_sends() {
        let ext = secctx_extension(b"security.selinux", b"system_u:object_r:tmp_t:s0\0");
        let parsed = parse_security_context(&ext).unwrap().unwrap();
        assert_eq!(parsed.name.as_bytes(), b"security.selinux");
        assert_eq!(parsed.value, b"system_u:object_r:tmp_t:s0\0");
    }

    #[test]
    fn an_empty_header_means_no_label() {
        let mut ext = 8u32.to_le_bytes().to_vec();
        ext.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_security_context(&ext).unwrap(), None);
        assert_eq!(parse_security_context(&[]).unwrap(), None);
    }

    #[test]
    fn malformed_security_contexts_are_einval() {
        let good = secctx_extension(b"security.selinux", b"x");
        let errno = |ext: &[u8]| {
            parse_security_context(ext)
                .err()
                .and_then(|e| e.raw_os_error())
        };
        // Truncated anywhere.
        for cut in [3, 8, 12, 20, good.len() - 8] {
            assert_eq!(errno(&good[..cut]), Some(libc::EINVAL), "cut at {cut}");
        }
        // Total size larger than what came.
        let mut big = good.clone();
        big[..4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(errno(&big), Some(libc::EINVAL));
        // Two contexts (Linux never sends them).
        let mut two = good.clone();
        two[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(errno(&two), Some(libc::EINVAL));
        // Value longer than the record.
        let mut long = good.clone();
        long[8..12].copy_from_slice(&500u32.to_le_bytes());
        assert_eq!(errno(&long), Some(libc::EINVAL));
        // Outside the security namespace.
        assert_eq!(
            errno(&secctx_extension(b"trusted.overlay", b"x")),
            Some(libc::EINVAL)
        );
        // Name without a NUL.
        let mut unterminated = good.clone();
        let end = unterminated.len();
        for byte in &mut unterminated[16..end] {
            *byte = b'a';
        }
        assert_eq!(errno(&unterminated), Some(libc::EINVAL));
    }

    #[test]
    fn extensions_are_split_off_by_total_extlen() {
        let header = InHeader {
            padding: 2,
            ..Default::default()
        };
        let body = [1u8; 24];
        let (args, ext) = split_extensions(&header, &body).unwrap();
        assert_eq!((args.len(), ext.len()), (8, 16));
        let header = InHeader {
            padding: 4,
            ..Default::default()
        };
        assert!(split_extensions(&header, &body).is_err());
    }

    #[test]
    fn init_flag_names() {
        assert_eq!(init_flags::describe(0), "none");
        assert_eq!(
            init_flags::describe(init_flags::POSIX_ACL | init_flags::SETXATTR_EXT),
            "POSIX_ACL, SETXATTR_EXT"
        );
    }
}
