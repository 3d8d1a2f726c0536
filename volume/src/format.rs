//! What a volume keeps in its bucket, and how it is encoded:
//!
//! ```text
//! PREFIX/volume.json              identity and geometry (written once)
//! PREFIX/manifests/<version>      the block map, version by version (binary, below)
//! PREFIX/packs/<id>-<session>     immutable data: chunks of whole blocks, each digested
//! PREFIX/snapshots/<name>         a full manifest kept under a name
//! PREFIX/clones/<volume id>       a clone made from one of the snapshots
//! PREFIX/lease                    who writes the volume now (JSON, conditional writes)
//! ```
//!
//! A manifest is either *full* (every mapped extent and every pack they use) or a
//! *delta* over the version before it (the new packs, and the extents that changed, with
//! `None` for blocks that now read as zeros). Loading a version walks back to the last full
//! one. The encoding is a fixed header, a zstd-compressed body and a BLAKE3 digest of
//! everything before it, so a damaged object is refused with its name, never half-used.

use berth_cache::manifest::{compress_chunk, decompress_chunk};
use berth_cache::Compression;
use serde::{Deserialize, Serialize};

use crate::error::{Result, VolumeError};
use crate::extent_map::Advance;

/// `volume.json`: what a volume is. Written once, when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// Format of the volume's objects.
    pub format: u32,
    /// Random id (hex), also stored in every manifest.
    pub id: String,
    /// Size in bytes (a multiple of `block_size`).
    pub size: u64,
    pub block_size: u32,
    /// Raw bytes per digested chunk of a pack.
    pub chunk_size: u32,
    /// How pack chunks are compressed.
    pub compression: Compression,
    pub created_ms: i64,
    /// The volume this one was cloned from, if any.
    #[serde(default)]
    pub parent: Option<CloneSource>,
}

/// Where a clone came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSource {
    /// The source volume's prefix in the same bucket.
    pub prefix: String,
    pub snapshot: String,
}

/// `clones/<id>` in a source volume: a clone that uses the packs of one of its snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRecord {
    pub prefix: String,
    pub snapshot: String,
    pub created_ms: i64,
}

pub const VOLUME_FORMAT: u32 = 1;

impl VolumeConfig {
    pub fn parse(object: &str, data: &[u8]) -> Result<Self> {
        let config: VolumeConfig =
            serde_json::from_slice(data).map_err(|e| VolumeError::Corrupt {
                object: object.to_string(),
                problem: e.to_string(),
            })?;
        let bad = |problem: String| VolumeError::Corrupt {
            object: object.to_string(),
            problem,
        };
        if config.format != VOLUME_FORMAT {
            return Err(bad(format!(
                "format {} is not the one this berth reads ({VOLUME_FORMAT})",
                config.format
            )));
        }
        if !config.block_size.is_power_of_two() || !(512..=4096).contains(&config.block_size) {
            return Err(bad(format!(
                "block size {} is not usable",
                config.block_size
            )));
        }
        if config.size == 0 || !config.size.is_multiple_of(u64::from(config.block_size)) {
            return Err(bad(format!(
                "size {} is not a positive multiple of the block size",
                config.size
            )));
        }
        if !config.chunk_size.is_power_of_two()
            || config.chunk_size < config.block_size
            || config.chunk_size > 16 << 20
        {
            return Err(bad(format!(
                "chunk size {} is not usable",
                config.chunk_size
            )));
        }
        if parse_id(&config.id).is_none() {
            return Err(bad(format!("id `{}` is not 32 hex digits", config.id)));
        }
        Ok(config)
    }

    pub fn id_bytes(&self) -> [u8; 16] {
        parse_id(&self.id).unwrap_or_default()
    }

    pub fn blocks(&self) -> u64 {
        self.size / u64::from(self.block_size)
    }

    pub fn chunk_blocks(&self) -> u32 {
        self.chunk_size / self.block_size
    }
}

/// 16 random bytes.
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let mut filled = 0;
    while filled < id.len() {
        // SAFETY: writes at most `id.len() - filled` bytes into `id`, which outlives the call.
        let n = unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), id.len() - filled, 0) };
        if n <= 0 {
            // getrandom cannot really fail here; fall back on time and pid.
            let now = now_ms() as u128 ^ (u128::from(std::process::id()) << 64);
            return now.to_le_bytes();
        }
        filled += n as usize;
    }
    id
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_id(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `lease`: who writes the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The writer's session (hex); empty when released.
    pub session: String,
    pub host: String,
    pub pid: u32,
    /// Bumped by every acquisition, renewal, release and break.
    pub generation: u64,
    /// When the holder last renewed, by its clock.
    pub renewed_ms: i64,
    pub ttl_ms: i64,
    /// Why it was released or broken (`released`, `broken by …`).
    #[serde(default)]
    pub note: String,
}

