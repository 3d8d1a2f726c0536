#![no_main]
//! A raw FUSE request in 1-3 readable descriptors plus a reply descriptor, served by the
//! passthrough filesystem (see berth_fuzz::fuse for the input encoding).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = berth_fuzz::fuse::serve(data);
});
