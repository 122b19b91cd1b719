//! Message transports to one collector: a connected UDP socket, or TCP with a non-blocking
//! connect, reconnect backoff and write timeouts, so the exporter thread never waits long.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// Longest a message write may block before the collector counts as stalled.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A connected UDP socket: every send is one message.
pub struct Udp {
    sock: UdpSocket,
}

impl Udp {
    pub fn connect(to: SocketAddr) -> io::Result<Udp> {
        let any: SocketAddr = if to.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)?;
        sock.connect(to)?;
        sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Udp { sock })
    }

    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        let n = self.sock.send(msg)?;
        if n != msg.len() {
            return Err(io::Error::other(format!("sent {n} of {} bytes", msg.len())));
        }
        Ok(())
    }
}

enum State {
    /// Waiting for the next attempt.
    Down {
        retry_at: Instant,
    },
    Connecting {
        stream: TcpStream,
    },
    Up {
        stream: TcpStream,
    },
}

/// What [`Tcp::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Connected; `fresh`: a new transport session that needs templates first.
    Up {
        fresh: bool,
    },
    Down,
}

/// A TCP connection to a collector that reconnects by itself.
pub struct Tcp {
    to: SocketAddr,
    state: State,
    backoff: Duration,
    /// Set when the session came up and nothing was sent on it yet.
    fresh: bool,
    /// The most recent connect or write error, for the caller's log line.
    pub last_error: Option<io::Error>,
    pub connects: u64,
}

impl Tcp {
    /// Starts connecting at once; never blocks.
    pub fn new(to: SocketAddr) -> Tcp {
        let mut t = Tcp {
            to,
            state: State::Down {
                retry_at: Instant::now(),
            },
            backoff: BACKOFF_MIN,
            fresh: false,
            last_error: None,
            connects: 0,
        };
        t.poll(Duration::ZERO);
        t
    }

    /// Advances the connection: starts or completes a connect (waiting at most `wait`), and
    /// notices a collector that closed its end.
    pub fn poll(&mut self, wait: Duration) -> Link {
        let state = std::mem::replace(
            &mut self.state,
            State::Down {
                retry_at: Instant::now(),
            },
        );
        self.state = match state {
            State::Down { retry_at } if Instant::now() >= retry_at => {
                match start_connect(self.to) {
                    Ok(stream) => self.check_connect(stream, wait),
                    Err(e) => self.failed(e),
                }
            }
            State::Connecting { stream } => self.check_connect(stream, wait),
            State::Up { stream } => match peer_closed(&stream) {
                // A collector never sends on an IPFIX session: readable means EOF or RST,
                // and writing on would lose the next message in a dead socket.
                Ok(false) => State::Up { stream },
                Ok(true) => self.failed(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the collector closed the connection",
                )),
                Err(e) => self.failed(e),
            },
            down => down,
        };
        match self.state {
            State::Up { .. } => Link::Up { fresh: self.fresh },
            _ => Link::Down,
        }
    }

    fn check_connect(&mut self, stream: TcpStream, wait: Duration) -> State {
        match wait_writable(&stream, wait) {
            Ok(false) => State::Connecting { stream },
            Ok(true) => match stream.take_error() {
                Ok(None) => match ready(&stream) {
                    Ok(()) => {
                        self.backoff = BACKOFF_MIN;
                        self.fresh = true;
                        self.connects += 1;
                        self.last_error = None;
                        State::Up { stream }
                    }
                    Err(e) => self.failed(e),
                },
                Ok(Some(e)) | Err(e) => self.failed(e),
            },
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: io::Error) -> State {
        self.last_error = Some(e);
        let retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        State::Down { retry_at }
    }

    /// Writes one message; any error drops the connection (a partial write would
    /// desynchronise the stream) and the caller counts the message lost.
    pub fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let State::Up { stream } = &mut self.state else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "not connected"));
        };
        match stream.write_all(msg) {
            Ok(()) => {
                self.fresh = false;
                Ok(())
            }
            Err(e) => {
                let kind = e.kind();
                let text = e.to_string();
                self.state = self.failed(e);
                Err(io::Error::new(kind, text))
            }
        }
    }

    /// Ends the session cleanly: what was written is delivered before the FIN.
    pub fn close(&mut self) {
        if let State::Up { stream } = &self.state {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    }
}

fn ready(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)
}

fn start_connect(to: SocketAddr) -> io::Result<TcpStream> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned by the TcpStream right below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (addr, len) = sockaddr(to);
    // SAFETY: addr holds a valid sockaddr of `len` bytes for this family.
    let r = unsafe { libc::connect(fd, (&raw const addr).cast::<libc::sockaddr>(), len) };
    if r == 0 {
        return Ok(stream);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(stream)
    } else {
        Err(e)
    }
}

fn sockaddr(to: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn poll_one(
    stream: &TcpStream,
    events: libc::c_short,
    wait: Duration,
) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(p.revents)
}

fn wait_writable(stream: &TcpStream, wait: Duration) -> io::Result<bool> {
    Ok(poll_one(stream, libc::POLLOUT, wait)? != 0)
}

fn peer_closed(stream: &TcpStream) -> io::Result<bool> {
    Ok(poll_one(stream, libc::POLLIN | libc::POLLRDHUP, Duration::ZERO)? != 0)
}
