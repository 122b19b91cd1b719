//! The gRPC listener: binds TCP or a unix socket with safe permissions, admits connections within caps (in all and per source address) that shed the oldest not-yet-authenticated ones first, closes connections that do not finish their handshake in time or stay idle, and accepts with a back-off when file descriptors run out.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use log::{debug, info, warn};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::admission::{self, Backoff, Busy, Caps, Connections, Episode, Held, Slot};
use crate::config::FileMode;
use crate::tls::ServerTls;

/// Bytes of a unix socket path (`sun_path` holds 108 with the closing NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<ListenAddr> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            anyhow::ensure!(
                !path.is_empty(),
                "listen address {s:?}: empty unix socket path"
            );
            anyhow::ensure!(
                path.len() <= MAX_SOCKET_PATH,
                "the socket path is {} bytes, and a unix socket's holds at most \
                 {MAX_SOCKET_PATH}; use a shorter one",
                path.len()
            );
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .with_context(|| format!("listen address {s:?}: expected HOST:PORT or unix:/path"))
    }
}

impl ListenAddr {
    /// Only this host can reach it: a loopback address or a unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(a) => a.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }
}

/// Who may open a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    pub mode: FileMode,
    /// Group id that owns the socket; None keeps the agent's.
    pub gid: Option<u32>,
}

/// Resolves `--grpc-socket-group`: a group name or a number, which must name a group of
/// this host (chown takes gid 4294967295 as "leave it", which would leave the socket root's).
pub fn group_id(group: &str) -> anyhow::Result<u32> {
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0u8; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    let rc = if let Ok(gid) = group.parse::<u32>() {
        // SAFETY: every pointer is valid for the call and buf outlives it; the result is
        // only read when getgrgid_r reports it filled `grp`.
        unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut out) }
    } else {
        let name = std::ffi::CString::new(group).map_err(|_| anyhow!("{group:?}: contains NUL"))?;
        // SAFETY: as above, for getgrnam_r.
        unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        }
    };
    if rc != 0 || out.is_null() {
        return Err(anyhow!(
            "no such group {group:?} on this host (`getent group` lists them)"
        ));
    }
    Ok(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is plain data (integers and pointers); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// A bound, not yet serving listener.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

pub fn bind(addr: &ListenAddr, access: &SocketAccess) -> anyhow::Result<Bound> {
    match addr {
        ListenAddr::Tcp(a) => {
            let l = std::net::TcpListener::bind(a)
                .with_context(|| format!("binding gRPC listener on {a}"))?;
            l.set_nonblocking(true)
                .with_context(|| format!("gRPC listener on {a}"))?;
            Ok(Bound::Tcp(l))
        }
        ListenAddr::Unix(path) => {
            let what = || format!("gRPC listener on unix:{}", path.display());
            remove_stale_socket(path)?;
            let l = bind_unix(path, access).with_context(what)?;
            l.set_nonblocking(true).with_context(what)?;
            Ok(Bound::Unix(l, path.clone()))
        }
    }
}

/// Binds inside a fresh 0700 directory, sets the socket's mode and group there, then
/// renames it into place: the path never exists with the umask's permissions.
fn bind_unix(
    path: &Path,
    access: &SocketAccess,
) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // The runtime directory systemd makes for the unit; run by hand, the agent makes it
    // (one level only: a mistyped deeper path is an error, not a tree of directories).
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let staging = parent.join(format!(".flowlens-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("creating {}", staging.display()))?;
    let result = (|| {
        let tmp = staging.join("sock");
        let l = std::os::unix::net::UnixListener::bind(&tmp).context("bind")?;
        if let Some(gid) = access.gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid))
                .with_context(|| format!("--grpc-socket-group: giving the socket to gid {gid}"))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(access.mode.0))
            .context("--grpc-socket-mode")?;
        std::fs::rename(&tmp, path).context("moving the socket into place")?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// A socket file left by a previous run would make bind fail; one that still accepts
/// connections belongs to a live server and must not be stolen.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    anyhow::ensure!(
        meta.file_type().is_socket(),
        "gRPC listener on unix:{}: path exists and is not a socket",
        path.display()
    );
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(anyhow!(
            "gRPC listener on unix:{}: address in use by a running server",
            path.display()
        ));
    }
    std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
}

