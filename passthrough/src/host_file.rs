//! [`HostFile`]: a host descriptor that READ and WRITE move data through with `preadv` /
//! `pwritev` straight over the request's or reply's buffers.
//!
//! fuse-backend-rs's implementation for `File` builds a heap vector of iovecs per call; this one
//! keeps them on the stack (the server hands over at most [`IOV_BATCH`] buffers at a time).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use arrayvec::ArrayVec;
use fuse_backend_rs::common::file_buf::FileVolatileSlice;
use fuse_backend_rs::common::file_traits::FileReadWriteVolatile;

use crate::server::IOV_BATCH;

/// An open host file, borrowed for one request.
pub(crate) struct HostFile<'f>(BorrowedFd<'f>);

impl<'f> HostFile<'f> {
    pub(crate) fn new(fd: BorrowedFd<'f>) -> Self {
        HostFile(fd)
    }
}

/// Fills `iov` with the buffers (at most [`IOV_BATCH`]; the rest is left for another call).
/// Filled in place: the array is 4 KiB, and moving it would cost more than a small read.
fn fill_iovecs(iov: &mut ArrayVec<libc::iovec, IOV_BATCH>, bufs: &[FileVolatileSlice<'_>]) {
    for buf in bufs.iter().take(IOV_BATCH) {
        iov.push(libc::iovec {
            iov_base: buf.as_ptr().cast(),
            iov_len: buf.len(),
        });
    }
}

/// A system call's byte count, or its error.
fn done(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// An offset for the kernel: one past i64::MAX is refused as the kernel would refuse it.
fn offset(offset: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl FileReadWriteVolatile for HostFile<'_> {
    fn read_volatile(&mut self, slice: FileVolatileSlice<'_>) -> io::Result<usize> {
        // SAFETY: the slice is valid writable memory of its length (FileVolatileSlice's
        // contract); the kernel writes at most that many bytes.
        done(unsafe { libc::read(self.0.as_raw_fd(), slice.as_ptr().cast(), slice.len()) })
    }

    fn write_volatile(&mut self, slice: FileVolatileSlice<'_>) -> io::Result<usize> {
        // SAFETY: the slice is valid readable memory of its length.
        done(unsafe { libc::write(self.0.as_raw_fd(), slice.as_ptr().cast(), slice.len()) })
    }

    fn read_at_volatile(&mut self, slice: FileVolatileSlice<'_>, at: u64) -> io::Result<usize> {
        let at = offset(at)?;
        // SAFETY: as in read_volatile.
        done(unsafe { libc::pread64(self.0.as_raw_fd(), slice.as_ptr().cast(), slice.len(), at) })
    }

    fn write_at_volatile(&mut self, slice: FileVolatileSlice<'_>, at: u64) -> io::Result<usize> {
        let at = offset(at)?;
        // SAFETY: as in write_volatile.
        done(unsafe { libc::pwrite64(self.0.as_raw_fd(), slice.as_ptr().cast(), slice.len(), at) })
    }

    fn read_vectored_at_volatile(
        &mut self,
        bufs: &[FileVolatileSlice<'_>],
        at: u64,
    ) -> io::Result<usize> {
        let at = offset(at)?;
        let mut iov = ArrayVec::new();
        fill_iovecs(&mut iov, bufs);
        // SAFETY: every iovec describes a valid writable buffer (FileVolatileSlice's contract),
        // and the count matches the array.
        done(unsafe {
            libc::preadv64(
                self.0.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                at,
            )
        })
    }

    fn write_vectored_at_volatile(
        &mut self,
        bufs: &[FileVolatileSlice<'_>],
        at: u64,
    ) -> io::Result<usize> {
        let at = offset(at)?;
        let mut iov = ArrayVec::new();
        fill_iovecs(&mut iov, bufs);
        // SAFETY: every iovec describes a valid readable buffer; the count matches the array.
        done(unsafe {
            libc::pwritev64(
                self.0.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                at,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn vectored_io_goes_to_the_offsets_asked() {
        let dir = std::env::temp_dir().join(format!("berth-host-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut host = HostFile::new(file.as_fd());
        let mut a = *b"abc";
        let mut b = *b"defg";
        // SAFETY: both buffers outlive the slices and nothing else touches them.
        let out = unsafe {
            [
                FileVolatileSlice::from_mut_slice(&mut a),
                FileVolatileSlice::from_mut_slice(&mut b),
            ]
        };
        assert_eq!(host.write_vectored_at_volatile(&out, 2).unwrap(), 7);
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0abcdefg");
        let mut c = [0u8; 5];
        let mut d = [0u8; 5];
        // SAFETY: as above.
        let into = unsafe {
            [
                FileVolatileSlice::from_mut_slice(&mut c),
                FileVolatileSlice::from_mut_slice(&mut d),
            ]
        };
        assert_eq!(host.read_vectored_at_volatile(&into, 1).unwrap(), 8);
        assert!(host.read_at_volatile(into[0], u64::MAX).is_err());
        assert_eq!(&c, b"\0abcd");
        assert_eq!(&d[..3], b"efg");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
