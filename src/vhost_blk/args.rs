//! `berth block serve-vhost` command line.

use std::os::unix::io::RawFd;
use std::path::PathBuf;

use clap::Args;

use crate::block::args::TargetArgs;
use crate::cli::CommonArgs;

/// Largest virtqueue the frontend may configure (a power of two, as split rings need).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Queues a device may have: one queue thread each, named by a bit of a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;

/// `berth block serve-vhost` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeVhostArgs {
    /// Image (a directory holding manifest.json, or the manifest), file / block device, or
    /// volume (`volume:s3://BUCKET/PREFIX`, see `berth volume`) to export.
    #[arg(value_name = "IMAGE|FILE|volume:LOCATION",
          required_unless_present_any = ["print_capabilities", "blk_file"])]
    pub target: Option<PathBuf>,

    /// The target given as a flag, as the vhost-user backend conventions spell it (libvirt).
    #[arg(long, value_name = "PATH", conflicts_with = "target")]
    pub blk_file: Option<PathBuf>,

    /// vhost-user socket to create and listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"])]
    pub socket_path: Option<PathBuf>,

    /// An inherited, already listening vhost-user socket.
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    pub fd: Option<RawFd>,

    /// Copy-on-write overlay file for writes (created if missing): a read-only image becomes
    /// a writable disk.
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,

    /// Export read-only (VIRTIO_BLK_F_RO): writes fail with an I/O error.
    #[arg(long, alias = "read-only")]
    pub readonly: bool,

    /// Request queues offered (VIRTIO_BLK_F_MQ); each is served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    pub queues: u16,

    /// Largest queue size the frontend may configure (QEMU's `queue-size` must not exceed it).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number the guest reads (VIRTIO_BLK_T_GET_ID), up to 20 bytes
    /// [default: the target's file name].
    #[arg(long, value_name = "TEXT", value_parser = parse_serial)]
    pub serial: Option<String>,

    /// How the process confines itself once the target is open: `namespace` (new mount, pid
    /// and network namespaces with the target's directory as the root; for an image, a root
    /// holding only its cache, its directory, a local backend's and the overlay's; for a
    /// volume, its --volume-dir and a file:// bucket's directory; the host's network kept for
    /// S3 or HTTP), `chroot` (root only; files and block devices only), or `none`.
    #[arg(long, value_name = "MODE", default_value = "namespace", value_parser = parse_sandbox)]
    pub sandbox: berth_seccomp::SandboxMode,

    /// What a thread's system call outside its allow-list does: `kill` the process, `log` it
    /// to the audit log and let it through, `trap` (SIGSYS), or `none` (no filter).
    #[arg(long, value_name = "ACTION", default_value = "kill", value_parser = parse_seccomp)]
    pub seccomp: berth_seccomp::SeccompAction,

    /// Keep the device's metrics in this file (Prometheus text format): requests, bytes,
    /// errors and a latency histogram per operation, with the image's cache engine or the
    /// volume's counters. Rewritten every --metrics-interval and at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// How often the metrics file is rewritten.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub metrics_interval: u64,

    /// Print the vhost-user backend capabilities (JSON, `"type": "blk"`) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    #[command(flatten)]
    pub target_options: TargetArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n.is_power_of_two() && n <= MAX_QUEUE_SIZE => Ok(n),
        _ => Err(format!(
            "`{s}` is not a power of two from 1 to {MAX_QUEUE_SIZE}"
        )),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("`{s}` is longer than 20 bytes"));
    }
    Ok(s.to_owned())
}

fn parse_sandbox(s: &str) -> Result<berth_seccomp::SandboxMode, String> {
    s.parse().map_err(|e: berth_seccomp::Error| e.to_string())
}

fn parse_seccomp(s: &str) -> Result<berth_seccomp::SeccompAction, String> {
    s.parse().map_err(|e: berth_seccomp::Error| e.to_string())
}

impl ServeVhostArgs {
    /// The image or file to export, however it was given.
    pub fn target_path(&self) -> Option<&PathBuf> {
        self.target.as_ref().or(self.blk_file.as_ref())
    }
}

/// The JSON `--print-capabilities` prints, as the vhost-user specification's backend
/// program conventions describe it.
pub fn capabilities_json() -> String {
    serde_json::json!({ "type": "blk", "features": ["read-only", "blk-file"] }).to_string()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::block::BlockCommand;
    use crate::cli::{Cli, Command};

    fn serve_vhost(args: &[&str]) -> Result<super::ServeVhostArgs, clap::Error> {
        let argv = ["berth", "block", "serve-vhost"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Block(BlockCommand::ServeVhost(args))) => Ok(args),
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn serve_vhost_flags_parse() {
        let args = serve_vhost(&[
            "--socket-path=/run/d.sock",
            "--queues=4",
            "--queue-size=256",
            "--serial=disk0",
            "--overlay=/o",
            "/srv/img",
        ])
        .unwrap();
        assert_eq!(args.target_path().unwrap().to_str(), Some("/srv/img"));
        assert_eq!((args.queues, args.queue_size), (4, 256));
        assert_eq!(args.serial.as_deref(), Some("disk0"));
        // The vhost-user backend conventions' spellings.
        let args = serve_vhost(&["--fd=3", "--blk-file=/f", "--read-only"]).unwrap();
        assert_eq!(args.target_path().unwrap().to_str(), Some("/f"));
        assert!(args.readonly && args.fd == Some(3));
        assert!(
            serve_vhost(&["--print-capabilities"])
                .unwrap()
                .print_capabilities
        );
    }

    #[test]
    fn serve_vhost_refuses_what_it_cannot_serve() {
        for bad in [
            &["/f"][..],                                     // no socket
            &["--socket-path=/s"],                           // no target
            &["--socket-path=/s", "--queues=0", "/f"],       // no queue
            &["--socket-path=/s", "--queues=65", "/f"],      // more than 64
            &["--socket-path=/s", "--queue-size=100", "/f"], // not a power of two
            &["--socket-path=/s", "--serial=123456789012345678901", "/f"],
            &["--socket-path=/s", "--fd=3", "/f"],
            &["--socket-path=/s", "--blk-file=/g", "/f"],
            &["--socket-path=/s", "--sandbox=jail", "/f"],
        ] {
            assert!(serve_vhost(bad).is_err(), "{bad:?} accepted");
        }
    }
}
