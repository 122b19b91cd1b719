//! Delivery without loss: a burst of ends larger than the old per-reader queues reaches stdout through a pipe, `watch --json` and a grpcio subscriber whole; a subscriber resuming after a SIGKILL and restart is told so; `watch --reconnect` gets every record exactly once across dropped connections.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::bin::{lines, BIN};
use common::grpc::*;
use flowlens::kernel::bpf::types;
use flowlens::poller::decode::monotonic_ns;
use libbpf_rs::{MapCore, MapFlags, MapHandle};

/// A pin root of the test's own on bpffs, removed however the test ends.
struct PinRoot(PathBuf);

impl PinRoot {
    fn new(tag: &str) -> PinRoot {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/flowlens-test-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        PinRoot(p)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// The agent's pinned base map, once it has pinned it.
    fn flows(&self) -> MapHandle {
        let deadline = Instant::now() + WAIT;
        loop {
            let dir = std::fs::read_dir(&self.0).ok().and_then(|d| {
                d.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('v'))
                })
            });
            if let Some(m) = dir.and_then(|d| MapHandle::from_pinned_path(d.join("flows")).ok()) {
                return m;
            }
            assert!(Instant::now() < deadline, "the agent never pinned its maps");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bytes<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: Plain types have no invalid bit patterns or hidden invariants.
    unsafe { plain::as_bytes(v) }
}

/// Writes UDP flows `from..from + n` into a pinned base map, quiet for two minutes: the
/// agent's next poll ends them all together, as a batch job or a scan ending would.
fn add_ended_flows(map: &MapHandle, from: u32, n: u32) {
    let seen = monotonic_ns() - 120_000_000_000;
    let (mut keys, mut vals) = (Vec::new(), Vec::new());
    for i in from..from + n {
        let mut k = types::flow_key::default();
        k.addr_lo[10..12].copy_from_slice(&[0xff, 0xff]);
        k.addr_lo[12..].copy_from_slice(&[10, 201, (i >> 8) as u8, i as u8]);
        k.addr_hi[10..12].copy_from_slice(&[0xff, 0xff]);
        k.addr_hi[12..].copy_from_slice(&[10, 200, 0, 2]);
        k.port_lo = 10_000 + (i >> 16) as u16;
        k.port_hi = 53;
        k.proto = 17;
        k.ip_version = 4;
        k.ifindex = 1;
        let v = types::flow_base {
            first_seen_ns: seen,
            last_seen_ns: seen,
            packets: [1, 1],
            bytes: [100, 100],
            ..Default::default()
        };
        keys.extend_from_slice(bytes(&k));
        vals.extend_from_slice(bytes(&v));
    }
    map.update_batch(&keys, &vals, n, MapFlags::ANY, MapFlags::ANY)
        .expect("filling the flow map");
}

/// `flowlens run` attached to no interface (the flows come from the test), pinning under
/// `pins`, with `extra` flags.
fn agent(pins: &PinRoot, extra: &[&str]) -> common::bin::Running {
    let mut child = Command::new(BIN)
        .args(["run", "--interface", "/^flowlens-test-none$/"])
        .args(["--pin-dir", pins.arg(), "--metrics-listen", "off"])
        .args(["--poll-interval", "200ms", "--max-flows", "131072"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowlens");
    common::bin::Running {
        stdout: lines(child.stdout.take().unwrap()),
        stderr: lines(child.stderr.take().unwrap()),
        child,
        err_seen: Vec::new(),
    }
}

/// 70,000 flows ending in one poll, printed as JSON into a pipe the test reads: more than
/// the 65,536 records stdout's queue used to hold, so a reader slower than the poller lost
/// some; now every one arrives, numbered, with its run.
#[test]
fn a_burst_of_ends_reaches_stdout_json_through_a_pipe_whole() {
    const FLOWS: u32 = 70_000;
    let pins = PinRoot::new("burst");
    let mut a = agent(
        &pins,
        &[
            "--output",
            "json",
            "--grpc-listen",
            "off",
            // A flag of the old model: accepted, and said to do nothing.
            "--output-queue",
            "65536",
        ],
    );
    a.wait_log("no interface matches yet", WAIT);
    add_ended_flows(&pins.flows(), 0, FLOWS);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seqs = BTreeSet::new();
    let mut runs = BTreeSet::new();
    while seqs.len() < FLOWS as usize {
        let line = a
            .stdout
            .recv_deadline(deadline)
            .unwrap_or_else(|_| panic!("stdout printed {} of {FLOWS} records", seqs.len()));
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON record");
        assert!(seqs.insert(v["seq"].as_u64().unwrap()), "seq twice: {line}");
        runs.insert(v["run"].as_u64().unwrap());
        assert_eq!(v["fragment"], false);
    }
    assert_eq!(seqs, (1..=u64::from(FLOWS)).collect(), "every seq once");
    assert_eq!(runs.len(), 1);
    assert!(*runs.first().unwrap() > 0);
    let log: Vec<String> = a
        .err_seen
        .iter()
        .cloned()
        .chain(a.stderr.try_iter())
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains("--output-queue has no effect")),
        "{log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("not keeping up")),
        "{log:#?}"
    );
    let (status, _) = a.stop();
    assert!(status.success(), "{status:?}");
}

