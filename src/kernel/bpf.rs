//! The compiled BPF skeletons and byte conversions for their map types.

/// Includes a skeleton libbpf-cargo generated from `src/bpf/<name>.bpf.c`.
macro_rules! skeleton {
    ($(#[$doc:meta])* $vis:vis $module:ident, $file:literal) => {
        $(#[$doc])*
        #[allow(
            clippy::all,
            clippy::pedantic,
            non_camel_case_types,
            non_snake_case,
            non_upper_case_globals,
            dead_code,
            unused_imports
        )]
        $vis mod $module {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

skeleton!(flow_skel, "flow.skel.rs");
skeleton!(
    /// The flow programs built with one single map (benchmarks only).
    pub flow_mono_skel,
    "flow_mono.skel.rs"
);
skeleton!(
    /// The start-up seed of sockets' owners (`src/bpf/seed.bpf.c`): loaded once, then dropped.
    pub seed_skel,
    "seed.skel.rs"
);
skeleton!(
    /// Baseline programs (benchmarks only).
    pub bench_skel,
    "bench.skel.rs"
);
skeleton!(
    /// A peer-like per-direction flow program of our own (benchmarks only).
    pub peer_skel,
    "peer.skel.rs"
);

pub use flow_skel::types;
pub use flow_skel::{FlowSkel, FlowSkelBuilder, OpenFlowSkel};

// SAFETY: these are plain-old-data C structs generated from BTF with
// explicit padding fields; every bit pattern is a valid value.
unsafe impl plain::Plain for types::flow_key {}
unsafe impl plain::Plain for types::flow_base {}
unsafe impl plain::Plain for types::flow_tcp {}
unsafe impl plain::Plain for types::flow_icmp {}
unsafe impl plain::Plain for types::scan_rec {}
unsafe impl plain::Plain for types::flow_owner {}
unsafe impl plain::Plain for types::owner_event {}
unsafe impl plain::Plain for types::owner_want_event {}
unsafe impl plain::Plain for types::owner_resolve_io {}
unsafe impl plain::Plain for types::owner_count_args {}
unsafe impl plain::Plain for types::scan_args {}
unsafe impl plain::Plain for types::flow_ended {}
unsafe impl plain::Plain for types::flow_probe {}
unsafe impl plain::Plain for types::probe_sketch {}
unsafe impl plain::Plain for types::probe_port {}
unsafe impl plain::Plain for flow_mono_skel::types::flow_packed {}
unsafe impl plain::Plain for flow_mono_skel::types::flow_naive {}
