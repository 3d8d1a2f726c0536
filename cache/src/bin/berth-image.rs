//! Standalone front end of the image builder and mounter until the main `berth`
//! binary wires them in.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_cache::{
    build_image, mount_image, open_backend, BuildOptions, CacheConfig, CacheEngine, Compression,
    MetricsWriter, MountOptions,
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "berth-image", about = "Build and lazily mount erofs images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a directory or tar archive and upload its blob.
    Build {
        /// Source directory or tar archive.
        #[arg(long)]
        source: PathBuf,
        /// Output directory (manifest.json, boot.img, blob.raw).
        #[arg(long)]
        out: PathBuf,
        /// Backend: a directory, file://DIR, s3://BUCKET[/PREFIX] or http(s)://URL.
        #[arg(long)]
        backend: String,
        #[arg(long, default_value_t = 1 << 20)]
        chunk_size: u32,
        /// none, zstd or lz4.
        #[arg(long, default_value = "none")]
        compression: String,
        /// Do not keep blob.raw in the output directory.
        #[arg(long)]
        drop_raw_blob: bool,
    },
    /// Mount an image and serve its blob lazily until SIGINT or SIGTERM.
    Mount {
        /// Image directory or manifest file.
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        mountpoint: PathBuf,
        #[arg(long)]
        cache_dir: PathBuf,
        #[arg(long)]
        backend: String,
        /// Cache capacity in bytes (unbounded when absent).
        #[arg(long)]
        capacity: Option<u64>,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Write Prometheus metrics to this file periodically.
        #[arg(long)]
        metrics_file: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        metrics_interval_secs: u64,
    },
    /// Serve a metrics file written by `mount --metrics-file` over HTTP.
    ServeMetrics {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
    },
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started later);
/// the returned set is then awaited with [`wait_for`]. Without this a signal could
/// kill the process while mounted, closing the fanotify group (fail-open).
fn block_termination_signals() -> Result<libc::sigset_t> {
    // SAFETY: plain signal-mask calls on a local, initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            anyhow::bail!("cannot block SIGINT/SIGTERM");
        }
        Ok(set)
    }
}

fn wait_for(set: &libc::sigset_t) {
    let mut signal = 0;
    // SAFETY: `set` is an initialised sigset_t and `signal` a live int.
    unsafe { libc::sigwait(set, &mut signal) };
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Build {
            source,
            out,
            backend,
            chunk_size,
            compression,
            drop_raw_blob,
        } => {
            let mut options = BuildOptions::new(source, out, open_backend(&backend)?);
            options.chunk_size = chunk_size;
            options.compression = compression.parse::<Compression>()?;
            options.keep_raw_blob = !drop_raw_blob;
            options.progress = true;
            let report = build_image(&options).context("building the image")?;
            println!(
                "blob {} ({} bytes, {} chunks, {} bytes stored); manifest {}",
                report.manifest.blob_id,
                report.manifest.blob_size,
                report.manifest.chunks.len(),
                report.stored_bytes,
                report.manifest_path.display()
            );
        }
        Command::Mount {
            image,
            mountpoint,
            cache_dir,
            backend,
            capacity,
            threads,
            metrics_file,
            metrics_interval_secs,
        } => {
            let signals = block_termination_signals()?;
            let mut config = CacheConfig::new(cache_dir);
            config.capacity_bytes = capacity;
            let engine = Arc::new(CacheEngine::new(config, open_backend(&backend)?)?);
            let _writer = metrics_file.map(|path| {
                MetricsWriter::start(
                    engine.metrics(),
                    path,
                    Duration::from_secs(metrics_interval_secs.max(1)),
                )
            });
            let handle = mount_image(MountOptions {
                image,
                mountpoint,
                engine,
                handler_threads: threads,
            })
            .context("mounting the image")?;
            println!(
                "mounted at {}; stop with SIGINT or SIGTERM",
                handle.mountpoint().display()
            );
            wait_for(&signals);
            handle.unmount().context("unmounting")?;
        }
        Command::ServeMetrics { file, listen } => {
            let listener =
                TcpListener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let body = std::fs::read_to_string(&file).unwrap_or_default();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        }
    }
    Ok(())
}
