//! The compiled BPF skeleton and byte conversions for its map types.

#[allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports
)]
mod flow_skel {
    include!(concat!(env!("OUT_DIR"), "/flow.skel.rs"));
}

/// The flow programs built with one monolithic map (benchmarks only).
#[allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports
)]
pub mod flow_mono_skel {
    include!(concat!(env!("OUT_DIR"), "/flow_mono.skel.rs"));
}

/// Baseline programs (benchmarks only).
#[allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unused_imports
)]
pub mod bench_skel {
    include!(concat!(env!("OUT_DIR"), "/bench.skel.rs"));
}

pub use flow_skel::types;
pub use flow_skel::{FlowSkel, FlowSkelBuilder, OpenFlowSkel};

// SAFETY: these are plain-old-data C structs generated from BTF with
// explicit padding fields; every bit pattern is a valid value.
unsafe impl plain::Plain for types::flow_key {}
unsafe impl plain::Plain for types::flow_base {}
unsafe impl plain::Plain for types::flow_tcp {}
unsafe impl plain::Plain for types::flow_icmp {}
unsafe impl plain::Plain for flow_mono_skel::types::flow_mono {}
