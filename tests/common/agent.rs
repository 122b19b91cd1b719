//! The collector assembled in-process: the library's `Agent`, started inside a test namespace, with a sink that collects every record.
#![allow(dead_code)]

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use flowlens::agent::Agent as FlowAgent;
use flowlens::config::Config;
use flowlens::hub::{Hub, Next, SinkKind, SinkRx};
use flowlens::kernel::datapath::{Capacities, FlowMaps};
use flowlens::poller::PollerConfig;
use flowlens::record::encoding::RecordDecoder;
use flowlens::record::flow::FlowRecord;
use flowlens::status::Status;
use libbpf_rs::MapCore;

use super::netns::{enter, NetPair};

pub struct Agent {
    pub hub: Hub,
    pub maps: FlowMaps,
    pub status: Arc<Status>,
    rx: SinkRx,
    pub seen: Vec<FlowRecord>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Short timeouts so tests finish quickly.
pub fn fast_config() -> PollerConfig {
    PollerConfig {
        poll_interval: Duration::from_millis(100),
        idle_tcp: Duration::from_secs(1),
        idle_udp: Duration::from_secs(1),
        idle_icmp: Duration::from_secs(1),
        idle_other: Duration::from_secs(1),
        tcp_close_grace: Duration::from_millis(300),
        active_timeout: Duration::from_secs(60),
        orphan_sweep_every: 5,
        pressure_threshold: 0.8,
        pressure_poll_interval: Duration::from_millis(50),
        evict_min_age: Duration::from_millis(500),
        evict_target: 0.5,
        ..PollerConfig::default()
    }
}

impl Agent {
    /// Starts the agent inside namespace `net.a`, attached to `net.if_a` only, with
    /// nothing on stdout, no pins and no listeners.
    pub fn start(net: &NetPair, poller: PollerConfig, capacities: Capacities) -> Agent {
        Self::start_on(net, &[&net.if_a], poller, capacities)
    }

    /// `start`, attached to `interfaces` of namespace `net.a`.
    pub fn start_on(
        net: &NetPair,
        interfaces: &[&str],
        poller: PollerConfig,
        capacities: Capacities,
    ) -> Agent {
        let cfg = Config {
            poller,
            capacities,
            ..Config::embedded(interfaces)
        };
        let path = format!("/run/netns/{}", net.a);
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::spawn(move || {
            enter(&path);
            let agent = FlowAgent::start(cfg).expect("start the agent");
            let rx = agent.hub().add_sink(SinkKind::Output, "test");
            let maps = agent.maps().expect("maps");
            ready_tx
                .send((agent.hub().clone(), agent.status().clone(), maps, rx))
                .expect("ready");
            agent.run(&stop_rx).expect("agent shutdown");
        });
        let (hub, status, maps, rx) = ready_rx.recv().expect("agent thread started");
        Agent {
            hub,
            maps,
            status,
            rx,
            seen: Vec::new(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn take_records(&mut self) -> bool {
        let mut got = false;
        let mut dec = RecordDecoder::default();
        loop {
            match self.rx.try_next() {
                Next::Records(run) => {
                    self.seen
                        .extend(run.decode(&mut dec).map(|r| r.expect("a record").1));
                    got = true;
                }
                Next::Lost(gap) => panic!("the test's sink lost records: {gap:?}"),
                Next::Idle | Next::End => return got,
            }
        }
    }

    /// Collects records until `done` holds for all records so far, or panics after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[FlowRecord]) -> bool,
    ) -> &[FlowRecord] {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; records: {:#?}",
                self.seen
            );
            if !self.take_records() {
                std::thread::sleep(left.min(Duration::from_millis(20)));
            }
        }
        &self.seen
    }

    pub fn map_entries(&self) -> [usize; 3] {
        [
            self.maps.flows.keys().count(),
            self.maps.tcp.keys().count(),
            self.maps.icmp.keys().count(),
        ]
    }

    /// Entries of the map of flows' local ends and their owners.
    pub fn owner_entries(&self) -> usize {
        self.maps.owner.keys().count()
    }

    /// Detaches, stops the poller (which flushes), and returns every record.
    pub fn stop(mut self) -> Vec<FlowRecord> {
        self.shutdown();
        self.take_records();
        std::mem::take(&mut self.seen)
    }

    /// Stops the agent the way the binary does: detach, flush every flow, close the hub.
    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}
