//! Packs: the immutable objects a volume's data lives in. A pack holds whole blocks, in
//! the order they were added, cut into chunks of a fixed number of blocks; each chunk is
//! stored as is or compressed on its own, and its BLAKE3 digest (of the raw bytes) is
//! kept in the manifest, so every byte fetched back is checked before it is used.

use berth_cache::manifest::{compress_chunk, decompress_chunk};
use berth_cache::Compression;
use bytes::Bytes;

use crate::buffer::LargeBuffer;
use crate::error::{Result, VolumeError};
use crate::format::{ChunkInfo, PackInfo};

/// Collects blocks for one pack.
#[derive(Debug)]
pub struct PackBuilder {
    block_size: usize,
    raw: Vec<u8>,
    /// (first volume block, blocks, first pack block)
    pub extents: Vec<(u64, u64, u64)>,
}

impl PackBuilder {
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size: block_size as usize,
            raw: Vec::new(),
            extents: Vec::new(),
        }
    }

    /// Blocks added so far.
    pub fn blocks(&self) -> u64 {
        (self.raw.len() / self.block_size) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Raw bytes added so far.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Appends the blocks `data` (whole blocks) of volume block `lba` on.
    pub fn add(&mut self, lba: u64, data: &[u8]) {
        debug_assert_eq!(data.len() % self.block_size, 0);
        let at = self.blocks();
        let blocks = (data.len() / self.block_size) as u64;
        match self.extents.last_mut() {
            Some(last) if last.0 + last.1 == lba && last.2 + last.1 == at => last.1 += blocks,
            _ => self.extents.push((lba, blocks, at)),
        }
        self.raw.extend_from_slice(data);
    }

    /// The stored object and its description (the key and id are the caller's), with the
    /// builder's extents (see [`pack_blocks`]).
    pub fn finish(
        self,
        id: u64,
        key: String,
        chunk_blocks: u32,
        compression: Compression,
    ) -> Result<FinishedPack> {
        let (object, info) = pack_blocks(
            self.raw.into(),
            self.block_size as u32,
            id,
            key,
            chunk_blocks,
            compression,
        )?;
        Ok(FinishedPack {
            object,
            info,
            extents: self.extents,
        })
    }
}

/// A built pack: the object to upload, its description, and where the builder's extents
/// landed in it (`(lba, blocks, block in the pack)`).
#[derive(Debug)]
pub struct FinishedPack {
    pub object: Bytes,
    pub info: PackInfo,
    pub extents: Vec<(u64, u64, u64)>,
}

/// Cuts `raw` (whole blocks) into chunks of `chunk_blocks`, digests each and stores it
/// compressed where that makes it smaller: the object and its description (the key and id
/// are the caller's). When no chunk compresses (random or already compressed data) the
/// object is `raw` itself, shared, not copied.
pub fn pack_blocks(
    raw: Bytes,
    block_size: u32,
    id: u64,
    key: String,
    chunk_blocks: u32,
    compression: Compression,
) -> Result<(Bytes, PackInfo)> {
    let raw_blocks = raw.len() as u64 / u64::from(block_size);
    let chunk_bytes = chunk_blocks as usize * block_size as usize;
    let mut chunks = Vec::with_capacity(raw.len().div_ceil(chunk_bytes.max(1)));
    // Stored back to back. The object is `raw` itself until a chunk compresses; from then
    // on it is built in one buffer that each compressed chunk is appended to and dropped,
    // so packing holds at most the raw bytes, the object and one chunk's output.
    let mut built: Option<LargeBuffer> = None;
    let mut offset = 0u64;
    for chunk in raw.chunks(chunk_bytes.max(1)) {
        let digest = *blake3::hash(chunk).as_bytes();
        let packed = match compression {
            Compression::None => None,
            other => Some(compress_chunk(other, chunk).map_err(VolumeError::store)?),
        }
        .filter(|p| p.len() < chunk.len());
        if packed.is_some() && built.is_none() {
            let mut object = LargeBuffer::with_capacity(raw.len())?;
            object.push(&raw[..offset as usize]);
            built = Some(object);
        }
        let stored = packed.as_deref().unwrap_or(chunk);
        // Never more than `raw`: each stored chunk is at most its raw chunk.
        if let Some(object) = built.as_mut() {
            if !object.push(stored) {
                return Err(VolumeError::Invalid(
                    "a pack object outgrew its raw bytes".into(),
                ));
            }
        }
        chunks.push(ChunkInfo {
            offset,
            stored_len: stored.len() as u32,
            compressed: packed.is_some(),
            digest,
        });
        offset += stored.len() as u64;
    }
    // Pages of the object's buffer past its end were never touched: no need to shrink it.
    let object = built.map_or(raw, LargeBuffer::freeze);
    Ok((
        object,
        PackInfo {
            id,
            key,
            raw_blocks,
            chunk_blocks,
            chunks,
        },
    ))
}

