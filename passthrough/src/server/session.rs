//! The FUSE session: INIT and DESTROY.
//!
//! A guest that starts over without unmounting (a reboot, a kexec, a crashed driver) sends
//! INIT again on a session berth still holds: what the old guest held (inodes, open files,
//! locks) is dropped first, so the new one mounts afresh on the same daemon.

use std::io;
use std::sync::atomic::Ordering;

use fuse_backend_rs::abi::fuse_abi::{
    FsOptions, InitIn, InitIn2, InitOut, FUSE_COMPAT_22_INIT_OUT_SIZE, FUSE_COMPAT_INIT_OUT_SIZE,
    KERNEL_MINOR_VERSION, KERNEL_MINOR_VERSION_INIT_22_OUT_SIZE,
    KERNEL_MINOR_VERSION_INIT_OUT_SIZE, KERNEL_VERSION,
};
use fuse_backend_rs::api::filesystem::FileSystem;
use vm_memory::ByteValued;

use super::abi::{init_flags, BUFFER_HEADER_SIZE, MAX_REQ_PAGES, MIN_READ_BUFFER};
use super::backing::INIT_PASSTHROUGH;
use super::reply::{self, Answer, Reply};
use super::request::Request;
use super::FsServer;
use berth_versions::wire::INIT_SHARED_VERSIONS;

impl FsServer {
    /// FUSE_INIT, negotiated on all 64 flag bits (fuse-backend-rs's `FsOptions` lacks some);
    /// the reply is laid out as fuse-backend-rs laid it out.
    pub(super) fn init(
        &self,
        req: &mut Request<'_, '_>,
        out: &mut Reply<'_, '_>,
    ) -> io::Result<Answer> {
        let init: InitIn = req.read()?;
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
            return reply::with(
                out,
                &InitOut {
                    major: KERNEL_VERSION,
                    minor: KERNEL_MINOR_VERSION,
                    ..Default::default()
                },
            );
        }
        let mut capable = u64::from(init.flags);
        if capable & init_flags::INIT_EXT != 0 {
            let init2: InitIn2 = req.read()?;
            capable |= u64::from(init2.flags2) << 32;
        }
        if self.initialized.load(Ordering::Acquire) {
            tracing::info!(
                "The guest started a new FUSE session without ending the last one (a reboot?): \
                 dropping the inodes, open files and locks it held."
            );
            self.reset_session();
        }
        let mut enabled = self.fs.negotiate(capable)?;
        let mut max_stack_depth = 0;
        if let Some(backing) = self.backing.get() {
            let writeback = enabled & FsOptions::WRITEBACK_CACHE.bits() != 0;
            match backing.negotiate(capable, writeback) {
                Ok(true) => {
                    enabled |= INIT_PASSTHROUGH | (capable & init_flags::INIT_EXT);
                    max_stack_depth = backing.max_stack_depth();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("Refusing FUSE_INIT: --passthrough always, but {e}.");
                    return Err(io::Error::from_raw_os_error(libc::EPROTO));
                }
            }
        }
        enabled |= self.negotiate_io_uring(capable)?;
        // The version table's reply extension: only when the transport gave the client the
        // table and the client found it (it offers the flag only then).
        let versions = self.versions_offered.load(Ordering::Acquire)
            && capable & INIT_SHARED_VERSIONS != 0
            && capable & init_flags::INIT_EXT != 0;
        if versions {
            enabled |= INIT_SHARED_VERSIONS | init_flags::INIT_EXT;
        }
        self.versions_negotiated.store(versions, Ordering::Release);
        tracing::info!(
            "FUSE_INIT {}.{}: the client offered {capable:#x}, berth enabled {enabled:#x}.",
            init.major,
            init.minor
        );
        let page_size = fuse_backend_rs::transport::pagesize() as u32;
        let max_pages = FsOptions::MAX_PAGES.bits();
        let big_writes = FsOptions::BIG_WRITES.bits();
        let mut init_out = InitOut {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: init.max_readahead,
            flags: enabled as u32,
            max_background: u16::MAX,
            congestion_threshold: (u16::MAX / 4) * 3,
            max_write: MIN_READ_BUFFER - BUFFER_HEADER_SIZE,
            time_gran: 1,
            flags2: (enabled >> 32) as u32,
            ..Default::default()
        };
        if enabled & (big_writes | max_pages) != 0 {
            init_out.max_write = u32::from(MAX_REQ_PAGES) * page_size;
        }
        if enabled & max_pages != 0 {
            init_out.max_pages = MAX_REQ_PAGES;
        }
        // `max_stack_depth` follows `flags2` (fuse-backend-rs 0.14 names it `unused[0]`).
        init_out.unused[0] = max_stack_depth;
        let bytes = init_out.as_slice();
        let len = if init.minor < KERNEL_MINOR_VERSION_INIT_OUT_SIZE {
            FUSE_COMPAT_INIT_OUT_SIZE
        } else if init.minor < KERNEL_MINOR_VERSION_INIT_22_OUT_SIZE {
            FUSE_COMPAT_22_INIT_OUT_SIZE
        } else {
            bytes.len()
        };
        self.initialized.store(true, Ordering::Release);
        out.append(&bytes[..len])?;
        reply::done()
    }

    /// FUSE_DESTROY (the guest unmounts): everything it held is dropped. Answered with a bare
    /// header, which the guest waits for.
    pub(super) fn destroy(&self) -> io::Result<Answer> {
        if let Some(backing) = self.backing.get() {
            backing.close_all();
        }
        self.fs.destroy();
        self.versions_negotiated.store(false, Ordering::Release);
        self.initialized.store(false, Ordering::Release);
        reply::done()
    }
}
