//! The vhost_user_message harness creates and drops a daemon per input: its descriptors must
//! not accumulate, or after some 20 000 inputs a daemon gets no exit events for its queue
//! threads and the harness hangs joining them (the hang that kept this target out of CI).
//! A test binary of its own, so that no other test opens descriptors meanwhile.

#[test]
fn a_daemon_per_input_leaks_no_descriptors() {
    let handshake = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus/vhost_user_message/handshake"),
    )
    .unwrap();
    // The first runs create the shared directory and the like.
    for _ in 0..5 {
        berth_fuzz::vhost_user::serve(&handshake);
    }
    let before = berth_fuzz::vhost_user::open_descriptors();
    for _ in 0..300 {
        berth_fuzz::vhost_user::serve(&handshake);
    }
    let after = berth_fuzz::vhost_user::open_descriptors();
    assert!(
        after <= before,
        "{before} descriptors before 300 daemons, {after} after"
    );
}
