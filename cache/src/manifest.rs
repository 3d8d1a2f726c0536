//! The image manifest: which blob, how it is chunked, how each chunk is stored and
//! what each chunk must hash to.
//!
//! The stored blob is one backend object holding every chunk, in order, each
//! compressed on its own (or not at all); `chunks[i].offset`/`stored_size` is the
//! offset table into that object. Chunks are contiguous, so a run of adjacent
//! chunks is one range read.

use std::borrow::Cow;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::BlobBackend;
use crate::error::{CacheError, IoContext, Result};

/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Smallest and largest chunk sizes accepted.
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// How chunks are compressed in the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
    Lz4,
}

impl std::str::FromStr for Compression {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(CacheError::InvalidManifest(format!(
                "unknown compression `{other}`"
            ))),
        }
    }
}

/// One chunk of the blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Hex blake3 digest of the uncompressed chunk.
    pub digest: String,
    /// Offset of the stored (possibly compressed) chunk in the backend object.
    pub offset: u64,
    /// Length of the stored chunk in the backend object.
    pub stored_size: u64,
}

/// One entry of the prefetch list: a path in the image and where its data lies in the
/// uncompressed blob. The list is in priority order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchEntry {
    /// Path inside the image (for logs; the ranges are what is fetched).
    pub path: String,
    /// `[start, end)` byte ranges of the uncompressed blob.
    pub ranges: Vec<[u64; 2]>,
}

/// Describes one image: its bootstrap and its data blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Hex blake3 digest of the whole uncompressed blob; also its cache file name.
    pub blob_id: String,
    pub blob_size: u64,
    pub chunk_size: u32,
    pub compression: Compression,
    /// Backend name of the stored blob object.
    pub object: String,
    /// File name of the erofs bootstrap, beside the manifest.
    pub bootstrap: String,
    /// Hex blake3 digest of the bootstrap, checked before it is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_digest: Option<String>,
    pub chunks: Vec<ChunkEntry>,
    /// What to fetch in the background after mounting, most wanted first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch: Vec<PrefetchEntry>,
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses a 64-character hex digest.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    if !is_hex_digest(s) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Largest stored size accepted for a compressed chunk of `raw_len` bytes: above the
/// worst-case expansion of zstd and lz4 (plus lz4's size prefix), far below anything
/// that could exhaust memory.
pub fn max_stored_size(raw_len: u64) -> u64 {
    raw_len + raw_len / 128 + 1024
}

