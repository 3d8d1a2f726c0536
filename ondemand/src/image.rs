//! Building an image: an erofs bootstrap (kept local) plus a chunked data blob
//! (uploaded to the backend) and the manifest describing it. mkfs.erofs writes the
//! bootstrap and the raw blob; `berth_cache::blob_writer` cuts, digests, compresses and
//! uploads the blob.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use berth_cache::blob_writer::{object_name, stage_blob_file, BlobLayout};
use berth_cache::{BlobBackend, Compression, Manifest, PrefetchEntry};
use indicatif::{ProgressBar, ProgressStyle};

use crate::erofs::ErofsImage;
use crate::error::{IoContext, OndemandError, Result};

/// File names inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const BOOTSTRAP_FILE: &str = "boot.img";
pub const RAW_BLOB_FILE: &str = "blob.raw";

/// What to build and where to put it.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// A directory, or a tar archive (any compression GNU tar detects).
    pub source: PathBuf,
    /// Receives `manifest.json`, `boot.img` and, if kept, `blob.raw`.
    pub out_dir: PathBuf,
    /// Chunk size of the blob (also passed to mkfs.erofs); a power of two ≥ 4096.
    pub chunk_size: u32,
    pub compression: Compression,
    pub backend: Arc<dyn BlobBackend>,
    /// The blob is stored as `<object_prefix>/<blob id>`.
    pub object_prefix: String,
    /// Keep the uncompressed blob in `out_dir` (handy as a fully local copy).
    pub keep_raw_blob: bool,
    /// A file naming, one per line, the paths of the image to prefetch after mounting,
    /// most wanted first (a directory stands for every file below it; empty lines and
    /// lines starting with `#` are ignored).
    pub prefetch_list: Option<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

impl BuildOptions {
    /// Defaults: 1 MiB chunks, no compression, objects under `blobs/`.
    pub fn new(
        source: impl Into<PathBuf>,
        out_dir: impl Into<PathBuf>,
        backend: Arc<dyn BlobBackend>,
    ) -> Self {
        Self {
            source: source.into(),
            out_dir: out_dir.into(),
            chunk_size: 1 << 20,
            compression: Compression::None,
            backend,
            object_prefix: "blobs".into(),
            keep_raw_blob: true,
            prefetch_list: None,
            progress: false,
        }
    }
}

/// What [`build_image`] produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub bootstrap_path: PathBuf,
    pub raw_blob_path: Option<PathBuf>,
    /// Size of the object uploaded to the backend.
    pub stored_bytes: u64,
}