/// The raw bytes of chunks `first..first + count` of `pack`, from `stored` (their stored
/// bytes, as one range of the object), each checked against its digest.
pub fn decode_chunks(
    pack: &PackInfo,
    first: usize,
    count: usize,
    stored: &[u8],
    compression: Compression,
    block_size: u32,
) -> Result<Vec<u8>> {
    let corrupt = |problem: String| VolumeError::Corrupt {
        object: pack.key.clone(),
        problem,
    };
    let base = pack
        .chunks
        .get(first)
        .map(|c| c.offset)
        .ok_or_else(|| corrupt(format!("chunk {first} is not in the pack")))?;
    let mut out = Vec::new();
    for index in first..first + count {
        let chunk = pack
            .chunks
            .get(index)
            .ok_or_else(|| corrupt(format!("chunk {index} is not in the pack")))?;
        let start = (chunk.offset - base) as usize;
        let piece = stored
            .get(start..start + chunk.stored_len as usize)
            .ok_or_else(|| corrupt(format!("chunk {index} is cut short")))?;
        let range = pack.chunk_range(index);
        let raw_len = ((range.end - range.start) * u64::from(block_size)) as usize;
        let raw = if chunk.compressed {
            decompress_chunk(compression, piece, raw_len)
                .map_err(|e| corrupt(format!("chunk {index} does not decompress: {e}")))?
        } else {
            piece.to_vec()
        };
        if raw.len() != raw_len {
            return Err(corrupt(format!(
                "chunk {index} holds {} bytes instead of {raw_len}",
                raw.len()
            )));
        }
        let digest = blake3::hash(&raw);
        if digest.as_bytes() != &chunk.digest {
            return Err(corrupt(format!(
                "chunk {index} failed verification (expected digest {}, got {})",
                crate::format::hex(&chunk.digest),
                digest.to_hex()
            )));
        }
        out.extend_from_slice(&raw);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_round_trip_and_a_flipped_byte_is_caught() {
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let mut builder = PackBuilder::new(512);
            let noise: Vec<u8> = (0..512 * 5).map(|i| (i * 7919 % 251) as u8).collect();
            builder.add(10, &noise[..1024]);
            builder.add(12, &noise[1024..]);
            builder.add(100, &vec![0u8; 512 * 3]);
            assert_eq!(builder.extents, vec![(10, 5, 0), (100, 3, 5)]);
            let raw = builder.raw().to_vec();
            let finished = builder.finish(1, "p".into(), 2, compression).unwrap();
            let (object, info) = (finished.object, finished.info);
            assert_eq!(finished.extents, vec![(10, 5, 0), (100, 3, 5)]);
            assert_eq!(info.raw_blocks * 512, raw.len() as u64);
            assert_eq!(info.chunks.len(), 4);
            // The zero chunks compress (but with no compression).
            assert_eq!(
                info.chunks.iter().any(|c| c.compressed),
                compression != Compression::None
            );
            let all = decode_chunks(&info, 0, 4, &object, compression, 512).unwrap();
            assert_eq!(all, raw);
            let second = &object[info.chunks[1].offset as usize..];
            let two = decode_chunks(&info, 1, 2, second, compression, 512).unwrap();
            assert_eq!(two, raw[1024..3072]);
            let mut bad = object.to_vec();
            let at = info.chunks[2].offset as usize + 3;
            bad[at] ^= 0x40;
            let err = decode_chunks(&info, 0, 4, &bad, compression, 512).unwrap_err();
            assert!(err.to_string().contains("`p`"), "{err}");
        }
    }

    #[test]
    fn a_pack_of_incompressible_chunks_is_its_raw_bytes_and_reads_back() {
        // xorshift64: no repeats LZ4 could find.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..512 * 7)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        for compression in [Compression::None, Compression::Lz4] {
            let mut builder = PackBuilder::new(512);
            builder.add(0, &noise);
            let finished = builder.finish(3, "q".into(), 2, compression).unwrap();
            assert_eq!(finished.object, noise, "stored as they are, in order");
            let info = finished.info;
            assert_eq!(info.chunks.len(), 4);
            assert!(info.chunks.iter().all(|c| !c.compressed));
            let offsets: Vec<u64> = info.chunks.iter().map(|c| c.offset).collect();
            assert_eq!(offsets, vec![0, 1024, 2048, 3072]);
            assert_eq!(info.chunks[3].stored_len, 512, "the last chunk is short");
            let all = decode_chunks(&info, 0, 4, &finished.object, compression, 512).unwrap();
            assert_eq!(all, noise);
        }
    }
}