const PY_BURST: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[2])
import grpc
from flowlens.v1 import flowlens_pb2 as pb, flowlens_pb2_grpc as rpc

want = int(sys.argv[3])
stub = rpc.FlowLensStub(grpc.insecure_channel(sys.argv[1]))
seqs, runs, lost = [], set(), 0
for resp in stub.Subscribe(pb.SubscribeRequest(), timeout=120):
    kind = resp.WhichOneof("event")
    if kind == "flows":
        for r in resp.flows.records:
            seqs.append(r.seq)
            runs.add(r.run)
    elif kind == "lost":
        lost += resp.lost.count
    if len(seqs) + lost >= want:
        break
print(json.dumps({"seqs": len(seqs), "in_order": seqs == list(range(1, len(seqs) + 1)),
                  "runs": sorted(runs), "lost": lost}))
"#;

/// 50,000 records published as fast as the hub takes them, in the poller's batches:
/// twelve times the 4,096 records a subscriber's queue used to hold. `watch --json` and a
/// Python grpcio subscriber (which asks for gzip) each get all of them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_watch_json_and_a_grpcio_subscriber_whole() {
    const N: u32 = 50_000;
    let agent = Agent::start();
    let run = agent.hub.run();
    let mut watch = Command::new(BIN)
        .args(["watch", "--json", "--server", &agent.addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let watch_out = lines(watch.stdout.take().unwrap());
    let watch_err = lines(watch.stderr.take().unwrap());
    let addr = agent.addr.to_string();
    let python = tokio::task::spawn_blocking(move || {
        let py = Grpcio::ready();
        run_py(&py, &addr)
    });
    // Installing grpcio the first time takes a while.
    let deadline = Instant::now() + Duration::from_secs(300);
    while agent.hub.stats().subscribers().count() < 2 {
        assert!(Instant::now() < deadline, "the subscribers never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let recs: Vec<FlowRecord> = (1..=N).map(rec).collect();
    for chunk in recs.chunks(1024) {
        agent.hub.publish_batches([chunk.to_vec()]);
    }
    let got = tokio::task::spawn_blocking(move || {
        let mut seqs = Vec::with_capacity(N as usize);
        while seqs.len() < N as usize {
            let Ok(line) = watch_out.recv_deadline(deadline) else {
                break;
            };
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
            assert_eq!(v["run"].as_u64(), Some(run));
            seqs.push(v["seq"].as_u64().unwrap());
        }
        seqs
    })
    .await
    .unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    let err: Vec<String> = watch_err.try_iter().collect();
    assert_eq!(
        got.len(),
        N as usize,
        "watch printed {} of {N}: {err:#?}",
        got.len()
    );
    assert_eq!(got, (1..=u64::from(N)).collect::<Vec<_>>());
    assert!(!err.iter().any(|l| l.contains("LOST")), "{err:#?}");

    let v: serde_json::Value = serde_json::from_str(python.await.unwrap().trim()).unwrap();
    assert_eq!(v["seqs"], N, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["in_order"], true, "{v}");
    assert_eq!(v["runs"], serde_json::json!([run]), "{v}");
    assert_eq!(agent.hub.stats().lost_total, 0);
}

fn run_py(py: &Grpcio, addr: &str) -> String {
    run(py
        .command()
        .args(["-c", PY_BURST, addr])
        .arg(py.gen())
        .arg("50000"))
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn status_of(url: &str) -> proto::GetStatusResponse {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = FlowLensClient::connect(url.to_owned()).await {
            if let Ok(s) = c.get_status(proto::GetStatusRequest {}).await {
                return s.into_inner();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent at {url} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent is SIGKILLed and started again on the same pins between two Subscribe calls.
/// The second names the run and seq it saw last: the answer says the agent restarted and
/// from which seq of the new run the stream resumes, and every record of the new run comes,
/// once (resuming with the old seq on the new run would have skipped the first 300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_across_a_sigkill_and_restart_names_the_restart() {
    let pins = PinRoot::new("restart");
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let args = ["--output", "none", "--grpc-listen", &listen];
    let mut first = agent(&pins, &args);
    let r1 = status_of(&url).await.run;
    assert_ne!(r1, 0);
    let mut s = FlowLensClient::connect(url.clone())
        .await
        .unwrap()
        .subscribe(proto::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    add_ended_flows(&pins.flows(), 0, 300);
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.records.len() >= 300).await;
    let last = got.records.last().unwrap();
    assert_eq!((last.run, last.seq), (r1, 300));

    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // Flows that end while no agent runs: the next one reports them, as run 2's first.
    add_ended_flows(&pins.flows(), 1000, 200);
    let _second = agent(&pins, &args);
    let r2 = status_of(&url).await.run;
    assert_ne!(r2, r1, "a new run id");
    let mut s = FlowLensClient::connect(url.clone())
        .await
        .unwrap()
        .subscribe(proto::SubscribeRequest {
            after_seq: Some(300),
            run: Some(r1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first_msg = next(&mut s).await.expect("a first event");
    let Some(Event::Restarted(r)) = first_msg.event else {
        panic!("the restart named first, got {first_msg:?}");
    };
    assert_eq!((r.requested_run, r.run, r.first_seq), (r1, r2, 1));
    let mut got = Received::default();
    read_until(&mut s, &mut got, |r| r.records.len() >= 200).await;
    let seqs: Vec<u64> = got.records.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    assert!(got.records.iter().all(|p| p.run == r2));
    let ports: BTreeSet<u32> = got.records.iter().map(|p| p.client_port).collect();
    assert_eq!(ports, BTreeSet::from([10_000]));
    assert!(got.losses.is_empty(), "{:?}", got.losses);
}

/// A loopback TCP relay to `upstream` that can cut every connection it carries while it
/// goes on accepting new ones: a connection dropped on the way, the agent still up.
struct CuttableRelay {
    addr: SocketAddr,
    cut: tokio::sync::watch::Sender<u32>,
}

impl CuttableRelay {
    async fn start(upstream: SocketAddr) -> CuttableRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cuts) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut cuts = cuts.clone();
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        CuttableRelay { addr, cut }
    }

    /// Drops every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// `watch --reconnect --json` through a relay that drops its connection twice while
/// records keep coming: watch resumes after the last record it printed, on the same run,
/// and prints every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnect_gets_every_record_once_across_dropped_connections() {
    const ROUNDS: u32 = 20;
    const PER_ROUND: u32 = 100;
    let agent = Agent::start();
    let relay = CuttableRelay::start(agent.addr).await;
    let args = WatchArgs {
        query: FlowQuery {
            agent: AgentAddr {
                server: relay.addr.to_string(),
                ..Default::default()
            },
            ..Default::default()
        },
        json: true,
        reconnect: true,
        ..Default::default()
    };
    let watch = WatchTask::spawn(args);
    let out = watch.out.clone();
    wait_subscribers(&agent.hub, 1).await;
    for round in 0..ROUNDS {
        agent
            .hub
            .publish_all((0..PER_ROUND).map(|i| rec(round * PER_ROUND + i + 1)));
        if round == 6 || round == 13 {
            relay.cut();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = (ROUNDS * PER_ROUND) as usize;
    let deadline = Instant::now() + WAIT;
    let seqs = loop {
        let seqs: Vec<u64> = out
            .json()
            .iter()
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        if seqs.len() >= total || Instant::now() > deadline {
            break seqs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(out.json().len(), total, "nothing twice");
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    assert!(agent.hub.stats().subscribers().count() == 1);
    watch.stop().await;
}
