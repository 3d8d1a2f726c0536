//! The lazily fetched image target: a block image stored as a chunked, digested blob,
//! read through the cache engine ([`berth_cache::BlobHandle`]). Chunks are fetched
//! (and verified) the first time a request touches them; the data is then read from the
//! engine's cache file. Read-only: put an overlay on top to write.

use std::sync::atomic::{AtomicU64, Ordering};

use berth_cache::BlobHandle;

use crate::error::{BlockError, Result};
use crate::target::{push_extent, BlockTarget, Extent, Source, TargetInfo, WriteTicket};

/// A block image served from the cache engine.
#[derive(Debug)]
pub struct ImageTarget {
    blob: BlobHandle,
    info: TargetInfo,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ImageTarget {
    /// Serves the blob of `blob` as a read-only device of `block_size`-byte blocks (the
    /// last partial block, if any, reads as zeros past the blob's end).
    pub fn new(blob: BlobHandle, block_size: u32) -> Self {
        let blob_size = blob.manifest().blob_size;
        let block = u64::from(block_size.max(512));
        let info = TargetInfo {
            size: blob_size.div_ceil(block) * block,
            block_size: block as u32,
            read_only: true,
            discard: false,
            write_zeroes: false,
            description: format!("image:{}", blob.id()),
        };
        Self {
            blob,
            info,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The blob this image reads.
    pub fn blob(&self) -> &BlobHandle {
        &self.blob
    }

    /// Requests served without fetching, and requests that had to wait for a fetch.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

impl BlockTarget for ImageTarget {
    fn info(&self) -> &TargetInfo {
        &self.info
    }

    fn map_read(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let blob_size = self.blob.manifest().blob_size;
        let end = offset.saturating_add(len);
        let data_end = end.min(blob_size);
        if offset < data_end {
            let range = offset..data_end;
            if self.blob.is_present(range.clone()) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                // Not through the engine: tell it, so sequential readers get read-ahead.
                self.blob.note_read(range.clone());
            } else {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.blob.ensure_present(range).map_err(BlockError::Cache)?;
            }
            push_extent(
                out,
                Extent {
                    len: data_end - offset,
                    source: Source::File {
                        fd: self.blob.cache_raw_fd(),
                        offset,
                    },
                },
            );
        }
        if end > data_end.max(offset) {
            push_extent(
                out,
                Extent {
                    len: end - data_end.max(offset),
                    source: Source::Zero,
                },
            );
        }
        Ok(())
    }

    fn map_write(&self, _offset: u64, _len: u64, _out: &mut Vec<Extent>) -> Result<WriteTicket> {
        Err(BlockError::ReadOnly)
    }

    fn finish_write(&self, _ticket: WriteTicket, _written: bool, _fua: bool) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly)
    }

    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let (hits, misses) = self.hits_and_misses();
        vec![
            (
                "berth_block_cache_hits_total",
                "Image reads served from chunks already cached.",
                hits,
            ),
            (
                "berth_block_cache_misses_total",
                "Image reads that waited for chunks to be fetched.",
                misses,
            ),
        ]
    }
}
