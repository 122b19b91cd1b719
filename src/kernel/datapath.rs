//! Loads the flow skeleton with userspace-chosen map capacities and hands out its maps and programs.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenMapMut, OpenObject, ProgramMut};
use log::{info, warn};
use thiserror::Error;

use crate::kernel::bpf::{types, FlowSkel, FlowSkelBuilder};
use crate::status::MapUsage;

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("opening the BPF object: {0}")]
    Open(#[source] libbpf_rs::Error),
    #[error("setting capacity of map {map} to {capacity}: {source}")]
    Capacity {
        map: &'static str,
        capacity: u32,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error(
        "loading the BPF programs into the kernel (needs CAP_BPF + CAP_NET_ADMIN and a kernel with BTF): {0}"
    )]
    Load(#[source] libbpf_rs::Error),
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] crate::kernel::preflight::PreflightError),
    #[error("program {prog}: {source}")]
    Program {
        prog: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
}

/// Maximum entries of each flow map, fixed before load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    pub flows: u32,
    pub tcp: u32,
    pub icmp: u32,
    /// Local ends of flows with their owners (`flows_owner`): one per local socket a
    /// flow ends at, two for a flow over loopback.
    pub owner: u32,
}

/// The TCP extension map holds a quarter of `--max-flows` unless set, the ICMP one a
/// sixteenth. Only a flow with a sample (a TCP answer, an echo reply) takes an extension
/// entry, and the base map is sized with headroom (pressure starts at 80 %): at half full,
/// these cover flows that are up to 50 % answered TCP and 12.5 % ICMP. The kernel gives a
/// hash map a power-of-two bucket array (16 B a bucket, allocated at creation whatever the
/// number of entries), so power-of-two fractions of a power-of-two `--max-flows` use every
/// bucket they pay for.
pub const TCP_SHARE: u32 = 4;
pub const ICMP_SHARE: u32 = 16;
/// `flows_owner` holds half of `--max-flows` unless set: one entry per local end, and
/// nearly every flow of a server has one (a loopback flow two, a forwarded one none), so
/// at the base map's half-full mark it covers every flow; its bucket array (16 B a
/// bucket) is paid at creation like the others'.
pub const OWNER_SHARE: u32 = 2;

impl Default for Capacities {
    fn default() -> Self {
        Capacities::for_flows(65_536)
    }
}

/// Which new flows wait in probation to be answered (`src/bpf/probation.h`), fixed at
/// load. The agent always runs `UnderPressure`; the others are for benchmarks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admission {
    /// While the base map is below `Capacities::admission_room` (half its capacity), a new
    /// flow goes straight in; past it, new flows wait in probation until answered, so a
    /// flood takes at most that share of the map.
    #[default]
    UnderPressure,
    /// Every new flow waits in probation until answered (the path under pressure).
    Always,
    /// No probation: every new flow straight into the base map, and a packet that finds it
    /// full is lost (the datapath before admission existed).
    Never,
}

impl Admission {
    fn mode(self) -> u32 {
        use types::admission_mode as M;
        match self {
            Admission::UnderPressure => M::ADMIT_UNDER_PRESSURE.0,
            Admission::Always => M::ADMIT_ALWAYS.0,
            Admission::Never => M::ADMIT_NEVER.0,
        }
    }
}

/// Ended TCP connections remembered (`ended`, an LRU map, so preallocated: 16,384
/// elements of 128 B, 2 MiB), so that one that resumes keeps its identity.
pub const ENDED_CONNECTIONS: u32 = 16_384;

impl Capacities {
    /// The capacities `--max-flows` alone implies: the extension maps as shares of it.
    pub fn for_flows(flows: u32) -> Capacities {
        Capacities {
            flows,
            tcp: Self::tcp_for(flows),
            icmp: Self::icmp_for(flows),
            owner: Self::owner_for(flows),
        }
    }

    /// The `flows_owner` capacity `flows` implies.
    pub fn owner_for(flows: u32) -> u32 {
        (flows / OWNER_SHARE).max(1)
    }

