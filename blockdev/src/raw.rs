//! The raw target: a local file or block device, byte for byte.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{BlockError, IoContext, Result};
use crate::target::{push_extent, BlockTarget, Extent, Source, TargetInfo, WriteTicket};

// Block-device ioctls (include/uapi/linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// How to open a raw target.
#[derive(Debug, Clone)]
pub struct RawOptions {
    pub read_only: bool,
    /// Logical block size exported (a power of two from 512 to 4096; at least the
    /// device's own for a block device).
    pub block_size: u32,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
}

impl Default for RawOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            block_size: 4096,
            direct: false,
        }
    }
}

/// A file or block device served as it is.
#[derive(Debug)]
pub struct RawTarget {
    file: File,
    path: PathBuf,
    is_block_device: bool,
    info: TargetInfo,
}

fn ioctl_u64(file: &File, request: libc::c_ulong) -> std::io::Result<u64> {
    let mut value = 0u64;
    // SAFETY: the request writes one u64 into `value`, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value as *mut u64) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_int(file: &File, request: libc::c_ulong) -> std::io::Result<i32> {
    let mut value: libc::c_int = 0;
    // SAFETY: the request writes one int into `value`, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_range(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> std::io::Result<()> {
    let range = [offset, len];
    // SAFETY: the request reads two u64 (start, length) from `range`, alive across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fallocate` on `file`; the error as `io::Error`.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; arguments are plain integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes zeros over `[offset, offset + len)` of `file`: a zero-range fallocate where
/// the filesystem has one, plain zero writes otherwise.
pub(crate) fn zero_file_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        Err(err) => return Err(err),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

impl RawTarget {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: &Path, options: &RawOptions) -> Result<Self> {
        let bad = |problem: String| BlockError::BadBacking {
            path: path.display().to_string(),
            problem,
        };
        if !options.block_size.is_power_of_two() || !(512..=4096).contains(&options.block_size) {
            return Err(bad(format!(
                "the block size {} is not a power of two from 512 to 4096",
                options.block_size
            )));
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open
            .open(path)
            .context(|| format!("opening {}", path.display()))?;
        let meta = file
            .metadata()
            .context(|| format!("reading the attributes of {}", path.display()))?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            let device_block = ioctl_int(&file, BLKSSZGET)
                .context(|| format!("reading the block size of {}", path.display()))?;
            if options.block_size < device_block as u32 {
                return Err(bad(format!(
                    "its logical block size is {device_block}, larger than the {} asked for",
                    options.block_size
                )));
            }
            ioctl_u64(&file, BLKGETSIZE64)
                .context(|| format!("reading the size of {}", path.display()))?
        } else if meta.file_type().is_file() {
            meta.len()
        } else {
            return Err(bad("it is neither a regular file nor a block device".into()));
        };
        let block = u64::from(options.block_size);
        let usable = size / block * block;
        if usable == 0 {
            return Err(bad(format!("it is smaller than one block ({size} bytes)")));
        }
        if usable != size {
            tracing::warn!(
                path = %path.display(),
                "the last {} bytes are not a whole block and are not served",
                size - usable
            );
        }
        let kind = if is_block_device { "device" } else { "raw" };
        Ok(Self {
            info: TargetInfo {
                size: usable,
                block_size: options.block_size,
                read_only: options.read_only,
                discard: !options.read_only,
                write_zeroes: !options.read_only,
                description: format!("{kind}:{}", path.display()),
            },
            file,
            path: path.to_path_buf(),
            is_block_device,
        })
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .context(|| format!("syncing {}", self.path.display()))
    }
}

impl BlockTarget for RawTarget {
    fn info(&self) -> &TargetInfo {
        &self.info
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        push_extent(
            out,
            Extent {
                len,
                source: Source::File {
                    fd: self.file.as_raw_fd(),
                    offset,
                },
            },
        );
        Ok(())
    }

    fn map_write(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<WriteTicket> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.map_read(offset, len, out)?;
        Ok(WriteTicket::in_place())
    }

    fn finish_write(&self, _ticket: WriteTicket, written: bool, fua: bool) -> Result<()> {
        if written && fua {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.is_block_device {
            return ioctl_range(&self.file, BLKDISCARD, offset, len)
                .context(|| format!("discarding [{offset}, +{len}) of {}", self.path.display()));
        }
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // A filesystem without holes: discarding is only a hint, nothing to do.
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other
                .context(|| format!("punching [{offset}, +{len}) out of {}", self.path.display())),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let result = if self.is_block_device {
            ioctl_range(&self.file, BLKZEROOUT, offset, len)
        } else {
            zero_file_range(&self.file, offset, len)
        };
        result.context(|| format!("zeroing [{offset}, +{len}) of {}", self.path.display()))
    }
}