impl LeaseRecord {
    pub fn parse(object: &str, data: &[u8]) -> Result<Self> {
        serde_json::from_slice(data).map_err(|e| VolumeError::Corrupt {
            object: object.to_string(),
            problem: e.to_string(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn is_free(&self) -> bool {
        self.session.is_empty()
    }

    pub fn expires_ms(&self) -> i64 {
        self.renewed_ms.saturating_add(self.ttl_ms)
    }

    pub fn holder(&self) -> String {
        format!(
            "host {} pid {} (session {})",
            self.host, self.pid, self.session
        )
    }
}

/// Where a block lives in the bucket: block `block` of the raw data of pack `pack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackLoc {
    pub pack: u64,
    pub block: u64,
}

impl Advance for PackLoc {
    fn advance(&self, blocks: u64) -> Self {
        PackLoc {
            pack: self.pack,
            block: self.block + blocks,
        }
    }
}

/// One digested chunk of a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Where its stored bytes start in the pack object.
    pub offset: u64,
    pub stored_len: u32,
    /// Stored compressed with the volume's compression (else as is).
    pub compressed: bool,
    /// BLAKE3 of the raw bytes.
    pub digest: [u8; 32],
}

/// A pack: an immutable object holding whole blocks, cut into chunks of
/// `chunk_blocks` blocks (the last may be shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackInfo {
    pub id: u64,
    /// Object name, relative to the bucket (a clone's packs may live under its source).
    pub key: String,
    pub raw_blocks: u64,
    pub chunk_blocks: u32,
    pub chunks: Vec<ChunkInfo>,
}

impl PackInfo {
    pub fn stored_size(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.offset + u64::from(c.stored_len))
    }

    /// Raw blocks of chunk `index`.
    pub fn chunk_range(&self, index: usize) -> std::ops::Range<u64> {
        let start = index as u64 * u64::from(self.chunk_blocks);
        start..(start + u64::from(self.chunk_blocks)).min(self.raw_blocks)
    }

    /// The chunks holding pack blocks `block..block + blocks`.
    pub fn chunks_of(&self, block: u64, blocks: u64) -> impl Iterator<Item = usize> {
        let per = u64::from(self.chunk_blocks.max(1));
        let last = (block + blocks.max(1) - 1) / per;
        ((block / per)..=last).map(|c| c as usize)
    }

    fn validate(&self, object: &str) -> Result<()> {
        let bad = |problem: String| VolumeError::Corrupt {
            object: object.to_string(),
            problem,
        };
        if self.chunk_blocks == 0 {
            return Err(bad(format!("pack {} has chunks of 0 blocks", self.id)));
        }
        let expected = self.raw_blocks.div_ceil(u64::from(self.chunk_blocks));
        if self.chunks.len() as u64 != expected {
            return Err(bad(format!(
                "pack {} lists {} chunks for {} blocks",
                self.id,
                self.chunks.len(),
                self.raw_blocks
            )));
        }
        let mut at = 0u64;
        for (i, chunk) in self.chunks.iter().enumerate() {
            if chunk.offset != at {
                return Err(bad(format!("pack {} chunk {i} is out of place", self.id)));
            }
            at += u64::from(chunk.stored_len);
        }
        Ok(())
    }
}

/// Full or delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    Full,
    Delta,
}

/// A manifest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub kind: ManifestKind,
    pub version: u64,
    /// Version this delta applies to (`version - 1`); 0 for a full manifest.
    pub base_version: u64,
    pub volume_id: [u8; 16],
    /// The writer's session.
    pub session: [u8; 16],
    pub lease_generation: u64,
    /// The writer's log position this version includes everything up to.
    pub wal_epoch: u32,
    pub wal_seq: u64,
    pub size: u64,
    pub block_size: u32,
    /// The next pack id the writer would use.
    pub next_pack_id: u64,
    pub written_ms: i64,
    /// Full: every pack an extent uses. Delta: the packs it adds.
    pub packs: Vec<PackInfo>,
    /// Full: every mapped extent. Delta: what changed (`None`: reads as zeros now).
    pub extents: Vec<(u64, u64, Option<PackLoc>)>,
}

const MAGIC: &[u8; 8] = b"BERTHVMF";
const MANIFEST_FORMAT: u32 = 1;
const HEADER_LEN: usize = 136;
/// Largest decoded body accepted (a bound on what a hostile object can make us allocate).
const MAX_BODY: u64 = 4 << 30;

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    object: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(VolumeError::Corrupt {
                object: self.object.to_string(),
                problem: format!("it ends early (wanted {n} bytes at {})", self.at),
            });
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }
}

