//! The gRPC sink: the FlowLens service (Subscribe, ListFlows, GetStatus, health, reflection) and the listener it serves on.
//!
//! Owns the server side of the API: each subscriber is a hub reader on a task of its own,
//! and Subscribe writes its gRPC messages itself (`subscribe`).
//! May import `hub`, `record`, `status`, `config` and `tls`; never the poller or the kernel
//! side (the flows in progress reach it through `record::snapshot`).

pub mod listener;
pub mod service;
pub mod subscribe;

pub use listener::ListenAddr;
pub use service::{
    spawn, spawn_in, spawn_with, spawn_with_snapshots, FlowLensService, GrpcEndpoint, ServiceHandle,
};
