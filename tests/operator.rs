//! What an operator types, on a pipe: `flowlens flows` and `flowlens status` against a running agent, `run --check-config`, and the one-line errors of a first day.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::bin::{start, BIN};
use common::netns::NetPair;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sh -c script` with the flowlens binary as $0's neighbour `$FL`; stdout is a pipe.
fn shell(script: &str) -> Output {
    Command::new("sh")
        .args(["-c", script])
        .env("FL", BIN)
        .env_remove("RUST_LOG")
        .output()
        .expect("sh")
}

#[test]
fn flows_and_status_work_on_a_pipe_against_a_running_agent() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-op-{}.sock", std::process::id());
    let server = format!("unix:{sock}");
    let mut agent = start(
        &net.a,
        &["--interface", &net.if_a, "--grpc-listen", &server],
    );
    agent.wait_log("attached to", Duration::from_secs(15));
    // Flows in progress: a ping each way of IPv4 and IPv6, and an open TCP connection.
    net.ping_from_a(net.v4_b, 2);
    net.ping_from_a(net.v6_b, 2);
    let listener = net.listen_b(false, 0);
    let port = listener.local_addr().expect("addr").port();
    let b = net.v4_b;
    let held = net
        .in_ns(&net.a, move || {
            let mut c = TcpStream::connect(SocketAddr::new(b, port)).expect("connect");
            c.write_all(b"hello").expect("send");
            c
        })
        .join()
        .expect("client");
    let (_accepted, _) = listener.accept().expect("accept");

    // `flows --json | jq length`, as the README has it: an array of every flow.
    let deadline = Instant::now() + Duration::from_secs(15);
    let count = loop {
        let out = shell(&format!(
            "\"$FL\" flows --server {server} --json | jq length"
        ));
        let (o, e) = text(&out);
        assert!(out.status.success(), "{o}{e}");
        let n: u64 = o
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("jq said {o:?}: {e}"));
        if n >= 3 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        count >= 3,
        "two echo flows and a TCP flow in progress, got {count}"
    );
    let out = Command::new(BIN)
        .args(["flows", "--server", &server, "--json"])
        .output()
        .expect("flows --json");
    let flows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("one JSON array");
    let snapshot = flows[0]["emitted_ns"].as_u64().expect("emitted_ns");
    for f in &flows {
        assert_eq!(f["end_reason"], "in_progress", "{f}");
        assert_eq!(
            f["emitted_ns"], snapshot,
            "every record of a listing: its snapshot time"
        );
        assert!(f["first_seen_ns"].as_u64().unwrap() <= snapshot, "{f}");
    }
    let tcp = flows
        .iter()
        .find(|f| f["server_port"] == port)
        .expect("the TCP flow");
    assert_eq!(tcp["tcp"]["state"], "established", "{tcp}");
    assert!(flows
        .iter()
        .any(|f| f["server_addr"] == net.v6_b.to_string()));

    // The table on a pipe: header, the snapshot's date, a row per flow, filtered on the
    // server, sorted, limited; --no-header leaves the rows alone.
    let out = Command::new(BIN)
        .args([
            "flows", "--server", &server, "--proto", "icmp", "--proto", "icmpv6",
        ])
        .output()
        .expect("flows");
    let (o, e) = text(&out);
    assert!(out.status.success(), "{e}");
    let lines: Vec<&str> = o.lines().collect();
    assert!(lines[0].starts_with("FIRST    PROT"), "{o}");
    assert!(lines[0].contains(" STATE "), "{o}");
    assert!(
        lines[1].starts_with("--- ") && lines[1].ends_with(" (UTC) ---"),
        "{o}"
    );
    // The two echo flows (IPv6 neighbour discovery may add rows of its own).
    let echo = |a, b| {
        lines
            .iter()
            .any(|l| l.contains(&format!("{a} > {b}")) && l.contains(" rtt "))
    };
    assert!(echo(net.v4_a, net.v4_b), "{o}");
    assert!(echo(net.v6_a, net.v6_b), "{o}");
    assert!(lines[2..].iter().all(|l| l.contains(" icmp")), "{o}");
    let out = Command::new(BIN)
        .args([
            "flows",
            "--server",
            &server,
            "--no-header",
            "--sort",
            "bytes",
        ])
        .args(["--limit", "1", "--time-format", "unix"])
        .output()
        .expect("flows");
    let (o, _) = text(&out);
    assert_eq!(o.lines().count(), 1, "{o}");
    assert!(o.chars().next().is_some_and(|c| c.is_ascii_digit()), "{o}");

    // status: the agent's state in a page of text, or JSON.
    let out = shell(&format!("\"$FL\" status --server {server} | cat"));
    let (o, e) = text(&out);
    assert!(out.status.success(), "{e}");
    let wants = [
        format!("flowlens {} at {server}", env!("CARGO_PKG_VERSION")),
        format!("interfaces:   {} (", net.if_a),
        "flows:        ".into(),
        "maps:".into(),
        "  flows ".into(),
        "sinks:".into(),
        "output  stdout".into(),
        "subscribers:".into(),
        "samples lost: 0 TCP latency (flows_tcp full: raise --max-tcp-flows), 0 ICMP RTT".into(),
        "packets_accounted".into(),
    ];
    for want in &wants {
        assert!(o.contains(want), "no {want:?} in:\n{o}");
    }
    let out = shell(&format!(
        "\"$FL\" status --server {server} --json | jq -r '.interfaces[0].name, .sinks[0].lost, .maps[0].name, .samples_lost.tcp_latency'"
    ));
    let (o, e) = text(&out);
    assert_eq!(o, format!("{}\n0\nflows\n0\n", net.if_a), "{e}");
    drop(held);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn check_config_validates_without_loading_anything() {
    let net = NetPair::new();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.b, BIN, "run", "--check-config"])
            .args(args)
            .env_remove("RUST_LOG");
        let out = common::bin::without_flowlens_env(&mut cmd)
            .envs(env.iter().copied())
            .output()
            .expect("flowlens");
        let (o, e) = text(&out);
        (out.status.code(), o, e)
    };
    // Good, with an uncommented `FLOWLENS_OBSERVER_ID=` (empty: the default).
    let (code, o, e) = run(
        &["--interface", &net.if_b, "--pin-dir", "off"],
        &[("FLOWLENS_OBSERVER_ID", ""), ("FLOWLENS_SCAN_THREADS", "")],
    );
    assert_eq!(code, Some(0), "{o}{e}");
    assert!(o.contains("the configuration is good"), "{o}");
    assert!(o.contains(&format!("interfaces     {}", net.if_b)), "{o}");
    assert!(
        o.contains("gRPC           unix:/run/flowlens/flowlens.sock"),
        "{o}"
    );
    assert!(!e.contains("INFO"), "nothing started: {e}");
    assert_eq!(
        common::netns::tcx_count(
            &net.b,
            common::netns::ifindex_in(&net.b, &net.if_b),
            libbpf_sys::BPF_TCX_INGRESS
        ),
        0
    );

    // A missing interface: one line, before anything, naming those that exist.
    let (code, o, e) = run(&["-i", "eth9", "--pin-dir", "off"], &[]);
    assert_eq!(code, Some(1), "{o}{e}");
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {e}");
    assert!(
        lines[0].contains("--interface eth9: no such interface here (there are: ")
            && lines[0].contains(&net.if_b)
            && lines[0].contains("eth9*"),
        "{e}"
    );
    // A pin directory that is not on bpffs: what to do instead, not "mount /sys/fs/bpf".
    let (code, _, e) = run(
        &["-i", &net.if_b, "--pin-dir", "/tmp/flowlens-not-bpffs"],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(
        e.contains("--pin-dir /tmp/flowlens-not-bpffs is not on a BPF filesystem: use a directory under /sys/fs/bpf"),
        "{e}"
    );
    assert!(!e.contains("mount -t bpf bpf /sys/fs/bpf"), "{e}");
    // A bad value from the environment names the variable.
    let (code, _, e) = run(&["-i", &net.if_b], &[("FLOWLENS_IDLE_TIMEOUT_UDP", "soon")]);
    assert_eq!(code, Some(2));
    assert!(
        e.contains("environment variable FLOWLENS_IDLE_TIMEOUT_UDP"),
        "{e}"
    );
}

#[test]
fn clients_without_an_agent_say_so_in_one_line() {
    let sock = format!("/tmp/flowlens-op-none-{}.sock", std::process::id());
    for cmd in ["watch", "flows", "status"] {
        let out = Command::new(BIN)
            .args([cmd, "--server", &format!("unix:{sock}")])
            .env_remove("RUST_LOG")
            .output()
            .expect("flowlens");
        let (_, e) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {e}");
        assert_eq!(e.lines().count(), 1, "{cmd}: {e}");
        assert!(
            e.contains(&format!(
                "no flowlens agent at unix:{sock} (the socket does not exist)"
            )),
            "{cmd}: {e}"
        );
    }
    // top on a pipe points to the commands that work there.
    let out = Command::new(BIN)
        .args(["top", "--server", &format!("unix:{sock}")])
        .output()
        .expect("flowlens top");
    let (_, e) = text(&out);
    assert!(e.contains("`flowlens flows`"), "{e}");
}
