//! Encoding replies: what a handler answers, and how it lands in the reply segments.
//!
//! Handlers return an [`Answer`]; [`finish`] writes the `fuse_out_header` and the body at the
//! start of the reply segments, or only the header for an error. Entry, attribute and open
//! replies are built in one place each ([`entry`], [`attr`], [`open_out`]), which is where
//! reply extensions (a version-table slot, a passthrough backing id) go.

use std::io;
use std::mem::size_of;
use std::time::Duration;

use arrayvec::ArrayVec;
use fuse_backend_rs::abi::fuse_abi::{stat64, AttrOut, EntryOut, OpenOut, OutHeader};
use fuse_backend_rs::api::filesystem::Entry;
use vm_memory::ByteValued;

use super::buffers::{Cursor, IoSegment};
use super::{DropReason, Served};

/// Reply bodies up to this size need no allocation (an entry and an open reply: 144 bytes).
const INLINE_BODY: usize = 192;

/// The bytes after the reply header.
pub(crate) enum Body {
    Inline(ArrayVec<u8, INLINE_BODY>),
    Heap(Vec<u8>),
}

impl Body {
    pub(crate) fn empty() -> Self {
        Body::Inline(ArrayVec::new())
    }

    /// A reply struct.
    pub(crate) fn of<T: ByteValued>(value: &T) -> Self {
        let mut body = Body::empty();
        body.push(value.as_slice());
        body
    }

    /// Variable-length bytes (a value, a link target, a name list).
    pub(crate) fn bytes(bytes: Vec<u8>) -> Self {
        Body::Heap(bytes)
    }

    /// Appends `bytes`.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        match self {
            Body::Inline(inline) => {
                if inline.try_extend_from_slice(bytes).is_err() {
                    let mut heap = Vec::with_capacity(inline.len() + bytes.len());
                    heap.extend_from_slice(inline);
                    heap.extend_from_slice(bytes);
                    *self = Body::Heap(heap);
                }
            }
            Body::Heap(heap) => heap.extend_from_slice(bytes),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Body::Inline(inline) => inline,
            Body::Heap(heap) => heap,
        }
    }
}

/// What a handler answers.
pub(crate) enum Answer {
    /// Success, with this body after the header.
    Body(Body),
    /// Success, with this many bytes already written after the header (READ, READDIR).
    Data(usize),
    /// The request takes no reply (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
}

impl Answer {
    /// Success with nothing after the header.
    pub(crate) fn empty() -> io::Result<Answer> {
        Ok(Answer::Body(Body::empty()))
    }

    /// Success with a reply struct.
    pub(crate) fn of<T: ByteValued>(value: &T) -> io::Result<Answer> {
        Ok(Answer::Body(Body::of(value)))
    }
}

/// The errno a reply carries for `e` (positive), as fuse-backend-rs encoded it.
pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| fuse_backend_rs::encode_io_error_kind(e.kind()))
}

/// The reply to a LOOKUP, MKNOD, MKDIR, SYMLINK, LINK (and the first half of CREATE's).
pub(crate) fn entry(entry: Entry) -> Body {
    Body::of(&EntryOut::from(entry))
}

/// The reply to a GETATTR or SETATTR.
pub(crate) fn attr(st: stat64, timeout: Duration) -> Body {
    Body::of(&AttrOut {
        attr_valid: timeout.as_secs(),
        attr_valid_nsec: timeout.subsec_nanos(),
        dummy: 0,
        attr: st.into(),
    })
}

/// The reply to an OPEN or OPENDIR (and the second half of CREATE's); `backing_id` is a FUSE
/// passthrough backing file.
pub(crate) fn open_out(fh: u64, open_flags: u32, backing_id: Option<u32>) -> OpenOut {
    OpenOut {
        fh,
        open_flags,
        passthrough: backing_id.unwrap_or_default(),
    }
}