fn run(command: &mut Command) -> Result<()> {
    let description = format!("{command:?}");
    let output = command.output().map_err(|e| OndemandError::Command {
        command: description.clone(),
        message: e.to_string(),
    })?;
    if !output.status.success() {
        return Err(OndemandError::Command {
            command: description,
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Builds the image described by `options` and uploads its blob.
pub fn build_image(options: &BuildOptions) -> Result<BuildReport> {
    let out = &options.out_dir;
    fs::create_dir_all(out).context(|| format!("creating {}", out.display()))?;
    BlobLayout {
        chunk_size: options.chunk_size,
        compression: options.compression,
    }
    .check()?;
    let bootstrap_path = out.join(BOOTSTRAP_FILE);
    let raw_path = out.join(RAW_BLOB_FILE);
    for stale in [&bootstrap_path, &raw_path] {
        let _ = fs::remove_file(stale);
    }
    let mut mkfs = Command::new("mkfs.erofs");
    mkfs.arg(format!("--chunksize={}", options.chunk_size))
        .arg(format!("--blobdev={}", raw_path.display()));
    let extracted = out.join(".rootfs");
    if options.source.is_dir() {
        run(mkfs.arg(&bootstrap_path).arg(&options.source))?;
    } else {
        // Debian bookworm's erofs-utils (1.5) cannot read tar archives (`--tar` came in
        // 1.7): extract with every attribute tar can restore, then build from the tree.
        let _ = fs::remove_dir_all(&extracted);
        fs::create_dir_all(&extracted).context(|| format!("creating {}", extracted.display()))?;
        let extract = run(Command::new("tar")
            .args(tar_attribute_flags())
            .arg("-xf")
            .arg(&options.source)
            .arg("-C")
            .arg(&extracted));
        let built = extract.and_then(|()| run(mkfs.arg(&bootstrap_path).arg(&extracted)));
        let _ = fs::remove_dir_all(&extracted);
        built?;
    }

    let blob_size = fs::metadata(&raw_path)
        .context(|| format!("reading {}", raw_path.display()))?
        .len();
    let bar = if options.progress {
        ProgressBar::new(blob_size)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
    {
        bar.set_style(style);
    }
    bar.set_message("chunking");
    let layout = BlobLayout {
        chunk_size: options.chunk_size,
        compression: options.compression,
    };
    let staged = stage_blob_file(&raw_path, layout, out, |n| bar.inc(n))?;
    let object = object_name(&options.object_prefix, &staged.blob_id);
    let prefetch = match &options.prefetch_list {
        Some(list) => resolve_prefetch_list(list, &bootstrap_path, blob_size)?,
        None => Vec::new(),
    };
    let manifest = staged.manifest(
        &object,
        BOOTSTRAP_FILE,
        Some(file_digest(&bootstrap_path)?),
        prefetch,
    )?;
    bar.set_message("uploading");
    staged.upload(options.backend.as_ref(), &object)?;
    bar.finish_with_message("done");
    let stored_bytes = staged.stored_bytes;
    drop(staged);
    let manifest_path = out.join(MANIFEST_FILE);
    manifest.save(&manifest_path)?;
    let raw_blob_path = if options.keep_raw_blob {
        Some(raw_path)
    } else {
        let _ = fs::remove_file(&raw_path);
        None
    };
    tracing::info!(blob = %manifest.blob_id, size = blob_size, stored = stored_bytes, "built image");
    Ok(BuildReport {
        manifest,
        manifest_path,
        bootstrap_path,
        raw_blob_path,
        stored_bytes,
    })
}

/// `tar` flags that restore ownership, permissions, xattrs and ACLs (root may set
/// every xattr namespace; others only `user.*`).
fn tar_attribute_flags() -> Vec<&'static str> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut flags = vec![
        "--preserve-permissions",
        "--numeric-owner",
        "--xattrs",
        "--acls",
    ];
    flags.push(if root {
        "--xattrs-include=*"
    } else {
        "--xattrs-include=user.*"
    });
    if root {
        flags.push("--same-owner");
    }
    flags
}

/// Hex blake3 digest of a file's contents.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut file = File::open(path).context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file, &mut hasher).context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Reads a prefetch list and finds where each path's data lies in the blob.
fn resolve_prefetch_list(
    list: &Path,
    bootstrap: &Path,
    blob_size: u64,
) -> Result<Vec<PrefetchEntry>> {
    let text = fs::read_to_string(list).context(|| format!("reading {}", list.display()))?;
    let image = ErofsImage::open(bootstrap)?;
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let path = line.trim();
        if path.is_empty() || path.starts_with('#') {
            continue;
        }
        let error = |message: String| OndemandError::PrefetchList {
            path: list.to_path_buf(),
            line: number + 1,
            message,
        };
        let ranges = image
            .data_ranges(path)?
            .ok_or_else(|| error(format!("`{path}` is not in the image")))?;
        let ranges: Vec<[u64; 2]> = ranges
            .into_iter()
            .map(|r| [r.start.min(blob_size), r.end.min(blob_size)])
            .filter(|[start, end]| start < end)
            .collect();
        entries.push(PrefetchEntry {
            path: path.to_string(),
            ranges,
        });
    }
    Ok(entries)
}

/// Finds the manifest for `image`: the file itself, or `manifest.json` inside it.
pub fn manifest_path_of(image: &Path) -> PathBuf {
    if image.is_dir() {
        image.join(MANIFEST_FILE)
    } else {
        image.to_path_buf()
    }
}
