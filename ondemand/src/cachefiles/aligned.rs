//! Page-aligned buffers: cachefiles writes what the daemon gives an object straight to
//! the backing file with direct I/O, which refuses (EINVAL) buffers, offsets and lengths
//! not aligned to the block size. Writes are made from these buffers, at page-aligned
//! offsets, in page multiples (zero-padded past the end of the data).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

/// The alignment of every offset, length and buffer written into a cache object.
pub const PAGE: usize = 4096;

/// A zeroed, page-aligned heap buffer of a page multiple.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value alone.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `len` bytes (rounded up to a page multiple, at least one).
    pub fn new(len: usize) -> Self {
        let size = len.max(1).div_ceil(PAGE) * PAGE;
        let layout = Layout::from_size_align(size, PAGE).unwrap_or_else(|_| {
            // Only a length near usize::MAX gets here.
            std::alloc::handle_alloc_error(Layout::new::<u8>())
        });
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len()` initialised (zeroed) bytes owned by us.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len()) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// The cache object `object` as a file to write at `offset`, which must be page-aligned.
/// Borrowed: the caller keeps `object` open across the writes, and dropping the result
/// does not close it.
fn object_at(object: RawFd, offset: u64) -> io::Result<ManuallyDrop<File>> {
    if !offset.is_multiple_of(PAGE as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} is not page-aligned"),
        ));
    }
    // SAFETY: `object` stays open while the result is used (the caller holds it);
    // ManuallyDrop keeps this File from closing it.
    Ok(ManuallyDrop::new(unsafe { File::from_raw_fd(object) }))
}

/// Copies `len` bytes at `offset` (page-aligned) from the file `source` into the cache
/// object `object`, in pieces of at most the buffer's length, the last one zero-padded to
/// a page multiple.
pub fn copy_into_object(
    source: &File,
    object: RawFd,
    offset: u64,
    len: u64,
    buffer: &mut AlignedBuf,
) -> io::Result<()> {
    let out = object_at(object, offset)?;
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buffer.len());
        let padded = n.div_ceil(PAGE) * PAGE;
        let slice = buffer.as_mut_slice();
        source.read_exact_at(&mut slice[..n], offset + done)?;
        slice[n..padded].fill(0);
        out.write_all_at(&slice[..padded], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Writes `data` at `offset` (page-aligned) into the cache object `object`: straight
/// from `data` where it is page-aligned in place and length, else through `scratch`
/// (allocated on first use), zero-padded to a page multiple.
pub fn write_into_object(
    object: RawFd,
    offset: u64,
    data: &[u8],
    scratch: &mut Option<AlignedBuf>,
) -> io::Result<()> {
    let out = object_at(object, offset)?;
    if (data.as_ptr() as usize).is_multiple_of(PAGE) && data.len().is_multiple_of(PAGE) {
        return out.write_all_at(data, offset);
    }
    let buffer = scratch.get_or_insert_with(|| AlignedBuf::new(data.len()));
    if buffer.len() < data.len() {
        *buffer = AlignedBuf::new(data.len());
    }
    let padded = data.len().div_ceil(PAGE) * PAGE;
    let slice = buffer.as_mut_slice();
    slice[..data.len()].copy_from_slice(data);
    slice[data.len()..padded].fill(0);
    out.write_all_at(&slice[..padded], offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_multiples_and_copies_pad_the_tail() {
        let buf = AlignedBuf::new(5000);
        assert_eq!(buf.len(), 8192);
        assert_eq!(buf.as_slice().as_ptr() as usize % PAGE, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));

        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&source, &data).unwrap();
        let target = File::create(dir.path().join("target")).unwrap();
        let mut buffer = AlignedBuf::new(4096);
        copy_into_object(
            &File::open(&source).unwrap(),
            std::os::fd::AsRawFd::as_raw_fd(&target),
            0,
            data.len() as u64,
            &mut buffer,
        )
        .unwrap();
        let copied = std::fs::read(dir.path().join("target")).unwrap();
        assert_eq!(copied.len(), 12_288, "written in whole pages");
        assert_eq!(&copied[..data.len()], &data[..]);
        assert!(copied[data.len()..].iter().all(|&b| b == 0));
        assert!(copy_into_object(
            &File::open(&source).unwrap(),
            std::os::fd::AsRawFd::as_raw_fd(&target),
            100,
            10,
            &mut buffer
        )
        .is_err());
    }

    #[test]
    fn writes_of_unaligned_data_go_through_the_scratch_buffer_padded() {
        let dir = tempfile::tempdir().unwrap();
        let target = File::create(dir.path().join("target")).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&target);
        let mut scratch = None;
        // Page-aligned in place: written as it is, no scratch buffer.
        let mut aligned = AlignedBuf::new(8192);
        aligned.as_mut_slice().fill(7);
        write_into_object(fd, 8192, aligned.as_slice(), &mut scratch).unwrap();
        assert!(scratch.is_none());
        // A tail of 5 000 bytes at an odd address: padded to two pages.
        let tail: Vec<u8> = (0..5_001u32).map(|i| (i % 251) as u8 + 1).collect();
        write_into_object(fd, 16_384, &tail[1..], &mut scratch).unwrap();
        assert!(scratch.is_some());
        let written = std::fs::read(dir.path().join("target")).unwrap();
        assert_eq!(written.len(), 16_384 + 8192);
        assert!(written[8192..16_384].iter().all(|&b| b == 7));
        assert_eq!(&written[16_384..16_384 + 5000], &tail[1..]);
        assert!(written[16_384 + 5000..].iter().all(|&b| b == 0));
        assert!(write_into_object(fd, 100, &tail, &mut scratch).is_err());
    }
}