    /// Bytes of `owner_ring`, the owners on their way to `flows_owner`: room for a
    /// 64th of its capacity in records (48 B each with the ring's header, 72 B for an end
    /// the poller is to look up), within [256 KiB, 1 MiB] (5,461 to 21,845 owners), a
    /// power of two as the kernel wants. The
    /// poller reads it before each scan, and is woken to read it when a quarter waits, so
    /// it overflows only if that many ends are taken faster than a thread wakes up.
    pub fn owner_ring(&self) -> u32 {
        (u64::from(self.owner) * 72 / 64)
            .next_power_of_two()
            .clamp(256 << 10, 1 << 20) as u32
    }

    /// The TCP extension capacity `flows` implies.
    pub fn tcp_for(flows: u32) -> u32 {
        (flows / TCP_SHARE).max(1)
    }

    /// The ICMP extension capacity `flows` implies.
    pub fn icmp_for(flows: u32) -> u32 {
        (flows / ICMP_SHARE).max(1)
    }

    /// Why explicit extension capacities lose samples the base map's would keep: one
    /// sentence per map set below what `--max-flows` implies.
    pub fn shortfalls(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, set, implied, what, counter) in [
            (
                "--max-tcp-flows",
                self.tcp,
                Self::tcp_for(self.flows),
                "TCP flows",
                "latency",
            ),
            (
                "--max-icmp-flows",
                self.icmp,
                Self::icmp_for(self.flows),
                "ICMP flows",
                "echo RTT",
            ),
        ] {
            if set < implied {
                out.push(format!(
                    "{flag} {set} is below the {implied} that --max-flows {} implies: \
                     {what} beyond {set} at once get no {counter} samples (counted as \
                     flowlens_kernel_samples_lost_total); raise it or leave it unset",
                    self.flows
                ));
            }
        }
        out
    }

    /// Flows not yet answered (`probation`, an LRU map, preallocated: 184 B an element):
    /// half the base map within [16384, 32768], 3 to 6 MiB. It follows the flood's rate,
    /// not the host's flows: how long an unanswered flow survives is its size over the rate
    /// of new junk (32,768 at ~740 k/s is 44 ms, far longer than a local handshake), and a
    /// client whose SYN is evicted still gets in on its final ACK, as a late start. Larger,
    /// it would be kernel memory held whatever the flows (48 MB at 1 M capacity for half).
    pub fn probation(&self) -> u32 {
        (self.flows / 2).clamp(16_384, 32_768)
    }

    /// The base map's entries below which a new flow goes straight in rather than through
    /// probation (`Admission::UnderPressure`): half its capacity. The datapath's estimate of
    /// the fill never runs low, so it can only send flows to probation early.
    pub fn admission_room(&self) -> u32 {
        self.flows / 2
    }

    /// TCP flows noted as closed at once (`closing`): a sixteenth of the base map within
    /// [8192, 16384]. An entry lives for the close grace only and a full map only makes an
    /// end wait for the next full scan, so it follows closes per grace period, not
    /// capacity: past 16,384 its bucket array (16 B an entry) would cost more than it saves.
    pub fn closing(&self) -> u32 {
        (self.flows / 16).clamp(8192, 16_384)
    }
}

/// Owned handles on the maps and the scan program, usable from any thread.
#[derive(Debug)]
pub struct FlowMaps {
    pub flows: MapHandle,
    pub tcp: MapHandle,
    pub icmp: MapHandle,
    pub counters: MapHandle,
    /// The scan's records, drained as it writes them.
    pub scan_ring: MapHandle,
    /// TCP flows the datapath noted as closed.
    pub closing: MapHandle,
    /// The owners of flows' local ends (`src/bpf/owner.h`), keyed by ext_id << 1 | end.
    pub owner: MapHandle,
    /// Per-CPU counters of attribution lost (`enum owner_counter`).
    pub owner_counters: MapHandle,
    /// The owners the datapath took, for the poller to put into `flows_owner`.
    pub owner_ring: MapHandle,
    /// The `owner_resolve` program and its request slot: the socket lookups the
    /// datapath leaves to the poller.
    pub owner_resolve: OwnedFd,
    pub owner_resolve_io: MapHandle,
    /// The `owner_entries` program: `flows_owner`'s entry count.
    pub owner_count: OwnedFd,
    /// Ended TCP connections, so a resumed one keeps its identity.
    pub ended: MapHandle,
    /// The time of the latest full scan.
    pub last_scan: MapHandle,
    /// Flows not answered yet.
    pub probation: MapHandle,
    /// What the scan tallied of the flows in probation: sources and ports.
    pub probe_sketch: MapHandle,
    pub probe_ports: MapHandle,
    /// The `flowlens_scan` program (src/bpf/scan.h).
    pub scan: OwnedFd,
}

