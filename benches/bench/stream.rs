//! gRPC stream rate: records/s through the hub's fanout and gRPC over loopback to 1 and 8
//! subscribers, publish rate, record encoding, 8 subscribers of a 1 M-record burst with and
//! without compression (the server's CPU measured apart), and the service's RSS with idle
//! subscribers (both in a `stream-server` child process).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use flowlens::hub::{Hub, HubConfig};
use flowlens::poller::{OUT_BATCH, OUT_FIRST};
use flowlens::record::flow::FlowRecord;
use flowlens::status::Status;

use crate::common::{cpu_secs, cpu_secs_of, mixed_record, rss_mib_of, Table};

/// Issue 11 goal 2: records/s through the agent's own path (the fanout thread publishing
/// in chunks as it drains the poller's channel) and gRPC over loopback to 1 and 8
/// subscribers, each on its own connection, server and clients in this process.
pub fn run(t: &mut Table) -> Result<()> {
    println!("stream: records through the hub's fanout thread and gRPC over loopback");
    let records: u64 = 500_000;
    let recs: Vec<FlowRecord> = (0..records).map(mixed_record).collect();
    let rt = tokio::runtime::Runtime::new()?;
    for subs in STREAM_SUBSCRIBERS {
        let hub = Hub::new(HubConfig {
            ring_capacity: 1000,
            ..HubConfig::default()
        });
        let svc =
            flowlens::sinks::grpc::spawn("127.0.0.1:0", hub.clone(), Arc::new(Status::new()))?;
        let addr = svc.local_addr().context("listen address")?.to_string();
        let clients: Vec<_> = (0..subs)
            .map(|_| rt.spawn(count_stream(addr.clone(), records, None)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let (tx, rx) = crossbeam_channel::unbounded();
        let (t0, c0) = (Instant::now(), cpu_secs());
        let fanout = hub.spawn_fanout(rx)?;
        // In the poller's batches, each made as the poller makes it, record by record.
        for chunk in recs.chunks(OUT_BATCH) {
            let mut batch = Vec::with_capacity(OUT_FIRST);
            batch.extend(chunk.iter().cloned());
            tx.send(batch)?;
        }
        // The poller goes, as when the agent stops: the hub closes after the last record
        // and every stream ends with it, so the last batch is sent at once instead of
        // after up to 100 ms of batching delay, which would be timed as if it were work.
        drop(tx);
        let mut total = 0;
        for c in clients {
            total += rt.block_on(c)??;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cores = (cpu_secs() - c0) / secs;
        let _ = fanout.join();
        if total != records * subs as u64 {
            bail!(
                "{subs} subscribers got {total} of {}",
                records * subs as u64
            );
        }
        let each = records as f64 / secs;
        t.add(
            "stream",
            &format!("records/s per subscriber, {subs} subscriber(s)"),
            each,
            "rec/s",
            format!(
                "{records} records each; {:.0} rec/s delivered in all; {cores:.2} cores busy",
                each * subs as f64
            ),
        );
        svc.shutdown()?;
    }
    // The poller's side: publishing with and without a subscriber that never reads.
    let mut rates = Vec::new();
    for stalled in [false, true] {
        let hub = Hub::new(HubConfig::default());
        let _enter = rt.enter();
        let _sub = stalled.then(|| hub.subscribe(Default::default()));
        let t0 = Instant::now();
        for r in &recs {
            hub.publish(r.clone());
        }
        rates.push(records as f64 / t0.elapsed().as_secs_f64());
    }
    t.add(
        "stream",
        "publish rate, no subscriber",
        rates[0],
        "rec/s",
        String::new(),
    );
    t.add(
        "stream",
        "publish rate, one stalled subscriber",
        rates[1],
        "rec/s",
        format!("x{:.2} of unstalled", rates[1] / rates[0]),
    );
    stream_encode(t, &recs)?;
    drop(recs);
    stream_codecs(t)?;
    stream_idle_rss(t)
}

/// What encoding one record costs: through the prost message (Strings, `core::fmt` for the
/// addresses), as the server did before, and written straight from the record.
fn stream_encode(t: &mut Table, recs: &[FlowRecord]) -> Result<()> {
    use prost::Message;
    let (mut bytes_prost, mut bytes_direct) = (0usize, 0usize);
    let t0 = Instant::now();
    for (i, r) in recs.iter().enumerate() {
        let mut p = flowlens::record::api::proto::FlowRecord::from(r);
        p.seq = i as u64 + 1;
        p.run = 1;
        bytes_prost += std::hint::black_box(p.encode_to_vec()).len();
    }
    let prost_ns = t0.elapsed().as_secs_f64() * 1e9 / recs.len() as f64;
    let mut buf = Vec::with_capacity(256);
    let t0 = Instant::now();
    for (i, r) in recs.iter().enumerate() {
        buf.clear();
        let at = flowlens::record::encoding::Stamp {
            run: 1,
            seq: i as u64 + 1,
        };
        flowlens::record::encoding::encode_record(at, r, &mut buf);
        bytes_direct += std::hint::black_box(&buf).len();
    }
    let direct_ns = t0.elapsed().as_secs_f64() * 1e9 / recs.len() as f64;
    // And back, as stdout and the exporters read the hub's log.
    let mut encoded = Vec::with_capacity(recs.len());
    for (i, r) in recs.iter().enumerate() {
        let mut b = Vec::with_capacity(256);
        let at = flowlens::record::encoding::Stamp {
            run: 1,
            seq: i as u64 + 1,
        };
        flowlens::record::encoding::encode_record(at, r, &mut b);
        encoded.push(b);
    }
    let mut dec = flowlens::record::encoding::RecordDecoder::default();
    let t0 = Instant::now();
    for b in &encoded {
        std::hint::black_box(dec.decode(b)?);
    }
    let decode_ns = t0.elapsed().as_secs_f64() * 1e9 / recs.len() as f64;
    if bytes_prost != bytes_direct {
        bail!("encodings differ in length: {bytes_prost} vs {bytes_direct} bytes");
    }
    t.add(
        "stream",
        "encode one record, via the prost message",
        prost_ns,
        "ns",
        String::new(),
    );
    t.add(
        "stream",
        "encode one record, straight from FlowRecord",
        direct_ns,
        "ns",
        format!("x{:.2} faster; same bytes", prost_ns / direct_ns),
    );
    t.add(
        "stream",
        "decode one record into a FlowRecord",
        decode_ns,
        "ns",
        "what stdout and each exporter pay to read the log".into(),
    );
    Ok(())
}

/// Subscriber counts of the stream throughput figures.
const STREAM_SUBSCRIBERS: [usize; 2] = [1, 8];

/// Subscribers the idle-memory figure connects.
const IDLE_SUBSCRIBERS: usize = 1000;

/// `flowlens-bench stream-server`: the hub and gRPC service of an agent alone in a
/// process, so its RSS and CPU time are the service's own. Prints its port, then takes
/// commands on stdin until it closes: `prepare N` makes N records of the realistic mix in
/// the poller's batches (and says `ready`), `burst` hands them to the fanout thread as the
/// poller would (and says `sent`).
pub fn stream_server() -> Result<()> {
    use std::io::BufRead;
    let hub = Hub::new(HubConfig::default());
    let grpc = flowlens::config::GrpcConfig {
        max_subscribers: IDLE_SUBSCRIBERS,
        ..Default::default()
    };
    let svc = flowlens::sinks::grpc::spawn_with(
        "127.0.0.1:0",
        &grpc,
        hub.clone(),
        Arc::new(Status::new()),
    )?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let fanout = hub.spawn_fanout(rx)?;
    println!("{}", svc.local_addr().context("listen address")?.port());
    std::io::stdout().flush()?;
    let mut prepared: Vec<Vec<FlowRecord>> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("prepare ") {
            let n: u64 = n.trim().parse()?;
            prepared = (0..n)
                .step_by(OUT_BATCH)
                .map(|first| {
                    (first..(first + OUT_BATCH as u64).min(n))
                        .map(mixed_record)
                        .collect()
                })
                .collect();
            println!("ready");
        } else if line == "burst" {
            for batch in prepared.drain(..) {
                tx.send(batch)?;
            }
            println!("sent");
        }
        std::io::stdout().flush()?;
    }
    drop(tx);
    let _ = fanout.join();
    svc.shutdown()
}

/// A `stream-server` child: its pid, port, stdin and stdout.
struct ServerChild {
    child: std::process::Child,
    port: u16,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl ServerChild {
    fn start() -> Result<ServerChild> {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("stream-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the stream server")?;
        let stdin = child.stdin.take().context("server stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("server stdout")?);
        let mut port = String::new();
        stdout.read_line(&mut port)?;
        Ok(ServerChild {
            port: port.trim().parse()?,
            child,
            stdin,
            stdout,
        })
    }

    /// Sends a command and waits for its one-line answer.
    fn ask(&mut self, cmd: &str) -> Result<String> {
        use std::io::BufRead;
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        Ok(answer.trim().to_owned())
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(self) {
        let ServerChild {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let _ = child.wait();
    }
}

/// Records of the burst the compression figures send to 8 subscribers.
const CODEC_BURST: u64 = 1_000_000;

/// 8 subscribers of a 1 M-record burst without compression, with gzip and with zstd (each
/// a fresh server process, its CPU read from /proc), and the server alone publishing it.
/// A block is compressed once per codec and shared, so gzip should cost the server about
/// what no compression does, not 8 gzips of every record.
fn stream_codecs(t: &mut Table) -> Result<()> {
    use tonic::codec::CompressionEncoding as C;
    const SUBS: usize = 8;
    let rt = tokio::runtime::Runtime::new()?;
    let mut base_cpu = 0.0;
    let mut figures = Vec::new();
    for codec in [None, Some(None), Some(Some(C::Gzip)), Some(Some(C::Zstd))] {
        let mut server = ServerChild::start()?;
        let pid = server.child.id();
        let addr = server.addr();
        let clients: Vec<_> = match codec {
            None => Vec::new(),
            Some(c) => (0..SUBS)
                .map(|_| rt.spawn(count_stream(addr.clone(), CODEC_BURST, c)))
                .collect(),
        };
        let want = if codec.is_some() { SUBS } else { 0 };
        rt.block_on(wait_subscribers(&addr, want))?;
        server.ask(&format!("prepare {CODEC_BURST}"))?;
        let (cpu0, t0) = (cpu_secs_of(pid)?, Instant::now());
        server.ask("burst")?;
        let mut total = 0;
        for c in clients {
            total += rt.block_on(c)??;
        }
        if codec.is_none() {
            rt.block_on(wait_published(&addr, CODEC_BURST))?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs_of(pid)? - cpu0;
        let held = rt.block_on(buffer_per_record(&addr))?;
        server.stop();
        let Some(c) = codec else {
            base_cpu = cpu;
            t.add(
                "stream",
                "1 M burst, server alone: CPU",
                cpu,
                "s",
                format!(
                    "fanout numbering and encoding, no subscriber; the buffer holds \
                     {held:.0} B/record"
                ),
            );
            continue;
        };
        if total != CODEC_BURST * SUBS as u64 {
            bail!(
                "{SUBS} subscribers got {total} of {}",
                CODEC_BURST * SUBS as u64
            );
        }
        let name = c.map_or("identity", |c| match c {
            C::Gzip => "gzip",
            _ => "zstd",
        });
        let rate = total as f64 / secs;
        figures.push((name, rate, cpu));
        t.add(
            "stream",
            &format!("1 M burst, 8 {name} subscribers: deliveries/s"),
            rate,
            "rec/s",
            format!(
                "server CPU {cpu:.2} s ({:.2} s over the server alone); the buffer holds \
                 {held:.0} B/record",
                cpu - base_cpu
            ),
        );
    }
    let identity = figures[0];
    for (name, rate, cpu) in &figures[1..] {
        t.add(
            "stream",
            &format!("1 M burst, 8 {name} / 8 identity subscribers"),
            rate / identity.1,
            "x rate",
            format!(
                "server CPU x{:.2} (x{:.2} over the server alone)",
                cpu / identity.2,
                (cpu - base_cpu) / (identity.2 - base_cpu)
            ),
        );
    }
    Ok(())
}

/// Waits until the server at `addr` has `n` subscribers.
async fn wait_subscribers(addr: &str, n: usize) -> Result<()> {
    use flowlens::record::api::proto::{flow_lens_client::FlowLensClient, GetStatusRequest};
    let mut c = FlowLensClient::connect(format!("http://{addr}")).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .get_status(GetStatusRequest {})
        .await?
        .into_inner()
        .subscribers
        .len()
        < n
    {
        if Instant::now() > deadline {
            bail!("{n} subscribers never connected");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Bytes the server's record buffer holds per record it holds (the compressed forms made
/// of its blocks included).
async fn buffer_per_record(addr: &str) -> Result<f64> {
    use flowlens::record::api::proto::{flow_lens_client::FlowLensClient, GetStatusRequest};
    let mut c = FlowLensClient::connect(format!("http://{addr}")).await?;
    let s = c.get_status(GetStatusRequest {}).await?.into_inner();
    Ok(s.buffer_bytes as f64 / s.ring_records.max(1) as f64)
}

/// Waits until the server at `addr` has published `n` records.
async fn wait_published(addr: &str, n: u64) -> Result<()> {
    use flowlens::record::api::proto::{flow_lens_client::FlowLensClient, GetStatusRequest};
    let mut c = FlowLensClient::connect(format!("http://{addr}")).await?;
    while c
        .get_status(GetStatusRequest {})
        .await?
        .into_inner()
        .records_published
        < n
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Issue 11 goal 3: the service's RSS with 1,000 connected idle subscribers (each on its
/// own connection, as 1,000 `watch` processes would be) against none, measured in a
/// child process that hosts only the hub and the gRPC service.
fn stream_idle_rss(t: &mut Table) -> Result<()> {
    use flowlens::record::api::proto::{flow_lens_client::FlowLensClient, GetStatusRequest};
    let server = ServerChild::start()?;
    let pid = server.child.id();
    let addr = format!("http://{}", server.addr());
    let rt = tokio::runtime::Runtime::new()?;
    let measured = rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let none = rss_mib_of(pid)?;
        let mut streams = Vec::with_capacity(IDLE_SUBSCRIBERS);
        for _ in 0..IDLE_SUBSCRIBERS {
            let mut c = FlowLensClient::connect(addr.clone()).await?;
            streams.push(
                c.subscribe(flowlens::record::api::proto::SubscribeRequest::default())
                    .await?
                    .into_inner(),
            );
        }
        let status = FlowLensClient::connect(addr.clone())
            .await?
            .get_status(GetStatusRequest {})
            .await?
            .into_inner();
        if status.subscribers.len() != IDLE_SUBSCRIBERS {
            bail!(
                "{} of {IDLE_SUBSCRIBERS} subscribers connected",
                status.subscribers.len()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with = rss_mib_of(pid)?;
        drop(streams);
        anyhow::Ok((none, with))
    });
    server.stop();
    let (none, with) = measured?;
    t.add(
        "stream",
        "service RSS, no subscriber",
        none,
        "MiB",
        "hub + gRPC service alone in a process".into(),
    );
    t.add(
        "stream",
        &format!("service RSS, {IDLE_SUBSCRIBERS} idle subscribers"),
        with,
        "MiB",
        format!(
            "{:.1} KiB per subscriber, each on its own connection",
            (with - none) * 1024.0 / IDLE_SUBSCRIBERS as f64
        ),
    );
    Ok(())
}

/// The bench's Subscribe client: it counts the records the server delivered without
/// decoding them, so on 2 vCPUs it is not the bottleneck of what it measures. It walks every
/// FlowBatch entry (one varint key and length per record), reads `seq` from the first and
/// last record of each batch, and fails unless every batch holds exactly the records
/// `first..=last` and follows the previous one without a gap.
mod counting {
    use bytes::Buf;
    use prost::encoding::decode_varint;
    use tonic::codec::{Codec, DecodeBuf, Decoder};
    use tonic::Status;

    use flowlens::record::api::proto::SubscribeRequest;

    /// One response: a batch's record count and its first and last seq, or a loss.
    #[derive(Debug, Default)]
    pub struct Counted {
        pub records: u64,
        pub first_seq: u64,
        pub last_seq: u64,
        pub lost: u64,
    }

    pub struct Counting;

    impl Codec for Counting {
        type Encode = SubscribeRequest;
        type Decode = Counted;
        type Encoder = tonic_prost::ProstEncoder<SubscribeRequest>;
        type Decoder = CountingDecoder;

        fn encoder(&mut self) -> Self::Encoder {
            tonic_prost::ProstEncoder::new(Default::default())
        }

        fn decoder(&mut self) -> Self::Decoder {
            CountingDecoder
        }
    }

    pub struct CountingDecoder;

    fn bad(what: &str) -> Status {
        Status::internal(format!("bench client: {what}"))
    }

    /// Splits one field off `buf`: its number, and its bytes (length-delimited) or value.
    fn field<'a>(buf: &mut &'a [u8]) -> Result<(u32, Option<&'a [u8]>, u64), Status> {
        let key = decode_varint(buf).map_err(|_| bad("key"))?;
        let tag = (key >> 3) as u32;
        let skip = |buf: &mut &'a [u8], n: usize| {
            if n > buf.len() {
                return Err(bad("truncated field"));
            }
            let (v, rest) = buf.split_at(n);
            *buf = rest;
            Ok(v)
        };
        match key & 7 {
            0 => Ok((tag, None, decode_varint(buf).map_err(|_| bad("varint"))?)),
            2 => {
                let len = decode_varint(buf).map_err(|_| bad("length"))? as usize;
                Ok((tag, Some(skip(buf, len)?), 0))
            }
            1 => skip(buf, 8).map(|_| (tag, None, 0)),
            5 => skip(buf, 4).map(|_| (tag, None, 0)),
            _ => Err(bad("wire type")),
        }
    }

    fn seq_of(mut rec: &[u8]) -> Result<u64, Status> {
        while !rec.is_empty() {
            if let (21, None, v) = field(&mut rec)? {
                return Ok(v);
            }
        }
        Err(bad("record without seq"))
    }

    fn count(mut msg: &[u8]) -> Result<Counted, Status> {
        let mut out = Counted::default();
        while !msg.is_empty() {
            match field(&mut msg)? {
                (1, Some(mut batch), _) => {
                    let (mut first, mut last) = (None, None);
                    while !batch.is_empty() {
                        let (_, rec, _) = field(&mut batch)?;
                        let rec = rec.ok_or_else(|| bad("record not a message"))?;
                        first.get_or_insert(rec);
                        last = Some(rec);
                        out.records += 1;
                    }
                    if let (Some(f), Some(l)) = (first, last) {
                        out.first_seq = seq_of(f)?;
                        out.last_seq = seq_of(l)?;
                    }
                }
                (2, Some(mut lost), _) => {
                    while !lost.is_empty() {
                        if let (1, None, v) = field(&mut lost)? {
                            out.lost += v;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    impl Decoder for CountingDecoder {
        type Item = Counted;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Counted>, Status> {
            let n = src.remaining();
            let chunk = src.chunk();
            if chunk.len() < n {
                return Err(bad("message not contiguous"));
            }
            let out = count(&chunk[..n])?;
            src.advance(n);
            Ok(Some(out))
        }
    }
}

/// Subscribes over its own connection, asking for `codec`, and counts `want` records (see
/// [`counting`]); fails on any loss or gap.
async fn count_stream(
    addr: String,
    want: u64,
    codec: Option<tonic::codec::CompressionEncoding>,
) -> Result<u64> {
    let (got, lost) = count_lossy(addr, want, codec, None).await?;
    if lost > 0 {
        bail!("the subscriber lost {lost} records");
    }
    Ok(got)
}

/// Subscribes over its own connection, asking for `codec`, and counts records and the
/// losses it is told of until they make `want`, the stream ends, or (with `quiet`) nothing
/// came for that long. Every batch must hold consecutive records after the previous one
/// or after a loss.
pub async fn count_lossy(
    addr: String,
    want: u64,
    codec: Option<tonic::codec::CompressionEncoding>,
    quiet: Option<Duration>,
) -> Result<(u64, u64)> {
    use flowlens::record::api::proto::SubscribeRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Some(c) = codec {
        grpc = grpc.accept_compressed(c);
    }
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/flowlens.v1.FlowLens/Subscribe");
    let mut s = grpc
        .server_streaming(
            tonic::Request::new(SubscribeRequest::default()),
            path,
            counting::Counting,
        )
        .await?
        .into_inner();
    let (mut got, mut lost, mut next_seq) = (0, 0, 1);
    while got + lost < want {
        let m = match quiet {
            None => s.message().await?,
            Some(q) => match tokio::time::timeout(q, s.message()).await {
                Ok(m) => m?,
                Err(_) => break,
            },
        };
        let Some(m) = m else { break };
        lost += m.lost;
        if m.records == 0 {
            continue;
        }
        if (m.first_seq != next_seq && m.lost == 0 && lost == 0)
            || m.last_seq + 1 - m.first_seq != m.records
        {
            bail!(
                "batch of {} records has seq {}..={}, expected to start at {next_seq}",
                m.records,
                m.first_seq,
                m.last_seq
            );
        }
        next_seq = m.last_seq + 1;
        got += m.records;
    }
    Ok((got, lost))
}
