//! The pre-created file set every backend and the native baseline work on.
//!
//! `data-N`: read-only files filled with the pattern (file id N, generation 0).
//! `wdata-N`: files the write workloads overwrite (file id `WRITE_FILE_BASE + N`).
//! `tree/dJ/fK`: empty files for LOOKUP/GETATTR storms; each `dJ` is also a READDIRPLUS target.
//! `churn/qN`: empty directories for CREATE/UNLINK churn.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::pattern;

/// Logical queues (and so files of each kind) the set is built for.
pub const FILES: usize = 4;
/// File ids of the write files start here, so they never match the read files' pattern.
pub const WRITE_FILE_BASE: u64 = 100;
const MARKER: &str = ".berth-loadgen-layout";

/// Sizes of the file set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub file_size: u64,
    pub tree_dirs: usize,
    pub files_per_dir: usize,
}

impl Layout {
    pub fn full() -> Self {
        Self {
            file_size: 128 << 20,
            tree_dirs: 10,
            files_per_dir: 10_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            file_size: 4 << 20,
            tree_dirs: 4,
            files_per_dir: 250,
        }
    }

    fn describe(&self) -> String {
        format!(
            "v1 files={FILES} size={} dirs={} per_dir={}\n",
            self.file_size, self.tree_dirs, self.files_per_dir
        )
    }
}

/// A file set on disk, with the inode numbers of the tree for checking LOOKUP replies.
pub struct FileSet {
    pub root: PathBuf,
    pub layout: Layout,
    /// `tree_inos[dir][file]`.
    pub tree_inos: Vec<Vec<u64>>,
}

pub fn data_name(index: usize) -> String {
    format!("data-{index}")
}

pub fn write_name(index: usize) -> String {
    format!("wdata-{index}")
}

pub fn dir_name(index: usize) -> String {
    format!("d{index}")
}

pub fn tree_file_name(index: usize) -> String {
    format!("f{index}")
}

pub fn churn_name(index: usize) -> String {
    format!("q{index}")
}

impl FileSet {
    /// Opens the set at `root`, creating it first unless a complete one of `layout` is there.
    pub fn prepare(root: &Path, layout: Layout) -> Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
        let marker = root.join(MARKER);
        let current = fs::read_to_string(&marker).unwrap_or_default();
        if current != layout.describe() {
            let stray = fs::read_dir(root)?
                .filter_map(|e| e.ok())
                .any(|e| !is_ours(&e.file_name().to_string_lossy()));
            if stray {
                bail!(
                    "{} holds files the load generator did not create; use an empty directory",
                    root.display()
                );
            }
            eprintln!(
                "loadgen: creating the file set in {} ({} MiB x {} x 2 files, {} x {} tree)...",
                root.display(),
                layout.file_size >> 20,
                FILES,
                layout.tree_dirs,
                layout.files_per_dir
            );
            let _ = fs::remove_file(&marker);
            create(root, layout)?;
            fs::write(&marker, layout.describe())?;
        }
        let mut tree_inos = Vec::with_capacity(layout.tree_dirs);
        for dir in 0..layout.tree_dirs {
            let dir_path = root.join("tree").join(dir_name(dir));
            let mut inos = Vec::with_capacity(layout.files_per_dir);
            for file in 0..layout.files_per_dir {
                let path = dir_path.join(tree_file_name(file));
                let meta = fs::symlink_metadata(&path)
                    .with_context(|| format!("the file set lacks {}", path.display()))?;
                inos.push(meta.ino());
            }
            tree_inos.push(inos);
        }
        // Leftovers of an interrupted churn run would make the next one fail on O_EXCL.
        for queue in 0..FILES {
            let churn = root.join("churn").join(churn_name(queue));
            for entry in fs::read_dir(&churn)? {
                fs::remove_file(entry?.path())?;
            }
        }
        Ok(Self {
            root: root.to_owned(),
            layout,
            tree_inos,
        })
    }

    pub fn data_path(&self, index: usize) -> PathBuf {
        self.root.join(data_name(index))
    }

    pub fn write_path(&self, index: usize) -> PathBuf {
        self.root.join(write_name(index))
    }

    pub fn dir_path(&self, index: usize) -> PathBuf {
        self.root.join("tree").join(dir_name(index))
    }

    pub fn churn_path(&self, index: usize) -> PathBuf {
        self.root.join("churn").join(churn_name(index))
    }

    /// Checks that `[offset, offset + len)` of write file `index` holds `generation`'s data.
    pub fn verify_written(
        &self,
        index: usize,
        generation: u64,
        offset: u64,
        len: usize,
    ) -> Result<()> {
        let file = File::open(self.write_path(index))?;
        let mut buffer = vec![0u8; len];
        file.read_exact_at(&mut buffer, offset)?;
        pattern::check(&buffer, WRITE_FILE_BASE + index as u64, generation, offset).map_err(|at| {
            anyhow::anyhow!(
                "{} at {at}: the data written through the daemon is not on the host",
                write_name(index)
            )
        })
    }

    /// Checks that no churn file was left behind.
    pub fn verify_churn_empty(&self) -> Result<()> {
        for queue in 0..FILES {
            let path = self.churn_path(queue);
            if let Some(entry) = fs::read_dir(&path)?.next() {
                bail!(
                    "{} was left behind by CREATE/UNLINK churn",
                    entry?.path().display()
                );
            }
        }
        Ok(())
    }
}

fn is_ours(name: &str) -> bool {
    name == MARKER
        || name == "tree"
        || name == "churn"
        || name.starts_with("data-")
        || name.starts_with("wdata-")
}

fn create(root: &Path, layout: Layout) -> Result<()> {
    let mut chunk = vec![0u8; 1 << 20];
    for index in 0..FILES {
        let mut file = File::create(root.join(data_name(index)))?;
        let mut offset = 0;
        while offset < layout.file_size {
            let len = chunk.len().min((layout.file_size - offset) as usize);
            pattern::fill(&mut chunk[..len], index as u64, 0, offset);
            file.write_all(&chunk[..len])?;
            offset += len as u64;
        }
        let write_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(write_name(index)))?;
        write_file.set_len(layout.file_size)?;
    }
    for dir in 0..layout.tree_dirs {
        let dir_path = root.join("tree").join(dir_name(dir));
        fs::create_dir_all(&dir_path)?;
        for file in 0..layout.files_per_dir {
            let path = dir_path.join(tree_file_name(file));
            if !path.exists() {
                File::create(&path)?;
            }
        }
    }
    for queue in 0..FILES {
        fs::create_dir_all(root.join("churn").join(churn_name(queue)))?;
    }
    Ok(())
}
