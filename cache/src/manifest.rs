//! The image manifest: which blob, how it is chunked, how each chunk is stored and
//! what each chunk must hash to.
//!
//! The stored blob is one backend object holding every chunk, in order, each
//! compressed on its own (or not at all); `chunks[i].offset`/`stored_size` is the
//! offset table into that object. Chunks are contiguous, so a run of adjacent
//! chunks is one range read.

use std::path::Path;

use serde::{Deserialize, Serialize};

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
    pub chunks: Vec<ChunkEntry>,
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

impl Manifest {
    /// Number of chunks a blob of `blob_size` bytes has at `chunk_size`.
    pub fn chunk_count_for(blob_size: u64, chunk_size: u32) -> u64 {
        blob_size.div_ceil(u64::from(chunk_size))
    }

    /// Byte range of chunk `index` in the uncompressed blob.
    pub fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        let start = index * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.blob_size)
    }

    /// Checks everything the engine relies on; call after deserializing.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CacheError::InvalidManifest(m));
        if self.version != MANIFEST_VERSION {
            return bad(format!("version {} is not supported", self.version));
        }
        if !is_hex_digest(&self.blob_id) {
            return bad("the blob id is not a hex blake3 digest".into());
        }
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return bad(format!(
                "chunk size {} is not a power of two in range",
                self.chunk_size
            ));
        }
        let expected = Self::chunk_count_for(self.blob_size, self.chunk_size);
        if self.chunks.len() as u64 != expected {
            return bad(format!(
                "{} chunks listed, {expected} expected",
                self.chunks.len()
            ));
        }
        let mut next_offset = self.chunks.first().map_or(0, |c| c.offset);
        for (index, chunk) in self.chunks.iter().enumerate() {
            if !is_hex_digest(&chunk.digest) {
                return bad(format!("chunk {index} has an invalid digest"));
            }
            if chunk.offset != next_offset {
                return bad(format!(
                    "chunk {index} is not contiguous with the previous one"
                ));
            }
            let raw_len = self.chunk_range(index as u64).end - self.chunk_range(index as u64).start;
            if self.compression == Compression::None && chunk.stored_size != raw_len {
                return bad(format!(
                    "uncompressed chunk {index} has stored size {}",
                    chunk.stored_size
                ));
            }
            if chunk.stored_size == 0 || chunk.stored_size > 2 * u64::from(MAX_CHUNK_SIZE) {
                return bad(format!(
                    "chunk {index} has stored size {}",
                    chunk.stored_size
                ));
            }
            next_offset = chunk.offset + chunk.stored_size;
        }
        if self.object.is_empty() || self.bootstrap.is_empty() || self.bootstrap.contains('/') {
            return bad("the object or bootstrap name is empty or not a plain name".into());
        }
        Ok(())
    }

    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| CacheError::InvalidManifest(format!("{}: {e}", path.display())))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Writes the manifest as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| CacheError::InvalidManifest(e.to_string()))?;
        std::fs::write(path, text).context(|| format!("writing {}", path.display()))
    }
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
