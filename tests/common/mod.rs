//! Shared test harness: a loaded datapath fed with hand-built packets.
#![allow(dead_code)]

use flowlens::kernel::bpf::types;
use flowlens::kernel::datapath::{counter_names, Admission, Capacities, Datapath, FlowMaps};
use flowlens::poller::decode::{ext_kind, RawFlow};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ProgramInput as Input};

pub const EXT_TCP: u32 = types::flow_ext::EXT_TCP.0;
pub const EXT_ICMP: u32 = types::flow_ext::EXT_ICMP.0;

pub struct Harness {
    pub dp: Datapath,
    pub maps: FlowMaps,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hook {
    Ingress,
    Egress,
}

pub fn read<T: plain::Plain + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    plain::copy_from_bytes(&mut v, bytes).expect("map value size");
    v
}

pub fn bytes_of<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: T is Plain (no padding-dependent invariants, any bytes valid).
    unsafe { plain::as_bytes(v) }
}

pub fn entries<K: plain::Plain + Default, V: plain::Plain + Default>(
    map: &MapHandle,
) -> Vec<(K, V)> {
    let keys: Vec<Vec<u8>> = map.keys().collect();
    keys.into_iter()
        .filter_map(|k| {
            let v = map.lookup(&k, MapFlags::ANY).expect("lookup")?;
            Some((read::<K>(&k), read::<V>(&v)))
        })
        .collect()
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with(Capacities::default())
    }

    pub fn with(cap: Capacities) -> Harness {
        Harness::with_admission(cap, Admission::default())
    }

    /// A datapath whose new flows are admitted as `admission` says (`Always`: every new
    /// flow through probation, as under pressure).
    pub fn with_admission(cap: Capacities, admission: Admission) -> Harness {
        let dp = Datapath::load_admission(cap, admission).expect("load datapath (run as root)");
        let maps = dp.maps().expect("map handles");
        Harness { dp, maps }
    }

    /// Runs one packet through a hook with an optional GSO segment count.
    pub fn run_gso(&self, hook: Hook, frame: &[u8], gso_segs: u32) -> u32 {
        let prog = match hook {
            Hook::Ingress => self.dp.ingress(),
            Hook::Egress => self.dp.egress(),
        };
        // SAFETY: all-zero is a valid __sk_buff; zeroed() (not Default)
        // also clears padding, which the kernel requires to be zero.
        let mut ctx: types::__sk_buff = unsafe { std::mem::zeroed() };
        ctx.gso_segs = gso_segs;
        // SAFETY: __sk_buff is a repr(C) struct of integers and arrays.
        let ctx_bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut ctx as *mut types::__sk_buff).cast::<u8>(),
                std::mem::size_of::<types::__sk_buff>(),
            )
        };
        let input = Input {
            data_in: Some(frame),
            context_in: Some(ctx_bytes),
            ..Default::default()
        };
        let out = prog.test_run(input).expect("BPF_PROG_TEST_RUN");
        out.return_value
    }

    pub fn run(&self, hook: Hook, frame: &[u8]) -> u32 {
        self.run_gso(hook, frame, 0)
    }

    /// Every flow: the base map's and probation's (a flow is in one of them).
    pub fn flows(&self) -> Vec<(types::flow_key, types::flow_base)> {
        let mut f = self.base_flows();
        f.extend(self.probation());
        f
    }

    /// The flows admitted to the base map.
    pub fn base_flows(&self) -> Vec<(types::flow_key, types::flow_base)> {
        entries(&self.maps.flows)
    }

    /// The flows in probation (not answered yet), as the base entry images they hold.
    pub fn probation(&self) -> Vec<(types::flow_key, types::flow_base)> {
        entries::<types::flow_key, types::flow_probe>(&self.maps.probation)
            .into_iter()
            .map(|(k, p)| (k, flowlens::poller::decode::decode(&p.base)))
            .collect()
    }

    /// TCP latency entries, keyed by extension id.
    pub fn tcp(&self) -> Vec<(u64, types::flow_tcp)> {
        entries(&self.maps.tcp)
    }

    /// ICMP echo RTT entries, keyed by extension id.
    pub fn icmp(&self) -> Vec<(u64, types::flow_icmp)> {
        entries(&self.maps.icmp)
    }

    /// Every flow as the poller joins it: base entry plus extension entry.
    pub fn joined(&self) -> Vec<RawFlow> {
        let tcp = self.tcp();
        let icmp = self.icmp();
        self.flows()
            .into_iter()
            .map(|(key, base)| RawFlow {
                key,
                base,
                tcp: tcp
                    .iter()
                    .find(|(id, _)| ext_kind(&base) == EXT_TCP && *id == base.ext_id)
                    .map(|e| e.1),
                icmp: icmp
                    .iter()
                    .find(|(id, _)| ext_kind(&base) == EXT_ICMP && *id == base.ext_id)
                    .map(|e| e.1),
                owner: [None, None],
            })
            .collect()
    }

    /// The one flow there is, joined.
    pub fn only_joined(&self) -> RawFlow {
        let f = self.joined();
        assert_eq!(f.len(), 1, "expected exactly one flow, got {f:?}");
        f[0]
    }

    pub fn only_flow(&self) -> (types::flow_key, types::flow_base) {
        let f = self.flows();
        assert_eq!(f.len(), 1, "expected exactly one flow, got {f:?}");
        f[0]
    }

    pub fn counters(&self) -> Vec<(String, u64)> {
        counter_names()
            .into_iter()
            .map(|(slot, name)| (name.to_owned(), self.maps.counter(slot).expect("counter")))
            .collect()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }
}

pub mod agent;
pub mod bin;
pub mod capture;
pub mod grpc;
pub mod kafka;
pub mod netns;
pub mod pki;
pub mod traffic;

/// One scan of `table` that ends every flow (a flush), now.
pub fn flush_scan(
    table: &mut flowlens::poller::KernelTable,
) -> Vec<(flowlens::poller::scan::ScanKind, RawFlow)> {
    use flowlens::poller::decode::monotonic_ns;
    use flowlens::poller::scan::args;
    let now = monotonic_ns();
    let (ended, _) = flowlens::poller::table::collect_scan(
        table,
        &args(&flowlens::poller::PollerConfig::default(), now, now, true),
        1,
    )
    .expect("scan");
    ended
}