/// Writes the reply for `answer` (an error if `answer` is one) at the start of `reply`.
pub(crate) fn finish(reply: &[IoSegment<'_>], unique: u64, answer: io::Result<Answer>) -> Served {
    match answer {
        Ok(Answer::NoReply) => Served::NoReply,
        Ok(Answer::Body(body)) => {
            let body = body.as_slice();
            match write(reply, unique, 0, body.len(), body) {
                Ok(len) => Served::Replied(len),
                Err(DropReason::NoRoomForHeader) => Served::Dropped(DropReason::NoRoomForHeader),
                Err(_) => {
                    tracing::debug!(
                        unique,
                        len = body.len(),
                        "The reply does not fit the reply buffer; answering EIO."
                    );
                    error(reply, unique, libc::EIO)
                }
            }
        }
        Ok(Answer::Data(len)) => match write(reply, unique, 0, len, &[]) {
            Ok(len) => Served::Replied(len),
            Err(_) => error(reply, unique, libc::EIO),
        },
        Err(e) => error(reply, unique, errno_of(&e)),
    }
}

/// An error reply: the header alone.
pub(crate) fn error(reply: &[IoSegment<'_>], unique: u64, errno: i32) -> Served {
    match write(reply, unique, -errno, 0, &[]) {
        Ok(len) => Served::Replied(len),
        Err(reason) => Served::Dropped(reason),
    }
}

/// Writes a header saying `body_len` bytes follow, then `body` (which may be empty when the
/// bytes are already in place). Returns the reply's length.
fn write(
    reply: &[IoSegment<'_>],
    unique: u64,
    error: i32,
    body_len: usize,
    body: &[u8],
) -> Result<usize, DropReason> {
    let mut cursor = Cursor::new(reply);
    if cursor.remaining() < size_of::<OutHeader>() {
        return Err(DropReason::NoRoomForHeader);
    }
    let len = size_of::<OutHeader>()
        .checked_add(body_len)
        .filter(|&len| len <= cursor.remaining())
        .ok_or(DropReason::ReplyTooLong)?;
    let header = OutHeader {
        len: u32::try_from(len).map_err(|_| DropReason::ReplyTooLong)?,
        error,
        unique,
    };
    // Header and body go together: on /dev/fuse each write is a whole reply.
    let mut bytes = ArrayVec::<u8, { size_of::<OutHeader>() + INLINE_BODY }>::new();
    if bytes
        .try_extend_from_slice(header.as_slice())
        .and_then(|()| bytes.try_extend_from_slice(body))
        .is_ok()
    {
        cursor
            .write_all(&bytes)
            .map_err(|_| DropReason::ReplyTooLong)?;
    } else {
        cursor
            .write_all(header.as_slice())
            .and_then(|()| cursor.write_all(body))
            .map_err(|_| DropReason::ReplyTooLong)?;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_spill_to_the_heap_when_long() {
        let mut body = Body::empty();
        body.push(&[1; 100]);
        assert!(matches!(body, Body::Inline(_)));
        body.push(&[2; 100]);
        assert!(matches!(body, Body::Heap(_)));
        assert_eq!(body.as_slice().len(), 200);
        assert_eq!(body.as_slice()[150], 2);
    }

    fn header(buf: &[u8]) -> OutHeader {
        *OutHeader::from_slice(&buf[..16]).unwrap()
    }

    #[test]
    fn replies_land_at_the_start_and_errors_replace_what_does_not_fit() {
        let mut a = vec![0u8; 10];
        let mut b = vec![0u8; 30];
        let segs = [
            IoSegment::from_mut_slice(&mut a),
            IoSegment::from_mut_slice(&mut b),
        ];
        let served = finish(&segs, 7, Ok(Answer::Body(Body::bytes(vec![9u8; 20]))));
        assert_eq!(served, Served::Replied(36));
        let mut joined = a.clone();
        joined.extend_from_slice(&b);
        assert_eq!(header(&joined).len, 36);
        assert_eq!(header(&joined).unique, 7);
        assert_eq!(&joined[16..36], &[9u8; 20]);
        // 30 bytes of body do not fit 40 bytes of room: EIO instead.
        let mut c = vec![0u8; 40];
        let segs = [IoSegment::from_mut_slice(&mut c)];
        let served = finish(&segs, 8, Ok(Answer::Body(Body::bytes(vec![1u8; 30]))));
        assert_eq!(served, Served::Replied(16));
        assert_eq!(header(&c).error, -libc::EIO);
        // No room for even a header: nothing is written.
        let mut d = vec![0u8; 15];
        let segs = [IoSegment::from_mut_slice(&mut d)];
        let served = finish(&segs, 9, Err(io::Error::from_raw_os_error(libc::ENOENT)));
        assert_eq!(served, Served::Dropped(DropReason::NoRoomForHeader));
        assert_eq!(d, vec![0u8; 15]);
    }
}
