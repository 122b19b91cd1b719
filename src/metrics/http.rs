//! The scrape endpoint: serves `GET /metrics` (and `HEAD`) over HTTP/1.1 from a caller-owned tokio runtime, with whatever a render closure returns, hardened against slow and idle clients.
//!
//! Limits (see [`HttpLimits`]):
//!
//! - **Whole-request timeout.** A request head must arrive completely within
//!   `request_timeout` of the moment the server starts waiting for it (the connection's start,
//!   or the end of the previous response); trickling a byte at a time does not extend it. The
//!   same clock bounds how long a kept-alive connection may sit idle.
//! - **Bounded keep-alive.** A connection serves at most `max_requests_per_connection`
//!   requests; the last response says `Connection: close`.
//! - **Connection cap that slow clients cannot exhaust** ([`crate::admission`], shared with
//!   the gRPC listener). At most `max_connections` are open, `max_connections_per_source` from
//!   one address. When a new one arrives at a cap, the oldest connection that is not in the
//!   middle of a request is closed to make room: first among those that never sent a complete
//!   request head (the slowloris case), else among kept-alive idle ones. A connection only
//!   counts as "in a request" from the moment its head has fully arrived until its response
//!   body has been handed over, so holding a slot requires the very thing an attacker avoids
//!   doing. Only when every slot is mid-request is the new connection refused.
//! - **Accept back-off.** When accepting fails (out of descriptors: EMFILE/ENFILE, or memory),
//!   the loop sleeps 100 ms, doubling to 1 s, and logs once per episode instead of spinning.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

use crate::admission::{self, Backoff, Busy, Caps, Connections, Episode, Held, Slot};

/// Produces the exposition text for one scrape; called on a runtime worker, so keep it cheap.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Content type of the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of the short error bodies.
const CONTENT_TYPE_PLAIN: &str = "text/plain; charset=utf-8";
/// Largest request head accepted (hyper's minimum buffer); longer heads get 431.
const MAX_HEAD: usize = 8 * 1024;
/// How long a request already being answered may take to finish once the server stops.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long `shutdown` waits for the server task to end.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(1500);

/// How much the endpoint lets one client hold; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest wait for a complete request head, counted from when the server starts waiting.
    pub request_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one address (an IPv6 /64).
    pub max_connections_per_source: usize,
    /// Requests served on one kept-alive connection before it is closed.
    pub max_requests_per_connection: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            request_timeout: Duration::from_secs(5),
            max_connections: 32,
            max_connections_per_source: 32,
            max_requests_per_connection: 100,
        }
    }
}

/// The running endpoint; `shutdown` stops it and waits, dropping it only signals the stop.
#[derive(Debug)]
pub struct MetricsHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: mpsc::Receiver<()>,
    /// Set when the endpoint runs on a runtime of its own (see [`MetricsHandle::owning`]).
    runtime: Option<Runtime>,
}

impl MetricsHandle {
    /// The bound address (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ties `rt` (the runtime the endpoint was spawned on) to the handle, to be shut down with it.
    pub fn owning(mut self, rt: Runtime) -> Self {
        self.runtime = Some(rt);
        self
    }

    /// Closes the listener and every idle or half-received connection, lets responses being
    /// written finish for up to a second, and returns within about 1.5 s whatever happens. It
    /// blocks: call it from outside the runtime's tasks (on a current-thread runtime, from the
    /// thread driving it, it can only time out).
    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Ok: the task ended; Disconnected: it is gone too (panicked or never ran).
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(SHUTDOWN_WAIT) {
            warn!("metrics endpoint: still stopping after {SHUTDOWN_WAIT:?}; leaving it");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_millis(100));
        }
    }
}

impl Drop for MetricsHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Serves `render`'s text on `GET /metrics` at `listen` ("HOST:PORT") from tasks on `rt`;
/// errors name the address when it cannot be bound (e.g. port in use).
pub fn spawn(
    listen: &str,
    rt: &Handle,
    render: Render,
    limits: HttpLimits,
) -> Result<MetricsHandle> {
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("metrics endpoint: cannot listen on {listen}"))?;
    let addr = std_listener
        .local_addr()
        .with_context(|| format!("metrics endpoint: local address of {listen}"))?;
    std_listener
        .set_nonblocking(true)
        .with_context(|| format!("metrics endpoint: configuring {addr}"))?;
    let listener = {
        let _in_runtime = rt.enter();
        TcpListener::from_std(std_listener)
            .with_context(|| format!("metrics endpoint: registering {addr} with the runtime"))?
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = mpsc::channel();
    rt.spawn(async move {
        run(listener, render, limits, stop_rx).await;
        let _ = done_tx.send(());
    });
    Ok(MetricsHandle {
        addr,
        stop: Some(stop_tx),
        done: done_rx,
        runtime: None,
    })
}

