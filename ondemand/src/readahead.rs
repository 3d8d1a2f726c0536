//! The kernel's read-ahead window on the erofs mounts berth makes.
//!
//! erofs gives a mount that is not on a block device (file-backed, as `berth mount` makes
//! in fanotify mode, and fscache mode) a backing device of its own, `erofs-N` in
//! `/sys/class/bdi`, with the kernel's default window of 128 KiB. Every window of a
//! sequential reader is one read down the stack (in fscache mode a cachefiles read of the
//! cache object), so a wider one costs fewer round trips: berth sets it as it mounts
//! (`--kernel-readahead`). The kernel names the device after a global counter, and nothing
//! links it to its mount, so it is found as the one `erofs-N` that appeared during the
//! mount. berth's own mounts are made one at a time for that; if another program mounted
//! erofs at the same moment, two appear, and the window is left at the kernel's default
//! with a warning.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

/// The window berth's mounts get unless told otherwise.
pub const DEFAULT_KERNEL_READAHEAD: u64 = 4 << 20;

const BDI_DIR: &str = "/sys/class/bdi";

/// Held across a mount and the search for its backing device.
static MOUNTING: Mutex<()> = Mutex::new(());

fn erofs_devices(dir: &Path) -> HashSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| name.starts_with("erofs-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `mount` (an erofs mount at `mountpoint`), then sets the new mount's read-ahead
/// window to `window` bytes (rounded down to KiB; 0 leaves the kernel's default). Failing
/// to set it is logged, never an error: the mount works either way.
pub fn mount_with_readahead<E>(
    window: u64,
    mountpoint: &Path,
    mount: impl FnOnce() -> Result<(), E>,
) -> Result<(), E> {
    if window < 1024 {
        return mount();
    }
    let _serial = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(BDI_DIR);
    let before = erofs_devices(dir);
    mount()?;
    let new: Vec<String> = erofs_devices(dir).difference(&before).cloned().collect();
    match set_window(dir, &new, window) {
        Ok(device) => tracing::info!(
            mountpoint = %mountpoint.display(),
            "kernel read-ahead of the mount set to {} KiB ({device})",
            window / 1024
        ),
        Err(why) => tracing::warn!(
            mountpoint = %mountpoint.display(),
            "the mount keeps the kernel's default read-ahead: {why}"
        ),
    }
    Ok(())
}

/// Writes `window` into the one device of `new`; returns its name.
fn set_window(dir: &Path, new: &[String], window: u64) -> Result<String, String> {
    let [device] = new else {
        return Err(format!(
            "{} erofs backing devices appeared in {} during the mount, not one",
            new.len(),
            dir.display()
        ));
    };
    let path = dir.join(device).join("read_ahead_kb");
    std::fs::write(&path, format!("{}\n", window / 1024))
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    Ok(device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_goes_to_the_one_new_device_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["erofs-1", "erofs-2", "254:0"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let before = erofs_devices(dir.path());
        assert_eq!(before.len(), 2);
        std::fs::create_dir(dir.path().join("erofs-3")).unwrap();
        let new: Vec<String> = erofs_devices(dir.path())
            .difference(&before)
            .cloned()
            .collect();
        assert_eq!(set_window(dir.path(), &new, 4 << 20).unwrap(), "erofs-3");
        let written = std::fs::read_to_string(dir.path().join("erofs-3/read_ahead_kb")).unwrap();
        assert_eq!(written, "4096\n");
        // Two new ones (another program mounted meanwhile), or none: left alone.
        let two = vec!["erofs-4".to_string(), "erofs-5".to_string()];
        assert!(set_window(dir.path(), &two, 4 << 20)
            .unwrap_err()
            .contains("2 erofs backing devices"));
        assert!(set_window(dir.path(), &[], 4 << 20).is_err());
    }
}
