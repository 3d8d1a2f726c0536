//! `--shared-cache` (`berth fuse` and the vhost-user daemon): its flags, and the start-up of the version table and of the
//! host watcher around the passthrough filesystem.
//!
//! Order at start: the table is opened before the sandbox (its directory is outside the share),
//! the watcher is set up inside it but before capabilities are dropped (fanotify needs
//! CAP_SYS_ADMIN), and its thread starts once the filesystem serves.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_passthrough::{Config, SharedCache};
use berth_seccomp::{SeccompAction, ThreadRole};
use berth_versions::{HostWatcher, OpenOutcome, TableOptions, VersionTable, WatchMode};
use clap::Args;
use tracing::{info, warn};

/// How long a tracked inode's entries and attributes may be cached: until its version moves,
/// in practice.
pub const SHARED_TIMEOUT: Duration = Duration::from_secs(86400);

/// Shared caching flags of `berth fuse`.
#[derive(Debug, Args, Clone)]
pub struct SharedCacheArgs {
    /// Cache entries, attributes and data long, and drop them as soon as another berth process
    /// or a host process changes them (through the shared version table). Inodes without a
    /// slot get the --cache mode's timeouts.
    #[arg(long)]
    pub shared_cache: bool,

    /// The version table file, shared by every berth process serving the directory (default
    /// /run/berth/versions/DEV-INO.table, or under $XDG_RUNTIME_DIR when not root).
    #[arg(long, value_name = "PATH", requires = "shared_cache")]
    pub version_table: Option<PathBuf>,

    /// Slots of a version table this process creates: one per inode any client holds, at
    /// most half full for fast lookups (16 bytes each; default 2 Mi, for 1 M inodes).
    #[arg(long, value_name = "N", requires = "shared_cache",
          default_value_t = berth_versions::DEFAULT_SLOTS)]
    pub version_slots: u64,

    /// How changes made by host processes are seen: fanotify (root), inotify, auto (fanotify
    /// when permitted), off (only when nothing but berth changes the directory).
    #[arg(long, value_name = "MODE", requires = "shared_cache", default_value = "auto",
          value_parser = |s: &str| s.parse::<WatchMode>())]
    pub watch_host: WatchMode,
}

/// What `--shared-cache` set up before the sandbox.
pub struct SharedCacheSetup {
    table: Arc<VersionTable>,
    watch: WatchMode,
}

/// The default table path for the directory with `dev`/`ino`.
fn default_table_path(dev: u64, ino: u64) -> anyhow::Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/berth")
    } else {
        let runtime = std::env::var_os("XDG_RUNTIME_DIR").context(
            "--shared-cache without --version-table needs XDG_RUNTIME_DIR when not run as root",
        )?;
        PathBuf::from(runtime).join("berth")
    };
    Ok(base.join("versions").join(format!("{dev:x}-{ino}.table")))
}

/// Opens (or builds) the version table of `shared_dir`; `None` without `--shared-cache`.
pub fn open_table(
    args: &SharedCacheArgs,
    shared_dir: &Path,
    writeback: bool,
) -> anyhow::Result<Option<SharedCacheSetup>> {
    if !args.shared_cache {
        return Ok(None);
    }
    if writeback {
        anyhow::bail!(
            "--shared-cache cannot be combined with --writeback: written data would stay in \
             this mount's page cache, unseen by the others"
        );
    }
    let meta = std::fs::metadata(shared_dir)
        .with_context(|| format!("cannot stat the shared directory {}", shared_dir.display()))?;
    let path = match &args.version_table {
        Some(path) => path.clone(),
        None => default_table_path(meta.dev(), meta.ino())?,
    };
    let (table, outcome) = VersionTable::open(&TableOptions {
        path: path.clone(),
        slots: args.version_slots,
        share_dev: meta.dev(),
        share_ino: meta.ino(),
    })?;
    match outcome {
        OpenOutcome::Created => info!("Created the version table {}.", path.display()),
        OpenOutcome::Attached => info!("Attached to the version table {}.", path.display()),
        OpenOutcome::NewGeneration => info!(
            "Attached to the version table {} with a new generation (its index was filling up).",
            path.display()
        ),
        OpenOutcome::Rebuilt(reason) => {
            warn!("Rebuilt the version table {}: {reason}.", path.display())
        }
        OpenOutcome::KeptSize(slots) => warn!(
            "The version table {} has {slots} slots, not the {} asked for; other processes use \
             it, so it keeps its size.",
            path.display(),
            args.version_slots
        ),
    }
    Ok(Some(SharedCacheSetup {
        table: Arc::new(table),
        watch: args.watch_host,
    }))
}

impl SharedCacheSetup {
    /// The table.
    pub fn table(&self) -> &Arc<VersionTable> {
        &self.table
    }

    /// Inside the sandbox, before capabilities are dropped: sets up the host watcher and turns
    /// shared caching on in `fs`. `track_client`: keep track of what the client cached, for a
    /// notifier (a `berth fuse` mount; a virtio-fs guest compares versions itself). Returns
    /// the watcher, to be started with [`start_watcher`].
    pub fn attach(&self, fs: &mut Config, track_client: bool) -> anyhow::Result<HostWatcher> {
        let watcher = HostWatcher::new(self.watch, &fs.root_dir, self.table.clone())?;
        info!(
            "Shared caching: host changes are seen through {}.",
            watcher.kind()
        );
        fs.shared_cache = Some(SharedCache {
            table: self.table.clone(),
            watched_devices: if self.watch == WatchMode::Off {
                // Nothing but berth changes the directory, by the user's word.
                vec![std::fs::metadata(&fs.root_dir)
                    .map(|m| m.dev())
                    .context("cannot stat the shared directory")?]
            } else {
                watcher.devices().to_vec()
            },
            timeout: SHARED_TIMEOUT,
            track_client,
        });
        Ok(watcher)
    }
}

/// Starts the watcher's thread (after the main thread's filter is in place).
pub fn start_watcher(watcher: HostWatcher, seccomp: SeccompAction) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("berth-watch".into())
        .spawn(move || {
            if let Err(e) = berth_seccomp::install_filter(ThreadRole::HostWatcher, seccomp) {
                tracing::error!("The host watcher cannot confine itself ({e}); it does not run.");
                return;
            }
            watcher.run();
        })
        .context("cannot start the host watcher thread")?;
    Ok(())
}
