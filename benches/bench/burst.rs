//! Bursts of flow ends (100 k and 1 M flows ending in one poll) through the `flowlens` binary to its readers: stdout JSON into a pipe, `flowlens watch --json`, and a Python grpcio subscriber (how many each got, how long it took, the agent's CPU and peak memory); and 1 M ends to 8 subscribers without and with gzip (the agent's CPU).
//!
//! Only the binaries' command lines and the gRPC API are used, so the same section measures
//! another build: `FLOWLENS_BIN=/path/to/flowlens flowlens-bench burst`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::MapHandle;

use flowlens::record::api::proto::{self, flow_lens_client::FlowLensClient};

use crate::common::{cpu_secs_of, fill_split_maps, peak_rss_mib_of, Mix, Table};
use crate::stream::count_lossy;

/// Burst sizes.
const BURSTS: [u32; 2] = [100_000, 1_000_000];
/// A reader that got nothing new for this long has got all it will.
const QUIET: Duration = Duration::from_secs(10);

pub fn run(t: &mut Table) -> Result<()> {
    let bin = flowlens_bin()?;
    println!("burst: flows ending together, through {}", bin.display());
    let py = Python::ready()?;
    for n in BURSTS {
        burst(t, &bin, &py, n)?;
    }
    codecs(t, &bin)
}

/// `FLOWLENS_BIN`, or the `flowlens` built beside this binary.
fn flowlens_bin() -> Result<PathBuf> {
    if let Some(b) = std::env::var_os("FLOWLENS_BIN") {
        return Ok(PathBuf::from(b));
    }
    let me = std::env::current_exe()?;
    Ok(me.with_file_name("flowlens"))
}

/// A line reader: lines counted as they come, with the time of the last.
struct Counter {
    lines: Arc<AtomicU64>,
    last: Arc<Mutex<Option<Instant>>>,
    /// Lines that matched `keep` (LOST lines, a summary).
    kept: Arc<Mutex<Vec<String>>>,
}

impl Counter {
    fn spawn(r: impl Read + Send + 'static, keep: fn(&str) -> bool) -> Counter {
        let c = Counter {
            lines: Arc::default(),
            last: Arc::default(),
            kept: Arc::default(),
        };
        let (lines, last, kept) = (c.lines.clone(), c.last.clone(), c.kept.clone());
        std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, r);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if keep(&line) {
                    kept.lock().unwrap().push(line.trim().to_owned());
                } else {
                    lines.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap() = Some(Instant::now());
                }
                line.clear();
            }
        });
        c
    }

    fn count(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }
}

/// The bench's grpcio: a venv with grpcio and the proto's modules generated.
struct Python {
    py: PathBuf,
    gen: PathBuf,
}

impl Python {
    fn ready() -> Result<Python> {
        let target = std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("target dir")?
            .to_owned();
        let venv = target.join("tmp/pyvenv-grpcio");
        let py = venv.join("bin/python");
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        if !ok(Command::new(&py).args(["-c", "import grpc, grpc_tools"])) {
            std::fs::create_dir_all(target.join("tmp"))?;
            if !ok(Command::new("python3").arg("-m").arg("venv").arg(&venv))
                || !ok(Command::new(&py).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "grpcio>=1.60",
                    "grpcio-tools>=1.60",
                ]))
            {
                bail!("installing grpcio into {}", venv.display());
            }
        }
        let gen = std::env::temp_dir().join(format!("flowlens-bench-py-{}", std::process::id()));
        std::fs::create_dir_all(&gen)?;
        let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
        if !ok(Command::new(&py)
            .args(["-m", "grpc_tools.protoc", "-I", proto_dir])
            .arg(format!("--python_out={}", gen.display()))
            .arg(format!("--grpc_python_out={}", gen.display()))
            .arg(format!("{proto_dir}/flowlens/v1/flowlens.proto")))
        {
            bail!("generating the Python modules");
        }
        Ok(Python { py, gen })
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.gen);
    }
}

/// Counts records as they come: a line per record (for the counter), `LOST n` lines.
const PY_COUNT: &str = r#"
import sys
sys.path.insert(0, sys.argv[2])
import grpc
from flowlens.v1 import flowlens_pb2 as pb, flowlens_pb2_grpc as rpc

out = sys.stdout
stub = rpc.FlowLensStub(grpc.insecure_channel(sys.argv[1]))
for resp in stub.Subscribe(pb.SubscribeRequest()):
    kind = resp.WhichOneof("event")
    if kind == "flows":
        out.write("r\n" * len(resp.flows.records))
        out.flush()
    elif kind == "lost":
        out.write("LOST %d\n" % resp.lost.count)
        out.flush()
"#;

/// Kills a child however the section ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent binary attached to nothing, its maps pinned where the bench fills them.
struct Agent {
    child: Reaped,
    pins: PathBuf,
    listen: String,
}