/// How accepted connections are treated.
#[derive(Debug, Clone, Copy)]
pub struct ConnPolicy {
    /// A connection with no open stream for this long is closed.
    pub idle_timeout: Duration,
    /// TCP keepalive idle time.
    pub tcp_keepalive: Duration,
    /// A connection that has not finished its TLS handshake (or, in cleartext, sent the
    /// HTTP/2 preface) this long after it was accepted is closed.
    pub handshake_timeout: Duration,
    /// Connections held at once, in all and per source address.
    pub caps: Caps,
}

/// The HTTP/2 client connection preface: what a cleartext peer proves itself with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accepts on its own task and hands connections to the server. Each is admitted within
/// the caps first (shedding, at a cap, the oldest connection that has not authenticated).
/// An accept failing for the listener rather than for one connection (out of descriptors
/// or memory) makes it pause, with the metrics endpoint's back-off, and log once per
/// episode instead of spinning; the task ends when the server drops the stream, closing
/// the listener.
pub fn incoming(
    bound: Bound,
    policy: ConnPolicy,
    tls: Option<Arc<ServerTls>>,
) -> anyhow::Result<ReceiverStream<io::Result<ServerIo>>> {
    let listener = match bound {
        Bound::Tcp(l) => Listener::Tcp(
            tokio::net::TcpListener::from_std(l).context("registering gRPC listener")?,
        ),
        Bound::Unix(l, _) => Listener::Unix(
            tokio::net::UnixListener::from_std(l).context("registering gRPC listener")?,
        ),
    };
    let (tx, rx) = mpsc::channel::<io::Result<ServerIo>>(1);
    let conns = Connections::new(policy.caps);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut shedding = Episode::default();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            match accepted {
                Ok(io) => {
                    if let Some((n, over)) = backoff.recovered() {
                        info!("gRPC: accepting connections again after {n} failed accepts over {over:?}");
                    }
                    let peer = io.peer();
                    let admitted = match Connections::admit(&conns, peer) {
                        Ok(a) => a,
                        Err(why) => {
                            debug!("gRPC: every connection is mid-request ({why:?} cap); refusing one from {peer:?}");
                            continue;
                        }
                    };
                    admission::log_shedding(
                        &mut shedding,
                        admitted.shed,
                        "gRPC",
                        policy.caps.total,
                    );
                    io.configure(&policy);
                    let conn = Conn::new(io, admitted.held, &policy, tls.is_some());
                    match &tls {
                        None => {
                            if tx.send(Ok(ServerIo::Plain(conn))).await.is_err() {
                                break;
                            }
                        }
                        // On a task of its own: a slow handshake holds up no one else.
                        Some(tls) => {
                            tokio::spawn(handshake(
                                tls.acceptor(),
                                conn,
                                policy.handshake_timeout,
                                tx.clone(),
                            ));
                        }
                    }
                    // Let the connection read what it already has before the next accept:
                    // a backlog of a flood's connections must not shed it unheard.
                    tokio::task::yield_now().await;
                }
                // One connection's failure (reset before accept, ...): the next one is fine.
                Err(e) if admission::transient(&e) => debug!("gRPC accept: {e}"),
                Err(e) => {
                    let pause = backoff.failed();
                    if backoff.first_of_episode() {
                        warn!(
                            "gRPC: cannot accept connections: {e}; pausing accepts until it \
                             passes (out of descriptors: raise LimitNOFILE, or lower \
                             --grpc-max-connections)"
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = tx.closed() => break,
                    }
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    conn: Conn,
    timeout: Duration,
    tx: mpsc::Sender<io::Result<ServerIo>>,
) {
    match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
        Ok(Ok(s)) => {
            // Authenticated (with --grpc-client-ca, by its certificate): shed last.
            s.get_ref().0.state.slot.prove();
            let _ = tx.send(Ok(ServerIo::Tls(Box::new(s)))).await;
        }
        Ok(Err(e)) => debug!("gRPC TLS handshake: {e}"),
        Err(_) => debug!("gRPC TLS handshake: not done in {timeout:?}"),
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<Io> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Io::Tcp(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Io::Unix(s)),
        }
    }
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Io {
    fn peer(&self) -> Option<std::net::IpAddr> {
        match self {
            Io::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Io::Unix(_) => None,
        }
    }

    fn configure(&self, policy: &ConnPolicy) {
        if let Io::Tcp(s) = self {
            // Batches are small and latency-sensitive; Nagle would hold them back.
            let _ = s.set_nodelay(true);
            if let Err(e) = set_tcp_keepalive(s, policy.tcp_keepalive) {
                debug!("TCP keepalive: {e}");
            }
        }
    }
}

/// Probes after `idle`, then every third of it, giving up after three unanswered probes.
fn set_tcp_keepalive(s: &TcpStream, idle: Duration) -> io::Result<()> {
    let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
    let opts = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(idle / 3)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ];
    for (level, name, value) in opts {
        // SAFETY: a valid socket fd, and a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A connection's place at the listener (streams open, authenticated or not), and since
/// when it has had no open stream.
#[derive(Debug)]
pub struct ConnState {
    slot: Arc<Slot>,
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn enter(self: &Arc<Self>) -> StreamGuard {
        StreamGuard {
            busy: Some(self.slot.enter()),
            state: self.clone(),
        }
    }

    fn idle_since(&self) -> Option<Instant> {
        if self.slot.is_busy() {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One open stream; the connection's idle clock starts when the last one goes.
pub struct StreamGuard {
    busy: Option<Busy>,
    state: Arc<ConnState>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut since = self
            .state
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.busy.take();
        if !self.state.slot.is_busy() {
            *since = Instant::now();
        }
    }
}

/// What a request learns about its connection (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    state: Arc<ConnState>,
}

type Closed = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// An accepted connection that fails its next read once it is shed at a cap, once it has
/// not authenticated within the handshake timeout, or once it has had no open stream for
/// the idle timeout, which makes the server close it.
pub struct Conn {
    io: Io,
    state: Arc<ConnState>,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// Until it resolves: shed to make room.
    closed: Option<Closed>,
    /// Cleartext: bytes of the preface seen so far (None: TLS, done, or not a preface).
    preface_seen: Option<usize>,
    _held: Held,
}

impl Conn {
    fn new(io: Io, held: Held, policy: &ConnPolicy, tls: bool) -> Conn {
        let slot = held.slot().clone();
        Conn {
            io,
            state: Arc::new(ConnState {
                slot: slot.clone(),
                idle_since: Mutex::new(Instant::now()),
            }),
            idle_timeout: policy.idle_timeout,
            handshake_timeout: policy.handshake_timeout,
            timer: Box::pin(tokio::time::sleep(
                policy.handshake_timeout.min(policy.idle_timeout),
            )),
            closed: Some(Box::pin(slot.closed())),
            preface_seen: (!tls).then_some(0),
            _held: held,
        }
    }

    /// The error that ends the connection, if its time is up: not authenticated within
    /// the handshake timeout, or idle for the idle timeout. Otherwise leaves the timer
    /// armed for the next check.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let (limit, why) = if self.state.slot.is_proven() {
                (
                    self.idle_timeout,
                    "connection idle for the --grpc-idle-timeout",
                )
            } else {
                // Not yet speaking gRPC is idle too: whichever limit comes first.
                (
                    self.handshake_timeout.min(self.idle_timeout),
                    "no TLS handshake or HTTP/2 preface in time (--grpc-handshake-timeout)",
                )
            };
            match self.state.idle_since() {
                Some(since) if now >= since + limit => return Some(why),
                Some(since) => self.timer.as_mut().reset(since + limit),
                None => self.timer.as_mut().reset(now + limit),
            }
        }
        None
    }

    /// Whether it was shed to make room for another connection.
    fn shed(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.closed {
            None => true,
            Some(f) => {
                if f.as_mut().poll(cx).is_ready() {
                    self.closed = None;
                    return true;
                }
                false
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        release_memory();
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        let (remote_addr, local_addr) = match &self.io {
            Io::Tcp(s) => (s.peer_addr().ok(), s.local_addr().ok()),
            Io::Unix(_) => (None, None),
        };
        ConnInfo {
            remote_addr,
            local_addr,
            state: self.state.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shed(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for another connection (--grpc-max-connections)",
            )));
        }
        if let Some(why) = this.expired(cx) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        let before = buf.filled().len();
        let r = match &mut this.io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let Some(seen) = this.preface_seen {
            let got = &buf.filled()[before..];
            let want = &PREFACE[seen..];
            let n = got.len().min(want.len());
            this.preface_seen = if got[..n] != want[..n] {
                None
            } else if seen + n == PREFACE.len() {
                this.state.slot.prove();
                None
            } else {
                Some(seen + n)
            };
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A trim is scheduled and has not run yet.
static TRIM_PENDING: AtomicBool = AtomicBool::new(false);
/// Connections and subscribers that end together share one trim.
const TRIM_DELAY: Duration = Duration::from_millis(500);

/// A stalled subscriber's buffers (the messages in flight to it, its connection's HTTP/2
/// buffers) reach hundreds of kilobytes; hand them back to the system when it goes rather
/// than leave them in glibc's free lists (200 stalled subscribers: 19 -> 137 MB, still
/// 116 MB 15 s after they left without this, 30 MB with it).
pub(crate) fn release_memory() {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if TRIM_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    rt.spawn(async {
        tokio::time::sleep(TRIM_DELAY).await;
        TRIM_PENDING.store(false, Ordering::Release);
        // SAFETY: malloc_trim only walks glibc's own heaps; it takes their locks itself.
        unsafe {
            libc::malloc_trim(0);
        }
    });
}

/// A connection as the server sees it: in cleartext, or TLS over it.
pub enum ServerIo {
    Plain(Conn),
    Tls(Box<tokio_rustls::server::TlsStream<Conn>>),
}

impl Connected for ServerIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            ServerIo::Plain(c) => c.connect_info(),
            ServerIo::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(c) => Pin::new(c).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(c) => Pin::new(c).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(c) => Pin::new(c).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(c) => Pin::new(c).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------
// Stream accounting
// ---------------------------------------------------------------------------

/// The services whose streams live as long as the client wants (health Watch, reflection):
/// they take a place among `--grpc-max-subscribers` as Subscribe does, and end when the
/// server stops instead of holding its drain up.
const LONG_LIVED: &[&str] = &[
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// A tower layer around every gRPC request: counts it as an open stream of its connection
/// until its response body ends, exposes the peer address the usual way (`remote_addr`),
/// fails a request whose message has not arrived whole within `request_timeout`, and
/// gives long-lived streams a place among `streams` and an end at shutdown.
#[derive(Debug, Clone)]
pub struct TrackStreams {
    /// Shared with Subscribe: one permit per long-lived stream.
    pub streams: Arc<tokio::sync::Semaphore>,
    pub max_streams: usize,
    /// Becomes true when the server stops.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub request_timeout: Duration,
}

impl<S> tower::Layer<S> for TrackStreams {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked {
            inner,
            policy: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    policy: TrackStreams,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for Tracked<S>
where
    S: tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let info = req.extensions().get::<ConnInfo>().cloned();
        let guard = info.map(|i| {
            req.extensions_mut().insert(TcpConnectInfo {
                local_addr: i.local_addr,
                remote_addr: i.remote_addr,
            });
            i.state.enter()
        });
        let long_lived = LONG_LIVED.contains(&req.uri().path());
        let permit = if long_lived {
            match self.policy.streams.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let refused = tonic::Status::resource_exhausted(format!(
                        "streams: all {} allowed long-lived streams (Subscribe, health Watch, \
                         reflection) are open (--grpc-max-subscribers)",
                        self.policy.max_streams
                    ))
                    .into_http();
                    return Box::pin(std::future::ready(Ok(refused)));
                }
            }
        } else {
            None
        };
        let timeout = self.policy.request_timeout;
        let req = req.map(|body| tonic::body::Body::new(DeadlineBody::new(body, timeout)));
        let stop: Option<Closed> = long_lived.then(|| {
            let mut stopping = self.policy.stopping.clone();
            Box::pin(async move {
                let _ = stopping.wait_for(|s| *s).await;
            }) as Closed
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| {
                tonic::body::Body::new(GuardedBody {
                    body,
                    stop,
                    ended: false,
                    _guard: guard,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A request body that fails once it has not ended within its deadline: a client
/// trickling its message (while answering pings) cannot hold a stream for ever.
struct DeadlineBody {
    body: tonic::body::Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    done: bool,
}

impl DeadlineBody {
    fn new(body: tonic::body::Body, timeout: Duration) -> DeadlineBody {
        DeadlineBody {
            body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            done: false,
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending if this.deadline.as_mut().poll(cx).is_ready() => {
                this.done = true;
                Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                    "the request did not arrive whole within {:?}",
                    this.timeout
                )))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that holds its stream's guard (and a long-lived stream's place) until
/// it is dropped; a long-lived one ends with UNAVAILABLE when the server stops, after
/// whatever its service had ready (a health watcher gets NOT_SERVING first).
struct GuardedBody {
    body: tonic::body::Body,
    stop: Option<Closed>,
    ended: bool,
    _guard: Option<StreamGuard>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if let Some(stop) = &mut this.stop {
                if stop.as_mut().poll(cx).is_ready() {
                    this.ended = true;
                    this.stop = None;
                    let mut trailers = http::HeaderMap::new();
                    let status = tonic::Status::unavailable("the agent is shutting down");
                    if status.add_header(&mut trailers).is_ok() {
                        return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
