//! Subscribe, served by a route of its own in front of the generated FlowLens server: it reads the request as tonic does, and writes each gRPC message itself, so a block of records is framed, and compressed, once per codec, and the same bytes go to every subscriber that asked for that codec.
//!
//! tonic compresses each message of each stream itself, so through it a block compressed
//! for one subscriber could not be sent to another. Here a response's messages are written
//! with the gRPC length prefix and its compressed flag, under the `grpc-encoding` the
//! client accepted (`grpc-accept-encoding`, in the client's order of preference): a whole
//! block's frame is made once per codec and kept with the block; a batch that is not a
//! whole block (a filter's matches, a catch-up over small blocks) is framed for its
//! subscriber alone. `Lost` and `Restarted` events go uncompressed (the flag says so).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http_body::Frame;
use prost::Message;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::codec::CompressionEncoding;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;

use crate::hub::{Event, Hub, LostReason, Records, Subscription};
use crate::record::api::{parse_request, proto, RequestLimits};
use crate::record::encoding::{batch_frame, grpc_frame, GRPC_PREFIX};
use crate::sinks::grpc::listener;

/// The route this module serves.
pub const PATH: &str = "/flowlens.v1.FlowLens/Subscribe";

/// Messages buffered per subscriber between its reader and the transport; small so a
/// stalled client leaves its place in the hub's log behind, where losses are counted.
const RESPONSE_BUFFER: usize = 2;

/// zstd level: zstd's own default, as tonic used.
const ZSTD_LEVEL: i32 = 3;
/// gzip level: the fastest. Made once per block now, but a gzip client of a slow link
/// waits for it, and the next levels buy a few percent of size for twice the time.
const GZIP_LEVEL: u32 = 1;

/// A compression a subscriber can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Gzip,
    Zstd,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        }
    }

    /// The block's derived form that holds its frame in this codec.
    fn slot(self) -> usize {
        match self {
            Codec::Gzip => 0,
            Codec::Zstd => 1,
        }
    }

    /// `msg` compressed, as one gRPC message (flag set).
    pub fn frame(self, msg: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(GRPC_PREFIX + msg.len() / 3);
        out.extend_from_slice(&[1, 0, 0, 0, 0]);
        let written = match self {
            Codec::Gzip => {
                let mut gz =
                    flate2::write::GzEncoder::new(out, flate2::Compression::new(GZIP_LEVEL));
                gz.write_all(msg).and_then(|()| gz.finish())
            }
            Codec::Zstd => zstd::stream::copy_encode(msg, &mut out, ZSTD_LEVEL).map(|()| out),
        };
        // Compressing into memory fails only without memory.
        let mut out = written.expect("compressing a message in memory");
        let len = (out.len() - GRPC_PREFIX) as u32;
        out[1..GRPC_PREFIX].copy_from_slice(&len.to_be_bytes());
        Bytes::from(out)
    }

    /// The first codec the client's `grpc-accept-encoding` lists that this server speaks.
    fn accepted(headers: &HeaderMap) -> Option<Codec> {
        let v = headers.get("grpc-accept-encoding")?.to_str().ok()?;
        v.split(',').find_map(|e| match e.trim() {
            "gzip" => Some(Codec::Gzip),
            "zstd" => Some(Codec::Zstd),
            _ => None,
        })
    }
}

/// The gRPC message `records` are for a subscriber that asked for `codec`: a whole block's
/// is its shared frame (made once per codec); anything else is framed for it alone.
pub fn records_frame(records: &Records, codec: Option<Codec>) -> Bytes {
    if let Some(block) = records.whole_block() {
        return match codec {
            None => block.batch().frame(),
            Some(c) => block.derived(c.slot(), |b| c.frame(b.batch().message())),
        };
    }
    let frame = batch_frame(&records.entries());
    match codec {
        None => Bytes::from(frame),
        Some(c) => c.frame(&frame[GRPC_PREFIX..]),
    }
}

fn event_frame(ev: Event, codec: Option<Codec>) -> Bytes {
    use proto::subscribe_response::Event as E;
    let msg = match ev {
        Event::Records(r) => return records_frame(&r, codec),
        Event::Lost(l) => E::Lost(proto::Lost {
            count: l.count,
            reason: match l.reason {
                LostReason::Behind => proto::LostReason::QueueFull,
                LostReason::NotRetained => proto::LostReason::NotRetained,
                LostReason::FiltersBehind => proto::LostReason::FiltersBehind,
            }
            .into(),
            first_seq: l.first_seq,
            last_seq: l.last_seq,
        }),
        Event::Restarted(r) => E::Restarted(proto::Restarted {
            requested_run: r.requested_run,
            run: r.run,
            started: Some(r.started.into()),
            first_seq: r.first_seq,
        }),
    };
    let msg = proto::SubscribeResponse { event: Some(msg) }.encode_to_vec();
    grpc_frame(&msg, false)
}

