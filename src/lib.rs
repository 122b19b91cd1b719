//! flowlens: a host network flow collector built on split BPF flow maps.

pub mod bpf;
pub mod flow;
pub mod service;
pub mod status;
pub mod stream;
pub mod watch;
