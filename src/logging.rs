//! Log output: tracing events (and the `log` records of the vhost and FUSE crates) go to stderr,
//! or to the local syslog socket with `--syslog`.

use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::cli::LogLevel;

/// Where syslog(3) sends its messages.
const SYSLOG_SOCKET: &str = "/dev/log";
/// Facility `user` (1), shifted as syslog priorities expect.
const FACILITY_USER: u8 = 1 << 3;

impl From<LogLevel> for LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Off => LevelFilter::OFF,
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        }
    }
}

/// Installs the global logger. An explicit level wins; without one, RUST_LOG's filter applies
/// (as with virtiofsd), else `info`. With `syslog` and no reachable syslog socket, logs go to
/// stderr and a warning says so. Returns whether logs go to stderr.
pub fn init(level: Option<LogLevel>, syslog: bool) -> bool {
    let level_filter = |level: LevelFilter| EnvFilter::default().add_directive(level.into());
    let filter = match level {
        Some(level) => level_filter(level.into()),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| level_filter(LevelFilter::INFO))
        }
    };
    // A log line that cannot be written (stderr closed, a full pipe) is lost, not reported:
    // the report would go to stderr too, and failing to print it panics the logging thread.
    let builder = tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(io::stderr().is_terminal());
    if !syslog {
        builder.with_writer(io::stderr).init();
        return true;
    }
    match SyslogWriter::connect() {
        Ok(writer) => {
            builder
                .with_ansi(false)
                .without_time()
                .with_writer(writer)
                .init();
            false
        }
        Err(e) => {
            builder.with_writer(io::stderr).init();
            tracing::warn!(
                "Cannot log to syslog because {SYSLOG_SOCKET} is not reachable ({e}); logging to stderr instead."
            );
            true
        }
    }
}

/// Sends each formatted event to the syslog socket as one datagram.
#[derive(Clone)]
struct SyslogWriter {
    socket: Arc<UnixDatagram>,
    prefix: String,
}

impl SyslogWriter {
    fn connect() -> io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(SYSLOG_SOCKET)?;
        Ok(SyslogWriter {
            socket: Arc::new(socket),
            prefix: format!("berth[{}]: ", std::process::id()),
        })
    }
}

fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// One event being formatted; sent when the formatter drops it.
struct SyslogMessage {
    socket: Arc<UnixDatagram>,
    buf: Vec<u8>,
}

impl Write for SyslogMessage {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogMessage {
    fn drop(&mut self) {
        while self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        // A full or vanished syslog daemon must not stall or kill the daemon: drop the line.
        let _ = self.socket.send(&self.buf);
    }
}

impl<'a> MakeWriter<'a> for SyslogWriter {
    type Writer = SyslogMessage;

    fn make_writer(&'a self) -> Self::Writer {
        self.message(6)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        self.message(severity(meta.level()))
    }
}

impl SyslogWriter {
    fn message(&self, severity: u8) -> SyslogMessage {
        let mut buf = format!("<{}>", FACILITY_USER | severity).into_bytes();
        buf.extend_from_slice(self.prefix.as_bytes());
        SyslogMessage {
            socket: self.socket.clone(),
            buf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_datagram_carries_priority_and_tag() {
        let (receiver, sender) = UnixDatagram::pair().unwrap();
        let writer = SyslogWriter {
            socket: Arc::new(sender),
            prefix: "berth[42]: ".into(),
        };
        {
            let mut message = writer.message(severity(&Level::WARN));
            message.write_all(b"WARN berth: disk on fire\n").unwrap();
        }
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<12>berth[42]: WARN berth: disk on fire");
    }
}
