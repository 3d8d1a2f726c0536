//! Decoding a request: its header, fixed arguments, names and extensions, all with checked
//! lengths. Anything that does not decode is EINVAL for the guest.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::api::filesystem::Context;
use vm_memory::ByteValued;

use super::abi::{XATTR_NAME_MAX, XATTR_SIZE_MAX};
use super::buffers::{Cursor, RequestData};

/// The security context a guest sends with a new node (FUSE_SECURITY_CTX): an xattr name in
/// the `security.` namespace and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecContext {
    pub name: CString,
    pub value: Vec<u8>,
}

/// The errno of a request that does not decode.
pub(crate) fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// One request: its header and a cursor on the bytes after it.
pub(crate) struct Request<'s, 'a> {
    pub header: InHeader,
    pub ctx: Context,
    /// Where the request sits on its virtqueue, when the transport is one.
    pub origin: Option<crate::lock_wait::QueueOrigin>,
    args: Cursor<'s, 'a>,
}

impl<'s, 'a> Request<'s, 'a> {
    /// Reads the header off `bytes`; `None` when the request is shorter than one.
    pub(crate) fn new(mut bytes: Cursor<'s, 'a>) -> Option<Self> {
        let mut header = InHeader::default();
        bytes.read_exact(header.as_mut_slice()).ok()?;
        let ctx = Context {
            uid: header.uid,
            gid: header.gid,
            pid: header.pid as libc::pid_t,
        };
        Some(Request {
            header,
            ctx,
            origin: None,
            args: bytes,
        })
    }

    /// The node the request is about.
    pub(crate) fn nodeid(&self) -> u64 {
        self.header.nodeid
    }

    /// The next fixed-size argument. Read from the bytes the request carries whatever its
    /// header's length says, as fuse-backend-rs did (Linux always sends both alike).
    pub(crate) fn read<T: ByteValued + Default>(&mut self) -> io::Result<T> {
        let mut value = T::default();
        self.args
            .read_exact(value.as_mut_slice())
            .map_err(|_| einval())?;
        Ok(value)
    }

    /// The variable part after `consumed` bytes of fixed arguments: as long as the header says
    /// (`len` less the header and those arguments), and present in full.
    pub(crate) fn body(&mut self, consumed: usize) -> io::Result<Vec<u8>> {
        let len = (self.header.len as usize)
            .checked_sub(size_of::<InHeader>())
            .and_then(|len| len.checked_sub(consumed))
            .ok_or_else(einval)?;
        // The length is the guest's word: never allocate more than the request holds (the
        // header's length was checked against the request size limit already).
        if len > self.args.remaining() {
            return Err(einval());
        }
        let mut body = vec![0u8; len];
        self.args.read_exact(&mut body).map_err(|_| einval())?;
        Ok(body)
    }

    /// As [`Request::body`], refused (EINVAL) when longer than `max`: for requests whose
    /// variable part has a known bound (names, a label, an xattr value).
    pub(crate) fn bounded_body(&mut self, consumed: usize, max: usize) -> io::Result<Vec<u8>> {
        let len = (self.header.len as usize)
            .checked_sub(size_of::<InHeader>())
            .and_then(|len| len.checked_sub(consumed))
            .ok_or_else(einval)?;
        if len > max {
            return Err(einval());
        }
        self.body(consumed)
    }

    /// Up to `max` of the bytes left, however long the header says the request is.
    pub(crate) fn rest(&mut self, max: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; self.args.remaining().min(max)];
        let n = self.args.read_some(&mut bytes);
        bytes.truncate(n);
        bytes
    }

    /// Bytes left after what was read.
    pub(crate) fn remaining(&self) -> usize {
        self.args.remaining()
    }

    /// The rest of the request as data for the host file (WRITE).
    pub(crate) fn data(&mut self) -> RequestData<'_, 's, 'a> {
        RequestData::new(&mut self.args)
    }
}

/// The name at the start of `bytes`: up to its first NUL, which must be there.
pub(crate) fn name(bytes: &[u8]) -> io::Result<&CStr> {
    CStr::from_bytes_until_nul(bytes).map_err(|_| einval())
}

/// The NUL-terminated string at the start of `bytes`, and what follows its NUL.
pub(crate) fn split_cstr(bytes: &[u8]) -> io::Result<(&CStr, &[u8])> {
    let name = name(bytes)?;
    let rest = &bytes[name.to_bytes_with_nul().len()..];
    Ok((name, rest))
}

/// Two NUL-terminated names one after the other (RENAME, SYMLINK).
pub(crate) fn two_names(bytes: &[u8]) -> io::Result<(&CStr, &CStr)> {
    let (first, rest) = split_cstr(bytes)?;
    if rest.is_empty() {
        return Err(einval());
    }
    Ok((first, name(rest)?))
}

/// Splits a request body into its arguments and the extensions the header's `total_extlen`
/// (the low 16 bits of the former padding word, in 8-byte units) says follow them.
pub(crate) fn split_extensions<'b>(
    header: &InHeader,
    body: &'b [u8],
) -> io::Result<(&'b [u8], &'b [u8])> {
    let ext_len = (header.padding & 0xffff) as usize * 8;
    let args_len = body.len().checked_sub(ext_len).ok_or_else(einval)?;
    Ok(body.split_at(args_len))
}

/// The security context in a request's extensions: a `fuse_secctx_header` (total size and
/// count), then per context a `fuse_secctx` (value size), the NUL-terminated xattr name and
/// the value. Linux sends at most one. No extension at all means no label.
pub(crate) fn parse_security_context(extensions: &[u8]) -> io::Result<Option<SecContext>> {
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
        name: CString::from(name),
        value: value.to_vec(),
    }))
}

/// A little-endian u32 at `offset`; callers check that four bytes are there.
pub(crate) fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = offset.checked_add(4).and_then(|end| bytes.get(offset..end)) {
        word.copy_from_slice(src);
    }
    u32::from_le_bytes(word)
}

/// A `T` from the start of `bytes`.
pub(crate) fn struct_at<T: ByteValued>(bytes: &[u8]) -> io::Result<T> {
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
    fn names_need_their_nul() {
        assert_eq!(name(b"abc\0def").unwrap().to_bytes(), b"abc");
        assert!(name(b"abc").is_err());
        let (a, b) = two_names(b"old\0new\0\0").unwrap();
        assert_eq!((a.to_bytes(), b.to_bytes()), (&b"old"[..], &b"new"[..]));
        assert!(two_names(b"old\0").is_err());
        assert!(two_names(b"old\0new").is_err());
        assert!(two_names(b"old").is_err());
    }
}
