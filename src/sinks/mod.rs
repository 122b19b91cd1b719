//! The sinks: where records go once the hub has numbered them (stdout, gRPC subscribers, IPFIX collectors, Kafka).
//!
//! Each sink registers with the hub (`Hub::add_sink`, `Hub::subscribe`) and reads the hub's
//! log at its own pace on a thread or task of its own, so none can hold up the poller or
//! another sink, and none loses a record unless it falls the whole buffer behind (then it is
//! told exactly which). A sink gets each record's protobuf as encoded once for all
//! (`Run::encoded`) or decoded (`Run::decode`). Sinks may import `hub`,
//! `record`, `status` and `config`; never the poller or the kernel side, and never each
//! other.

pub mod grpc;
pub mod ipfix;
pub mod kafka;
pub mod stdout;
