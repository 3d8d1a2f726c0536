//! Copying a device out to a plain file: what `berth block commit` folds an overlay and
//! its base into, before the result is turned into a new image.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::target::{read_at, BlockTarget, Source};

/// Writes every block of `target` into a new sparse file at `out` (zeros stay holes);
/// returns the bytes of data written.
pub fn export_to_file(target: &dyn BlockTarget, out: &Path) -> Result<u64> {
    let size = target.info().size;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .context(|| format!("creating {}", out.display()))?;
    file.set_len(size)
        .context(|| format!("sizing {}", out.display()))?;
    const STEP: u64 = 1 << 20;
    let mut buf = vec![0u8; STEP as usize];
    let mut extents = Vec::new();
    let mut written = 0;
    let mut at = 0;
    while at < size {
        let n = (size - at).min(STEP);
        extents.clear();
        let pin = crate::target::map_read_waiting(target, at, n, &mut extents)?;
        let all_zero = extents.iter().all(|e| e.source == Source::Zero);
        drop(pin);
        if all_zero {
            at += n;
            continue;
        }
        let chunk = &mut buf[..n as usize];
        read_at(target, at, chunk)?;
        // Whole zero blocks stay holes.
        let block = target.info().block_size as usize;
        for (i, piece) in chunk.chunks(block).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                let offset = at + (i * block) as u64;
                file.write_all_at(piece, offset)
                    .context(|| format!("writing {}", out.display()))?;
                written += piece.len() as u64;
            }
        }
        at += n;
    }
    file.sync_all()
        .context(|| format!("syncing {}", out.display()))?;
    Ok(written)
}
