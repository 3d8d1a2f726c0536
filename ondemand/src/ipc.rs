//! Messages between the processes of a cachefiles server (supervisor, worker, clients):
//! one JSON value per `SOCK_SEQPACKET` datagram, optionally carrying one file
//! descriptor (SCM_RIGHTS). Datagrams keep message boundaries, so a reader never sees
//! half a message; a peer that goes away reads as end of stream.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest message accepted (paths and options fit well inside it).
pub const MAX_MESSAGE: usize = 64 << 10;

/// A connected seqpacket pair (close-on-exec).
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A listening seqpacket socket at `path` (a stale socket file is replaced).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    // std has no seqpacket sockets: bound by hand.
    let _ = std::fs::remove_file(path);
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let (address, len) = socket_address(path)?;
    // SAFETY: `address` is a valid sockaddr_un of length `len`.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on our own socket.
    if unsafe { libc::listen(socket.as_raw_fd(), 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Connects to the seqpacket socket at `path`.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let (address, len) = socket_address(path)?;
    // SAFETY: `address` is a valid sockaddr_un of length `len`.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Accepts one connection (close-on-exec); `Ok(None)` if none is pending on a
/// non-blocking listener.
pub fn accept(listener: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: accept4 on a listening socket without an address buffer.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ECONNABORTED) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: accept4 returned a new descriptor nobody else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn socket_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the socket path {} is too long", path.display()),
        ));
    }
    for (slot, &byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((address, len as libc::socklen_t))
}

pub fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor the caller holds.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, flags);
    }
}

/// Sends `bytes` as one datagram, with `fd` attached if given.
pub fn send_bytes(socket: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: the control buffer holds one cmsghdr with one descriptor, and
        // CMSG_FIRSTHDR/CMSG_DATA point inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `header` describes valid buffers; MSG_NOSIGNAL turns a dead peer into EPIPE.
    let n = unsafe { libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else if n as usize != bytes.len() {
        Err(io::Error::other("short send"))
    } else {
        Ok(())
    }
}

/// Receives one datagram and the descriptor sent with it. `Ok(None)`: the peer is gone.
pub fn receive_bytes(socket: RawFd) -> io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    let mut bytes = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as in `send_bytes`.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: the buffers are ours and large enough; received descriptors are installed
    // close-on-exec.
    let n = unsafe { libc::recvmsg(socket, &mut header, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ECONNRESET) => Ok(None),
            _ => Err(err),
        };
    }
    // Descriptors are taken over before anything else, so none leaks on an error.
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if n == 0 {
        return Ok(None);
    }
    if header.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("a message was longer than allowed"));
    }
    bytes.truncate(n as usize);
    Ok(Some((bytes, fds.into_iter().next())))
}

/// Sends `message` as JSON.
pub fn send<T: Serialize>(socket: RawFd, message: &T, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    send_bytes(socket, &bytes, fd)
}

/// Receives one JSON message; a message that does not parse is an error (the peer is
/// not speaking this protocol), never a panic.
pub fn receive<T: DeserializeOwned>(socket: RawFd) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let Some((bytes, fd)) = receive_bytes(socket)? else {
        return Ok(None);
    };
    let message = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((message, fd)))
}

/// Waits up to `timeout_ms` for `fd` to become readable.
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    rc > 0 && pollfd.revents != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Hello {
        name: String,
        n: u64,
    }

    #[test]
    fn json_messages_and_descriptors_cross_a_pair() {
        let (a, b) = socket_pair().unwrap();
        let file = File::open("/proc/self/exe").unwrap();
        let hello = Hello {
            name: "x".repeat(1000),
            n: u64::MAX,
        };
        send(a.as_raw_fd(), &hello, Some(file.as_raw_fd())).unwrap();
        let (got, fd): (Hello, _) = receive(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(got, hello);
        let received = File::from(fd.unwrap());
        let (x, y) = (file.metadata().unwrap(), received.metadata().unwrap());
        assert_eq!((x.dev(), x.ino()), (y.dev(), y.ino()));
        send_bytes(a.as_raw_fd(), b"{not json", None).unwrap();
        assert!(receive::<Hello>(b.as_raw_fd()).is_err());
        drop(a);
        assert!(receive::<Hello>(b.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn listener_accepts_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = listen(&path).unwrap();
        let client = connect(&path).unwrap();
        let server = accept(listener.as_raw_fd()).unwrap().unwrap();
        send(client.as_raw_fd(), &7u32, None).unwrap();
        let (n, _): (u32, _) = receive(server.as_raw_fd()).unwrap().unwrap();
        assert_eq!(n, 7);
    }
}
