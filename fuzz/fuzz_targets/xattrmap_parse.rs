#![no_main]
//! The `--xattrmap` rule parser and matcher (harness and input format in
//! `src/xattrmap.rs`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    berth_fuzz::xattrmap::check(data);
});
