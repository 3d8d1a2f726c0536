//! Writing a blob in the chunked format the engine reads: a byte stream is cut into
//! fixed-size chunks, each digested (BLAKE3 of the uncompressed bytes) and stored as is
//! or compressed on its own, one after the other in a single backend object; the blob
//! id is the BLAKE3 digest of the whole uncompressed stream. Image builders of every
//! kind (erofs images in `berth-ondemand`, raw block images) produce their blob here and
//! then describe it in a [`Manifest`] saved with [`Manifest::save`] (atomically).
//!
//! ```text
//! BlobWriter::new(staging, layout)?  --write()-->  finish()  -> StagedBlob
//! StagedBlob::manifest(..)  (validated before anything is uploaded)
//! StagedBlob::upload(backend, object)
//! ```

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::backend::BlobBackend;
use crate::error::{CacheError, IoContext, Result};
use crate::manifest::{
    compress_chunk, ChunkEntry, Compression, Manifest, PrefetchEntry, MANIFEST_VERSION,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};

/// How a blob is cut and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLayout {
    /// Chunk size: a power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`].
    pub chunk_size: u32,
    pub compression: Compression,
}

impl Default for BlobLayout {
    /// 1 MiB chunks, stored uncompressed.
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            compression: Compression::None,
        }
    }
}

impl BlobLayout {
    /// Refuses a chunk size the manifest would refuse.
    pub fn check(&self) -> Result<()> {
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(CacheError::InvalidManifest(format!(
                "chunk size {} is not usable (a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE})",
                self.chunk_size
            )));
        }
        Ok(())
    }
}

/// Name of the stored object of blob `blob_id` under `prefix` (`blobs` by convention).
pub fn object_name(prefix: &str, blob_id: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        blob_id.to_string()
    } else {
        format!("{prefix}/{blob_id}")
    }
}

/// A blob cut into chunks and staged locally, ready to be described and uploaded.
#[derive(Debug)]
pub struct StagedBlob {
    /// Hex BLAKE3 digest of the uncompressed blob.
    pub blob_id: String,
    /// Size of the uncompressed blob.
    pub blob_size: u64,
    pub layout: BlobLayout,
    /// Where each stored chunk lies in the object, and its digest.
    pub chunks: Vec<ChunkEntry>,
    /// Size of the object that [`StagedBlob::upload`] stores.
    pub stored_bytes: u64,
    /// The file holding the stored object.
    stored_path: PathBuf,
    /// Whether `stored_path` is ours to delete (a compressed copy), not the caller's
    /// input file.
    owned: bool,
}