/// Name of each kernel counter slot, in `enum flow_counter` order.
pub fn counter_names() -> Vec<(u32, &'static str)> {
    use types::flow_counter as C;
    let mut names = vec![
        (C::CNT_ETH_TRUNC.0, "eth_truncated"),
        (C::CNT_VLAN_TRUNC.0, "vlan_truncated"),
        (C::CNT_IPV4_TRUNC.0, "ipv4_truncated"),
        (C::CNT_IPV4_BAD_IHL.0, "ipv4_bad_ihl"),
        (C::CNT_IPV4_BAD_LEN.0, "ipv4_bad_total_length"),
        (C::CNT_IPV6_TRUNC.0, "ipv6_truncated"),
        (C::CNT_IPV6_BAD_EXT.0, "ipv6_bad_extension_chain"),
        (C::CNT_TCP_TRUNC.0, "tcp_truncated"),
        (C::CNT_TCP_BAD_DOFF.0, "tcp_bad_data_offset"),
        (C::CNT_UDP_TRUNC.0, "udp_truncated"),
        (C::CNT_ICMP_TRUNC.0, "icmp_truncated"),
        (C::CNT_BASE_FULL.0, "base_map_full"),
        (C::CNT_TCP_FULL.0, "tcp_map_full"),
        (C::CNT_ICMP_FULL.0, "icmp_map_full"),
        (C::CNT_IP_BAD_VERSION.0, "ip_bad_version"),
        (C::CNT_PACKETS.0, "packets_accounted"),
        (C::CNT_NON_IP.0, "non_ip_skipped"),
        (C::CNT_FRAGMENTS.0, "ip_fragments_non_first"),
        (C::CNT_ADMIT_DEFERRED.0, "admission_deferred_base_full"),
    ];
    for (base, what) in [
        (C::CNT_PROBE_NEW.0, "new"),
        (C::CNT_PROBE_MOVED.0, "admitted"),
        (C::CNT_PROBE_ENDED.0, "ended"),
    ] {
        for (i, proto) in PROBE_PROTOS.iter().enumerate() {
            names.push((base + i as u32, probation_counter(what, proto)));
        }
    }
    names
}

/// Protocols of the probation counters, in `enum scan_proto` order.
pub const PROBE_PROTOS: [&str; 4] = ["tcp", "udp", "icmp", "other"];

/// The name of a probation counter: `probation_{new,admitted,ended}_{proto}`.
pub fn probation_counter(what: &str, proto: &str) -> &'static str {
    const NAMES: [[&str; 4]; 3] = [
        [
            "probation_new_tcp",
            "probation_new_udp",
            "probation_new_icmp",
            "probation_new_other",
        ],
        [
            "probation_admitted_tcp",
            "probation_admitted_udp",
            "probation_admitted_icmp",
            "probation_admitted_other",
        ],
        [
            "probation_ended_tcp",
            "probation_ended_udp",
            "probation_ended_icmp",
            "probation_ended_other",
        ],
    ];
    let w = ["new", "admitted", "ended"]
        .iter()
        .position(|w| *w == what)
        .expect("probation counter kind");
    let p = PROBE_PROTOS
        .iter()
        .position(|p| *p == proto)
        .expect("probation protocol");
    NAMES[w][p]
}

/// Name of each attribution counter slot, in `enum owner_counter` order: not packets,
/// so apart from `counter_names`.
pub fn owner_counter_names() -> Vec<(u32, &'static str)> {
    use types::owner_counter as C;
    vec![
        (C::OWN_FULL.0, "owner_map_full"),
        (C::OWN_SOCK_LOST.0, "socket_owner_lost"),
        (C::OWN_RING_FULL.0, "owner_ring_full"),
    ]
}

/// Whether a counter slot counts a packet that was not accounted.
pub fn is_error_counter(slot: u32) -> bool {
    slot < types::flow_counter::CNT_ERRORS_END.0 && !is_sample_loss_counter(slot)
}

/// Whether a counter slot counts samples lost to a full extension map: the packet was
/// accounted, its latency or RTT sample was not.
pub fn is_sample_loss_counter(slot: u32) -> bool {
    use types::flow_counter as C;
    slot == C::CNT_TCP_FULL.0 || slot == C::CNT_ICMP_FULL.0
}

