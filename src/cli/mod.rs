//! The clients of a running agent: `watch` (ended flows as they come), `top` (flows in progress, full screen), `flows` (flows in progress, once), `status` (the agent's state), and what they share (`client`: connection and filter flags).
//!
//! They speak gRPC only: they import `record` (the API, filters, rendering), `config` (the
//! duration grammar, defaults), `tls` and `fatal`, never the agent's internals.

pub mod client;
pub mod flows;
pub mod status;
pub mod terminal;
pub mod top;
pub mod watch;
