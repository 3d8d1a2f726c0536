//! `berth block commit`: folds a copy-on-write overlay into a new block image. The
//! image and the overlay are opened as the devices open them (the overlay read-only, so
//! neither file changes), and what that device reads is streamed into a new image by
//! `berth_blockdev::build`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use berth_blockdev::build::{build_block_image_from_target, TargetBuildOptions, BLOCK_DESCRIPTOR};
use berth_blockdev::{BlockTarget, OverlayRecovery, OverlayTarget};
use berth_cache::{open_backend, BlobBackend, BlobLayout, LocalDirBackend, Manifest};
use serde_json::json;
use tracing::{error, warn};

use super::args::{CommitArgs, TargetArgs};
use super::{is_image, manifest_path_of, open_base_target, Engines};
use crate::shutdown::{signal_name, TerminationSignals};

/// `path` made absolute and free of symbolic links, also when it does not exist yet (its
/// nearest existing ancestor is resolved).
fn resolve_maybe_missing(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(path)
        .with_context(|| format!("cannot make {} absolute", path.display()))?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut resolved) => {
                for part in rest.iter().rev() {
                    resolved.push(part);
                }
                return Ok(resolved);
            }
            Err(_) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Ok(absolute);
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
        }
    }
}

/// Whether the directory `dir` exists (an error if it is something else) and is empty.
fn out_state(dir: &Path) -> anyhow::Result<Option<bool>> {
    match std::fs::metadata(dir) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", dir.display())),
        Ok(meta) if !meta.is_dir() => bail!("--out {} is not a directory", dir.display()),
        Ok(_) => {
            let mut entries =
                std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            Ok(Some(entries.next().is_none()))
        }
    }
}

/// Removes what a failed commit left in `out` (which was absent or empty before).
fn clean_up(out: &Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(out);
        return;
    }
    if let Ok(entries) = std::fs::read_dir(out) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