impl FlowMaps {
    /// Sums a per-CPU counter slot over all CPUs.
    pub fn counter(&self, slot: u32) -> Result<u64, DatapathError> {
        sum_percpu(&self.counters, "counters", slot)
    }

    /// Every counter by name: the packet counters, then the attribution counters.
    pub fn counters(&self) -> Result<BTreeMap<String, u64>, DatapathError> {
        let mut all: BTreeMap<String, u64> = counter_names()
            .into_iter()
            .map(|(slot, name)| Ok((name.to_owned(), self.counter(slot)?)))
            .collect::<Result<_, DatapathError>>()?;
        for (slot, name) in owner_counter_names() {
            all.insert(
                name.to_owned(),
                sum_percpu(&self.owner_counters, "owner_counters", slot)?,
            );
        }
        Ok(all)
    }

    /// Fill level of the three flow maps, given their entry counts (base, TCP, ICMP).
    pub fn usage(&self, entries: [u64; 3]) -> Vec<MapUsage> {
        [
            ("flows", &self.flows),
            ("flows_tcp", &self.tcp),
            ("flows_icmp", &self.icmp),
        ]
        .into_iter()
        .zip(entries)
        .map(|((name, m), entries)| MapUsage {
            name: name.to_owned(),
            entries,
            capacity: u64::from(m.max_entries()),
        })
        .collect()
    }

    /// The time of the latest full scan, by this agent or (pinned) its predecessor; None
    /// before the first.
    pub fn last_scan(&self) -> Option<u64> {
        let v = self
            .last_scan
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()?;
        let t = u64::from_ne_bytes(v.get(..8)?.try_into().ok()?);
        (t != 0).then_some(t)
    }

    /// Kernel memory the map accounts for itself (fdinfo `memlock`).
    pub fn memlock(map: &MapHandle) -> Result<u64, DatapathError> {
        map.query_fdinfo()
            .map(|i| i.memlock.unwrap_or(0))
            .map_err(|source| DatapathError::Map {
                map: "fdinfo",
                source,
            })
    }
}

/// A descriptor of a loaded program of its own, to run it apart from the skeleton.
fn prog_fd(p: &ProgramMut<'_>, prog: &'static str) -> Result<OwnedFd, DatapathError> {
    p.as_fd()
        .try_clone_to_owned()
        .map_err(|source| DatapathError::Program { prog, source })
}

/// Sums slot `slot` of a per-CPU array of u64 over all CPUs.
fn sum_percpu(map: &MapHandle, name: &'static str, slot: u32) -> Result<u64, DatapathError> {
    let per_cpu = map
        .lookup_percpu(&slot.to_ne_bytes(), MapFlags::ANY)
        .map_err(|source| DatapathError::Map { map: name, source })?
        .unwrap_or_default();
    Ok(per_cpu
        .iter()
        .map(|v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8]);
            u64::from_ne_bytes(b)
        })
        .sum())
}

/// The loaded flow programs and maps.
pub struct Datapath {
    skel: FlowSkel<'static>,
    pin_dir: Option<PathBuf>,
    /// Flows found in reused pinned maps at load time.
    reused_flows: Option<u64>,
    /// Whether the flow programs take the owners of flows' local sockets, and why not
    /// when they do not.
    attribution: Result<(), String>,
    /// The socket hook on the cgroup v2 root, while attached.
    owner_link: Option<libbpf_rs::Link>,
}

