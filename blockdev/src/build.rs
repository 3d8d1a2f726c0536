//! Building a block image: a filesystem image (given, or made from a directory with
//! `mkfs.ext4 -d` or `mkfs.erofs`) cut into the chunked, digested blob the cache engine
//! serves, through `berth_cache`'s blob writer, and described by a manifest. The
//! manifest's "bootstrap" is a small `block.json` naming the filesystem and size (a block
//! image has no erofs metadata to keep local).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use berth_cache::blob_writer::object_name;
use berth_cache::{stage_blob_file, BlobBackend, BlobLayout, Manifest};

use crate::error::{BlockError, IoContext, Result};

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
    let descriptor = serde_json::json!({
        "kind": "block",
        "filesystem": if options.source.is_dir() { options.filesystem.name() } else { "as given" },
        "size": staged.blob_size,
    });
    let descriptor_path = out.join(BLOCK_DESCRIPTOR);
    let descriptor_text = descriptor.to_string();
    berth_cache::blob_writer::write_file_atomically(&descriptor_path, descriptor_text.as_bytes())
        .map_err(BlockError::Cache)?;
    let object = object_name(&options.object_prefix, &staged.blob_id);
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
    staged
        .upload(&*options.backend, &object)
        .map_err(BlockError::Cache)?;
    let manifest_path = out.join("manifest.json");
    manifest.save(&manifest_path).map_err(BlockError::Cache)?;
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