/// Whether `name` is a relative, `/`-separated path of plain components.
fn is_plain_relative_path(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && !name.bytes().any(|b| b == 0 || b.is_ascii_control())
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

impl Manifest {
    /// Number of chunks a blob of `blob_size` bytes has at `chunk_size`.
    pub fn chunk_count_for(blob_size: u64, chunk_size: u32) -> u64 {
        blob_size.div_ceil(u64::from(chunk_size.max(1)))
    }

    /// Number of chunks of the blob.
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Byte range of chunk `index` in the uncompressed blob (empty past the end).
    pub fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        let chunk_size = u64::from(self.chunk_size);
        let start = index.saturating_mul(chunk_size).min(self.blob_size);
        start..start.saturating_add(chunk_size).min(self.blob_size)
    }

    /// Chunks overlapping the byte range `range` of the uncompressed blob (clamped to
    /// the blob; empty if nothing overlaps).
    pub fn chunks_of(&self, range: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let end = range.end.min(self.blob_size);
        if range.start >= end {
            return 0..0;
        }
        let chunk_size = u64::from(self.chunk_size.max(1));
        range.start / chunk_size..(end - 1) / chunk_size + 1
    }

    /// Checks everything the engine relies on: called by [`Manifest::parse`] and
    /// [`Manifest::load`], and again by the engine before it opens a blob. The error
    /// names the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: String, problem: String| {
            Err(CacheError::InvalidManifest(format!(
                "field `{field}`: {problem}"
            )))
        };
        if self.version != MANIFEST_VERSION {
            return bad(
                "version".into(),
                format!(
                    "version {} is not supported (expected {MANIFEST_VERSION})",
                    self.version
                ),
            );
        }
        if !is_hex_digest(&self.blob_id) {
            return bad("blob_id".into(), "not a 64-digit hex blake3 digest".into());
        }
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return bad(
                "chunk_size".into(),
                format!(
                    "{} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
                    self.chunk_size
                ),
            );
        }
        // Keeps every offset computation (chunk index × chunk size, file sizes) far from
        // overflow.
        if self.blob_size > i64::MAX as u64 {
            return bad(
                "blob_size".into(),
                format!("{} is too large", self.blob_size),
            );
        }
        let expected = Self::chunk_count_for(self.blob_size, self.chunk_size);
        if self.chunks.len() as u64 != expected {
            return bad(
                "chunks".into(),
                format!(
                    "{} chunks listed, but a blob of {} bytes in chunks of {} has {expected}",
                    self.chunks.len(),
                    self.blob_size,
                    self.chunk_size
                ),
            );
        }
        let mut next_offset = 0u64;
        for (index, chunk) in self.chunks.iter().enumerate() {
            if !is_hex_digest(&chunk.digest) {
                return bad(
                    format!("chunks[{index}].digest"),
                    "not a 64-digit hex blake3 digest".into(),
                );
            }
            if chunk.offset != next_offset {
                return bad(
                    format!("chunks[{index}].offset"),
                    format!(
                        "{} does not follow the previous chunk (expected {next_offset})",
                        chunk.offset
                    ),
                );
            }
            let raw = self.chunk_range(index as u64);
            let raw_len = raw.end - raw.start;
            let size_ok = match self.compression {
                Compression::None => chunk.stored_size == raw_len,
                _ => chunk.stored_size > 0 && chunk.stored_size <= max_stored_size(raw_len),
            };
            if !size_ok {
                return bad(
                    format!("chunks[{index}].stored_size"),
                    format!(
                        "{} is impossible for a {raw_len}-byte chunk stored with {:?}",
                        chunk.stored_size, self.compression
                    ),
                );
            }
            next_offset = match chunk.offset.checked_add(chunk.stored_size) {
                Some(end) if end <= i64::MAX as u64 => end,
                _ => {
                    return bad(
                        format!("chunks[{index}].stored_size"),
                        "the chunk ends beyond any possible object size".into(),
                    )
                }
            };
        }
        if !is_plain_relative_path(&self.object) {
            return bad(
                "object".into(),
                format!("`{}` is not a relative path of plain names", self.object),
            );
        }
        if !is_plain_relative_path(&self.bootstrap) || self.bootstrap.contains('/') {
            return bad(
                "bootstrap".into(),
                format!("`{}` is not a plain file name", self.bootstrap),
            );
        }
        if let Some(digest) = &self.bootstrap_digest {
            if !is_hex_digest(digest) {
                return bad(
                    "bootstrap_digest".into(),
                    "not a 64-digit hex blake3 digest".into(),
                );
            }
        }
        for (index, entry) in self.prefetch.iter().enumerate() {
            for (at, &[start, end]) in entry.ranges.iter().enumerate() {
                if start >= end || end > self.blob_size {
                    return bad(
                        format!("prefetch[{index}].ranges[{at}]"),
                        format!(
                            "[{start}, {end}) is not a non-empty range inside the {}-byte blob",
                            self.blob_size
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Every chunk's digest, as bytes, in chunk order.
    pub fn chunk_digests(&self) -> Result<Vec<[u8; 32]>> {
        self.chunks
            .iter()
            .enumerate()
            .map(|(index, chunk)| {
                parse_digest(&chunk.digest).ok_or_else(|| {
                    CacheError::InvalidManifest(format!(
                        "field `chunks[{index}].digest`: not a digest"
                    ))
                })
            })
            .collect()
    }

    /// Chunk `index` restored from `stored`, its bytes as the backend holds them, and
    /// checked against `digest`: what every consumer does before it trusts a fetched
    /// chunk. An uncompressed chunk is `stored` itself, not a copy.
    pub fn restore_chunk<'a>(
        &self,
        index: u64,
        digest: &[u8; 32],
        stored: &'a [u8],
    ) -> Result<Cow<'a, [u8]>> {
        let raw_range = self.chunk_range(index);
        let raw_len = (raw_range.end - raw_range.start) as usize;
        let raw =
            if self.compression == Compression::None && stored.len() == raw_len {
                Cow::Borrowed(stored)
            } else {
                Cow::Owned(decompress_chunk(self.compression, stored, raw_len).map_err(
                    |message| CacheError::Decompression {
                        blob: self.blob_id.clone(),
                        chunk: index,
                        message,
                    },
                )?)
            };
        let actual = blake3::hash(&raw);
        if actual.as_bytes() != digest {
            return Err(CacheError::Verification {
                blob: self.blob_id.clone(),
                chunk: index,
                expected: blake3::Hash::from_bytes(*digest).to_hex().to_string(),
                actual: actual.to_hex().to_string(),
            });
        }
        Ok(raw)
    }

    /// Size of the stored object the chunk table describes.
    pub fn stored_size(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.offset.saturating_add(c.stored_size))
    }

    /// Checks that `backend` holds this manifest's blob at the size the chunk table
    /// describes, so that a wrong backend or a cut-short upload is refused before any
    /// chunk is read rather than failing reads one by one.
    pub fn check_stored_object(&self, backend: &dyn BlobBackend) -> Result<()> {
        let stored = backend.size(&self.object)?;
        let expected = self.stored_size();
        if stored != expected {
            return Err(CacheError::BlobSize {
                object: self.object.clone(),
                backend: backend.describe(),
                stored,
                expected,
            });
        }
        Ok(())
    }

    /// Parses and validates a manifest from its JSON text.
    pub fn parse(text: &[u8]) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(text)
            .map_err(|e| CacheError::InvalidManifest(format!("not a manifest: {e}")))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).map_err(|err| match err {
            CacheError::InvalidManifest(message) => {
                CacheError::InvalidManifest(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Writes the manifest as pretty JSON, atomically: a temporary file beside it is
    /// written and synced, then renamed over `path`, and the directory synced, so a
    /// reader (or a crash) sees the old manifest or the new one, never a torn one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| CacheError::InvalidManifest(e.to_string()))?;
        write_atomically(path, &text)
    }
}

/// Replaces `path` with `data` through a synced temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let partial = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let outcome = (|| {
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&partial, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if outcome.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    outcome.context(|| format!("writing {}", path.display()))
}

/// Compresses one chunk for storage.
pub fn compress_chunk(compression: Compression, data: &[u8]) -> Result<Vec<u8>> {
    match compression {
        Compression::None => Ok(data.to_vec()),
        Compression::Zstd => {
            zstd::bulk::compress(data, 3).context(|| "compressing a chunk with zstd".into())
        }
        Compression::Lz4 => Ok(lz4_flex::block::compress_prepend_size(data)),
    }
}

/// Restores one stored chunk; `expected_len` bounds the output.
pub fn decompress_chunk(
    compression: Compression,
    stored: &[u8],
    expected_len: usize,
) -> std::result::Result<Vec<u8>, String> {
    let data = match compression {
        Compression::None => stored.to_vec(),
        Compression::Zstd => {
            zstd::bulk::decompress(stored, expected_len).map_err(|e| e.to_string())?
        }
        Compression::Lz4 => {
            // Check the size prefix before trusting it for an allocation.
            let prefix: [u8; 4] = stored
                .get(..4)
                .and_then(|p| p.try_into().ok())
                .ok_or("the chunk is truncated")?;
            if u32::from_le_bytes(prefix) as usize != expected_len {
                return Err(format!(
                    "the chunk claims {} bytes instead of {expected_len}",
                    u32::from_le_bytes(prefix)
                ));
            }
            lz4_flex::block::decompress(&stored[4..], expected_len).map_err(|e| e.to_string())?
        }
    };
    if data.len() != expected_len {
        return Err(format!("{} bytes instead of {expected_len}", data.len()));
    }
    Ok(data)
}