/// Points a map at its pin, first removing a pin whose map no longer fits
/// (another layout, type, size or capacity), so libbpf creates it afresh.
fn pin_map(m: &mut OpenMapMut<'_>, name: &'static str, dir: &Path) -> Result<bool, DatapathError> {
    let path = dir.join(name);
    let map_err = |source| DatapathError::Map { map: name, source };
    let mut reuse = false;
    if path.exists() {
        match MapHandle::from_pinned_path(&path).and_then(|h| h.info()) {
            Ok(i) => {
                let i = i.info;
                let want = (
                    m.map_type() as u32,
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                );
                let have = (
                    i.type_,
                    i.key_size,
                    i.value_size,
                    i.max_entries,
                    i.map_flags,
                );
                if want == have {
                    reuse = true;
                } else {
                    warn!(
                        "replacing incompatible pinned map {} (type, key, value, capacity, flags: pinned {have:?}, wanted {want:?}); flows in it are lost",
                        path.display()
                    );
                    std::fs::remove_file(&path).map_err(|source| DatapathError::PinDir {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
            Err(e) => {
                warn!("replacing unreadable pin {}: {e}", path.display());
                std::fs::remove_file(&path).map_err(|source| DatapathError::PinDir {
                    path: path.clone(),
                    source,
                })?;
            }
        }
    }
    m.set_pin_path(&path).map_err(map_err)?;
    Ok(reuse)
}

/// Sends libbpf's own messages through the agent's logger at debug level (target
/// `libbpf`) instead of straight to stderr: a failed load is one sentence of the agent's,
/// and `--log-level debug` still shows libbpf's account of it.
fn route_libbpf_output() {
    fn to_log(_level: libbpf_rs::PrintLevel, msg: String) {
        log::debug!(target: "libbpf", "{}", msg.trim_end());
    }
    let print = log::log_enabled!(target: "libbpf", log::Level::Debug).then_some((
        libbpf_rs::PrintLevel::Debug,
        to_log as libbpf_rs::PrintCallback,
    ));
    libbpf_rs::set_print(print);
}

impl Datapath {
    /// Opens the skeleton, applies capacities, and loads it into the kernel.
    pub fn load(cap: Capacities) -> Result<Datapath, DatapathError> {
        Self::load_pinned(cap, None)
    }

    /// Like `load`, with maps pinned under `pin_root/v<layout>/`: compatible
    /// pinned maps are reused, so flows in progress survive an agent restart. When the
    /// kernel refuses the programs that note sockets' owners, it loads without them and
    /// without attribution (`attribution` says why).
    pub fn load_pinned(
        cap: Capacities,
        pin_root: Option<&Path>,
    ) -> Result<Datapath, DatapathError> {
        let admission = Admission::default();
        match Self::load_as(cap, pin_root, true, admission) {
            Err(DatapathError::Load(e)) => {
                let why = format!("the kernel refused the socket owner programs ({e})");
                let mut dp = Self::load_as(cap, pin_root, false, admission)?;
                dp.attribution = Err(why);
                Ok(dp)
            }
            other => other,
        }
    }

    /// The flow programs without attribution: what a flow costs without it (benchmarks).
    pub fn load_without_attribution(cap: Capacities) -> Result<Datapath, DatapathError> {
        let mut dp = Self::load_as(cap, None, false, Admission::default())?;
        dp.attribution = Err("left out on purpose".into());
        Ok(dp)
    }

    /// Like `load`, with new flows admitted as `admission` says (benchmarks, tests).
    pub fn load_admission(
        cap: Capacities,
        admission: Admission,
    ) -> Result<Datapath, DatapathError> {
        Self::load_as(cap, None, true, admission)
    }

    fn load_as(
        cap: Capacities,
        pin_root: Option<&Path>,
        attribution: bool,
        admission: Admission,
    ) -> Result<Datapath, DatapathError> {
        route_libbpf_output();
        // The skeleton borrows its object storage for its whole life; the
        // agent keeps one datapath for the process, so leaking it is right.
        let storage: &'static mut MaybeUninit<OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = FlowSkelBuilder::default()
            .open(storage)
            .map_err(DatapathError::Open)?;
        let set = |m: &mut libbpf_rs::OpenMapMut<'_>, map: &'static str, capacity: u32| {
            m.set_max_entries(capacity)
                .map_err(|source| DatapathError::Capacity {
                    map,
                    capacity,
                    source,
                })
        };
        set(&mut open.maps.flows, "flows", cap.flows)?;
        set(&mut open.maps.flows_tcp, "flows_tcp", cap.tcp)?;
        set(&mut open.maps.flows_icmp, "flows_icmp", cap.icmp)?;
        set(&mut open.maps.closing, "closing", cap.closing())?;
        set(&mut open.maps.flows_owner, "flows_owner", cap.owner)?;
        set(&mut open.maps.owner_ring, "owner_ring", cap.owner_ring())?;
        set(&mut open.maps.ended, "ended", ENDED_CONNECTIONS)?;
        set(&mut open.maps.probation, "probation", cap.probation())?;
        if let Some(r) = open.maps.rodata_data.as_deref_mut() {
            r.admission = admission.mode();
            r.admission_room = i64::from(cap.admission_room());
            r.owner_ring_wake = u64::from(cap.owner_ring() / 4);
        }
        if !attribution {
            if let Some(r) = open.maps.rodata_data.as_deref_mut() {
                r.owner_attribution = false;
            }
            open.progs.owner_sock_create.set_autoload(false);
        }
        // FLOWLENS_LAYOUT_VERSION, as compiled into the object: a new layout
        // gets a new directory and never meets maps of an old one.
        let version = open
            .maps
            .rodata_data
            .as_deref()
            .map_or(0, |r| r.layout_version);
        let pin_dir = pin_root.map(|root| root.join(format!("v{version}")));
        let mut reused = false;
        if let Some(dir) = &pin_dir {
            // Root's alone, and checked before anything in it is reused.
            crate::kernel::preflight::make_pin_dir(dir)?;
            let maps = &mut open.maps;
            reused |= pin_map(&mut maps.flows, "flows", dir)?;
            reused |= pin_map(&mut maps.flows_tcp, "flows_tcp", dir)?;
            reused |= pin_map(&mut maps.flows_icmp, "flows_icmp", dir)?;
            reused |= pin_map(&mut maps.counters, "counters", dir)?;
            reused |= pin_map(&mut maps.flows_owner, "flows_owner", dir)?;
            // Owners taken but not yet read: a restart reads them.
            pin_map(&mut maps.owner_ring, "owner_ring", dir)?;
            reused |= pin_map(&mut maps.probation, "probation", dir)?;
            // What the scan keeps between agents: not flows, so they do not make a
            // start a restart.
            pin_map(&mut maps.ended, "ended", dir)?;
            pin_map(&mut maps.last_scan, "last_scan", dir)?;
        }
        let mut skel = open.load().map_err(DatapathError::Load)?;
        let reused_flows = reused.then(|| skel.maps.flows.keys().count() as u64);
        // The gate's estimate counts the flows found, and probation may hold some, until
        // the first scan counts again (src/bpf/probation.h).
        if let (Some(n), Some(bss)) = (reused_flows, skel.maps.bss_data.as_deref_mut()) {
            bss.base_offset = i64::try_from(n).unwrap_or(i64::MAX);
            bss.probe_busy = 1;
        }
        if let (Some(n), Some(dir)) = (reused_flows, &pin_dir) {
            info!(
                "reusing pinned maps in {}: {n} flows in progress",
                dir.display()
            );
        }
        Ok(Datapath {
            skel,
            pin_dir,
            reused_flows,
            attribution: Ok(()),
            owner_link: None,
        })
    }

    /// Whether flows are attributed to their local sockets' owners; why not, if not.
    pub fn attribution(&self) -> Result<(), &str> {
        self.attribution.as_ref().map_err(String::as_str).copied()
    }

    /// Notes the owner of every inet and inet6 socket opened from now on: the socket
    /// hook, attached (as a link, alongside other programs) to the cgroup v2 root whose
    /// directory `cgroup_root` is open.
    pub fn attach_owner_hook(&mut self, cgroup_root: BorrowedFd<'_>) -> Result<(), DatapathError> {
        let link = self
            .skel
            .progs
            .owner_sock_create
            .attach_cgroup(cgroup_root.as_raw_fd())
            .map_err(|source| DatapathError::Map {
                map: "owner_sock_create (cgroup link)",
                source,
            })?;
        self.owner_link = Some(link);
        Ok(())
    }

    /// Gives the sockets open now in this network namespace (TCP and UDP, IPv4 and
    /// IPv6) the task that holds each as their owner, unless one is noted already.
    /// Returns how many sockets the tasks held.
    pub fn seed_owners(&self) -> Result<u64, DatapathError> {
        use crate::kernel::bpf::seed_skel::SeedSkelBuilder;
        let mut storage = MaybeUninit::uninit();
        let mut open = SeedSkelBuilder::default()
            .open(&mut storage)
            .map_err(DatapathError::Open)?;
        let shared = &self.skel.maps;
        for (m, theirs, map) in [
            (
                &mut open.maps.owner_socks,
                &shared.owner_socks,
                "owner_socks",
            ),
            (
                &mut open.maps.owner_counters,
                &shared.owner_counters,
                "owner_counters",
            ),
        ] {
            m.reuse_fd(theirs.as_fd())
                .map_err(|source| DatapathError::Map { map, source })?;
        }
        let seed = open.load().map_err(DatapathError::Load)?;
        let run = |p: &ProgramMut<'_>, name: &'static str| -> Result<(), DatapathError> {
            let err = |source| DatapathError::Map { map: name, source };
            let link = p.attach().map_err(err)?;
            let mut it = libbpf_rs::Iter::new(&link).map_err(err)?;
            std::io::copy(&mut it, &mut std::io::sink()).map_err(|e| DatapathError::Program {
                prog: name,
                source: e,
            })?;
            Ok(())
        };
        run(&seed.progs.owner_seed_tasks, "owner_seed_tasks")?;
        let held = seed.maps.owner_seed_socks.keys().count() as u64;
        run(&seed.progs.owner_seed_tcp, "owner_seed_tcp")?;
        run(&seed.progs.owner_seed_udp, "owner_seed_udp")?;
        // Dropping the seed frees its map of the sockets open at start, bucket array
        // and all (emptying it would leave the array, 16 MiB).
        Ok(held)
    }

    /// Directory the maps are pinned in, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Flows that were in the reused pinned maps at load time.
    pub fn reused_flows(&self) -> Option<u64> {
        self.reused_flows
    }

    /// Removes the map pins (after a clean shutdown flushed every flow).
    pub fn unpin(&mut self) -> Result<(), DatapathError> {
        let Some(dir) = self.pin_dir.take() else {
            return Ok(());
        };
        let maps = &mut self.skel.maps;
        for (m, name) in [
            (&mut maps.flows, "flows"),
            (&mut maps.flows_tcp, "flows_tcp"),
            (&mut maps.flows_icmp, "flows_icmp"),
            (&mut maps.counters, "counters"),
            (&mut maps.flows_owner, "flows_owner"),
            (&mut maps.owner_ring, "owner_ring"),
            (&mut maps.probation, "probation"),
            (&mut maps.ended, "ended"),
            (&mut maps.last_scan, "last_scan"),
        ] {
            let path = dir.join(name);
            if path.exists() {
                m.unpin(&path)
                    .map_err(|source| DatapathError::Map { map: name, source })?;
            }
        }
        // Only empty directories go; anything else someone put there stays.
        let _ = std::fs::remove_dir(dir.join("links"));
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    pub fn maps(&self) -> Result<FlowMaps, DatapathError> {
        let h = |m: &libbpf_rs::MapMut<'_>, map: &'static str| {
            MapHandle::try_from(m).map_err(|source| DatapathError::Map { map, source })
        };
        let maps = &self.skel.maps;
        Ok(FlowMaps {
            flows: h(&maps.flows, "flows")?,
            tcp: h(&maps.flows_tcp, "flows_tcp")?,
            icmp: h(&maps.flows_icmp, "flows_icmp")?,
            counters: h(&maps.counters, "counters")?,
            scan_ring: h(&maps.scan_ring, "scan_ring")?,
            closing: h(&maps.closing, "closing")?,
            owner: h(&maps.flows_owner, "flows_owner")?,
            owner_counters: h(&maps.owner_counters, "owner_counters")?,
            owner_ring: h(&maps.owner_ring, "owner_ring")?,
            owner_resolve: prog_fd(&self.skel.progs.owner_resolve, "owner_resolve")?,
            owner_resolve_io: h(&maps.owner_resolve_io, "owner_resolve_io")?,
            owner_count: prog_fd(&self.skel.progs.owner_entries, "owner_entries")?,
            ended: h(&maps.ended, "ended")?,
            last_scan: h(&maps.last_scan, "last_scan")?,
            probation: h(&maps.probation, "probation")?,
            probe_sketch: h(&maps.probe_sketch, "probe_sketch")?,
            probe_ports: h(&maps.probe_ports, "probe_ports")?,
            scan: prog_fd(&self.skel.progs.flowlens_scan, "flowlens_scan")?,
        })
    }

    pub fn ingress(&self) -> &ProgramMut<'static> {
        &self.skel.progs.flowlens_ingress
    }

    pub fn egress(&self) -> &ProgramMut<'static> {
        &self.skel.progs.flowlens_egress
    }
}
