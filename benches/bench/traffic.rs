//! Real-traffic overhead: iperf3 TCP and UDP between two network namespaces without
//! flowlens, with an empty TC program, and with the whole agent on the veth.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libbpf_rs::MapCore;

use flowlens::agent::Agent;
use flowlens::config::Config;
use flowlens::kernel::attach::IfNames;

use crate::common::{load_baselines, Table};

/// Rounds of the traffic section, each 3 s of TCP and 3 s of UDP without, with the hook
/// alone, and with flowlens.
const TRAFFIC_ROUNDS: usize = 5;

pub fn run(t: &mut Table) -> Result<()> {
    println!("real traffic: iperf3 between two namespaces, without and with flowlens on the veth");
    let net = Net("flbench-a", "flbench-b");
    sh(&["ip", "netns", "add", net.0])?;
    sh(&["ip", "netns", "add", net.1])?;
    sh(&[
        "ip", "link", "add", "flbA", "netns", net.0, "type", "veth", "peer", "name", "flbB",
        "netns", net.1,
    ])?;
    sh(&[
        "ip",
        "-n",
        net.0,
        "addr",
        "add",
        "10.200.250.1/24",
        "dev",
        "flbA",
    ])?;
    sh(&[
        "ip",
        "-n",
        net.1,
        "addr",
        "add",
        "10.200.250.2/24",
        "dev",
        "flbB",
    ])?;
    for (ns, i) in [(net.0, "flbA"), (net.1, "flbB")] {
        sh(&["ip", "-n", ns, "link", "set", i, "up"])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    let mut server = Command::new("ip")
        .args(["netns", "exec", net.1, "iperf3", "-s", "-B", "10.200.250.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let run = || -> Result<(f64, f64)> {
        // Client and server each on a CPU of their own (`-A 0,1`): on 2 vCPUs, where the
        // scheduler puts them moves a run by more than the hook costs.
        let tcp = iperf(net.0, &["-c", "10.200.250.2", "-t", "3", "-A", "0,1"])?;
        let gbps = tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9;
        let udp = iperf(
            net.0,
            &[
                "-c",
                "10.200.250.2",
                "-u",
                "-l",
                "64",
                "-b",
                "0",
                "-t",
                "3",
                "-A",
                "0,1",
            ],
        )?;
        let pps = udp["end"]["sum"]["packets"].as_f64().unwrap_or(0.0)
            / udp["end"]["sum"]["seconds"].as_f64().unwrap_or(1.0);
        Ok((gbps, pps))
    };
    // Rounds alternate without, with the hook alone (an empty program attached the same
    // way) and with flowlens, so a drift of the machine over the section (other jobs,
    // frequency) weighs on every side alike; each round gives its ratios.
    let mut rounds = Vec::new();
    let mut flows = 0;
    for _ in 0..TRAFFIC_ROUNDS {
        let without = run()?;
        let (stop, hook) = attach_empty(net.0, "flbA")?;
        let empty = run();
        drop(stop);
        hook.join()
            .map_err(|_| anyhow::anyhow!("hook thread panicked"))??;
        // The whole agent (datapath, attacher, poller, hub), as `flowlens run` wires it.
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let agent = in_netns(net.0, move || {
            let agent = Agent::start(Config::embedded(&["flbA"]))?;
            ready_tx.send(agent.maps()?)?;
            agent.run(&stop_rx)
        });
        let with = match ready_rx.recv() {
            Ok(maps) => {
                // Past its start (loading, attaching, the first poll): its steady state.
                std::thread::sleep(Duration::from_secs(1));
                let with = run();
                flows = flows.max(maps.flows.keys().count());
                with
            }
            Err(_) => Err(anyhow::anyhow!("the agent did not start")),
        };
        drop(stop_tx);
        agent
            .join()
            .map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
        rounds.push([without, empty?, with?]);
    }
    let _ = server.kill();
    let _ = server.wait();
    let median_ratio = |pick: fn(&(f64, f64)) -> f64, of: usize, to: usize| {
        let mut ratios: Vec<f64> = rounds.iter().map(|r| pick(&r[of]) / pick(&r[to])).collect();
        let each = ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        ratios.sort_by(f64::total_cmp);
        (ratios[ratios.len() / 2], each)
    };
    let tcp: fn(&(f64, f64)) -> f64 = |r| r.0;
    let udp: fn(&(f64, f64)) -> f64 = |r| r.1;
    for (what, unit, pick) in [
        ("iperf3 TCP", "Gbit/s", tcp),
        ("iperf3 UDP 64 B", "pkt/s", udp),
    ] {
        for (i, side) in ["without flowlens", "an empty TC program", "with flowlens"]
            .iter()
            .enumerate()
        {
            let mean = rounds.iter().map(|r| pick(&r[i])).sum::<f64>() / rounds.len() as f64;
            t.add(
                "traffic",
                &format!("{what}, {side}"),
                mean,
                unit,
                format!("mean of {TRAFFIC_ROUNDS} rounds"),
            );
        }
        for (label, of, to) in [
            ("with / without flowlens", 2, 0),
            ("the hook alone: empty program / without", 1, 0),
            ("flowlens / empty program", 2, 1),
        ] {
            let (median, each) = median_ratio(pick, of, to);
            t.add(
                "traffic",
                &format!("{what}, {label}"),
                median,
                "ratio",
                format!("median of the rounds ({each}); {flows} flows in the map"),
            );
        }
    }
    Ok(())
}

/// Runs `f` on a thread of its own inside network namespace `ns`.
fn in_netns(
    ns: &str,
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> std::thread::JoinHandle<Result<()>> {
    let ns_path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<()> {
        let netns = std::fs::File::open(&ns_path)?;
        // SAFETY: valid netns fd; affects this thread only.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&netns), libc::CLONE_NEWNET) } != 0
        {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

/// The hook's own cost: the bench's empty passive program attached by TCX to `iface`'s
/// ingress and egress in namespace `ns`, as flowlens attaches, until the sender is dropped.
fn attach_empty(
    ns: &str,
    iface: &str,
) -> Result<(
    crossbeam_channel::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
)> {
    use flowlens::kernel::attach::{Attacher, Mode, ProgramFds, Selector};
    use std::os::fd::AsFd;
    let only = Selector::new(&[iface.to_owned()], &[])?;
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let hook = in_netns(ns, move || {
        let skel = load_baselines()?;
        let prog = skel.progs.bench_empty.as_fd();
        let progs = ProgramFds {
            ingress: prog.try_clone_to_owned()?,
            egress: prog.try_clone_to_owned()?,
        };
        // Detached when dropped, at the end of this thread.
        let mut attacher = Attacher::new(progs, Mode::Tcx, IfNames::default());
        let report = attacher.sync(&only)?;
        if report.attached.is_empty() {
            bail!("the empty program attached nowhere: {:?}", report.failed);
        }
        ready_tx.send(())?;
        let _ = stop_rx.recv();
        Ok(())
    });
    if ready_rx.recv().is_err() {
        return Err(hook
            .join()
            .map_err(|_| anyhow::anyhow!("hook thread panicked"))?
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("the empty program did not attach")));
    }
    Ok((stop_tx, hook))
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

fn iperf(ns: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-J"])
        .args(args)
        .output()
        .context("iperf3")?;
    serde_json::from_slice(&out.stdout).context("iperf3 JSON")
}

/// Two namespaces and a veth pair, deleted on drop.
struct Net(&'static str, &'static str);

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", self.0]);
        let _ = sh(&["ip", "netns", "del", self.1]);
    }
}
