#![no_main]
//! One virtio-blk request in a descriptor chain, served by berth's vhost-user-blk request
//! path against a raw file.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = berth_fuzz::blk_request::serve(data);
});
