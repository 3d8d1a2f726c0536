#![no_main]
//! A byte stream on the vhost-user socket, handled by the vhost-user daemon library.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    berth_fuzz::vhost_user::serve(data);
});
