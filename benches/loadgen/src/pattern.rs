//! The data pattern of the file set: every 8-byte word is a function of the file, a write
//! generation and its offset, so a read can be checked without keeping a copy of the data and
//! a daemon that returns stale, misplaced or zeroed data is caught.

/// Words are checked every this many bytes (plus the last word of each buffer).
pub const CHECK_STRIDE: usize = 512;

/// The word at byte `offset` (a multiple of 8) of file `file` written in generation `generation`.
pub fn word(file: u64, generation: u64, offset: u64) -> u64 {
    (offset ^ (file << 40) ^ (generation << 52) ^ 0x5bd1_e995_0000_0000).rotate_left(13)
}

/// Fills `buffer` with the pattern of `[offset, offset + buffer.len())`.
pub fn fill(buffer: &mut [u8], file: u64, generation: u64, offset: u64) {
    for (index, chunk) in buffer.chunks_exact_mut(8).enumerate() {
        let value = word(file, generation, offset + 8 * index as u64);
        chunk.copy_from_slice(&value.to_le_bytes());
    }
}

/// Checks a sample of the words of `buffer` (one every [`CHECK_STRIDE`] bytes and the last),
/// returning the offset of the first wrong word.
pub fn check(buffer: &[u8], file: u64, generation: u64, offset: u64) -> Result<(), u64> {
    let last = buffer.len().saturating_sub(8) & !7;
    let positions = (0..buffer.len().saturating_sub(7))
        .step_by(CHECK_STRIDE)
        .chain(std::iter::once(last));
    for position in positions {
        let Some(bytes) = buffer.get(position..position + 8) else {
            return Err(offset + position as u64);
        };
        let mut word_bytes = [0u8; 8];
        word_bytes.copy_from_slice(bytes);
        let at = offset + position as u64;
        if u64::from_le_bytes(word_bytes) != word(file, generation, at) {
            return Err(at);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_buffer_checks_and_corruption_is_found() {
        let mut buffer = vec![0u8; 8192];
        fill(&mut buffer, 3, 1, 4096);
        assert_eq!(check(&buffer, 3, 1, 4096), Ok(()));
        assert!(check(&buffer, 3, 2, 4096).is_err(), "another generation");
        assert!(check(&buffer, 2, 1, 4096).is_err(), "another file");
        assert!(check(&buffer, 3, 1, 0).is_err(), "another offset");
        buffer[8192 - 3] ^= 1;
        assert_eq!(check(&buffer, 3, 1, 4096), Err(4096 + 8192 - 8));
        assert!(
            check(&[0u8; 4096], 0, 0, 0).is_err(),
            "zeroes are not the pattern"
        );
    }
}
