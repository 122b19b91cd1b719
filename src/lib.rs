//! flowlens: a host network flow collector built on split BPF flow maps.
//!
//! Data moves one way, in stages, each a folder: the `kernel` side loads the datapath
//! (built from `src/bpf/`) and attaches it; the `poller` reads the maps and ends flows into
//! `record`s; the `hub` numbers them and hands each to every one of the `sinks` (stdout,
//! gRPC subscribers, IPFIX, Kafka). The `agent` owns and wires them all from one `config`, with
//! one shutdown order. The `cli` clients (`watch`, `top`) talk to a running agent over gRPC
//! only. A stage imports from the stages before it and from `record`, never from one after
//! it; ARCHITECTURE.md draws it.

pub mod admission;
pub mod agent;
pub mod cli;
pub mod config;
pub mod fatal;
pub mod hub;
pub mod kernel;
pub mod metrics;
pub mod poller;
pub mod ranges;
pub mod record;
pub mod sinks;
pub mod status;
pub mod tls;