impl StagedBlob {
    /// The manifest of an image made of this blob (stored as `object`) and the
    /// bootstrap file `bootstrap` beside the manifest; validated.
    pub fn manifest(
        &self,
        object: &str,
        bootstrap: &str,
        bootstrap_digest: Option<String>,
        prefetch: Vec<PrefetchEntry>,
    ) -> Result<Manifest> {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            blob_id: self.blob_id.clone(),
            blob_size: self.blob_size,
            chunk_size: self.layout.chunk_size,
            compression: self.layout.compression,
            object: object.to_string(),
            bootstrap: bootstrap.to_string(),
            bootstrap_digest,
            chunks: self.chunks.clone(),
            prefetch,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Stores the object as `object` in `backend` (multipart where the backend does that).
    pub fn upload(&self, backend: &dyn BlobBackend, object: &str) -> Result<()> {
        backend.put_file(object, &self.stored_path)
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if self.owned {
            let _ = fs::remove_file(&self.stored_path);
        }
    }
}

/// Cuts a byte stream into chunks as it is written. Stage the stored object in a file
/// under a directory of the caller's (the object can be as large as the blob).
pub struct BlobWriter {
    layout: BlobLayout,
    stored_path: PathBuf,
    /// `None` when the stream is its own stored object and already on disk (see
    /// [`stage_blob_file`]): nothing is copied then.
    stored: Option<BufWriter<File>>,
    pending: Vec<u8>,
    blob_hasher: blake3::Hasher,
    chunks: Vec<ChunkEntry>,
    blob_size: u64,
    stored_bytes: u64,
    /// Digest and stored form of an all-zero chunk of the full chunk size, made the
    /// first time one is cut (disk images are mostly free space).
    zero_chunk: Option<(String, Vec<u8>)>,
}

/// Whether `data` holds only zeros (a block at a time, so the OR vectorizes).
fn all_zero(data: &[u8]) -> bool {
    data.chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("layout", &self.layout)
            .field("stored_path", &self.stored_path)
            .field("blob_size", &self.blob_size)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// A writer staging the stored object as a new file in `staging_dir`.
    pub fn new(staging_dir: &Path, layout: BlobLayout) -> Result<Self> {
        layout.check()?;
        fs::create_dir_all(staging_dir)
            .context(|| format!("creating {}", staging_dir.display()))?;
        let stored_path = staging_dir.join(format!(".blob.stored-{}", std::process::id()));
        let file =
            File::create(&stored_path).context(|| format!("creating {}", stored_path.display()))?;
        Ok(Self::with_sink(
            layout,
            stored_path,
            Some(BufWriter::new(file)),
        ))
    }

    fn with_sink(
        layout: BlobLayout,
        stored_path: PathBuf,
        stored: Option<BufWriter<File>>,
    ) -> Self {
        Self {
            layout,
            stored_path,
            stored,
            pending: Vec::with_capacity(layout.chunk_size as usize),
            blob_hasher: blake3::Hasher::new(),
            chunks: Vec::new(),
            blob_size: 0,
            stored_bytes: 0,
            zero_chunk: None,
        }
    }

    /// Bytes of the uncompressed blob written so far.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    fn push_chunk(&mut self, chunk_len: usize) -> Result<()> {
        let chunk = &self.pending[..chunk_len];
        self.blob_hasher.update(chunk);
        // A full chunk of zeros reuses the digest and stored form of the first one, and
        // is left as a hole in an uncompressed staged object: free space costs no
        // digest, no compression and no disk space.
        let zero = chunk_len == self.layout.chunk_size as usize && all_zero(chunk);
        if zero && self.zero_chunk.is_none() {
            let stored = match self.layout.compression {
                Compression::None => Vec::new(),
                other => compress_chunk(other, chunk)?,
            };
            self.zero_chunk = Some((blake3::hash(chunk).to_hex().to_string(), stored));
        }
        let (digest, stored_size) = match (&mut self.stored, &self.zero_chunk) {
            (None, Some((digest, _))) if zero => (digest.clone(), chunk_len as u64),
            (None, _) => (blake3::hash(chunk).to_hex().to_string(), chunk_len as u64),
            (Some(writer), Some((digest, packed))) if zero => {
                if self.layout.compression == Compression::None {
                    writer
                        .seek(SeekFrom::Current(chunk_len as i64))
                        .context(|| format!("writing {}", self.stored_path.display()))?;
                    (digest.clone(), chunk_len as u64)
                } else {
                    writer
                        .write_all(packed)
                        .context(|| format!("writing {}", self.stored_path.display()))?;
                    (digest.clone(), packed.len() as u64)
                }
            }
            (Some(writer), _) => {
                let packed;
                let bytes = match self.layout.compression {
                    Compression::None => chunk,
                    other => {
                        packed = compress_chunk(other, chunk)?;
                        &packed[..]
                    }
                };
                writer
                    .write_all(bytes)
                    .context(|| format!("writing {}", self.stored_path.display()))?;
                (blake3::hash(chunk).to_hex().to_string(), bytes.len() as u64)
            }
        };
        self.chunks.push(ChunkEntry {
            digest,
            offset: self.stored_bytes,
            stored_size,
        });
        self.stored_bytes += stored_size;
        self.blob_size += chunk_len as u64;
        self.pending.drain(..chunk_len);
        Ok(())
    }