impl Manifest {
    /// The encoded object.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Writer(Vec::new());
        body.u32(self.packs.len() as u32);
        for pack in &self.packs {
            body.u64(pack.id);
            body.u16(pack.key.len() as u16);
            body.bytes(pack.key.as_bytes());
            body.u64(pack.raw_blocks);
            body.u32(pack.chunk_blocks);
            body.u32(pack.chunks.len() as u32);
            for chunk in &pack.chunks {
                body.u64(chunk.offset);
                body.u32(chunk.stored_len);
                body.u8(u8::from(chunk.compressed));
                body.bytes(&chunk.digest);
            }
        }
        body.u64(self.extents.len() as u64);
        for &(start, len, loc) in &self.extents {
            body.u64(start);
            body.u64(len);
            match loc {
                Some(loc) => {
                    body.u8(1);
                    body.u64(loc.pack);
                    body.u64(loc.block);
                }
                None => body.u8(0),
            }
        }
        let raw_len = body.0.len() as u64;
        let stored = compress_chunk(Compression::Zstd, &body.0).unwrap_or_else(|_| body.0.clone());
        let compressed = stored.len() < body.0.len();
        let stored = if compressed { stored } else { body.0 };
        let mut out = Writer(Vec::with_capacity(HEADER_LEN + stored.len() + 32));
        out.bytes(MAGIC);
        out.u32(MANIFEST_FORMAT);
        out.u8(match self.kind {
            ManifestKind::Full => 0,
            ManifestKind::Delta => 1,
        });
        out.u8(u8::from(compressed));
        out.u16(0);
        out.u64(self.version);
        out.u64(self.base_version);
        out.bytes(&self.volume_id);
        out.bytes(&self.session);
        out.u64(self.lease_generation);
        out.u32(self.wal_epoch);
        out.u32(0);
        out.u64(self.wal_seq);
        out.u64(self.size);
        out.u32(self.block_size);
        out.u32(0);
        out.u64(self.next_pack_id);
        out.u64(self.written_ms as u64);
        out.u64(raw_len);
        out.u64(stored.len() as u64);
        debug_assert_eq!(out.0.len(), HEADER_LEN);
        out.bytes(&stored);
        let digest = blake3::hash(&out.0);
        out.bytes(digest.as_bytes());
        out.0
    }

    /// Decodes and checks the object `object`; any damage is an error naming it.
    pub fn decode(object: &str, data: &[u8]) -> Result<Self> {
        let bad = |problem: String| VolumeError::Corrupt {
            object: object.to_string(),
            problem,
        };
        if data.len() < HEADER_LEN + 32 {
            return Err(bad(format!(
                "{} bytes is too short for a manifest",
                data.len()
            )));
        }
        let (content, digest) = data.split_at(data.len() - 32);
        if blake3::hash(content).as_bytes() != digest {
            return Err(bad("its digest does not match its content".into()));
        }
        let mut r = Reader {
            data: content,
            at: 0,
            object,
        };
        if r.take(8)? != MAGIC {
            return Err(bad("it is not a berth volume manifest".into()));
        }
        let format = r.u32()?;
        if format != MANIFEST_FORMAT {
            return Err(bad(format!("manifest format {format} is not known here")));
        }
        let kind = match r.u8()? {
            0 => ManifestKind::Full,
            1 => ManifestKind::Delta,
            k => return Err(bad(format!("unknown manifest kind {k}"))),
        };
        let compressed = r.u8()? != 0;
        r.u16()?;
        let version = r.u64()?;
        let base_version = r.u64()?;
        let volume_id = r.array::<16>()?;
        let session = r.array::<16>()?;
        let lease_generation = r.u64()?;
        let wal_epoch = r.u32()?;
        r.u32()?;
        let wal_seq = r.u64()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        r.u32()?;
        let next_pack_id = r.u64()?;
        let written_ms = r.u64()? as i64;
        let raw_len = r.u64()?;
        let stored_len = r.u64()?;
        if raw_len > MAX_BODY || stored_len != (content.len() - HEADER_LEN) as u64 {
            return Err(bad(format!(
                "its body sizes ({raw_len} raw, {stored_len} stored) are impossible"
            )));
        }
        let stored = r.take(stored_len as usize)?;
        let body = if compressed {
            decompress_chunk(Compression::Zstd, stored, raw_len as usize)
                .map_err(|e| bad(format!("its body does not decompress: {e}")))?
        } else {
            stored.to_vec()
        };
        if body.len() as u64 != raw_len {
            return Err(bad("its body has the wrong length".into()));
        }
        let mut r = Reader {
            data: &body,
            at: 0,
            object,
        };
        let pack_count = r.u32()?;
        let mut packs = Vec::new();
        for _ in 0..pack_count {
            let id = r.u64()?;
            let key_len = r.u16()? as usize;
            let key = String::from_utf8(r.take(key_len)?.to_vec())
                .map_err(|_| bad(format!("pack {id} has a key that is not UTF-8")))?;
            let raw_blocks = r.u64()?;
            let chunk_blocks = r.u32()?;
            let chunk_count = r.u32()?;
            if u64::from(chunk_count) * 45 > (body.len() - r.at) as u64 {
                return Err(bad(format!("pack {id} claims {chunk_count} chunks")));
            }
            let mut chunks = Vec::with_capacity(chunk_count as usize);
            for _ in 0..chunk_count {
                chunks.push(ChunkInfo {
                    offset: r.u64()?,
                    stored_len: r.u32()?,
                    compressed: r.u8()? != 0,
                    digest: r.array::<32>()?,
                });
            }
            let pack = PackInfo {
                id,
                key,
                raw_blocks,
                chunk_blocks,
                chunks,
            };
            pack.validate(object)?;
            packs.push(pack);
        }
        let extent_count = r.u64()?;
        if extent_count.saturating_mul(17) > (body.len() - r.at) as u64 {
            return Err(bad(format!("it claims {extent_count} extents")));
        }
        let blocks = size / u64::from(block_size.max(1));
        let mut extents = Vec::with_capacity(extent_count as usize);
        let mut last_end = 0u64;
        for i in 0..extent_count {
            let start = r.u64()?;
            let len = r.u64()?;
            let loc = match r.u8()? {
                0 => None,
                1 => Some(PackLoc {
                    pack: r.u64()?,
                    block: r.u64()?,
                }),
                k => return Err(bad(format!("extent {i} has kind {k}"))),
            };
            let end = start.checked_add(len).filter(|&e| e <= blocks && len > 0);
            if end.is_none() || start < last_end {
                return Err(bad(format!(
                    "extent {i} ([{start}, +{len}) blocks) is out of order or outside the volume"
                )));
            }
            last_end = start + len;
            extents.push((start, len, loc));
        }
        if r.at != body.len() {
            return Err(bad("it has trailing bytes".into()));
        }
        Ok(Self {
            kind,
            version,
            base_version,
            volume_id,
            session,
            lease_generation,
            wal_epoch,
            wal_seq,
            size,
            block_size,
            next_pack_id,
            written_ms,
            packs,
            extents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            kind: ManifestKind::Delta,
            version: 7,
            base_version: 6,
            volume_id: [1; 16],
            session: [2; 16],
            lease_generation: 3,
            wal_epoch: 4,
            wal_seq: 5000,
            size: 1 << 30,
            block_size: 4096,
            next_pack_id: 9,
            written_ms: 123,
            packs: vec![PackInfo {
                id: 8,
                key: "vol/packs/0000000000000008-aa".into(),
                raw_blocks: 100,
                chunk_blocks: 64,
                chunks: vec![
                    ChunkInfo {
                        offset: 0,
                        stored_len: 1000,
                        compressed: true,
                        digest: [5; 32],
                    },
                    ChunkInfo {
                        offset: 1000,
                        stored_len: 36 * 4096,
                        compressed: false,
                        digest: [6; 32],
                    },
                ],
            }],
            extents: vec![
                (0, 10, Some(PackLoc { pack: 8, block: 0 })),
                (10, 5, None),
                (100, 90, Some(PackLoc { pack: 8, block: 10 })),
            ],
        }
    }

    #[test]
    fn a_manifest_survives_encoding() {
        let m = sample();
        assert_eq!(Manifest::decode("m", &m.encode()).unwrap(), m);
    }

    #[test]
    fn any_damage_is_refused_with_the_object_name() {
        let encoded = sample().encode();
        for at in [0, 9, 40, HEADER_LEN + 3, encoded.len() - 1] {
            let mut bad = encoded.clone();
            bad[at] ^= 1;
            let err = Manifest::decode("vol/manifests/7", &bad).unwrap_err();
            assert!(err.to_string().contains("vol/manifests/7"), "{err}");
        }
        let err = Manifest::decode("x", &encoded[..100]).unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
    }

    #[test]
    fn extents_outside_the_volume_or_out_of_order_are_refused() {
        let mut m = sample();
        m.extents.push((50, 1, None));
        let err = Manifest::decode("m", &m.encode()).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
        let mut m = sample();
        m.extents = vec![(m.size / 4096, 1, None)];
        assert!(Manifest::decode("m", &m.encode()).is_err());
    }
}
