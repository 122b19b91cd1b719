//! Kafka export: records encoded (value + key), encoded and handed to librdkafka by the sink's producer, and acknowledged by a tansu broker on loopback, with flowlens' default producer settings (zstd, idempotent, acks=all).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use flowlens::record::encoding::{encode_record, Endpoints, Stamp};
use flowlens::sinks::kafka::message::write_key;
use flowlens::sinks::kafka::{KafkaFlags, KafkaStats, Producer};

use crate::common::{mixed_record, thread_cpu, Table};

/// Records per round; rounds per measurement (the machine is shared: the table gives the
/// range).
const N: u64 = 500_000;
const ROUNDS: usize = 3;
/// Records the sink hands over per call, as its thread does.
const BATCH: usize = 4096;

/// tansu as `make test-deps` builds it.
fn tansu() -> Result<PathBuf> {
    let dir = std::env::var_os("FLOWLENS_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/flowlens-tools")
        });
    let t = dir.join("tansu/bin/tansu");
    if !t.exists() {
        bail!("{} missing: run `make test-deps`", t.display());
    }
    Ok(t)
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tansu broker with in-memory storage on a free loopback port, and a 3-partition topic.
fn broker(topic: &str) -> Result<(Broker, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let tansu = tansu()?;
    let child = Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/", "--silent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tansu")?;
    let b = Broker(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("tansu did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = Command::new(&tansu)
        .args([
            "topic",
            "create",
            "--broker",
            &url,
            "--partitions",
            "3",
            topic,
        ])
        .output()?
        .status
        .success();
    if !ok {
        bail!("tansu topic create {topic} failed");
    }
    Ok((b, port))
}

fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

pub fn run(t: &mut Table) -> Result<()> {
    println!(
        "kafka: {N} records per round, {ROUNDS} rounds (best and worst shown), tansu on loopback"
    );
    // The records as the hub's log holds them: encoded once by the fanout, for every reader.
    let recs: Vec<Vec<u8>> = (1..=N)
        .map(|i| {
            let mut b = Vec::new();
            encode_record(Stamp { run: 1, seq: i }, &mixed_record(i), &mut b);
            b
        })
        .collect();
    let bytes: usize = recs.iter().map(Vec::len).sum();

    // The sink's own work before librdkafka: each record's key, read from its encoding.
    let mut enc = Vec::new();
    let mut key = Vec::with_capacity(128);
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        for r in &recs {
            key.clear();
            write_key(&Endpoints::read(r)?, &mut key);
        }
        enc.push(N as f64 / t0.elapsed().as_secs_f64());
    }
    let (lo, hi) = range(&enc);
    t.add(
        "kafka",
        "keys read from encoded records, no librdkafka",
        hi,
        "rec/s",
        format!("worst {lo:.0}; {:.0} B per value", bytes as f64 / N as f64),
    );

    let (mut handed, mut handed_cpu, mut acked) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let topic = format!("bench{round}");
        let (_broker, port) = broker(&topic)?;
        let cfg = KafkaFlags {
            brokers: Some(
                format!("127.0.0.1:{port}")
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            ),
            topic,
            // Room for the whole round: the sink never waits for the broker here.
            options: vec![
                "queue.buffering.max.messages=2000000"
                    .parse()
                    .map_err(anyhow::Error::msg)?,
                "queue.buffering.max.kbytes=2097152"
                    .parse()
                    .map_err(anyhow::Error::msg)?,
            ],
            ..KafkaFlags::default()
        }
        .resolve()?
        .context("kafka config")?;
        let stats = Arc::new(KafkaStats::default());
        let mut p = Producer::new(cfg, "bench", stats.clone())?;
        // Connected, with the topic's metadata, before the clock starts.
        p.send(recs.iter().take(1).map(Vec::as_slice), 0);
        let deadline = Instant::now() + Duration::from_secs(15);
        while stats.snapshot().records_delivered < 1 {
            if Instant::now() > deadline {
                bail!("the first record was not acknowledged");
            }
            p.upkeep();
        }
        let t0 = Instant::now();
        let (mut in_send, mut send_cpu) = (Duration::ZERO, Duration::ZERO);
        for chunk in recs.chunks(BATCH) {
            let (s0, c0) = (Instant::now(), thread_cpu());
            p.send(chunk.iter().map(Vec::as_slice), 0);
            in_send += s0.elapsed();
            send_cpu += thread_cpu() - c0;
            p.upkeep();
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let c = stats.snapshot();
            if c.records_delivered + c.lost_total() > N {
                if c.lost_total() > 0 {
                    bail!("{} records lost: {c:?}", c.lost_total());
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("not acknowledged in 300 s: {c:?}");
            }
            p.upkeep();
        }
        let total = t0.elapsed();
        handed.push(N as f64 / in_send.as_secs_f64());
        handed_cpu.push(N as f64 / send_cpu.as_secs_f64());
        acked.push(N as f64 / total.as_secs_f64());
        let c = stats.snapshot();
        println!(
            "  round {round}: handed over in {in_send:.2?} ({send_cpu:.2?} of the thread's CPU), \
             acknowledged in {total:.2?} ({:.0} MB of values)",
            c.bytes_delivered as f64 / 1e6
        );
        p.finish(Duration::from_secs(1));
    }
    let (lo, hi) = range(&handed_cpu);
    t.add(
        "kafka",
        "records keyed + handed to librdkafka, per CPU s",
        hi,
        "rec/s",
        format!("worst {lo:.0}; the sink thread's CPU time in Producer::send"),
    );
    let (lo, hi) = range(&handed);
    t.add(
        "kafka",
        "records keyed + handed to librdkafka (wall)",
        hi,
        "rec/s",
        format!(
            "worst {lo:.0}; wall time in Producer::send, librdkafka and tansu on the other CPU"
        ),
    );
    let (lo, hi) = range(&acked);
    t.add(
        "kafka",
        "records acknowledged by tansu (loopback)",
        hi,
        "rec/s",
        format!("worst {lo:.0}; first send to last acknowledgement, broker on the same 2 vCPUs"),
    );
    Ok(())
}
