//! The notification side of `berth fuse --shared-cache`: a thread that sleeps on the version
//! table and, when slots of inodes this mount's kernel has cached move, writes
//! FUSE_NOTIFY_INVAL_INODE and FUSE_NOTIFY_INVAL_ENTRY (expire only) to /dev/fuse, so the
//! kernel refetches them at the next access.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_passthrough::{FsServer, Invalidation};
use berth_seccomp::{SeccompAction, ThreadRole};
use tracing::{debug, error};

const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
/// Expire the dentry (revalidate at the next access) instead of dropping it.
const FUSE_EXPIRE_ONLY: u32 = 1;
/// How long the thread sleeps without news before it checks the table anyway.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Starts the notifier on `fuse`, a descriptor of the mount's FUSE connection.
pub fn start(server: Arc<FsServer>, fuse: File, seccomp: SeccompAction) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("berth-notify".into())
        .spawn(move || {
            if let Err(e) = berth_seccomp::install_filter(ThreadRole::FuseNotifier, seccomp) {
                error!(
                    "The FUSE notifier cannot confine itself ({e}); caches are not invalidated."
                );
                return;
            }
            run(&server, fuse);
        })
        .context("cannot start the FUSE notifier thread")?;
    Ok(())
}

fn run(server: &FsServer, mut fuse: File) {
    let fs = server.fs();
    let Some(table) = fs.version_table() else {
        return;
    };
    let mut feed = table.feed();
    loop {
        feed.wait(IDLE_WAIT);
        let changes = feed.poll();
        for invalidation in fs.stale_cache(changes) {
            let message = encode(&invalidation);
            match fuse.write(&message) {
                Ok(_) => {}
                // Not (or no longer) in the kernel's cache: nothing to drop.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return,
                Err(e) => debug!("A FUSE invalidation failed: {e}."),
            }
        }
    }
}

/// One notification as the kernel reads it: `fuse_out_header` (unique 0, the code in
/// `error`) and the notification's body.
fn encode(invalidation: &Invalidation) -> Vec<u8> {
    let mut body = Vec::new();
    let code = match invalidation {
        Invalidation::Inode(node) => {
            body.extend_from_slice(&node.to_ne_bytes());
            body.extend_from_slice(&0i64.to_ne_bytes()); // from offset 0
            body.extend_from_slice(&0i64.to_ne_bytes()); // to the end
            FUSE_NOTIFY_INVAL_INODE
        }
        Invalidation::Entry { parent, name } => {
            body.extend_from_slice(&parent.to_ne_bytes());
            body.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            body.extend_from_slice(&FUSE_EXPIRE_ONLY.to_ne_bytes());
            body.extend_from_slice(name);
            body.push(0);
            FUSE_NOTIFY_INVAL_ENTRY
        }
    };
    let mut message = Vec::with_capacity(16 + body.len());
    message.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&code.to_ne_bytes());
    message.extend_from_slice(&0u64.to_ne_bytes());
    message.extend_from_slice(&body);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_laid_out_as_the_kernel_reads_them() {
        let inode = encode(&Invalidation::Inode(7));
        assert_eq!(inode.len(), 40);
        assert_eq!(&inode[0..4], &40u32.to_ne_bytes());
        assert_eq!(&inode[4..8], &2i32.to_ne_bytes());
        assert_eq!(&inode[16..24], &7u64.to_ne_bytes());
        let entry = encode(&Invalidation::Entry {
            parent: 1,
            name: b"abc"[..].into(),
        });
        assert_eq!(entry.len(), 16 + 16 + 4);
        assert_eq!(&entry[4..8], &3i32.to_ne_bytes());
        assert_eq!(&entry[24..28], &3u32.to_ne_bytes());
        assert_eq!(&entry[28..32], &1u32.to_ne_bytes());
        assert_eq!(&entry[32..], b"abc\0");
    }
}
