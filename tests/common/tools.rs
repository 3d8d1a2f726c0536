//! Third-party test programs the integration tests run against berth's mounts (pjdfstest,
//! fsx): found through an environment variable, or in the cache directory `tests/run-all.sh`
//! builds them into (`cargo install … --root ~/.cache/berth/NAME-VERSION`).
//!
//! Included with `#[path = "common/tools.rs"] mod tools;`.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The binary `name` of `crate_and_version` (e.g. `pjdfstest-0.2.2`): the path in `env_var`
/// if set, else the one in the cache, if it is there.
pub fn installed_tool(env_var: &str, crate_and_version: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    let binary = cache
        .join("berth")
        .join(crate_and_version)
        .join("bin")
        .join(name);
    binary.is_file().then_some(binary)
}

/// Runs `binary` with `args` to its end; its exit status and its output (stdout, then
/// stderr) as text.
pub fn run<I, S>(binary: &Path, args: I) -> (ExitStatus, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

/// The last `count` lines of `text`, in their order.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}