/// Accepts until told to stop, then closes every connection (draining those mid-request).
async fn run(
    listener: TcpListener,
    render: Render,
    limits: HttpLimits,
    mut stop: oneshot::Receiver<()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD)
        .title_case_headers(true);
    let conns = Connections::new(Caps {
        total: limits.max_connections,
        per_source: limits.max_connections_per_source,
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = Backoff::default();
    let mut shedding = Episode::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = listener.accept() => r,
        };
        // Reap finished connection tasks so the set does not grow with every connection served.
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                if let Some((n, over)) = backoff.recovered() {
                    info!(
                        "metrics endpoint: accepting again after {n} failed accepts over {over:?}"
                    );
                }
                accepted
            }
            Err(e) if admission::transient(&e) => continue,
            Err(e) => {
                let pause = backoff.failed();
                if backoff.first_of_episode() {
                    warn!("metrics endpoint: accept: {e}; retrying every {:?} to {:?} until it succeeds", admission::BACKOFF_MIN, admission::BACKOFF_MAX);
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let admitted = match Connections::admit(&conns, Some(peer.ip())) {
            Ok(a) => a,
            Err(why) => {
                debug!(
                    "metrics endpoint: every connection mid-request ({why:?} cap); refusing {peer}"
                );
                continue;
            }
        };
        admission::log_shedding(
            &mut shedding,
            admitted.shed,
            "metrics endpoint",
            limits.max_connections,
        );
        let (http, render) = (http.clone(), render.clone());
        tasks.spawn(async move {
            serve(stream, &http, render, limits, admitted.held).await;
        });
        // Let the new connection read what it already has before the next accept: a
        // backlog of a flood's connections must not shed it before it had a chance.
        tokio::task::yield_now().await;
    }
    drop(listener);
    admission::lock(&conns).close_all();
    // Each task ends at once unless mid-request; those get DRAIN_GRACE, then are dropped here.
    let _ = tokio::time::timeout(DRAIN_GRACE + Duration::from_millis(100), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Serves one connection until it ends, is evicted, or the server stops.
async fn serve(
    stream: TcpStream,
    http: &hyper::server::conn::http1::Builder,
    render: Render,
    limits: HttpLimits,
    held: Held,
) {
    let slot = held.slot().clone();
    let served = Arc::new(AtomicU32::new(0));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = answer(&req, &render, limits, &slot, &served);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!("metrics endpoint: connection: {e}");
            }
        }
        () = held.slot().closed() => {
            if held.slot().is_busy() {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN_GRACE, conn).await;
            }
        }
    }
}

/// The response to one request; marks the slot busy until the body has been handed over.
fn answer(
    req: &Request<Incoming>,
    render: &Render,
    limits: HttpLimits,
    slot: &Arc<Slot>,
    served: &AtomicU32,
) -> Response<OneChunk> {
    let busy = slot.enter();
    // A complete request head: no longer the first to be shed at the cap.
    slot.prove();
    let served = served.fetch_add(1, Ordering::AcqRel) + 1;
    let (status, body, content_type) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "not found; try /metrics\n".to_owned(),
            CONTENT_TYPE_PLAIN,
        )
    } else if req.method() == Method::GET || req.method() == Method::HEAD {
        (StatusCode::OK, render(), CONTENT_TYPE)
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
            CONTENT_TYPE_PLAIN,
        )
    };
    let mut resp = Response::new(OneChunk {
        data: Some(Bytes::from(body)),
        _busy: busy,
    });
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    if served >= limits.max_requests_per_connection {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A response body sent in one piece, holding its connection's "in a request" mark until it
/// has been taken (or dropped, as for HEAD).
struct OneChunk {
    data: Option<Bytes>,
    _busy: Busy,
}

impl Body for OneChunk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