impl Agent {
    fn start(bin: &Path, n: u32, output: &str) -> Result<Agent> {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/flowlens-bench-burst-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pins);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let cap = (2 * n).to_string();
        let child = Reaped(
            Command::new(bin)
                .args([
                    "run",
                    "--interface",
                    "/^flowlens-bench-none$/",
                    "--output",
                    output,
                ])
                .arg("--pin-dir")
                .arg(&pins)
                .args(["--grpc-listen", &listen, "--metrics-listen", "off"])
                .args(["--max-flows", &cap, "--max-tcp-flows", &cap])
                .args(["--max-icmp-flows", &cap, "--log-level", "warn"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the agent")?,
        );
        let agent = Agent {
            child,
            pins,
            listen,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.status().is_none() {
            if Instant::now() > deadline {
                bail!("the agent never answered on {}", agent.listen);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// GetStatus, if it answers.
    fn status(&self) -> Option<proto::GetStatusResponse> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut c = FlowLensClient::connect(format!("http://{}", self.listen))
                .await
                .ok()?;
            let s = c.get_status(proto::GetStatusRequest {}).await.ok()?;
            Some(s.into_inner())
        })
    }

    fn wait_subscribers(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.status().map(|s| s.subscribers.len()) != Some(n) {
            if Instant::now() > deadline {
                bail!("{n} subscribers never came");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `n` flows of the realistic mix, quiet since boot: the next poll ends all of them.
    fn end_flows(&self, n: u32) -> Result<()> {
        let dir = std::fs::read_dir(&self.pins)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with('v'))
            })
            .context("the agent's pinned maps")?;
        let map = |name: &str| MapHandle::from_pinned_path(dir.join(name)).context(name.to_owned());
        let (flows, tcp, icmp) = (map("flows")?, map("flows_tcp")?, map("flows_icmp")?);
        fill_split_maps([&flows, &tcp, &icmp], n, Mix::DEFAULT, 100)
    }

    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let _ = self.child.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn burst(t: &mut Table, bin: &Path, py: &Python, n: u32) -> Result<()> {
    let mut agent = Agent::start(bin, n, "json")?;
    let pid = agent.pid();
    let listen = agent.listen.clone();
    let stdout = Counter::spawn(agent.child.0.stdout.take().context("stdout")?, |_| false);
    let mut watch = Reaped(
        Command::new(bin)
            .args(["watch", "--json", "--server", &listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let watch_out = Counter::spawn(watch.0.stdout.take().context("watch stdout")?, |_| false);
    let watch_err = Counter::spawn(watch.0.stderr.take().context("watch stderr")?, |_| true);
    let mut grpcio = Reaped(
        Command::new(&py.py)
            .args(["-c", PY_COUNT, &listen])
            .arg(&py.gen)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let grpcio_out = Counter::spawn(grpcio.0.stdout.take().context("python stdout")?, |l| {
        l.starts_with("LOST")
    });
    agent.wait_subscribers(2)?;
    let (cpu0, t0) = (cpu_secs_of(pid)?, Instant::now());
    agent.end_flows(n)?;
    let readers = [
        ("stdout JSON to a pipe", &stdout),
        ("watch --json", &watch_out),
        ("Python grpcio subscriber", &grpcio_out),
    ];
    let mut last_change = Instant::now();
    let mut last_total = 0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let total: u64 = readers.iter().map(|(_, c)| c.count()).sum();
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        }
        if total >= 3 * u64::from(n) || last_change.elapsed() > QUIET {
            break;
        }
    }
    let cpu = cpu_secs_of(pid)? - cpu0;
    let peak = peak_rss_mib_of(pid)?;
    agent.stop();
    let lost_lines = |c: &Counter| -> u64 {
        c.kept
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let rest = &l[l.find("LOST ")? + 5..];
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    };
    for (what, c) in readers {
        let got = c.count();
        let secs = c
            .last
            .lock()
            .unwrap()
            .map_or(0.0, |l| l.duration_since(t0).as_secs_f64());
        let told = match what {
            "watch --json" => format!("; told lost {}", lost_lines(&watch_err)),
            "Python grpcio subscriber" => format!("; told lost {}", lost_lines(&grpcio_out)),
            _ => String::new(),
        };
        t.add(
            "burst",
            &format!("{}k ends: {what}, records", n / 1000),
            got as f64,
            "rec",
            format!(
                "{:.1} % lost; last {secs:.1} s after the flows were written{told}",
                100.0 * (1.0 - got as f64 / f64::from(n))
            ),
        );
    }
    t.add(
        "burst",
        &format!("{}k ends: agent CPU, peak RSS", n / 1000),
        cpu,
        "s",
        format!("peak RSS {peak:.0} MiB"),
    );
    Ok(())
}

/// 1 M flows ending together with no subscriber, 8 uncompressed and 8 gzip subscribers
/// (the bench's counting clients): the agent's CPU for each, and over the first.
fn codecs(t: &mut Table, bin: &Path) -> Result<()> {
    use tonic::codec::CompressionEncoding as C;
    const N: u32 = 1_000_000;
    const SUBS: usize = 8;
    let rt = tokio::runtime::Runtime::new()?;
    let mut alone = 0.0;
    for (name, codec) in [
        ("no subscriber", None),
        ("8 identity subscribers", Some(None)),
        ("8 gzip subscribers", Some(Some(C::Gzip))),
    ] {
        let agent = Agent::start(bin, N, "none")?;
        let pid = agent.pid();
        let clients: Vec<_> = match codec {
            None => Vec::new(),
            Some(c) => (0..SUBS)
                .map(|_| {
                    rt.spawn(count_lossy(
                        agent.listen.clone(),
                        u64::from(N),
                        c,
                        Some(QUIET),
                    ))
                })
                .collect(),
        };
        agent.wait_subscribers(clients.len())?;
        let (cpu0, t0) = (cpu_secs_of(pid)?, Instant::now());
        agent.end_flows(N)?;
        let (mut got, mut lost) = (0, 0);
        for c in clients {
            let (g, l) = rt.block_on(c)??;
            got += g;
            lost += l;
        }
        if codec.is_none() {
            while agent.status().map_or(0, |s| s.records_published) < u64::from(N) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs_of(pid)? - cpu0;
        agent.stop();
        if codec.is_none() {
            alone = cpu;
        }
        t.add(
            "burst",
            &format!("1000k ends, {name}: agent CPU"),
            cpu,
            "s",
            format!(
                "{:.2} s over no subscriber; {got} delivered, {lost} told lost, in {secs:.1} s",
                cpu - alone
            ),
        );
    }
    Ok(())
}
