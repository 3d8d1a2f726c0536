//! Feeds a byte stream, as a VMM would write it to the vhost-user socket, to the vhost-user
//! message handling berth runs on its control thread (the vhost-user-backend library's daemon
//! and request handler), with a stand-in device that offers virtio-fs's queue layout and
//! features. berth's own device (src/vhost_user.rs) is in the binary and not reachable here.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// A device that accepts every configuration and serves nothing.
struct StandInDevice;

impl VhostUserBackend for StandInDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> std::io::Result<()> {
        Ok(())
    }

    /// Without exit events the queue threads never end and dropping the daemon joins forever
    /// (berth's device provides them the same way).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a daemon connected to a fresh socket, writes `data` to it as the frontend, hangs up,
/// and waits until the daemon's message thread has finished with the stream.
pub fn serve(data: &[u8]) {
    let dir = tempfile::tempdir().expect("socket directory");
    let path = dir.path().join("vhost.sock");
    let listener = UnixListener::bind(&path).expect("bind socket");
    let memory = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let mut daemon =
        VhostUserDaemon::new("fuzz".to_owned(), Arc::new(StandInDevice), memory).expect("daemon");
    let bytes = data.to_vec();
    let frontend = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            // The daemon may hang up first on a bad message: that is not an error here.
            let _ = stream.write_all(&bytes);
        }
    });
    // Errors are the daemon refusing bad input, which is what it should do; crashes, hangs
    // and sanitizer reports are what the fuzzer looks for.
    if daemon
        .start_client(path.to_str().expect("utf-8 path"))
        .is_ok()
    {
        let _ = daemon.wait();
    }
    let _ = frontend.join();
}
