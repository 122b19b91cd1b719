//! Kafka export: a sink thread that produces one message per flow record to a topic, for ClickHouse (deploy/clickhouse/) or any consumer, losing (and counting) records rather than ever holding up its feeder.
//!
//! # Messages
//!
//! The value is the record's `flowlens.v1.FlowRecord` protobuf, not length-delimited: the
//! bytes a gRPC subscriber gets, as the hub's log holds them. The key is the
//! flow's canonical 5-tuple ([`message::write_key`]), and librdkafka's `murmur2_random`
//! partitioner (the Java client's) puts every record of a connection, from every host that
//! saw it, on one partition. Headers name the schema, its version and the observer.
//!
//! # Delivery
//!
//! `acks=all` with idempotence: a retry neither duplicates nor reorders. librdkafka buffers
//! what the brokers have not acknowledged (up to 1 M records or 256 MiB, for up to
//! `message.timeout.ms` = 5 min by default), so an outage shorter than that loses nothing:
//! the records still buffered go out when a broker is back. Every record ends up counted
//! either delivered or lost, by reason ([`producer::LossReason`]).

pub mod config;
pub mod message;
pub mod producer;

use std::thread::JoinHandle;
use std::time::Duration;

use crate::hub::{Next, SinkRx};
pub use config::{KafkaConfig, KafkaFlags};
pub use producer::{KafkaCounts, KafkaStats, LossReason, Producer, SettingsError};

/// How long the thread waits for records before serving delivery reports again.
const TICK: Duration = Duration::from_millis(100);
/// How long stopping waits for the brokers to acknowledge what is buffered.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Starts the producer thread on a hub sink: it produces what the sink reads until the hub
/// closes, then waits up to [`STOP_GRACE`] for the acknowledgements and returns. The producer
/// is made first ([`Producer::new`]), so its settings are checked before anything starts.
pub fn spawn(mut producer: Producer, mut rx: SinkRx) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flowlens-kafka".into())
        .spawn(move || {
            loop {
                // The log holds each record encoded: its bytes are the message value.
                match rx.next_blocking(Some(TICK)) {
                    Next::Records(run) => producer.send(run.encoded().map(|(_, b)| b), 0),
                    Next::Lost(gap) => producer.send(std::iter::empty(), gap.count()),
                    Next::Idle => {}
                    Next::End => break,
                }
                producer.upkeep();
            }
            producer.finish(STOP_GRACE);
        })
}
