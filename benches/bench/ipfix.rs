//! IPFIX export: records encoded, encoded + sent over UDP by the exporter thread, and the
//! fanout's hand-off cost per exporter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use flowlens::hub::{Hub, HubConfig, Next, SinkKind};
use flowlens::record::encoding::RecordDecoder;
use flowlens::record::flow::FlowRecord;

use crate::common::{cpu_secs, record, thread_cpu, Table};

/// IPFIX: records encoded, and encoded + sent by the exporter thread to a local UDP sink;
/// what handing records to it costs the output thread at 100 k flows ended per second.
pub fn run(t: &mut Table) -> Result<()> {
    use flowlens::sinks::ipfix::{self, encode::Encoder, Destination, IpfixConfig, IpfixStats};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    println!("ipfix: RFC 7011 encoding and UDP export (two data records per flow)");
    let n: u64 = 1_000_000;
    let recs: Vec<Arc<FlowRecord>> = (1..=n)
        .map(|i| {
            let mut r = record(i);
            r.server = r.client;
            Arc::new(r)
        })
        .collect();

    let mut enc = Encoder::new(0, 1400 - 28, None)?;
    let (mut bytes, mut msgs) = (0usize, 0u64);
    let t0 = Instant::now();
    for chunk in recs.chunks(4096) {
        enc.encode(chunk.iter().map(|r| &**r), 0, false, &mut |m| {
            bytes += m.bytes.len();
            msgs += 1;
        });
    }
    let encode_rate = n as f64 / t0.elapsed().as_secs_f64();
    t.add(
        "ipfix",
        "flow records encoded (no I/O)",
        encode_rate,
        "rec/s",
        format!(
            "{:.1} B/flow, {msgs} messages of <= 1372 B",
            bytes as f64 / n as f64
        ),
    );

    // What the exporter thread does but send: read the records from the hub's log (decode
    // them) and encode them. One thread, no I/O: the cost of reading from the log beside
    // encoding alone.
    let hub = Hub::new(HubConfig {
        buffer_memory: n as usize * 1024,
        ..HubConfig::default()
    });
    let mut rx = hub.add_sink(SinkKind::Export, "bench");
    for chunk in recs.chunks(1000) {
        hub.publish_all(chunk.iter().map(|r| (**r).clone()));
    }
    hub.close();
    let mut enc = Encoder::new(0, 1400 - 28, None)?;
    let mut dec = RecordDecoder::default();
    let mut batch = Vec::new();
    let (mut read, mut read_bytes) = (0u64, 0usize);
    let t0 = Instant::now();
    loop {
        match rx.try_next() {
            Next::Records(run) => {
                let k = run.decode_into(&mut dec, &mut batch);
                read += k as u64;
                enc.encode(batch[..k].iter(), 0, false, &mut |m| {
                    read_bytes += m.bytes.len();
                });
            }
            Next::End => break,
            other => bail!("reading the log: {other:?}"),
        }
    }
    let read_rate = read as f64 / t0.elapsed().as_secs_f64();
    if read != n || read_bytes < bytes / 2 {
        bail!("read and encoded {read} records ({read_bytes} bytes) of {n}");
    }
    t.add(
        "ipfix",
        "flow records read from the hub's log and encoded (no I/O)",
        read_rate,
        "rec/s",
        format!(
            "x{:.2} of encoding alone: reading costs {:.0} ns/rec",
            read_rate / encode_rate,
            1e9 / read_rate - 1e9 / encode_rate
        ),
    );
    drop(rx);

    let sink = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sink.set_read_timeout(Some(Duration::from_millis(200)))?;
    let port = sink.local_addr()?.port();
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (got, stop) = (received.clone(), done.clone());
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(len) = sink.recv(&mut buf) {
                got.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
        thread_cpu()
    });
    let cfg = IpfixConfig {
        destination: format!("udp://127.0.0.1:{port}").parse::<Destination>()?,
        observation_domain: 0,
        mtu: ipfix::DEFAULT_MTU,
        template_refresh: Duration::from_secs(60),
        enterprise: None,
    };
    let stats = Arc::new(IpfixStats::default());
    // Room for every record: the exporter loses none to the log's bound.
    let hub = Hub::new(HubConfig {
        buffer_memory: n as usize * 1024,
        ..HubConfig::default()
    });
    // The exporter's CPU is the process's less this thread's (publishing) and the sink
    // reader's: what it costs per record, whatever else shares the machine.
    let (t0, cpu0, own0) = (Instant::now(), cpu_secs(), thread_cpu());
    let exporter = ipfix::spawn(cfg, hub.add_sink(SinkKind::Export, "bench"), stats.clone())?;
    for chunk in recs.chunks(256) {
        hub.publish_all(chunk.iter().map(|r| (**r).clone()));
    }
    hub.close();
    let publish_cpu = (thread_cpu() - own0).as_secs_f64();
    exporter
        .join()
        .map_err(|_| anyhow::anyhow!("the exporter panicked"))?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let reader_cpu = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the sink reader panicked"))?
        .as_secs_f64();
    let exporter_ns = (cpu - publish_cpu - reader_cpu).max(0.0) * 1e9 / n as f64;
    let s = stats.snapshot();
    if s.records_sent + s.records_lost != n {
        bail!(
            "exporter accounted for {} of {n} records",
            s.records_sent + s.records_lost
        );
    }
    let send_rate = s.records_sent as f64 / secs;
    t.add(
        "ipfix",
        "flow records published, encoded + sent over UDP (loopback)",
        send_rate,
        "rec/s",
        format!(
            "x{:.2} of encoding alone; {} messages, {:.1}% of bytes read by the sink",
            send_rate / encode_rate,
            s.messages_sent,
            100.0 * received.load(Ordering::Relaxed) as f64 / s.bytes_sent.max(1) as f64
        ),
    );

    t.add(
        "ipfix",
        "exporter thread CPU per flow record (read, encode, send)",
        exporter_ns,
        "ns/rec",
        format!(
            "publishing (clone, number, encode into the log): {:.0} ns/rec on the bench thread",
            publish_cpu * 1e9 / n as f64
        ),
    );

    // The fanout's share: publishing with an exporter's sink registered vs none.
    let plain: Vec<FlowRecord> = recs.iter().take(200_000).map(|r| (**r).clone()).collect();
    // Rounds alternate without and with, and each side keeps its fastest: the hand-off is
    // a few ns per record, under the noise of one round.
    let mut per_rec = [f64::MAX; 2];
    for _ in 0..5 {
        for (side, with_sink) in [false, true].into_iter().enumerate() {
            // The ring keeps every record on both sides, so neither frees any while timed.
            let hub = Hub::new(HubConfig {
                ring_capacity: plain.len(),
                buffer_memory: plain.len() * 1024,
            });
            let _rx = with_sink.then(|| hub.add_sink(SinkKind::Export, "bench"));
            let t0 = Instant::now();
            for chunk in plain.chunks(256) {
                hub.publish_all(chunk.iter().cloned());
            }
            let ns = t0.elapsed().as_nanos() as f64 / plain.len() as f64;
            per_rec[side] = per_rec[side].min(ns);
        }
    }
    let handoff_ns = per_rec[1] - per_rec[0];
    t.add(
        "ipfix",
        "hand-off cost in the fanout per exporter",
        handoff_ns,
        "ns/rec",
        format!(
            "{:.2}% of a core at 100k flows/s; exporter thread {:.1}% of a core",
            handoff_ns * 100_000.0 / 1e7,
            100.0 * 100_000.0 / send_rate
        ),
    );
    Ok(())
}