    /// Appends `len` zero bytes to the blob (whole zero chunks cost no copy).
    pub fn append_zeros(&mut self, mut len: u64) -> Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        while len > 0 {
            let take = len.min(ZEROS.len() as u64);
            self.append(&ZEROS[..take as usize])?;
            len -= take;
        }
        Ok(())
    }

    /// Appends `data` to the blob.
    pub fn append(&mut self, mut data: &[u8]) -> Result<()> {
        let chunk_size = self.layout.chunk_size as usize;
        while !data.is_empty() {
            let take = (chunk_size - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == chunk_size {
                self.push_chunk(chunk_size)?;
            }
        }
        Ok(())
    }

    /// Cuts the last (short) chunk and makes the stored object durable.
    pub fn finish(mut self) -> Result<StagedBlob> {
        if !self.pending.is_empty() {
            let len = self.pending.len();
            self.push_chunk(len)?;
        }
        let owned = self.stored.is_some();
        let stored_bytes = self.stored_bytes;
        if let Some(writer) = self.stored.take() {
            let synced = writer
                .into_inner()
                .map_err(|e| CacheError::Io {
                    context: format!("writing {}", self.stored_path.display()),
                    source: e.into_error(),
                })
                .and_then(|file| {
                    // Zero chunks at the end were skipped over: the object still ends
                    // where the last chunk does.
                    file.set_len(stored_bytes)
                        .and_then(|()| file.sync_all())
                        .context(|| format!("syncing {}", self.stored_path.display()))
                });
            if let Err(err) = synced {
                let _ = fs::remove_file(&self.stored_path);
                return Err(err);
            }
        }
        let hasher = std::mem::take(&mut self.blob_hasher);
        Ok(StagedBlob {
            blob_id: hasher.finalize().to_hex().to_string(),
            blob_size: self.blob_size,
            layout: self.layout,
            chunks: std::mem::take(&mut self.chunks),
            stored_bytes: self.stored_bytes,
            stored_path: std::mem::take(&mut self.stored_path),
            owned,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Abandoned before `finish`: the staged copy is useless.
        if self.stored.is_some() && !self.stored_path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.stored_path);
        }
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Cuts the file `raw` (the uncompressed blob, for example a filesystem image) into
/// chunks. Uncompressed, the file itself is the stored object (no copy is made);
/// compressed, the object is staged in `staging_dir`. `progress` is called with the
/// bytes read after each read.
pub fn stage_blob_file(
    raw: &Path,
    layout: BlobLayout,
    staging_dir: &Path,
    mut progress: impl FnMut(u64),
) -> Result<StagedBlob> {
    layout.check()?;
    let mut writer = match layout.compression {
        Compression::None => BlobWriter::with_sink(layout, raw.to_path_buf(), None),
        _ => BlobWriter::new(staging_dir, layout)?,
    };
    let mut input = File::open(raw).context(|| format!("opening {}", raw.display()))?;
    let mut buffer = vec![0u8; layout.chunk_size.max(1 << 20) as usize];
    loop {
        let n = input
            .read(&mut buffer)
            .context(|| format!("reading {}", raw.display()))?;
        if n == 0 {
            break;
        }
        writer.append(&buffer[..n])?;
        progress(n as u64);
    }
    writer.finish()
}

/// Replaces `path` with `data` through a synced temporary file beside it, a rename and
/// a sync of the directory: a reader, or a crash, sees the old file or the new one,
/// never a torn one.
pub fn write_file_atomically(path: &Path, data: &[u8]) -> Result<()> {
    crate::manifest::write_atomically(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDirBackend;
    use crate::manifest::decompress_chunk;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn streamed_and_file_blobs_are_identical_and_chunk_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(3 * 65536 + 1000);
        let raw = dir.path().join("raw");
        fs::write(&raw, &data).unwrap();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let layout = BlobLayout {
                chunk_size: 65536,
                compression,
            };
            let mut seen = 0;
            let from_file = stage_blob_file(&raw, layout, dir.path(), |n| seen += n).unwrap();
            assert_eq!(seen, data.len() as u64);
            let mut streamed = BlobWriter::new(dir.path(), layout).unwrap();
            // Odd write sizes cross chunk boundaries.
            for piece in data.chunks(10_007) {
                streamed.write_all(piece).unwrap();
            }
            let streamed = streamed.finish().unwrap();
            assert_eq!(from_file.blob_id, blake3::hash(&data).to_hex().to_string());
            assert_eq!(streamed.blob_id, from_file.blob_id);
            assert_eq!(streamed.chunks, from_file.chunks);
            assert_eq!(from_file.chunks.len(), 4);
            assert_eq!(from_file.blob_size, data.len() as u64);

            let store = LocalDirBackend::new(dir.path().join("store"));
            let object = object_name("/blobs/", &from_file.blob_id);
            assert_eq!(object, format!("blobs/{}", from_file.blob_id));
            let manifest = from_file
                .manifest(&object, "boot.img", None, Vec::new())
                .unwrap();
            from_file.upload(&store, &object).unwrap();
            assert_eq!(store.size(&object).unwrap(), manifest.stored_size());
            for (index, entry) in manifest.chunks.iter().enumerate() {
                let stored = store
                    .read_range(&object, entry.offset..entry.offset + entry.stored_size)
                    .unwrap();
                let range = manifest.chunk_range(index as u64);
                let chunk =
                    decompress_chunk(compression, &stored, (range.end - range.start) as usize)
                        .unwrap();
                assert_eq!(chunk, &data[range.start as usize..range.end as usize]);
                assert_eq!(entry.digest, blake3::hash(&chunk).to_hex().to_string());
            }
            let staged = streamed.stored_path.clone();
            drop(streamed);
            assert!(!staged.exists(), "the staged copy is removed");
        }
        assert!(raw.exists(), "the caller's file is never removed");
    }

    #[test]
    fn zero_chunks_are_cut_like_any_other_and_read_back_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 65536usize;
        // Data, three zero chunks, a chunk half data, a zero chunk at the very end (left
        // as a hole the object must still cover).
        let mut data = pattern(chunk);
        data.extend(vec![0u8; 3 * chunk]);
        data.extend(pattern(chunk / 2));
        data.extend(vec![0u8; chunk / 2]);
        data.extend(vec![0u8; chunk]);
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let layout = BlobLayout {
                chunk_size: chunk as u32,
                compression,
            };
            let mut writer = BlobWriter::new(dir.path(), layout).unwrap();
            writer.append(&data[..chunk + 100]).unwrap();
            writer.append_zeros(3 * chunk as u64 - 100).unwrap();
            writer.append(&data[4 * chunk..5 * chunk]).unwrap();
            writer.append_zeros(chunk as u64).unwrap();
            let staged = writer.finish().unwrap();
            assert_eq!(staged.blob_id, blake3::hash(&data).to_hex().to_string());
            assert_eq!(staged.blob_size, data.len() as u64);
            assert_eq!(staged.chunks.len(), 6);
            let store = LocalDirBackend::new(dir.path().join("store"));
            let object = object_name("blobs", &staged.blob_id);
            let manifest = staged.manifest(&object, "b", None, Vec::new()).unwrap();
            staged.upload(&store, &object).unwrap();
            assert_eq!(store.size(&object).unwrap(), manifest.stored_size());
            for (index, entry) in manifest.chunks.iter().enumerate() {
                let range = manifest.chunk_range(index as u64);
                let expected = &data[range.start as usize..range.end as usize];
                let stored = store
                    .read_range(&object, entry.offset..entry.offset + entry.stored_size)
                    .unwrap();
                let chunk = decompress_chunk(compression, &stored, expected.len()).unwrap();
                assert_eq!(chunk, expected, "chunk {index} ({compression:?})");
                assert_eq!(entry.digest, blake3::hash(expected).to_hex().to_string());
            }
            if compression != Compression::None {
                let zero = &manifest.chunks[1];
                assert!(
                    zero.stored_size < chunk as u64 / 16,
                    "a zero chunk compresses to almost nothing: {zero:?}"
                );
            }
        }
    }

    #[test]
    fn unusable_chunk_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for chunk_size in [0, 1000, 2048, 3 << 20, 128 << 20] {
            let layout = BlobLayout {
                chunk_size,
                compression: Compression::None,
            };
            assert!(BlobWriter::new(dir.path(), layout).is_err(), "{chunk_size}");
        }
    }

    #[test]
    fn an_empty_stream_is_an_empty_blob() {
        let dir = tempfile::tempdir().unwrap();
        let blob = BlobWriter::new(dir.path(), BlobLayout::default())
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(blob.blob_size, 0);
        assert!(blob.chunks.is_empty());
        assert_eq!(blob.blob_id, blake3::hash(b"").to_hex().to_string());
    }
}
