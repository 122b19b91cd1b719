//! The collector assembled in-process (datapath, attacher in a test namespace, poller thread).
#![allow(dead_code)]

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use flowlens::attach::{Attacher, IfNames, Mode, ProgramFds, Selector};
use flowlens::datapath::{Capacities, Datapath, FlowMaps};
use flowlens::flow::FlowRecord;
use flowlens::poller::{Poller, PollerConfig};
use flowlens::status::Status;
use libbpf_rs::MapCore;

use super::netns::{enter, NetPair};

pub struct Agent {
    pub dp: Datapath,
    pub maps: FlowMaps,
    pub status: Arc<Status>,
    rx: Receiver<FlowRecord>,
    pub seen: Vec<FlowRecord>,
    stop_attach: Option<Sender<()>>,
    attach_thread: Option<JoinHandle<()>>,
    stop_poll: Option<Sender<()>>,
    poll_thread: Option<JoinHandle<()>>,
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
    }
}

impl Agent {
    /// Attaches to `net.if_a` inside namespace `net.a` and starts polling.
    pub fn start(net: &NetPair, cfg: PollerConfig, cap: Capacities) -> Agent {
        let dp = Datapath::load(cap).expect("load datapath");
        let fds = ProgramFds::of(&dp).expect("program fds");
        let ifnames = IfNames::default();
        let names = ifnames.clone();
        let sel = Selector::new(std::slice::from_ref(&net.if_a), &[]).expect("selector");
        let path = format!("/run/netns/{}", net.a);
        let (stop_attach, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<usize>(1);
        let attach_thread = std::thread::spawn(move || {
            enter(&path);
            let mut attacher = Attacher::new(fds, Mode::Auto, names);
            let r = attacher.sync(&sel).expect("sync");
            ready_tx.send(r.attached.len()).expect("ready");
            let _ = stop_rx.recv();
            attacher.detach_all();
        });
        assert_eq!(
            ready_rx.recv().expect("attach thread"),
            1,
            "attached to the test veth"
        );
        let status = Arc::new(Status::new());
        let (tx, rx) = crossbeam_channel::unbounded();
        let (stop_poll, stop_poll_rx) = crossbeam_channel::bounded::<()>(1);
        let poller = Poller::new(dp.maps().expect("maps"), cfg, tx, status.clone(), ifnames);
        let poll_thread = std::thread::spawn(move || poller.run(stop_poll_rx).expect("poller"));
        Agent {
            maps: dp.maps().expect("maps"),
            dp,
            status,
            rx,
            seen: Vec::new(),
            stop_attach: Some(stop_attach),
            attach_thread: Some(attach_thread),
            stop_poll: Some(stop_poll),
            poll_thread: Some(poll_thread),
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
            if let Ok(r) = self.rx.recv_timeout(left.min(Duration::from_millis(100))) {
                self.seen.push(r);
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

    /// Detaches, stops the poller (which flushes), and returns every record.
    pub fn stop(mut self) -> Vec<FlowRecord> {
        self.shutdown();
        while let Ok(r) = self.rx.try_recv() {
            self.seen.push(r);
        }
        std::mem::take(&mut self.seen)
    }

    fn shutdown(&mut self) {
        drop(self.stop_attach.take());
        if let Some(t) = self.attach_thread.take() {
            let _ = t.join();
        }
        drop(self.stop_poll.take());
        if let Some(t) = self.poll_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}
