//! flowlens: a host network flow collector built on split BPF flow maps.
//!
//! Data moves one way: the datapath (`bpf`, `datapath`, `attach`) counts packets into the
//! kernel maps; the `poller` reads and ends flows into `flow` records; the `hub` hands
//! each record to every sink (`output`, the gRPC `service`'s subscribers). The `agent`
//! owns and wires them all from one `config`. `api` is shared by the server and the
//! `watch` client; `record_encoding` writes a record as the server streams it; `render` is
//! how people and scripts see a record.

pub mod agent;
pub mod api;
pub mod attach;
pub mod bpf;
pub mod client;
pub mod config;
pub mod datapath;
pub mod fatal;
pub mod filter;
pub mod flow;
pub mod hub;
pub mod ipfix;
pub mod listener;
pub mod metrics;
pub mod metrics_http;
pub mod output;
pub mod packet;
pub mod poller;
pub mod preflight;
pub mod record_encoding;
pub mod render;
pub mod service;
pub mod snapshot;
pub mod status;
pub mod tls;
pub mod top;
pub mod watch;
