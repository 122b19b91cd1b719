//! flowlens: a host network flow collector built on split BPF flow maps.

pub mod attach;
pub mod bpf;
pub mod datapath;
pub mod flow;
pub mod ipfix;
pub mod metrics;
pub mod packet;
pub mod poller;
pub mod preflight;
pub mod service;
pub mod status;
pub mod stream;
pub mod watch;
