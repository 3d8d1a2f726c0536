//! The lazily fetched image target: a block image stored as a chunked, digested blob,
//! read through the cache engine ([`berth_cache::BlobHandle`]). Chunks are fetched
//! (and verified) the first time a request touches them; the data is then read from the
//! engine's cache file. Read-only: put an overlay on top to write.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use berth_cache::{BlobHandle, CacheError};

use crate::error::{BlockError, Result};
use crate::target::{
    push_extent, BlockTarget, Completion, Extent, FetchReply, Progress, Source, TargetInfo,
    WriteTicket,
};

/// A fetch handed to the fetch threads, with where to send its outcome.
type FetchJob = (Range<u64>, FetchReply<CacheError>);

/// What a pending read of an image whose fetch threads are gone ends with.
fn fetch_threads_gone() -> BlockError {
    BlockError::UblkSetup("the image's fetch threads are gone".into())
}

/// Threads that make missing ranges present. Requests wait for them rather than fetch
/// themselves: a backend may open sockets and start threads of its own, which the
/// confined threads serving requests (ublk queues) are not allowed to do.
struct FetchPool {
    jobs: Option<Mutex<Sender<FetchJob>>>,
    threads: Vec<JoinHandle<()>>,
}

impl FetchPool {
    fn start(blob: Arc<BlobHandle>, count: usize) -> Self {
        let (sender, receiver) = channel::<FetchJob>();
        let receiver = Arc::new(Mutex::new(receiver));
        let threads = (0..count)
            .filter_map(|i| {
                let blob = blob.clone();
                let receiver: Arc<Mutex<Receiver<FetchJob>>> = receiver.clone();
                std::thread::Builder::new()
                    .name(format!("berth-blk-fetch-{i}"))
                    .spawn(move || loop {
                        let job = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((range, reply)) = job else { return };
                        reply.send(blob.ensure_present(range));
                    })
                    .map_err(|err| tracing::warn!("cannot start a fetch thread: {err}"))
                    .ok()
            })
            .collect();
        Self {
            jobs: Some(Mutex::new(sender)),
            threads,
        }
    }
}

impl Drop for FetchPool {
    fn drop(&mut self) {
        // Closing the channel ends the threads.
        self.jobs.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A block image served from the cache engine.
pub struct ImageTarget {
    blob: Arc<BlobHandle>,
    info: TargetInfo,
    hits: AtomicU64,
    misses: AtomicU64,
    fetchers: FetchPool,
}

impl std::fmt::Debug for ImageTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageTarget")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Fetch threads per image: misses of different requests are fetched side by side.
const FETCH_THREADS: usize = 4;

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
        let blob = Arc::new(blob);
        Self {
            fetchers: FetchPool::start(blob.clone(), FETCH_THREADS),
            blob,
            info,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Hands `range` to the fetch threads.
    fn send_fetch(&self, range: Range<u64>, reply: FetchReply<CacheError>) -> Result<()> {
        let sent = self.fetchers.jobs.as_ref().is_some_and(|jobs| {
            jobs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .send((range, reply))
                .is_ok()
        });
        if !sent || self.fetchers.threads.is_empty() {
            return Err(fetch_threads_gone());
        }
        Ok(())
    }

    /// Makes `range` present through the fetch threads and waits for it.
    fn fetch(&self, range: Range<u64>) -> Result<()> {
        let (reply, outcome) = channel();
        self.send_fetch(range, FetchReply::Blocked(reply))?;
        match outcome.recv() {
            Ok(result) => result.map_err(BlockError::Cache),
            Err(_) => Err(BlockError::UblkSetup(
                "a fetch thread ended without an answer".into(),
            )),
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
            // Hits and misses are counted by `start_read`, which every transport calls
            // first; a read counts again only if it has to fetch here (its chunks were
            // evicted in between).
            if self.blob.is_present(range.clone()) {
                // Not through the engine: tell it, so sequential readers get read-ahead.
                self.blob.note_read(range.clone());
            } else {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.fetch(range)?;
            }
            push_extent(
                out,
                Extent {
                    len: data_end - offset,
                    source: Source::File {
                        fd: self.blob.cache_raw_fd().map_err(BlockError::Cache)?,
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

    fn start_read(&self, offset: u64, len: u64) -> Progress {
        let data_end = offset
            .saturating_add(len)
            .min(self.blob.manifest().blob_size);
        if offset >= data_end || self.blob.is_present(offset..data_end) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Progress::Done(Ok(()));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let completion = match Completion::new() {
            Ok(completion) => completion,
            Err(err) => return Progress::Done(Err(err)),
        };
        let reply = FetchReply::Pending {
            completion: completion.clone(),
            into_block: BlockError::Cache,
            gone: fetch_threads_gone,
        };
        match self.send_fetch(offset..data_end, reply) {
            Ok(()) => Progress::Pending(completion),
            Err(err) => Progress::Done(Err(err)),
        }
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
