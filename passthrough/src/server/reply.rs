//! Encoding replies straight into the reply segments.
//!
//! A handler writes its reply body through [`Reply`] (which starts after the room for the
//! header) and says how the request ended; [`finish`] then writes the `fuse_out_header` in
//! front, or an error header alone. Entry, attribute and open replies are written in one place
//! each ([`entry`], [`attr`], [`open`]), which is where reply extensions (a version-table slot,
//! a passthrough backing id) go.

use std::io;
use std::mem::size_of;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, Attr, AttrOut, EntryOut, OpenOut, OutHeader};
use fuse_backend_rs::api::filesystem::Entry;
use vm_memory::ByteValued;

use super::buffers::{Cursor, IoSegment, ReplyData};
use super::{DropReason, Served};

/// How a handled request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Success; the body (possibly empty) is in the [`Reply`].
    Reply,
    /// The request takes no reply (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
    /// A lock wait was parked: the request is answered later, maybe by another daemon.
    Parked,
}

/// The reply being written: the room after the header.
pub(crate) struct Reply<'s, 'a> {
    body: Cursor<'s, 'a>,
    /// Room for the body when the reply started.
    capacity: usize,
    /// Whether a reply header fits at all.
    has_room: bool,
}

impl<'s, 'a> Reply<'s, 'a> {
    pub(crate) fn new(segments: &'s [IoSegment<'a>]) -> Self {
        let mut body = Cursor::new(segments);
        let has_room = body.skip(size_of::<OutHeader>()).is_ok();
        let capacity = if has_room { body.remaining() } else { 0 };
        if !has_room {
            body = Cursor::new(&[]);
        }
        Reply {
            body,
            capacity,
            has_room,
        }
    }

    /// Whether a reply header fits: a request that cannot be answered is not served.
    pub(crate) fn has_room(&self) -> bool {
        self.has_room
    }

    /// Body bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.capacity - self.body.remaining()
    }

    /// Room for the header and the body, as the transport gave it.
    pub(crate) fn total_room(&self) -> usize {
        if self.has_room {
            self.capacity + size_of::<OutHeader>()
        } else {
            0
        }
    }

    /// Appends `bytes` to the body; a body longer than the room is EIO for the guest (as
    /// fuse-backend-rs answered it), and nothing of it is written.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.body.write_all(bytes).map_err(|_| {
            tracing::debug!(
                len = bytes.len(),
                room = self.body.remaining(),
                "The reply does not fit the reply buffer; answering EIO."
            );
            io::Error::from_raw_os_error(libc::EIO)
        })
    }

    /// Appends a reply struct.
    pub(crate) fn put<T: ByteValued>(&mut self, value: &T) -> io::Result<()> {
        self.append(value.as_slice())
    }

    /// The body's room as a sink for host file data (READ) or directory entries.
    pub(crate) fn data(&mut self) -> ReplyData<'_, 's, 'a> {
        ReplyData::new(&mut self.body)
    }
}

/// Success with nothing (more) after the header.
pub(crate) fn done() -> io::Result<Answer> {
    Ok(Answer::Reply)
}

/// Success with a reply struct.
pub(crate) fn with<T: ByteValued>(out: &mut Reply<'_, '_>, value: &T) -> io::Result<Answer> {
    out.put(value)?;
    done()
}

/// The errno a reply carries for `e` (positive), as fuse-backend-rs encoded it.
pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| fuse_backend_rs::encode_io_error_kind(e.kind()))
}

/// The reply to a LOOKUP, MKNOD, MKDIR, SYMLINK, LINK (and the first half of CREATE's).
pub(crate) fn entry(out: &mut Reply<'_, '_>, entry: Entry) -> io::Result<()> {
    out.put(&EntryOut::from(entry))
}

/// The version-table extension, when the session negotiated it: after the `fuse_entry_out` or
/// `fuse_attr_out` (and after the `fuse_open_out` of CREATE and TMPFILE).
pub(crate) fn version_ext(
    out: &mut Reply<'_, '_>,
    ext: Option<berth_versions::wire::VersionExt>,
) -> io::Result<()> {
    match ext {
        Some(ext) => out.append(&ext.encode()),
        None => Ok(()),
    }
}

/// The reply to a GETATTR or SETATTR; `flags` are fuse_attr's (FUSE_ATTR_DAX).
pub(crate) fn attr(
    out: &mut Reply<'_, '_>,
    st: stat64,
    flags: u32,
    timeout: Duration,
) -> io::Result<()> {
    out.put(&AttrOut {
        attr_valid: timeout.as_secs(),
        attr_valid_nsec: timeout.subsec_nanos(),
        dummy: 0,
        attr: Attr::with_flags(st, flags),
    })
}

