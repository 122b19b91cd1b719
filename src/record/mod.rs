//! Flow records and the vocabulary every stage shares: the record type, the gRPC API's messages and their conversions, subscriber filters, a record's wire encoding, the flows-in-progress snapshot and the renderings people and scripts read.
//!
//! Nothing here imports another stage: the poller, the hub, the sinks and the clients all
//! import from it.

pub mod api;
pub mod encoding;
pub mod filter;
pub mod flow;
pub mod render;
pub mod snapshot;
