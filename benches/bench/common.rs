//! What several sections share: the results table, the BPF loaders, the flow mix and map
//! fills, synthetic flow records, and CPU time and RSS readers.

use std::mem::MaybeUninit;

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject};

use flowlens::kernel::bpf::bench_skel::{BenchSkel, BenchSkelBuilder};
use flowlens::kernel::bpf::flow_mono_skel::{FlowMonoSkel, FlowMonoSkelBuilder};
use flowlens::kernel::bpf::peer_skel::{PeerSkel, PeerSkelBuilder};
use flowlens::kernel::bpf::types;
use flowlens::kernel::datapath::FlowMaps;
use flowlens::poller::decode::{meta, Clock, Counts, RawFlow, RecordMeta, LO_TO_HI};
use flowlens::record::flow::{DirStats, EndReason, FlowRecord, Hook};

/// Rows of the final table: (section, measurement, value, unit, note).
pub struct Table(pub Vec<(String, String, f64, &'static str, String)>);

impl Table {
    pub fn add(&mut self, section: &str, what: &str, value: f64, unit: &'static str, note: String) {
        println!("  {section:<10} {what:<46} {value:>14.2} {unit:<10} {note}");
        self.0
            .push((section.into(), what.into(), value, unit, note));
    }
}

fn leak_storage() -> &'static mut MaybeUninit<OpenObject> {
    // Each skeleton borrows its storage for the life of the process.
    Box::leak(Box::new(MaybeUninit::uninit()))
}

pub fn load_mono(capacity: u32) -> Result<FlowMonoSkel<'static>> {
    let mut open = FlowMonoSkelBuilder::default()
        .open(leak_storage())
        .context("open mono")?;
    open.maps.flows.set_max_entries(capacity)?;
    open.maps.flows_naive.set_max_entries(capacity)?;
    open.load().context("load mono")
}

/// The peer-like per-direction flow program (src/bpf/peer.bpf.c), `capacity` flows.
pub fn load_peer(capacity: u32) -> Result<PeerSkel<'static>> {
    let mut open = PeerSkelBuilder::default()
        .open(leak_storage())
        .context("open peer")?;
    open.maps.peer_flows.set_max_entries(capacity)?;
    open.load().context("load peer")
}

pub fn load_baselines() -> Result<BenchSkel<'static>> {
    let skel = BenchSkelBuilder::default()
        .open(leak_storage())?
        .load()
        .context("load baselines")?;
    skel.maps
        .bench_counts
        .update(&0u32.to_ne_bytes(), &0u64.to_ne_bytes(), MapFlags::ANY)?;
    skel.maps
        .bench_locked
        .update(&0u32.to_ne_bytes(), &[0u8; 24], MapFlags::ANY)?;
    skel.maps
        .bench_key44
        .update(&[0u8; 44], &0u64.to_ne_bytes(), MapFlags::ANY)?;
    Ok(skel)
}

/// A flow mix: percent of TCP, UDP and ICMP flows.
#[derive(Clone, Copy)]
pub struct Mix(pub u32, pub u32, pub u32);

impl Mix {
    pub const DEFAULT: Mix = Mix(40, 50, 10);

    pub fn proto(self, i: u32) -> u8 {
        match i % 100 {
            x if x < self.0 => 6,
            x if x < self.0 + self.1 => 17,
            _ => 1,
        }
    }

    pub fn ext(self, i: u32) -> u32 {
        match self.proto(i) {
            6 => types::flow_ext::EXT_TCP.0,
            1 => types::flow_ext::EXT_ICMP.0,
            _ => 0,
        }
    }

    pub fn label(self) -> String {
        format!("{}/{}/{}", self.0, self.1, self.2)
    }
}

pub fn key(i: u32, mix: Mix) -> types::flow_key {
    let mut k = types::flow_key::default();
    k.addr_lo[10] = 0xff;
    k.addr_lo[11] = 0xff;
    k.addr_lo[12..].copy_from_slice(&[10, 201, (i >> 8) as u8, i as u8]);
    k.addr_hi[10] = 0xff;
    k.addr_hi[11] = 0xff;
    k.addr_hi[12..].copy_from_slice(&[10, 200, 0, 2]);
    k.port_lo = (i >> 16) as u16;
    k.port_hi = 443;
    k.proto = mix.proto(i);
    k.ip_version = 4;
    k.ifindex = 1;
    k
}

pub fn bytes<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: Plain types have no invalid bit patterns or hidden invariants.
    unsafe { plain::as_bytes(v) }
}

/// Fills `map` with `n` entries in batches of 10,000.
pub fn fill(map: &MapHandle, n: u32, kv: impl Fn(u32) -> Option<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    let mut keys = Vec::new();
    let mut vals = Vec::new();
    let mut count = 0;
    for i in 0..n {
        if let Some((k, v)) = kv(i) {
            keys.extend_from_slice(&k);
            vals.extend_from_slice(&v);
            count += 1;
        }
        if count == 10_000 || (i == n - 1 && count > 0) {
            map.update_batch(&keys, &vals, count, MapFlags::ANY, MapFlags::ANY)?;
            keys.clear();
            vals.clear();
            count = 0;
        }
    }
    Ok(())
}