pub(super) fn run(args: CommitArgs, signals: TerminationSignals) -> anyhow::Result<()> {
    let out_dir = args.out.clone();
    signals.spawn_handler(move |signal| {
        error!(
            "Received {}; the image in {} is incomplete.",
            signal_name(signal),
            out_dir.display()
        );
        std::process::exit(1);
    })?;

    // The image.
    if !is_image(&args.image) {
        bail!(
            "{} is not a block image (a directory holding manifest.json, or the manifest)",
            args.image.display()
        );
    }
    let manifest_path = std::fs::canonicalize(manifest_path_of(&args.image))
        .with_context(|| format!("cannot find {}", args.image.display()))?;
    let manifest = Manifest::load(&manifest_path)
        .with_context(|| format!("cannot load the image {}", args.image.display()))?;
    if manifest.bootstrap != BLOCK_DESCRIPTOR {
        bail!(
            "{} is not a block image (it was not built with `berth image build --block`)",
            args.image.display()
        );
    }
    let image_dir = manifest_path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);

    // The overlay, checked against the image before anything is fetched.
    let described = OverlayTarget::describe(&args.overlay)
        .with_context(|| format!("cannot read the overlay {}", args.overlay.display()))?;
    if described.in_use {
        bail!(
            "the overlay {} is in use by a running device: stop it first (its writes are then all in the file)",
            args.overlay.display()
        );
    }
    let block_size = described.block_size;
    if !(512..=4096).contains(&block_size) {
        bail!(
            "the overlay {} has {block_size}-byte clusters; block devices have 512 to 4096-byte blocks",
            args.overlay.display()
        );
    }
    let identity = format!("image:{}", manifest.blob_id);
    if described.base_id != identity {
        bail!(
            "the overlay {} was made over another base ({}), not over the image {} ({identity})",
            args.overlay.display(),
            described.base_id,
            args.image.display()
        );
    }
    let image_size = manifest.blob_size.div_ceil(u64::from(block_size)) * u64::from(block_size);
    if described.base_size != image_size {
        bail!(
            "the overlay {} was made over a base of {} bytes; the image {} is {image_size} bytes",
            args.overlay.display(),
            described.base_size,
            args.image.display()
        );
    }

    // Where the new image goes.
    let out = resolve_maybe_missing(&args.out)?;
    if out.starts_with(&image_dir) {
        bail!(
            "--out {} is inside the image's directory {}: give a directory of its own",
            args.out.display(),
            image_dir.display()
        );
    }
    if let Some(spec) = &args.store {
        // A local store inside the image's directory would add to (or replace) its blobs.
        let local = spec
            .strip_prefix("file://")
            .or((!spec.contains("://")).then_some(spec.as_str()));
        if let Some(local) = local {
            if resolve_maybe_missing(Path::new(local))?.starts_with(&image_dir) {
                bail!(
                    "--store {spec} is inside the image's directory {}: the image is never written",
                    image_dir.display()
                );
            }
        }
    }
    let existed = match out_state(&out)? {
        Some(false) => bail!(
            "--out {} exists and is not empty: give a new or empty directory",
            args.out.display()
        ),
        Some(true) => true,
        None => false,
    };

    // The device as `block add IMAGE --overlay FILE` serves it, but read-only.
    let settings = TargetArgs {
        cache_dir: args.cache_dir.clone(),
        backend: args.backend.clone(),
        readahead: 8 << 20,
        block_size,
        volume: Default::default(),
    };
    let engines = Engines::default();
    let base = open_base_target(&args.image, true, &settings, &engines).with_context(|| {
        format!(
            "cannot read the image {} (if a device serves it from the same cache directory, give the commit a --cache-dir of its own)",
            args.image.display()
        )
    })?;
    let (device, recovery) = OverlayTarget::open_read_only(&args.overlay, base)
        .with_context(|| format!("cannot open the overlay {}", args.overlay.display()))?;
    if recovery != OverlayRecovery::Clean {
        warn!(
            overlay = %args.overlay.display(),
            ?recovery,
            "The overlay was not closed cleanly: committing what a device reopening it would read."
        );
    }

    let store: Arc<dyn BlobBackend> = match &args.store {
        Some(spec) => open_backend(spec)?,
        None => Arc::new(LocalDirBackend::new(&out)),
    };
    let filesystem = std::fs::read(image_dir.join(BLOCK_DESCRIPTOR))
        .ok()
        .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
        .and_then(|d| {
            d.get("filesystem")
                .and_then(|f| f.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "as given".into());
    let options = TargetBuildOptions {
        out_dir: out.clone(),
        layout: BlobLayout {
            chunk_size: args.chunk_size.unwrap_or(manifest.chunk_size),
            compression: args.compression.map_or(manifest.compression, Into::into),
        },
        backend: store.clone(),
        object_prefix: "blobs".into(),
        filesystem,
        origin: Some(manifest.blob_id.clone()),
    };
    let report = match build_block_image_from_target(&device, &options, |_| {}) {
        Ok(report) => report,
        Err(err) => {
            clean_up(&out, existed);
            return Err(anyhow!(err)).with_context(|| {
                format!(
                    "cannot commit the overlay {} over {}",
                    args.overlay.display(),
                    args.image.display()
                )
            });
        }
    };
    let written_clusters = device.written_clusters();
    let device_size = device.info().size;
    drop(device);

    let new = &report.manifest;
    // Chunks that differ from the image's, when both are cut alike.
    let changed = (new.chunk_size == manifest.chunk_size).then(|| {
        new.chunks
            .iter()
            .enumerate()
            .filter(|(i, c)| manifest.chunks.get(*i).is_none_or(|b| b.digest != c.digest))
            .count()
    });
    if args.json {
        println!(
            "{}",
            json!({
                "image": out,
                "manifest": report.manifest_path,
                "blob_id": new.blob_id,
                "size": device_size,
                "chunk_size": new.chunk_size,
                "chunks": new.chunks.len(),
                "changed_chunks": changed,
                "stored_bytes": report.stored_bytes,
                "object": new.object,
                "store": store.describe(),
                "base_blob_id": manifest.blob_id,
                "overlay_clusters": written_clusters,
                "overlay_recovery": format!("{recovery:?}"),
            })
        );
    } else {
        let changed = changed.map_or_else(String::new, |n| {
            format!(", {n} of them differ from the image's")
        });
        println!(
            "Committed {} over {} into block image {}: {device_size} bytes in {} chunks{changed}; {} bytes stored as {} in {}.",
            args.overlay.display(),
            args.image.display(),
            args.out.display(),
            new.chunks.len(),
            report.stored_bytes,
            new.object,
            store.describe()
        );
    }
    Ok(())
}
