//! The sinks: where records go once the hub has numbered them (stdout, gRPC subscribers, IPFIX collectors, Kafka).
//!
//! Each sink registers with the hub and reads its own bounded queue on a thread or task of
//! its own, so none can hold up the poller or another sink. Sinks may import `hub`,
//! `record`, `status` and `config`; never the poller or the kernel side, and never each
//! other.

pub mod grpc;
pub mod ipfix;
pub mod kafka;
pub mod stdout;
