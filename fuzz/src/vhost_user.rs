//! Feeds a byte stream, as a VMM would write it to the vhost-user socket, to the message
//! handling berth runs on its control thread: vhost-user-backend's daemon and request handler
//! driving berth's own device, `FsBackend` from src/vhost_user.rs (features, protocol
//! features, config space reads and writes, memory tables, vring set-up), over a scratch
//! shared directory.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, OnceLock};

use berth_passthrough::{Config, FsServer, PassthroughFs};
use berth_seccomp::SeccompAction;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{DeviceOptions, FsBackend};

struct Shared {
    server: Arc<FsServer>,
    _dir: tempfile::TempDir,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("scratch directory");
        std::fs::write(dir.path().join("file"), b"hello fuzzer\n").expect("fixture file");
        let fs = PassthroughFs::new(Config {
            root_dir: dir.path().to_owned(),
            xattr: true,
            ..Default::default()
        })
        .expect("passthrough filesystem");
        Shared {
            server: Arc::new(FsServer::new(fs)),
            _dir: dir,
        }
    })
}

/// Runs berth's device behind a daemon connected to a fresh socket, writes `data` to it as
/// the frontend, hangs up, waits until the control thread has finished with the stream, and
/// tears everything down (queue threads joined, descriptors closed).
pub fn serve(data: &[u8]) {
    let dir = tempfile::tempdir().expect("socket directory");
    let path = dir.path().join("vhost.sock");
    let listener = UnixListener::bind(&path).expect("bind socket");
    let backend = Arc::new(
        FsBackend::new(
            shared().server.clone(),
            DeviceOptions {
                tag: Some("fuzz".to_owned()),
                max_request_queues: 2,
                thread_pool_size: 0,
                poll_us: 0,
                seccomp: SeccompAction::None,
                dax_window: 0,
                versions: None,
                metrics: None,
            },
        )
        .expect("device"),
    );
    let mut daemon = VhostUserDaemon::new(
        "fuzz-control".to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::<BitmapMmapRegion>::new()),
    )
    .expect("daemon");
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
    // Joins the queue threads (each exits on its exit event), then closes the exit events'
    // descriptors that the library keeps: without that, a process creating daemon after
    // daemon runs out of descriptors after some 20 000 inputs here, gets no exit event for
    // the next daemon's threads, and hangs joining them.
    drop(daemon);
    backend.reclaim_exit_events();
}

/// Descriptors this process has open (for the teardown test).
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
