#![no_main]
//! The DAX window manager driven by random setups, removals and file size changes against a
//! model (harness and input format in `src/dax.rs`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    berth_fuzz::dax::check(data);
});
