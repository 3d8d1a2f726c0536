//! Request and reply bytes as a transport hands them over: the untrusted edge of the server.
//!
//! A transport describes a request as readable [`IoSegment`]s and the room for its reply as
//! writable ones: guest memory it has checked (virtio), or berth's own buffers (/dev/fuse, and
//! later io_uring ring buffers). Everything the server reads from a request or writes into a
//! reply goes through a [`Cursor`], which never leaves its segments, computes every length
//! with checked or saturating arithmetic, and accesses memory only with volatile copies or
//! system calls: a guest may change its memory while berth reads it.
//!
//! READ and WRITE data never pass through a buffer of berth's: [`ReplyData`] and
//! [`RequestData`] hand the host file the segments themselves (`preadv` / `pwritev`).

use std::io;
use std::marker::PhantomData;

use arrayvec::ArrayVec;
use fuse_backend_rs::api::filesystem::{ZeroCopyReader, ZeroCopyWriter};
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;
use vm_memory::VolatileSlice;

/// Most buffers one `preadv`/`pwritev` is given (the kernel takes up to 1024). A 1 MiB request
/// in 4 KiB guest pages needs 256; longer lists are served in several calls.
pub(crate) const IOV_BATCH: usize = 256;

/// A span of memory a request is read from or a reply is written into.
#[derive(Clone, Copy, Debug)]
pub struct IoSegment<'a> {
    ptr: *mut u8,
    len: usize,
    _memory: PhantomData<&'a mut [u8]>,
}

