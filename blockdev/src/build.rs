//! Building a block image: a filesystem image (given, or made from a directory with
//! `mkfs.ext4 -d` or `mkfs.erofs`) cut into the chunked, digested blob the cache engine
//! serves, through `berth_cache`'s blob writer, and described by a manifest. The
//! manifest's "bootstrap" is a small `block.json` naming the filesystem and size (a block
//! image has no erofs metadata to keep local).
//!
//! [`build_block_image_from_target`] makes the same kind of image from whatever a
//! [`BlockTarget`] reads (an image with its copy-on-write overlay: `berth block commit`),
//! streamed range by range into the blob writer, never through a full-size copy.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use berth_cache::blob_writer::object_name;
use berth_cache::{stage_blob_file, BlobBackend, BlobLayout, BlobWriter, Manifest, StagedBlob};

use crate::error::{BlockError, IoContext, Result};
use crate::target::{file_of, BlockTarget, Source};

/// Name of the descriptor file beside a block image's manifest.
pub const BLOCK_DESCRIPTOR: &str = "block.json";
/// The filesystem image a build from a directory leaves when asked to keep it.
pub const DISK_IMAGE: &str = "disk.img";

/// The filesystem made from a source directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    Ext4,
    Erofs,
}

impl Filesystem {
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Erofs => "erofs",
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BlockBuildOptions {
    /// A filesystem or disk image (used as it is), or a directory to make one from.
    pub source: PathBuf,
    pub out_dir: PathBuf,
    pub filesystem: Filesystem,
    /// Size of an ext4 image made from a directory [default: the tree's size × 1.5 plus
    /// 64 MiB]; free space reads as zeros and costs nothing stored.
    pub size: Option<u64>,
    pub layout: BlobLayout,
    pub backend: Arc<dyn BlobBackend>,
    /// The blob is stored as `<object_prefix>/<blob id>`.
    pub object_prefix: String,
    /// Keep the filesystem image made from a directory as `disk.img` in `out_dir`.
    pub keep_disk_image: bool,
}

/// What [`build_block_image`] produced.
#[derive(Debug)]
pub struct BlockBuildReport {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub stored_bytes: u64,
}

fn run(command: &mut Command) -> Result<()> {
    let description = format!("{command:?}");
    let output = command
        .output()
        .context(|| format!("running {description}"))?;
    if !output.status.success() {
        return Err(BlockError::BadBacking {
            path: description,
            problem: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => {
                    total += entry
                        .metadata()
                        .map_or(0, |m| m.len().div_ceil(4096) * 4096)
                }
                Err(_) => {}
            }
        }
    }
    total
}

/// Builds the block image `options` describes and uploads its blob.
pub fn build_block_image(options: &BlockBuildOptions) -> Result<BlockBuildReport> {
    let out = &options.out_dir;
    fs::create_dir_all(out).context(|| format!("creating {}", out.display()))?;
    let made = out.join(DISK_IMAGE);
    let raw = if options.source.is_dir() {
        let _ = fs::remove_file(&made);
        match options.filesystem {
            Filesystem::Ext4 => {
                let size = options
                    .size
                    .unwrap_or_else(|| tree_bytes(&options.source) * 3 / 2 + (64 << 20));
                let size = size.div_ceil(1 << 20) << 20;
                run(Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d"])
                    .arg(&options.source)
                    .arg(&made)
                    .arg(format!("{}k", size >> 10)))?;
            }
            Filesystem::Erofs => {
                run(Command::new("mkfs.erofs").arg(&made).arg(&options.source))?;
                // A block device is a whole number of 4 KiB blocks.
                let len = fs::metadata(&made)
                    .context(|| format!("reading {}", made.display()))?
                    .len();
                fs::OpenOptions::new()
                    .write(true)
                    .open(&made)
                    .and_then(|f| f.set_len(len.div_ceil(4096) * 4096))
                    .context(|| format!("padding {}", made.display()))?;
            }
        }
        made.clone()
    } else {
        options.source.clone()
    };
    let staged = stage_blob_file(&raw, options.layout, out, |_| {}).map_err(BlockError::Cache)?;
    let filesystem = if options.source.is_dir() {
        options.filesystem.name()
    } else {
        "as given"
    };
    let (manifest, manifest_path) = describe_and_upload(
        &staged,
        out,
        serde_json::json!({ "kind": "block", "filesystem": filesystem, "size": staged.blob_size }),
        &*options.backend,
        &options.object_prefix,
    )?;
    let stored_bytes = staged.stored_bytes;
    drop(staged);
    if options.source.is_dir() && !options.keep_disk_image {
        let _ = fs::remove_file(&made);
    }
    Ok(BlockBuildReport {
        manifest,
        manifest_path,
        stored_bytes,
    })
}

/// Writes the descriptor `descriptor` and the manifest of `staged` into `out`, and
/// uploads the blob as `<object_prefix>/<blob id>`: the manifest is saved last, so a
/// directory with a manifest always names a stored blob.
fn describe_and_upload(
    staged: &StagedBlob,
    out: &Path,
    descriptor: serde_json::Value,
    backend: &dyn BlobBackend,
    object_prefix: &str,
) -> Result<(Manifest, PathBuf)> {
    let descriptor_path = out.join(BLOCK_DESCRIPTOR);
    let descriptor_text = descriptor.to_string();
    berth_cache::blob_writer::write_file_atomically(&descriptor_path, descriptor_text.as_bytes())
        .map_err(BlockError::Cache)?;
    let object = object_name(object_prefix, &staged.blob_id);
    let manifest = staged
        .manifest(
            &object,
            BLOCK_DESCRIPTOR,
            Some(
                blake3::hash(descriptor_text.as_bytes())
                    .to_hex()
                    .to_string(),
            ),
            Vec::new(),
        )
        .map_err(BlockError::Cache)?;
    staged.upload(backend, &object).map_err(BlockError::Cache)?;
    let manifest_path = out.join("manifest.json");
    manifest.save(&manifest_path).map_err(BlockError::Cache)?;
    Ok((manifest, manifest_path))
}

/// What to build from a target.
#[derive(Debug, Clone)]
pub struct TargetBuildOptions {
    pub out_dir: PathBuf,
    pub layout: BlobLayout,
    pub backend: Arc<dyn BlobBackend>,
    /// The blob is stored as `<object_prefix>/<blob id>`.
    pub object_prefix: String,
    /// The filesystem the descriptor names (that of the image the target was made from).
    pub filesystem: String,
    /// The blob id of the image the target's data came from, recorded in the descriptor.
    pub origin: Option<String>,
}

/// Builds a block image holding what `target` reads, byte for byte, from offset 0 to its
/// size, and uploads its blob. The target is read through its mapping, one range of at
/// least a chunk at a time: ranges it maps to zeros (unwritten space, discarded clusters)
/// are never read, and every all-zero chunk is stored the way free space of a built
/// image is (a hole when uncompressed). `progress` is called with the bytes done after
/// each range.
pub fn build_block_image_from_target(
    target: &dyn BlockTarget,
    options: &TargetBuildOptions,
    mut progress: impl FnMut(u64),
) -> Result<BlockBuildReport> {
    let info = target.info().clone();
    let out = &options.out_dir;
    fs::create_dir_all(out).context(|| format!("creating {}", out.display()))?;
    let mut writer = BlobWriter::new(out, options.layout).map_err(BlockError::Cache)?;
    let block = u64::from(info.block_size.max(1));
    let step = (u64::from(options.layout.chunk_size).max(1 << 20)).div_ceil(block) * block;
    let mut buf = vec![0u8; step as usize];
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < info.size {
        let len = step.min(info.size - at);
        extents.clear();
        let pin = crate::target::map_read_waiting(target, at, len, &mut extents)?;
        let mut mapped = 0u64;
        for extent in &extents {
            let Some(piece) = buf
                .get_mut(..extent.len as usize)
                .filter(|_| mapped + extent.len <= len)
            else {
                mapped = u64::MAX;
                break;
            };
            match extent.source {
                Source::Zero => writer.append_zeros(extent.len).map_err(BlockError::Cache)?,
                Source::File { fd, offset } => {
                    file_of(fd).read_exact_at(piece, offset).context(|| {
                        format!(
                            "reading {} bytes at {at} of {}",
                            piece.len(),
                            info.description
                        )
                    })?;
                    writer.append(piece).map_err(BlockError::Cache)?;
                }
            }
            mapped += extent.len;
        }
        drop(pin);
        if mapped != len {
            return Err(BlockError::BadBacking {
                path: info.description.clone(),
                problem: format!("it mapped other than the {len} bytes asked at {at}"),
            });
        }
        at += len;
        progress(at);
    }
    let staged = writer.finish().map_err(BlockError::Cache)?;
    let mut descriptor = serde_json::json!({
        "kind": "block",
        "filesystem": options.filesystem,
        "size": staged.blob_size,
    });
    if let Some(origin) = &options.origin {
        descriptor["origin"] = serde_json::Value::String(origin.clone());
    }
    let (manifest, manifest_path) = describe_and_upload(
        &staged,
        out,
        descriptor,
        &*options.backend,
        &options.object_prefix,
    )?;
    Ok(BlockBuildReport {
        manifest,
        manifest_path,
        stored_bytes: staged.stored_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{discard_at, read_at, write_at, write_zeroes_at};
    use crate::{ImageTarget, OverlayOptions, OverlayTarget, RawOptions, RawTarget, SharedTarget};
    use berth_cache::{CacheConfig, CacheEngine, Compression, LocalDirBackend};

    const BLOCK: u64 = 4096;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Everything `target` reads.
    fn read_all(target: &dyn BlockTarget) -> Vec<u8> {
        let mut all = vec![0u8; target.info().size as usize];
        read_at(target, 0, &mut all).unwrap();
        all
    }

    #[test]
    fn an_image_built_from_an_overlaid_target_reads_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        // 3 MiB + 3 blocks: data, a zero MiB, data, a partial last chunk.
        let size = (3 << 20) + 3 * BLOCK;
        let mut base_data = noise(1, size as usize);
        base_data[1 << 20..2 << 20].fill(0);
        let base_path = dir.path().join("base.img");
        fs::write(&base_path, &base_data).unwrap();
        let base: SharedTarget = Arc::new(
            RawTarget::open(
                &base_path,
                &RawOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let overlay_path = dir.path().join("overlay");
        let mut expected = base_data.clone();
        {
            let (overlay, _) =
                OverlayTarget::open(&overlay_path, base.clone(), &OverlayOptions::default())
                    .unwrap();
            let written = noise(2, 5 * BLOCK as usize);
            write_at(&overlay, 10 * BLOCK, &written, false).unwrap();
            expected[10 * BLOCK as usize..15 * BLOCK as usize].copy_from_slice(&written);
            // Data into the zero MiB, then zeros over data.
            let written = noise(3, BLOCK as usize);
            write_at(&overlay, (1 << 20) + 7 * BLOCK, &written, false).unwrap();
            expected[(1 << 20) + 7 * BLOCK as usize..][..BLOCK as usize].copy_from_slice(&written);
            discard_at(&overlay, 2 << 20, 16 * BLOCK).unwrap();
            expected[2 << 20..(2 << 20) + 16 * BLOCK as usize].fill(0);
            write_zeroes_at(&overlay, size - BLOCK, BLOCK).unwrap();
            expected[(size - BLOCK) as usize..].fill(0);
            assert_eq!(read_all(&overlay), expected);
        }
        let overlay_bytes = fs::read(&overlay_path).unwrap();
        for compression in [Compression::None, Compression::Zstd] {
            let (overlay, _) = OverlayTarget::open_read_only(&overlay_path, base.clone()).unwrap();
            assert!(overlay.info().read_only);
            assert!(matches!(
                write_at(&overlay, 0, &[1u8; BLOCK as usize], false),
                Err(BlockError::ReadOnly)
            ));
            let out = dir.path().join(format!("committed-{compression:?}"));
            let store = Arc::new(LocalDirBackend::new(&out));
            let mut seen = 0;
            let report = build_block_image_from_target(
                &overlay,
                &TargetBuildOptions {
                    out_dir: out.clone(),
                    layout: BlobLayout {
                        chunk_size: 256 << 10,
                        compression,
                    },
                    backend: store.clone(),
                    object_prefix: "blobs".into(),
                    filesystem: "as given".into(),
                    origin: Some("base".into()),
                },
                |done| seen = done,
            )
            .unwrap();
            drop(overlay);
            assert_eq!(seen, size);
            let manifest = Manifest::load(&out.join("manifest.json")).unwrap();
            assert_eq!(manifest, report.manifest);
            assert_eq!(manifest.blob_size, size);
            assert_eq!(
                manifest.blob_id,
                blake3::hash(&expected).to_hex().to_string()
            );
            let descriptor: serde_json::Value =
                serde_json::from_slice(&fs::read(out.join(BLOCK_DESCRIPTOR)).unwrap()).unwrap();
            assert_eq!(descriptor["origin"], "base");
            assert_eq!(descriptor["size"], size);
            if compression != Compression::None {
                assert!(
                    report.stored_bytes < size - (1 << 20),
                    "the zero MiB is stored as almost nothing: {}",
                    report.stored_bytes
                );
            }
            // Served again as an image, it reads what the overlaid device read.
            let engine = CacheEngine::new(CacheConfig::new(out.join("cache")), store).unwrap();
            let image = ImageTarget::new(engine.open_blob(&manifest).unwrap(), 4096);
            assert_eq!(image.info().size, size);
            assert!(read_all(&image) == expected, "{compression:?}");
            assert!(
                fs::read(&overlay_path).unwrap() == overlay_bytes,
                "reading the overlay leaves its file as it was"
            );
        }
        // While a server has the overlay open, it cannot be read as a snapshot.
        let (serving, _) =
            OverlayTarget::open(&overlay_path, base.clone(), &OverlayOptions::default()).unwrap();
        let err = OverlayTarget::open_read_only(&overlay_path, base.clone()).unwrap_err();
        assert!(matches!(err, BlockError::OverlayBusy { .. }), "{err}");
        drop(serving);
        let missing = OverlayTarget::open_read_only(&dir.path().join("nope"), base).unwrap_err();
        assert!(matches!(missing, BlockError::Io { .. }), "{missing}");
    }

    #[test]
    fn an_overlay_a_killed_server_left_is_read_as_recovered_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.img");
        fs::write(&base_path, noise(5, 64 * BLOCK as usize)).unwrap();
        let base: SharedTarget = Arc::new(
            RawTarget::open(
                &base_path,
                &RawOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let overlay_path = dir.path().join("overlay");
        let (overlay, _) =
            OverlayTarget::open(&overlay_path, base.clone(), &OverlayOptions::default()).unwrap();
        // Written, never flushed, and the server killed.
        let written = noise(6, 2 * BLOCK as usize);
        write_at(&overlay, 3 * BLOCK, &written, false).unwrap();
        let expected = read_all(&overlay);
        overlay.abandon_as_if_killed();
        let left = fs::read(&overlay_path).unwrap();
        let (snapshot, recovery) =
            OverlayTarget::open_read_only(&overlay_path, base.clone()).unwrap();
        assert_eq!(recovery, crate::OverlayRecovery::AfterProcessCrash);
        assert!(
            read_all(&snapshot) == expected,
            "the unflushed write is read"
        );
        drop(snapshot);
        assert!(
            fs::read(&overlay_path).unwrap() == left,
            "nothing was recovered in the file"
        );
        // A server opening it afterwards still recovers it.
        let (reopened, recovery) =
            OverlayTarget::open(&overlay_path, base, &OverlayOptions::default()).unwrap();
        assert_eq!(recovery, crate::OverlayRecovery::AfterProcessCrash);
        assert!(read_all(&reopened) == expected);
    }
}