/// What Subscribe needs besides the hub: the request limits and the subscriber cap.
#[derive(Debug)]
pub struct SubscribeRoute {
    pub hub: Hub,
    pub limits: RequestLimits,
    /// Bytes a request message may have.
    pub max_request: usize,
    /// One permit per open long-lived stream: Subscribe, and health Watch and reflection
    /// through the listener's layer.
    pub subscribers: Arc<Semaphore>,
    pub max_subscribers: usize,
    /// Becomes true when the server stops, so following streams end and connections drain.
    pub stopping: watch::Receiver<bool>,
}

impl SubscribeRoute {
    /// Reads the request, registers the subscriber before the response head goes out (so
    /// a client that has its response sees every record published afterwards), and
    /// streams.
    pub async fn serve(
        self: Arc<Self>,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        match self.start(req).await {
            Ok(resp) => resp,
            Err(status) => status.into_http(),
        }
    }

    async fn start(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, tonic::Status> {
        let codec = Codec::accepted(req.headers());
        let encoding = match req
            .headers()
            .get("grpc-encoding")
            .map(HeaderValue::as_bytes)
        {
            None | Some(b"identity") => None,
            Some(b"gzip") => Some(CompressionEncoding::Gzip),
            Some(b"zstd") => Some(CompressionEncoding::Zstd),
            Some(other) => {
                return Err(tonic::Status::unimplemented(format!(
                    "the request is compressed with {:?}, which this server does not speak \
                     (gzip, zstd)",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut body = tonic::codec::Streaming::new_request(
            tonic_prost::ProstDecoder::<proto::SubscribeRequest>::default(),
            req.into_body(),
            encoding,
            Some(self.max_request),
        );
        let msg = body
            .message()
            .await?
            .ok_or_else(|| tonic::Status::invalid_argument("no SubscribeRequest in the request"))?;
        let opts = parse_request(&msg, peer, &self.limits)?;
        let permit = self.subscribers.clone().try_acquire_owned().map_err(|_| {
            tonic::Status::resource_exhausted(format!(
                "subscribers: all {} allowed long-lived streams (Subscribe, health Watch, \
                 reflection) are open (--grpc-max-subscribers)",
                self.max_subscribers
            ))
        })?;
        let sub = self.hub.subscribe(opts);
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(stream(
            sub,
            tx,
            codec,
            self.hub.clone(),
            self.stopping.clone(),
            permit,
        ));
        let mut resp = http::Response::new(tonic::body::Body::new(ResponseBody {
            rx,
            trailers_sent: false,
        }));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-accept-encoding",
            HeaderValue::from_static("zstd,gzip,identity"),
        );
        if let Some(c) = codec {
            h.insert("grpc-encoding", HeaderValue::from_static(c.name()));
        }
        Ok(resp)
    }
}

/// One subscriber: its events, as messages, into its response until the stream ends.
async fn stream(
    mut sub: Subscription,
    tx: mpsc::Sender<Bytes>,
    codec: Option<Codec>,
    hub: Hub,
    mut stopping: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    loop {
        let ev = tokio::select! {
            _ = stopping.wait_for(|s| *s) => None,
            _ = tx.closed() => break,
            ev = sub.next_event() => match ev {
                Some(ev) => Some(ev),
                None => break,
            },
        };
        let Some(ev) = ev else {
            // Stopping. A closed hub holds every record it will ever have (the agent's
            // final flush included): deliver them, then end. The server's shutdown grace
            // bounds a stalled client.
            if hub.is_closed() {
                while let Some(ev) = sub.next_event().await {
                    if tx.send(event_frame(ev, codec)).await.is_err() {
                        break;
                    }
                }
            }
            break;
        };
        if tx.send(event_frame(ev, codec)).await.is_err() {
            break;
        }
    }
    log::debug!("subscriber {} done", sub.id());
    drop(sub);
    drop(permit);
    listener::release_memory();
}

/// A Subscribe response's body: the messages its stream task writes, then the OK status.
struct ResponseBody {
    rx: mpsc::Receiver<Bytes>,
    trailers_sent: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => {
                self.trailers_sent = true;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers_sent
    }
}

/// The FlowLens service: Subscribe on its own route, the unary methods on `unary` (the
/// generated server).
#[derive(Debug, Clone)]
pub struct Routes<S> {
    pub unary: S,
    pub subscribe: Arc<SubscribeRoute>,
}

impl<S> NamedService for Routes<S> {
    const NAME: &'static str = "flowlens.v1.FlowLens";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for Routes<S>
where
    S: tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.unary.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == PATH {
            let route = self.subscribe.clone();
            return Box::pin(async move { Ok(route.serve(req).await) });
        }
        Box::pin(self.unary.call(req))
    }
}