/// The reply to an OPEN or OPENDIR (and the second half of CREATE's); `backing_id` is a FUSE
/// passthrough backing file.
pub(crate) fn open(
    out: &mut Reply<'_, '_>,
    fh: u64,
    open_flags: u32,
    backing_id: Option<u32>,
) -> io::Result<()> {
    out.put(&OpenOut {
        fh,
        open_flags,
        passthrough: backing_id.unwrap_or_default(),
    })
}

/// Writes the header for how the request ended (`body_len` body bytes are in place after it
/// on success) at the start of `reply`.
pub(crate) fn finish(
    reply: &[IoSegment<'_>],
    unique: u64,
    answer: io::Result<Answer>,
    body_len: usize,
) -> Served {
    match answer {
        Ok(Answer::NoReply) => Served::NoReply,
        Ok(Answer::Parked) => Served::Parked,
        Ok(Answer::Reply) => match header(reply, unique, 0, body_len) {
            Ok(len) => Served::Replied(len),
            Err(DropReason::NoRoomForHeader) => Served::Dropped(DropReason::NoRoomForHeader),
            Err(_) => error(reply, unique, libc::EIO),
        },
        Err(e) => error(reply, unique, errno_of(&e)),
    }
}

/// An error reply: the header alone.
pub(crate) fn error(reply: &[IoSegment<'_>], unique: u64, errno: i32) -> Served {
    match header(reply, unique, -errno, 0) {
        Ok(len) => Served::Replied(len),
        Err(reason) => Served::Dropped(reason),
    }
}

/// Writes a header saying `body_len` bytes follow it. Returns the reply's length.
fn header(
    reply: &[IoSegment<'_>],
    unique: u64,
    error: i32,
    body_len: usize,
) -> Result<usize, DropReason> {
    let mut cursor = Cursor::new(reply);
    let len = size_of::<OutHeader>()
        .checked_add(body_len)
        .ok_or(DropReason::ReplyTooLong)?;
    if cursor.remaining() < size_of::<OutHeader>() {
        return Err(DropReason::NoRoomForHeader);
    }
    if len > cursor.remaining() {
        return Err(DropReason::ReplyTooLong);
    }
    let header = OutHeader {
        len: u32::try_from(len).map_err(|_| DropReason::ReplyTooLong)?,
        error,
        unique,
    };
    cursor
        .write_all(header.as_slice())
        .map_err(|_| DropReason::NoRoomForHeader)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_header(buf: &[u8]) -> OutHeader {
        *OutHeader::from_slice(&buf[..16]).unwrap()
    }

    #[test]
    fn replies_land_after_their_header_across_segments() {
        let mut a = vec![0u8; 10];
        let mut b = vec![0u8; 30];
        let segs = [
            IoSegment::from_mut_slice(&mut a),
            IoSegment::from_mut_slice(&mut b),
        ];
        let mut out = Reply::new(&segs);
        assert!(out.has_room());
        assert_eq!(out.total_room(), 40);
        out.append(&[9u8; 20]).unwrap();
        // Longer than what is left: refused, nothing written.
        assert_eq!(
            out.append(&[1u8; 5]).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        let written = out.written();
        assert_eq!(finish(&segs, 7, done(), written), Served::Replied(36));
        let mut joined = a.clone();
        joined.extend_from_slice(&b);
        assert_eq!(out_header(&joined).len, 36);
        assert_eq!(out_header(&joined).unique, 7);
        assert_eq!(&joined[16..36], &[9u8; 20]);
        assert_eq!(&joined[36..], &[0u8; 4]);
    }

    #[test]
    fn errors_are_a_bare_header_and_need_room_for_one() {
        let mut c = vec![0xffu8; 40];
        let segs = [IoSegment::from_mut_slice(&mut c)];
        let served = finish(&segs, 8, Err(io::Error::from_raw_os_error(libc::ENOENT)), 0);
        assert_eq!(served, Served::Replied(16));
        assert_eq!(out_header(&c).error, -libc::ENOENT);
        assert_eq!(out_header(&c).len, 16);
        let mut d = vec![0u8; 15];
        let segs = [IoSegment::from_mut_slice(&mut d)];
        assert!(!Reply::new(&segs).has_room());
        let served = finish(&segs, 9, Err(io::Error::from_raw_os_error(libc::ENOENT)), 0);
        assert_eq!(served, Served::Dropped(DropReason::NoRoomForHeader));
        assert_eq!(d, vec![0u8; 15]);
    }
}