/// Fills the split maps as the datapath would: every flow a base entry, and
/// `sampled` percent of the TCP and ICMP flows (those with a latency or RTT
/// sample; 100 is the worst case) an extension entry under its id.
pub fn fill_split(maps: &FlowMaps, n: u32, mix: Mix, sampled: u32) -> Result<()> {
    fill_split_maps([&maps.flows, &maps.tcp, &maps.icmp], n, mix, sampled)
}

/// `fill_split` on the base, TCP and ICMP maps given apart (pinned ones, say).
pub fn fill_split_maps(maps: [&MapHandle; 3], n: u32, mix: Mix, sampled: u32) -> Result<()> {
    let [flows, tcp, icmp] = maps;
    fill(flows, n, |i| {
        let base = types::flow_base {
            packets: [10, 10],
            meta: meta::created(LO_TO_HI, false, mix.ext(i)),
            ext_id: if mix.ext(i) == 0 { 0 } else { u64::from(i) + 1 },
            ..Default::default()
        };
        Some((bytes(&key(i, mix)).to_vec(), bytes(&base).to_vec()))
    })?;
    let ext_fill = |map: &MapHandle, want: u32, value: &[u8]| {
        fill(map, n, |i| {
            (mix.ext(i) == want && (i / 100) % 100 < sampled)
                .then(|| ((u64::from(i) + 1).to_ne_bytes().to_vec(), value.to_vec()))
        })
    };
    ext_fill(
        tcp,
        types::flow_ext::EXT_TCP.0,
        bytes(&types::flow_tcp::default()),
    )?;
    ext_fill(
        icmp,
        types::flow_ext::EXT_ICMP.0,
        bytes(&types::flow_icmp::default()),
    )
}

/// CPU seconds process `pid` has used (utime + stime in /proc/<pid>/stat).
pub fn cpu_secs_of(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("/proc stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the command name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    Ok(ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Peak resident memory of process `pid` in MiB (VmHWM).
pub fn peak_rss_mib_of(pid: u32) -> Result<f64> {
    status_mib(pid, "VmHWM")
}

/// CPU seconds this process has used.
pub fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time this thread has used.
pub fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Resident memory of process `pid` in MiB (VmRSS in /proc/<pid>/status).
pub fn rss_mib_of(pid: u32) -> Result<f64> {
    status_mib(pid, "VmRSS")
}

/// A memory field of /proc/<pid>/status (in kB there), in MiB.
fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .with_context(|| format!("{field} of process {pid}"))
}

pub fn record(i: u64) -> FlowRecord {
    let key = key(i as u32, Mix::DEFAULT);
    let raw = RawFlow {
        key,
        base: types::flow_base::default(),
        tcp: None,
        icmp: None,
        owner: [None, None],
    };
    let mut r = raw.to_record(
        RecordMeta {
            counts: Counts::default(),
            end_reason: EndReason::IdleTimeout,
            interface: "bench0".into(),
            observer: "bench".into(),
            window_start_ns: 0,
            emitted_ns: 0,
            flow_id: raw.flow_id(),
            continuation: false,
            local: [None, None],
        },
        &Clock::new(),
    );
    r.client = DirStats {
        packets: i,
        bytes: i * 100,
        ttl: 64,
    };
    r.first_hook = Hook::Ingress;
    r
}

/// A realistic record mix: 40 % TCP (flags, handshake, latency), 50 % UDP, 10 % ICMP echo.
pub fn mixed_record(i: u64) -> FlowRecord {
    use flowlens::record::flow::{IcmpInfo, Latency, TcpInfo, TcpState};
    let mut r = record(i);
    r.client_addr = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32 % 5000));
    r.server = DirStats {
        packets: i % 97,
        bytes: (i % 97) * 1400,
        ttl: 63,
    };
    let lat = Latency {
        count: 1 + (i % 50) as u32,
        sum_ns: 250_000 * (1 + i % 50),
        min_ns: 90_000,
        max_ns: 900_000,
        jitter_ns: Some(40_000),
    };
    match i % 10 {
        0..=3 => {
            r.protocol = 6;
            r.server_port = [443, 80, 22, 5432][(i % 4) as usize];
            r.tcp = Some(TcpInfo {
                client_flags: 0x1b,
                server_flags: 0x1b,
                state: TcpState::Closed,
                handshake_client_ns: Some(120_000 + (i % 1000) as u32),
                handshake_server_ns: Some(40_000),
                syn_retransmits: 0,
                late_start: false,
                client_latency: Some(lat),
                server_latency: Some(lat),
            });
        }
        4..=8 => {
            r.protocol = 17;
            r.server_port = 53;
        }
        _ => {
            r.protocol = 1;
            r.client_port = 0;
            r.server_port = 0;
            r.icmp = Some(IcmpInfo {
                client_type: Some(8),
                client_code: Some(0),
                server_type: Some(0),
                server_code: Some(0),
                echo_id: Some(i as u16),
                echo_rtt: Some(Latency {
                    jitter_ns: None,
                    ..lat
                }),
            });
        }
    }
    r
}