impl<'a> IoSegment<'a> {
    /// A segment of memory the caller vouches for.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr + len)` must be mapped for `'a`: readable, and writable too if the segment
    /// is given to the server as room for a reply. Anything else touching that memory meanwhile
    /// (a guest) may change it at any time; the server only reads it with volatile copies and
    /// never trusts what it reads, so that is allowed.
    pub unsafe fn from_raw_parts(ptr: *mut u8, len: usize) -> Self {
        IoSegment {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// One of berth's own buffers.
    pub fn from_mut_slice(buf: &'a mut [u8]) -> Self {
        IoSegment {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _memory: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` bytes from `offset`, for the host file's vectored I/O. Callers keep
    /// `offset + len <= self.len`.
    fn file_slice(&self, offset: usize, len: usize) -> FileVolatileSlice<'a> {
        debug_assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: the range is inside the segment (checked by every caller, asserted above),
        // which the constructor's contract keeps mapped for 'a; the host kernel accesses it
        // through the system call, the server through volatile copies only.
        unsafe { FileVolatileSlice::from_raw_ptr(self.ptr.add(offset), len) }
    }

    /// `len` bytes from `offset` for volatile copies (same bounds as `file_slice`).
    fn volatile(&self, offset: usize, len: usize) -> VolatileSlice<'a, ()> {
        self.file_slice(offset, len).as_volatile_slice()
    }
}

/// The request or reply was shorter than the server needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Short;

/// A position in a list of segments, moving front to back.
#[derive(Clone)]
pub(crate) struct Cursor<'s, 'a> {
    segments: &'s [IoSegment<'a>],
    /// Segment holding the next byte.
    index: usize,
    /// Offset of the next byte in that segment.
    offset: usize,
    /// Bytes from the position to the end of the last segment.
    remaining: usize,
}

impl<'s, 'a> Cursor<'s, 'a> {
    pub(crate) fn new(segments: &'s [IoSegment<'a>]) -> Self {
        let remaining = segments
            .iter()
            .fold(0usize, |total, s| total.saturating_add(s.len));
        Cursor {
            segments,
            index: 0,
            offset: 0,
            remaining,
        }
    }

    /// Bytes left after the position.
    pub(crate) fn remaining(&self) -> usize {
        self.remaining
    }

    /// Walks the next `len` bytes (at most what is left) as (segment, offset, length) pieces,
    /// without moving.
    fn pieces(&self, len: usize, mut visit: impl FnMut(&IoSegment<'a>, usize, usize) -> bool) {
        let mut left = len.min(self.remaining);
        let mut offset = self.offset;
        for segment in self.segments.iter().skip(self.index) {
            if left == 0 {
                break;
            }
            let take = segment.len.saturating_sub(offset).min(left);
            if take > 0 && !visit(segment, offset, take) {
                break;
            }
            left -= take;
            offset = 0;
        }
    }

    /// Moves `len` bytes on (at most to the end).
    pub(crate) fn advance(&mut self, len: usize) {
        let mut left = len.min(self.remaining);
        self.remaining -= left;
        while left > 0 {
            let Some(segment) = self.segments.get(self.index) else {
                break;
            };
            let here = segment.len.saturating_sub(self.offset);
            if left < here {
                self.offset += left;
                return;
            }
            left -= here;
            self.index += 1;
            self.offset = 0;
        }
    }

    /// The next `len` bytes when they lie in the current segment (the common case: a header
    /// or an argument struct in one descriptor).
    fn contiguous(&self, len: usize) -> Option<VolatileSlice<'a, ()>> {
        let segment = self.segments.get(self.index)?;
        let end = self.offset.checked_add(len)?;
        (end <= segment.len).then(|| segment.volatile(self.offset, len))
    }

    /// Copies the next `out.len()` bytes into `out` and moves past them; fails, moving
    /// nowhere, if fewer are left.
    pub(crate) fn read_exact(&mut self, out: &mut [u8]) -> Result<(), Short> {
        if out.len() > self.remaining {
            return Err(Short);
        }
        if let Some(slice) = self.contiguous(out.len()) {
            slice.copy_to(out);
            self.offset += out.len();
            self.remaining -= out.len();
            return Ok(());
        }
        let mut done = 0;
        self.pieces(out.len(), |segment, offset, len| {
            segment
                .volatile(offset, len)
                .copy_to(&mut out[done..done + len]);
            done += len;
            true
        });
        self.advance(out.len());
        Ok(())
    }

    /// Copies up to `out.len()` bytes into `out`; returns how many.
    pub(crate) fn read_some(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.remaining);
        // Cannot fail: n is within what is left.
        let _ = self.read_exact(&mut out[..n]);
        n
    }

    /// Writes `bytes` at the position and moves past them; fails, writing nothing, if they do
    /// not fit.
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<(), Short> {
        if bytes.len() > self.remaining {
            return Err(Short);
        }
        if let Some(slice) = self.contiguous(bytes.len()) {
            slice.copy_from(bytes);
            self.offset += bytes.len();
            self.remaining -= bytes.len();
            return Ok(());
        }
        let mut done = 0;
        self.pieces(bytes.len(), |segment, offset, len| {
            segment
                .volatile(offset, len)
                .copy_from(&bytes[done..done + len]);
            done += len;
            true
        });
        self.advance(bytes.len());
        Ok(())
    }

    /// Moves `len` bytes on; fails, moving nowhere, if fewer are left.
    pub(crate) fn skip(&mut self, len: usize) -> Result<(), Short> {
        if len > self.remaining {
            return Err(Short);
        }
        self.advance(len);
        Ok(())
    }

    /// The next `len` bytes (at most what is left, in at most [`IOV_BATCH`] pieces) as file
    /// slices; returns how many bytes they cover.
    fn batch(&self, len: usize, out: &mut ArrayVec<FileVolatileSlice<'a>, IOV_BATCH>) -> usize {
        let mut covered = 0;
        self.pieces(len, |segment, offset, len| {
            if out.try_push(segment.file_slice(offset, len)).is_err() {
                return false;
            }
            covered += len;
            true
        });
        covered
    }

    /// Moves up to `count` bytes between the segments and a host file: `io` is called with
    /// batches of file slices and the number of bytes moved before them, and returns how many
    /// it moved. Stops at the first short transfer (the end of the file for a read). An error
    /// after some bytes moved ends the transfer with what moved, as a short read would.
    fn transfer(
        &mut self,
        count: usize,
        mut io: impl FnMut(&[FileVolatileSlice<'a>], u64) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut done = 0usize;
        while done < count {
            let mut batch = ArrayVec::new();
            let covered = self.batch(count - done, &mut batch);
            if covered == 0 {
                break;
            }
            let moved = match io(&batch, done as u64) {
                Ok(moved) => moved.min(covered),
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            };
            self.advance(moved);
            done += moved;
            if moved < covered {
                break;
            }
        }
        Ok(done)
    }
}

/// The reply's data part: what READ's host file data and directory entries are written into.
pub(crate) struct ReplyData<'c, 's, 'a> {
    cursor: &'c mut Cursor<'s, 'a>,
    written: usize,
}

impl<'c, 's, 'a> ReplyData<'c, 's, 'a> {
    pub(crate) fn new(cursor: &'c mut Cursor<'s, 'a>) -> Self {
        ReplyData { cursor, written: 0 }
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.written
    }

    /// Room left.
    pub(crate) fn remaining(&self) -> usize {
        self.cursor.remaining()
    }

    /// Appends `bytes`; fails, writing nothing, if they do not fit.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> Result<(), Short> {
        self.cursor.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }
}

impl ZeroCopyWriter for ReplyData<'_, '_, '_> {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        if count > self.cursor.remaining() {
            // fuse-backend-rs refused this the same way (the guest gets EIO).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the reply buffer is smaller than the data asked for",
            ));
        }
        let moved = self.cursor.transfer(count, |bufs, done| {
            let at = off
                .checked_add(done)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            f.read_vectored_at_volatile(bufs, at)
        })?;
        self.written += moved;
        Ok(moved)
    }

    fn available_bytes(&self) -> usize {
        self.cursor.remaining()
    }
}

impl io::Write for ReplyData<'_, '_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.cursor.remaining());
        // Cannot fail: n fits.
        let _ = self.append(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The request's data part: what WRITE hands the host file.
pub(crate) struct RequestData<'c, 's, 'a> {
    cursor: &'c mut Cursor<'s, 'a>,
}

impl<'c, 's, 'a> RequestData<'c, 's, 'a> {
    pub(crate) fn new(cursor: &'c mut Cursor<'s, 'a>) -> Self {
        RequestData { cursor }
    }
}

impl ZeroCopyReader for RequestData<'_, '_, '_> {
    /// Writes up to `count` bytes, fewer if the request carries fewer (as fuse-backend-rs did).
    fn read_to(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        self.cursor.transfer(count, |bufs, done| {
            let at = off
                .checked_add(done)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            f.write_vectored_at_volatile(bufs, at)
        })
    }
}

impl io::Read for RequestData<'_, '_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.cursor.read_some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(bufs: &mut [Vec<u8>]) -> Vec<IoSegment<'_>> {
        bufs.iter_mut()
            .map(|b| IoSegment::from_mut_slice(b))
            .collect()
    }

    #[test]
    fn reads_and_writes_cross_segments_and_skip_empty_ones() {
        let mut bufs = vec![vec![0u8; 3], vec![], vec![0u8; 2], vec![0u8; 5]];
        let segs = segments(&mut bufs);
        let mut w = Cursor::new(&segs);
        assert_eq!(w.remaining(), 10);
        w.write_all(b"abcd").unwrap();
        w.write_all(b"efghij").unwrap();
        assert_eq!(w.write_all(b"k"), Err(Short));
        let mut r = Cursor::new(&segs);
        let mut out = [0u8; 4];
        r.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"abcd");
        r.skip(1).unwrap();
        let mut rest = [0u8; 8];
        assert_eq!(r.read_some(&mut rest), 5);
        assert_eq!(&rest[..5], b"fghij");
        assert_eq!(r.read_exact(&mut out[..1]), Err(Short));
        assert_eq!(r.skip(1), Err(Short));
    }

    #[test]
    fn a_short_read_moves_nothing() {
        let mut bufs = vec![vec![1u8; 4]];
        let segs = segments(&mut bufs);
        let mut r = Cursor::new(&segs);
        let mut out = [0u8; 5];
        assert_eq!(r.read_exact(&mut out), Err(Short));
        assert_eq!(r.remaining(), 4);
    }

    #[test]
    fn file_data_moves_through_the_segments_in_batches() {
        let dir = tempfile_dir();
        let path = dir.join("data");
        let content: Vec<u8> = (0..(IOV_BATCH * 3 * 7) as u32).map(|i| i as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        // More pieces than one batch holds: 3 * IOV_BATCH segments of 7 bytes, plus a header.
        let mut bufs = vec![vec![0u8; 16]];
        bufs.extend((0..IOV_BATCH * 3).map(|_| vec![0u8; 7]));
        let segs = segments(&mut bufs);
        let mut cursor = Cursor::new(&segs);
        cursor.skip(16).unwrap();
        let mut data = ReplyData::new(&mut cursor);
        let n = data.write_from(&mut file, content.len() - 5, 5).unwrap();
        assert_eq!(n, content.len() - 5);
        assert_eq!(data.written(), n);
        let joined: Vec<u8> = bufs[1..].concat();
        assert_eq!(&joined[..n], &content[5..]);
        // Asking for more than the room is refused, as before.
        let mut small = vec![vec![0u8; 4]];
        let segs = segments(&mut small);
        let mut cursor = Cursor::new(&segs);
        let mut data = ReplyData::new(&mut cursor);
        assert!(data.write_from(&mut file, 5, 0).is_err());
        // At the end of the file a read is short and stops.
        let mut bufs = vec![vec![0u8; 8]; 4];
        let segs = segments(&mut bufs);
        let mut cursor = Cursor::new(&segs);
        let mut data = ReplyData::new(&mut cursor);
        let at = (content.len() - 10) as u64;
        assert_eq!(data.write_from(&mut file, 32, at).unwrap(), 10);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn request_data_writes_what_the_request_carries() {
        let dir = tempfile_dir();
        let path = dir.join("out");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut bufs = vec![b"xyz".to_vec(), b"0123".to_vec()];
        let segs = segments(&mut bufs);
        let mut cursor = Cursor::new(&segs);
        cursor.skip(1).unwrap();
        let mut data = RequestData::new(&mut cursor);
        // More is asked than the request holds: what is there is written.
        assert_eq!(data.read_to(&mut file, 100, 2).unwrap(), 6);
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0yz0123");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "berth-buffers-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
