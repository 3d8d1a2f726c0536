//! A tmpfs mounted for the life of a value (root only): a filesystem of the test's own, which
//! nothing else writes to, with a size limit where the test needs one.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// Mounts a tmpfs on `dir`, of at most `size` (mount's `size=` syntax, e.g. `20m`; `None`:
    /// tmpfs's default); `None` when the mount fails.
    pub fn new(dir: &Path, size: Option<&str>) -> Option<Self> {
        let mut mount = Command::new("mount");
        mount.args(["-t", "tmpfs"]);
        if let Some(size) = size {
            mount.arg("-o").arg(format!("size={size}"));
        }
        let mounted = mount
            .arg("berth-test")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| TmpfsMount(dir.to_owned()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
