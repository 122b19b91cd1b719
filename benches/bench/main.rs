//! `make bench`: datapath cost per packet, split vs monolithic maps (time and kernel memory),
//! poller drain rate, gRPC stream rate, bursts of flow ends to every reader, IPFIX and Kafka
//! export rates, and real-traffic overhead, as ratios measured in one run.

mod burst;
mod busy;
mod common;
mod compression;
mod datapath;
mod ipfix;
mod kafka;
mod memory;
mod poller;
mod poller_cost;
mod stream;
mod traffic;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use common::Table;

type Section = fn(&mut Table) -> Result<()>;

/// Every section, in the order a full run takes them: its name, what it measures, and it.
const SECTIONS: [(&str, &str, Section); 12] = [
    (
        "datapath",
        "BPF datapath cost per packet, split vs monolithic maps",
        datapath::run,
    ),
    (
        "attribution",
        "a new flow's cost with and without its local sockets' owners",
        datapath::attribution,
    ),
    (
        "memory",
        "kernel memory per flow, split maps vs single maps",
        memory::run,
    ),
    (
        "poller",
        "poller read + join rate, batch vs key-by-key; snapshot cost",
        poller::run,
    ),
    (
        "poller_cost",
        "agent CPU at 1 M live flows; ending 100 k flows at once",
        poller_cost::run,
    ),
    (
        "busy",
        "agent CPU and RSS at 1 M flows sending a packet a minute (active records)",
        busy::run,
    ),
    (
        "stream",
        "gRPC stream rate, publish rate, encoding, idle-subscriber RSS",
        stream::run,
    ),
    (
        "burst",
        "100 k and 1 M flows ending at once, through the binary to stdout, watch and grpcio",
        burst::run,
    ),
    (
        "compression",
        "bytes per streamed record, uncompressed, zstd and gzip",
        compression::run,
    ),
    (
        "ipfix",
        "IPFIX encoding and UDP export rate; fanout hand-off cost",
        ipfix::run,
    ),
    (
        "kafka",
        "Kafka export: encoding, hand-off to librdkafka, tansu acknowledgements",
        kafka::run,
    ),
    (
        "traffic",
        "iperf3 between two namespaces without and with flowlens",
        traffic::run,
    ),
];

fn usage() -> String {
    let mut u = String::from(
        "usage: flowlens-bench [SECTION]...\n\
         Runs the named sections (all when none is named; as root) and prints one table.\n\n\
         sections:\n",
    );
    for (name, about, _) in SECTIONS {
        u += &format!("  {name:<12} {about}\n");
    }
    u
}

fn main() -> Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    if only.first().is_some_and(|a| a == "stream-server") {
        return stream::stream_server();
    }
    if only.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", usage());
        return Ok(());
    }
    if let Some(unknown) = only.iter().find(|o| SECTIONS.iter().all(|s| s.0 != *o)) {
        let names: Vec<&str> = SECTIONS.iter().map(|s| s.0).collect();
        eprintln!(
            "flowlens-bench: unknown section `{unknown}` (sections: {})",
            names.join(", ")
        );
        std::process::exit(2);
    }
    let mut t = Table(Vec::new());
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let wanted: Vec<(&str, Section)> = SECTIONS
        .into_iter()
        .filter(|s| want(s.0))
        .map(|(name, _, f)| (name, f))
        .collect();
    let mut rows = Vec::new();
    if let [(name, f)] = wanted[..] {
        f(&mut t).with_context(|| format!("benchmark section {name}"))?;
    } else {
        // Each section in a process of its own: one section's leftovers (a heap grown to
        // hundreds of MiB, kernel objects) moved the next one's figures by up to 2x.
        for (name, _) in wanted {
            wait_quiet();
            rows.extend(section_in_child(name)?);
        }
    }
    println!();
    println!("{TABLE_HEADER}");
    let mut out = std::io::stdout().lock();
    for (s, w, v, u, n) in &t.0 {
        writeln!(out, "{s:<10} {w:<46} {v:>14.2} {u:<10} {n}")?;
    }
    for row in rows {
        writeln!(out, "{row}")?;
    }
    Ok(())
}

const TABLE_HEADER: &str =
    "section    measurement                                             value unit       note";

/// Waits (at most 30 s) until the machine's CPUs are 90 % idle over half a second: the
/// kernel frees a section's maps (millions of entries) on its own threads after the section
/// ended, and the next section would be timed against that.
fn wait_quiet() {
    let busy_idle = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let idle = cpu.get(3)? + cpu.get(4)?;
        Some((cpu.iter().sum::<u64>() - idle, idle))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some((b0, i0)) = busy_idle() else { return };
        std::thread::sleep(Duration::from_millis(500));
        let Some((b1, i1)) = busy_idle() else { return };
        let (busy, idle) = (b1 - b0, i1 - i0);
        if busy * 9 <= idle {
            return;
        }
    }
}

/// Runs one section in a child process, passing its progress through; returns its table's
/// rows.
fn section_in_child(name: &str) -> Result<Vec<String>> {
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe()?)
        .arg(name)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting benchmark section {name}"))?;
    let out = child.stdout.take().context("child stdout")?;
    let (mut rows, mut in_table) = (Vec::new(), false);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        if in_table {
            rows.push(line);
        } else if line == TABLE_HEADER {
            in_table = true;
        } else {
            println!("{line}");
        }
    }
    if !child.wait()?.success() {
        bail!("benchmark section {name} failed");
    }
    Ok(rows)
}
