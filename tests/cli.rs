//! The `flowlens` binary: attach, follow interfaces, detach on exit, and reject bad input clearly.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin::{lines, start, Running, BIN};
use common::netns::{ifindex_in, sh, sh_out, tcx_count, Bpffs, NetPair};
use common::pki::Pki;

/// `run` flags for an agent on the pair's `a` veth, pinning under `pins`.
fn pinned<'a>(net: &'a NetPair, pins: &'a str) -> [&'a str; 6] {
    [
        "--interface",
        &net.if_a,
        "--pin-dir",
        pins,
        "--grpc-listen",
        "off",
    ]
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tcx_attach_follows_new_interfaces_and_detaches_everything_on_exit() {
    let net = NetPair::new();
    let ifa = net.ifindex_a();
    let fs = Bpffs::new("follow");
    let pins = fs.pins();
    let mut agent = start(
        &net.a,
        &[
            "--interface",
            "fa*",
            "--interface",
            "/fz[0-9]+/",
            "--pin-dir",
            &pins,
            "--grpc-listen",
            "off",
        ],
    );
    agent.wait_log(
        &format!("attached to {} (ifindex {ifa}) with TCX", net.if_a),
        Duration::from_secs(10),
    );
    assert_eq!(tcx_count(&net.a, ifa, libbpf_sys::BPF_TCX_INGRESS), 1);
    assert_eq!(tcx_count(&net.a, ifa, libbpf_sys::BPF_TCX_EGRESS), 1);

    // An interface created later is picked up within about a second.
    sh(&[
        "ip", "-n", &net.a, "link", "add", "fz1", "type", "veth", "peer", "name", "fy2",
    ]);
    sh(&["ip", "-n", &net.a, "link", "set", "fz1", "up"]);
    let fz1 = ifindex_in(&net.a, "fz1");
    let fy2 = ifindex_in(&net.a, "fy2");
    let t0 = Instant::now();
    wait_until("fz1 attached", Duration::from_secs(3), || {
        tcx_count(&net.a, fz1, libbpf_sys::BPF_TCX_INGRESS) == 1
    });
    let took = t0.elapsed();
    agent.wait_log("attached to fz1", Duration::from_secs(1));
    assert!(
        took < Duration::from_millis(1500),
        "new interface attached after {took:?}"
    );
    assert!(fy2 > 0);
    assert_eq!(
        tcx_count(&net.a, fy2, libbpf_sys::BPF_TCX_INGRESS),
        0,
        "fy2 matches no pattern"
    );

    // One that goes away is dropped cleanly.
    sh(&["ip", "-n", &net.a, "link", "del", "fz1"]);
    agent.wait_log("detached from fz1", Duration::from_secs(3));

    net.ping_from_a(net.v4_b, 2);
    let (status, out) = agent.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    for (dir, ty) in [
        ("ingress", libbpf_sys::BPF_TCX_INGRESS),
        ("egress", libbpf_sys::BPF_TCX_EGRESS),
    ] {
        assert_eq!(tcx_count(&net.a, ifa, ty), 0, "{dir} program left attached");
    }
    // The ping flow was flushed at shutdown (or ended before): it is in the output.
    let echo: Vec<serde_json::Value> = out
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["protocol"] == 1)
        .collect();
    assert_eq!(echo.len(), 1, "{out:#?}");
    assert_eq!(echo[0]["client"]["packets"], 2);
    assert_eq!(echo[0]["server"]["packets"], 2);
    assert_eq!(echo[0]["end_reason"], "shutdown");
}

#[test]
fn tc_mode_attaches_clsact_filters_and_removes_them_on_exit() {
    let net = NetPair::new();
    let mut agent = start(&net.a, &["--interface", &net.if_a, "--attach-mode", "tc"]);
    agent.wait_log("with TC clsact", Duration::from_secs(30));
    let filters =
        |dir: &str| sh_out(&["tc", "-n", &net.a, "filter", "show", "dev", &net.if_a, dir]);
    assert!(
        filters("ingress").contains("flowlens_ingres"),
        "{}",
        filters("ingress")
    );
    assert!(
        filters("egress").contains("flowlens_egress"),
        "{}",
        filters("egress")
    );
    let (status, _) = agent.stop();
    assert!(status.success());
    assert_eq!(filters("ingress").trim(), "", "ingress filter left behind");
    assert_eq!(filters("egress").trim(), "", "egress filter left behind");
}

fn fails_with(args: &[&str], needle: &str) {
    // Outside any test namespace: a pin directory of its own, no listeners.
    let fs = Bpffs::new("flags");
    let pins = fs.pins();
    let mut all = args.to_vec();
    if args[0] == "run" {
        all.extend([
            "--pin-dir",
            &pins,
            "--grpc-listen",
            "off",
            "--metrics-listen",
            "off",
        ]);
    }
    let out = Command::new(BIN).args(&all).output().expect("run flowlens");
    assert!(!out.status.success(), "{args:?} must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

#[test]
fn bad_flags_get_precise_errors() {
    fails_with(
        &["run", "--poll-interval", "0s"],
        "must be greater than zero",
    );
    fails_with(&["run", "--poll-interval", "soon"], "--poll-interval");
    fails_with(
        &["run", "--max-flows", "0"],
        "--max-flows \"0\" is out of range: give 1 to 16777216",
    );
    fails_with(&["run", "--scan-threads", "0"], "--scan-threads");
    fails_with(
        &["run", "--output", "xml"],
        "possible values: table, json, none",
    );
    fails_with(
        &["run", "--interface", "/[/"],
        "invalid interface pattern \"/[/\"",
    );
    fails_with(
        &["run", "--interface", "nosuchif0"],
        "--interface nosuchif0: no such interface here (there are: ",
    );
    fails_with(
        &[
            "run",
            "--interface",
            "flx0",
            "--exclude-interface",
            "lo,flx0",
        ],
        "--interface flx0 and --exclude-interface flx0 cancel each other",
    );
    fails_with(&["run", "--log-level", "loud"], "'--log-level <LOG_LEVEL>'");
}

/// `flowlens run` with `args` and `env`, expected to fail before attaching anything; its
/// stderr. `--interface nosuchif0` keeps it from attaching to the host's interfaces even
/// if a check it should fail lets it through.
fn run_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--metrics-listen", "off"]);
    if !args.contains(&"--interface") {
        cmd.args(["--interface", "nosuchif0"]);
    }
    if !args.contains(&"--grpc-listen") {
        cmd.args(["--grpc-listen", "off"]);
    }
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run flowlens");
    assert!(!out.status.success(), "{args:?} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn fatal_errors_name_their_source_once() {
    let fs = Bpffs::new("fatal");
    let pins = fs.pins();
    let err = run_fails(&["--pin-dir", &pins], &[("FLOWLENS_POLL_INTERVAL", "soon")]);
    assert!(
        err.contains("environment variable FLOWLENS_POLL_INTERVAL: invalid value 'soon'"),
        "{err}"
    );
    // A capacity past the documented range: one line, before anything is loaded.
    let err = run_fails(&["--pin-dir", &pins, "--max-flows", "4294967295"], &[]);
    assert_eq!(
        err,
        "flowlens: --max-flows \"4294967295\" is out of range: give 1 to 16777216\n"
    );
    // One the kernel refuses (through the library, which has no flag ranges): said so by
    // flag, libbpf's own lines only in the debug log, and no pin directory left behind.
    let cfg = flowlens::config::Config {
        capacities: flowlens::kernel::datapath::Capacities {
            flows: u32::MAX,
            ..Default::default()
        },
        pin_dir: Some(pins.clone().into()),
        ..flowlens::config::Config::embedded(&["nosuchif*"])
    };
    let err = flowlens::agent::Agent::start(cfg).err().expect("E2BIG");
    let err = flowlens::fatal::describe(&err);
    assert!(
        err.starts_with("the kernel refused a flow map this large (E2BIG): --max-flows 4294967295"),
        "{err}"
    );
    assert!(!std::path::Path::new(&pins).exists(), "{pins} left behind");
    // Plaintext on a routable address, refused before anything is loaded.
    let err = run_fails(&["--pin-dir", &pins, "--grpc-listen", "0.0.0.0:0"], &[]);
    assert!(err.contains("--grpc-allow-insecure"), "{err}");
    // The env file's commented default, uncommented, must not allow it either.
    let err = run_fails(
        &["--pin-dir", &pins, "--grpc-listen", "0.0.0.0:0"],
        &[("FLOWLENS_GRPC_ALLOW_INSECURE", "false")],
    );
    assert!(
        err.contains("refusing to serve flows in cleartext"),
        "{err}"
    );
    let err = run_fails(
        &[
            "--pin-dir",
            &pins,
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-tls-cert",
            "/nonexistent.pem",
            "--grpc-tls-key",
            "/nonexistent.key",
        ],
        &[],
    );
    assert!(
        err.contains("--grpc-tls-cert /nonexistent.pem: No such file"),
        "{err}"
    );
    assert!(!std::path::Path::new(&pins).exists(), "{pins} left behind");

    let out = Command::new(BIN)
        .args(["watch", "--server", "127.0.0.1:1"])
        .output()
        .expect("watch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("no flowlens agent at 127.0.0.1:1 (connection refused)")
            .count(),
        1,
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn sighup_reloads_the_grpc_certificates() {
    let net = NetPair::new();
    let pki = Pki::generate();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (cert, key, ca) = (path(&pki.server.0), path(&pki.server.1), path(&pki.ca));
    let mut agent = start(
        &net.a,
        &[
            "--interface",
            &net.if_a,
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-tls-cert",
            &cert,
            "--grpc-tls-key",
            &key,
            "--grpc-client-ca",
            &ca,
        ],
    );
    agent.wait_log(
        "gRPC on 127.0.0.1:0 (TLS, client certificates required)",
        Duration::from_secs(10),
    );
    let hup = |agent: &Running| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    };
    hup(&agent);
    agent.wait_log(
        "reloaded the gRPC TLS certificate files",
        Duration::from_secs(10),
    );
    std::fs::write(&key, "not a key").unwrap();
    hup(&agent);
    agent.wait_log(
        "keeping the gRPC TLS settings in use: --grpc-tls-key",
        Duration::from_secs(10),
    );
    let (status, _) = agent.stop();
    assert!(status.success(), "SIGHUP does not stop the agent");
}

#[test]
fn a_pin_directory_others_control_is_refused() {
    use std::os::unix::fs::{chown, PermissionsExt};
    let fs = Bpffs::new("trust");
    let pins = fs.pins();
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    std::fs::create_dir(&pins).unwrap();
    chown(&pins, Some(65534), None).unwrap();
    let err = run_fails(&["--pin-dir", &pins], &[]);
    assert!(
        err.contains(&format!(
            "pin directory {pins}: is owned by uid 65534, not root"
        )),
        "{err}"
    );
    chown(&pins, Some(0), None).unwrap();
    mode(&pins, 0o777);
    let err = run_fails(&["--pin-dir", &pins], &[]);
    assert!(
        err.contains("is writable by group or others (mode 0777)"),
        "{err}"
    );
    // Nobody may have moved or swapped anything inside.
    assert_eq!(std::fs::read_dir(&pins).unwrap().count(), 0);
    std::fs::remove_dir(&pins).unwrap();

    // A parent under bpffs that others may write (without the sticky bit).
    let shared = fs.dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let shared = shared.to_string_lossy().into_owned();
    mode(&shared, 0o777);
    let nested = format!("{shared}/pins");
    let err = run_fails(&["--pin-dir", &nested], &[]);
    assert!(
        err.contains(&format!(
            "pin directory {shared}: is writable by group or others"
        )),
        "{err}"
    );
    assert!(!std::path::Path::new(&nested).exists());
    // With the sticky bit (as a fresh bpffs root is) it is fine, and the directory
    // flowlens creates is root's alone.
    mode(&shared, 0o1777);
    let err = run_fails(&["--pin-dir", &nested], &[]);
    assert!(err.contains("no such interface"), "{err}");
}

#[test]
fn watch_receives_exactly_the_flows_of_the_traffic_over_grpc() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-test-{}.sock", std::process::id());
    let listen = format!("unix:{sock}");
    let mut agent = start(
        &net.a,
        &[
            "--interface",
            &net.if_a,
            "--idle-timeout-udp",
            "1s",
            "--grpc-listen",
            &listen,
            "--metrics-listen",
            "127.0.0.1:9464",
        ],
    );
    agent.wait_log("gRPC on", Duration::from_secs(30));
    agent.wait_log("attached to", Duration::from_secs(30));

    let port = 40_000 + (std::process::id() % 10_000) as u16;
    let mut watch = Command::new(BIN)
        .args([
            "watch",
            "--server",
            &listen,
            "--json",
            "--proto",
            "udp",
            "--dport",
            &format!("{port}-{}", port + 1),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let watch_out = lines(watch.stdout.take().expect("stdout"));
    std::thread::sleep(Duration::from_millis(500)); // let the subscription start

    let (a, b) = (net.v4_a, net.v4_b);
    net.in_ns(&net.a, move || {
        let s = std::net::UdpSocket::bind(std::net::SocketAddr::new(a, 0)).expect("bind");
        for _ in 0..10 {
            s.send_to(&[5u8; 72], std::net::SocketAddr::new(b, port))
                .expect("send");
        }
        // another flow the filter must drop
        s.send_to(&[5u8; 72], std::net::SocketAddr::new(b, port + 2))
            .expect("send");
    })
    .join()
    .expect("traffic");

    let line = watch_out
        .recv_timeout(Duration::from_secs(15))
        .expect("a record from watch");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(v["protocol"], 17);
    assert_eq!(v["server_port"], port);
    assert_eq!(v["client"]["packets"], 10);
    assert_eq!(v["client"]["bytes"], 10 * (72 + 28));
    assert_eq!(v["client_addr"], a.to_string());
    assert_eq!(v["end_reason"], "idle_timeout");

    // Self-metrics, scraped from inside the agent's namespace.
    let body = net.scrape(&net.a, "127.0.0.1:9464");
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "{body}"
    );
    let metric = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    assert!(metric("flowlens_records_emitted_total ") >= 1.0);
    assert!(metric("flowlens_kernel_packets_total{counter=\"packets_accounted\"} ") >= 11.0);
    assert_eq!(metric("flowlens_subscribers "), 1.0);

    // A flow still live at shutdown reaches the subscriber before the stream ends.
    net.in_ns(&net.a, move || {
        let s = std::net::UdpSocket::bind(std::net::SocketAddr::new(a, 0)).expect("bind");
        s.send_to(&[5u8; 10], std::net::SocketAddr::new(b, port + 1))
            .expect("send");
    })
    .join()
    .expect("traffic");
    std::thread::sleep(Duration::from_millis(100));
    let (status, _) = agent.stop();
    assert!(status.success());
    let line = watch_out
        .recv_timeout(Duration::from_secs(10))
        .expect("the flushed record");
    let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(
        (v["server_port"].as_u64(), v["end_reason"].as_str()),
        (Some(u64::from(port) + 1), Some("shutdown"))
    );
    // The stream ends with the agent and watch exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let wstatus = loop {
        if let Some(s) = watch.try_wait().expect("wait watch") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "watch did not exit when the stream ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = watch_out.try_iter().collect();
    assert!(rest.is_empty(), "only the two matching flows: {rest:#?}");
    assert!(wstatus.code().is_some());
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn a_crashed_agent_restarts_without_losing_the_flow_in_progress() {
    use std::io::{Read, Write};
    let net = NetPair::new();
    let fs = Bpffs::new("restart");
    let pins = fs.pins();
    let ifa = net.ifindex_a();
    let args = pinned(&net, &pins);
    let mut first = start(&net.a, &args);
    first.wait_log("with TCX", Duration::from_secs(30));

    let cap = net
        .in_ns(&net.a, move || common::capture::Capture::open(ifa))
        .join()
        .expect("capture");
    let (a, b) = (net.v4_a, net.v4_b);
    let listener = net.listen_b(false, 0);
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut v = Vec::new();
        s.read_to_end(&mut v).expect("read");
        s.write_all(&[1u8; 1000]).expect("reply");
        v.len()
    });
    let client = net.in_ns(&net.a, move || {
        let mut c =
            std::net::TcpStream::connect(std::net::SocketAddr::new(b, port)).expect("connect");
        for _ in 0..40 {
            c.write_all(&[2u8; 10_000]).expect("send");
            std::thread::sleep(Duration::from_millis(50));
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("read back");
        c.local_addr().expect("local").port()
    });

    // Crash mid-transfer: the pinned link keeps counting into the pinned maps.
    std::thread::sleep(Duration::from_millis(600));
    drop(first); // SIGKILL
    assert_eq!(
        tcx_count(&net.a, ifa, libbpf_sys::BPF_TCX_INGRESS),
        1,
        "the pinned link stays attached"
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut second = start(&net.a, &args);
    second.wait_log("reusing pinned maps", Duration::from_secs(30));
    second.wait_log("took over the pinned TCX link", Duration::from_secs(30));
    assert_eq!(
        tcx_count(&net.a, ifa, libbpf_sys::BPF_TCX_INGRESS),
        1,
        "one program, not two"
    );

    let cport = client.join().expect("client");
    assert_eq!(server.join().expect("server"), 400_000);
    let rec = second.record("the flow record", Duration::from_secs(20), |v| {
        v["protocol"] == 6 && v["server_port"] == port
    });
    let pkts = cap.drain();
    let keep = |p: &common::capture::Packet| {
        p.proto == 6 && [p.sport, p.dport].contains(&port) && [p.sport, p.dport].contains(&cport)
    };
    let (cp, cb) = common::capture::sent_by(&pkts, a, keep);
    let (sp, sb) = common::capture::sent_by(&pkts, b, keep);
    assert_eq!(rec["end_reason"], "tcp_fin");
    assert_eq!(
        (
            rec["client"]["packets"].as_u64(),
            rec["client"]["bytes"].as_u64()
        ),
        (Some(cp), Some(cb)),
        "client totals across the restart"
    );
    assert_eq!(
        (
            rec["server"]["packets"].as_u64(),
            rec["server"]["bytes"].as_u64()
        ),
        (Some(sp), Some(sb)),
        "server totals across the restart"
    );
    assert!(
        rec["tcp"]["handshake_client_ns"].as_u64().is_some(),
        "handshake seen by the first agent survives: {rec}"
    );

    let (status, _) = second.stop();
    assert!(status.success());
    assert_eq!(tcx_count(&net.a, ifa, libbpf_sys::BPF_TCX_INGRESS), 0);
    assert!(
        !std::path::Path::new(&pins).join(layout_dir()).exists(),
        "pins removed after a clean stop"
    );
}

#[test]
fn two_agents_cannot_share_a_pin_directory() {
    let net = NetPair::new();
    let fs = Bpffs::new("busy");
    let pins = fs.pins();
    let args = pinned(&net, &pins);
    let mut first = start(&net.a, &args);
    first.wait_log("attached to", Duration::from_secs(30));
    let mut second = Command::new("ip")
        .args(["netns", "exec", &net.a, BIN, "run"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("second agent");
    let err_lines = lines(second.stderr.take().expect("stderr"));
    wait_until(
        "the second agent to give up",
        Duration::from_secs(10),
        || matches!(second.try_wait(), Ok(Some(_))),
    );
    let status = second.wait().expect("wait");
    assert!(!status.success());
    let err = err_lines.iter().collect::<Vec<_>>().join("\n");
    assert!(
        err.contains("another flowlens already uses the pinned maps"),
        "{err}"
    );
    let (status, _) = first.stop();
    assert!(status.success());
}

#[test]
fn incompatible_pinned_maps_are_replaced_with_a_log_line() {
    let net = NetPair::new();
    let fs = Bpffs::new("compat");
    let pins = fs.pins();
    let base = pinned(&net, &pins);
    let mut first = start(&net.a, &[&base[..], &["--max-flows", "1000"]].concat());
    first.wait_log("attached to", Duration::from_secs(30));
    drop(first); // SIGKILL: pins stay
    let mut second = start(&net.a, &[&base[..], &["--max-flows", "2000"]].concat());
    second.wait_log("replacing incompatible pinned map", Duration::from_secs(30));
    second.wait_log("attached to", Duration::from_secs(30));
    assert!(
        second
            .err_seen
            .iter()
            .any(|l| l.contains("/flows (") && l.contains("1000") && l.contains("2000")),
        "the log line names the map and both capacities: {:#?}",
        second.err_seen
    );
    let (status, _) = second.stop();
    assert!(status.success());
}

#[test]
fn watch_exits_cleanly_on_ctrl_c_and_reports_a_missing_server() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-test-{}-int.sock", std::process::id());
    let listen = format!("unix:{sock}");
    let mut agent = start(
        &net.a,
        &["--interface", &net.if_a, "--grpc-listen", &listen],
    );
    agent.wait_log("gRPC on", Duration::from_secs(30));
    let mut watch = Command::new(BIN)
        .args(["watch", "--server", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let out = lines(watch.stdout.take().expect("stdout"));
    // The table header shows once the subscription is up.
    out.recv_timeout(Duration::from_secs(10))
        .expect("table header");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    wait_until("watch to exit on SIGINT", Duration::from_secs(10), || {
        matches!(watch.try_wait(), Ok(Some(_)))
    });
    assert_eq!(
        watch.wait().expect("wait").code(),
        Some(0),
        "Ctrl-C is a clean exit"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
    let _ = std::fs::remove_file(&sock);

    let gone = Command::new(BIN)
        .args(["watch", "--server", &listen])
        .output()
        .expect("watch without a server");
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(err.contains(&sock), "the error names the server: {err}");
}

#[test]
fn a_missing_bpffs_is_mounted_for_the_default_pin_dir() {
    // `ip netns exec` gives the agent a fresh /sys without the host's bpffs.
    let net = NetPair::new();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &net.a,
        BIN,
        "run",
        "--interface",
        &net.if_a,
    ])
    .args([
        "--grpc-listen",
        "off",
        "--metrics-listen",
        "off",
        "--output",
        "none",
    ])
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut agent = Running {
        stderr: lines(child.stderr.take().expect("stderr")),
        // stdout is not captured: an already-closed channel
        stdout: crossbeam_channel::unbounded().1,
        child,
        err_seen: Vec::new(),
    };
    agent.wait_log(
        "mounted a BPF filesystem at /sys/fs/bpf",
        Duration::from_secs(10),
    );
    // Root's alone, as systemd mounts it (a bare `mount -t bpf` gives 1777).
    let bpffs = format!("/proc/{}/root/sys/fs/bpf", agent.child.id());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&bpffs)
            .expect("the agent's bpffs")
            .permissions(),
    );
    // (bpffs always adds the sticky bit to its root.)
    assert_eq!(mode & 0o777, 0o700, "{bpffs}");
    agent.wait_log("attached to", Duration::from_secs(30));
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn loopback_traffic_is_counted_once() {
    let net = NetPair::new();
    let mut agent = start(&net.a, &["--interface", "lo", "--idle-timeout-icmp", "1s"]);
    agent.wait_log("attached to lo", Duration::from_secs(30));
    assert_eq!(
        tcx_count(&net.a, 1, libbpf_sys::BPF_TCX_INGRESS),
        0,
        "egress only on loopback"
    );
    assert_eq!(tcx_count(&net.a, 1, libbpf_sys::BPF_TCX_EGRESS), 1);
    net.ping_from_a(std::net::IpAddr::from([127, 0, 0, 1]), 3);
    let rec = agent.record("the loopback echo flow", Duration::from_secs(15), |v| {
        v["protocol"] == 1
    });
    // Source and destination are the same address: requests and replies
    // land on one side, six packets of 84 bytes, each counted once.
    let total = rec["client"]["packets"].as_u64().unwrap_or(0)
        + rec["server"]["packets"].as_u64().unwrap_or(0);
    assert_eq!(total, 6, "{rec}");
    assert_eq!(rec["icmp"]["echo_rtt"]["count"], 3, "{rec}");
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// Kills the agent (SIGKILL: no flush, pins stay) and returns every record it had written.
fn kill_and_collect(mut agent: Running) -> Vec<serde_json::Value> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGKILL) };
    agent.child.wait().expect("wait");
    // The reader thread forwards what was written before the kill, then ends.
    agent
        .stdout
        .iter()
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// Waits for the first record `want` accepts, keeping every record seen on the way.
fn until_record(
    agent: &Running,
    seen: &mut Vec<serde_json::Value>,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = agent
            .stdout
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("{what}: {e}; records: {seen:#?}"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON record");
        let done = want(&v);
        seen.push(v);
        if done {
            return;
        }
    }
}

/// Two SIGKILLs during a transfer, with a 5 s active timeout and pinned maps: the records
/// of the three agents add up exactly to the capture (what a record carried left the kernel
/// entry, so nothing is reported twice), every record has the flow's id, and a flow quiet
/// since before the first kill gets no active-timeout record from the restarted agents.
#[test]
fn two_crashes_with_active_records_out_report_nothing_twice() {
    use std::io::{Read, Write};
    let net = NetPair::new();
    let fs = Bpffs::new("kill2");
    let pins = fs.pins();
    let ifa = net.ifindex_a();
    let args = [
        &pinned(&net, &pins)[..],
        &["--active-timeout", "5s", "--idle-timeout-udp", "60s"],
    ]
    .concat();
    let mut seen = Vec::new();
    let mut first = start(&net.a, &args);
    first.wait_log("with TCX", Duration::from_secs(30));

    let cap = net
        .in_ns(&net.a, move || common::capture::Capture::open(ifa))
        .join()
        .expect("capture");
    let (a, b) = (net.v4_a, net.v4_b);
    // A flow that goes quiet right away and stays so.
    let udp = net
        .in_ns(&net.a, move || {
            let s = std::net::UdpSocket::bind(std::net::SocketAddr::new(a, 0)).expect("bind");
            for _ in 0..5 {
                s.send_to(&[3u8; 200], std::net::SocketAddr::new(b, 9))
                    .expect("send");
            }
            s.local_addr().expect("local").port()
        })
        .join()
        .expect("udp");
    // A transfer of about 16 s.
    let listener = net.listen_b(false, 0);
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut v = Vec::new();
        s.read_to_end(&mut v).expect("read");
        s.write_all(&[1u8; 1000]).expect("reply");
        v.len()
    });
    let client = net.in_ns(&net.a, move || {
        let mut c =
            std::net::TcpStream::connect(std::net::SocketAddr::new(b, port)).expect("connect");
        for _ in 0..320 {
            c.write_all(&[2u8; 10_000]).expect("send");
            std::thread::sleep(Duration::from_millis(50));
        }
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("read back");
        c.local_addr().expect("local").port()
    });
    let is_tcp = move |v: &serde_json::Value| v["protocol"] == 6 && v["server_port"] == port;
    let is_udp = move |v: &serde_json::Value| v["protocol"] == 17 && v["client_port"] == udp;
    let active = |v: &serde_json::Value| v["end_reason"] == "active_timeout";

    // Each agent dies a second after an active-timeout record of the transfer: the kill
    // never lands while a record is on its way out.
    until_record(&first, &mut seen, "the first active record", |v| {
        is_tcp(v) && active(v)
    });
    std::thread::sleep(Duration::from_secs(1));
    seen.extend(kill_and_collect(first));
    let mut second = start(&net.a, &args);
    second.wait_log("reusing pinned maps", Duration::from_secs(30));
    until_record(
        &second,
        &mut seen,
        "the second agent's active record",
        |v| is_tcp(v) && active(v),
    );
    std::thread::sleep(Duration::from_secs(1));
    seen.extend(kill_and_collect(second));
    let mut third = start(&net.a, &args);
    third.wait_log("reusing pinned maps", Duration::from_secs(30));
    let cport = client.join().expect("client");
    assert_eq!(server.join().expect("server"), 3_200_000);
    until_record(&third, &mut seen, "the transfer's final record", |v| {
        is_tcp(v) && v["end_reason"] == "tcp_fin"
    });
    let (status, out) = third.stop();
    assert!(status.success());
    seen.extend(out.iter().filter_map(|l| serde_json::from_str(l).ok()));

    let pkts = cap.drain();
    let total = |want: &dyn Fn(&serde_json::Value) -> bool, side: &str| {
        seen.iter().filter(|v| want(v)).fold((0, 0), |(n, b), v| {
            (
                n + v[side]["packets"].as_u64().expect("packets"),
                b + v[side]["bytes"].as_u64().expect("bytes"),
            )
        })
    };
    let keep = |p: &common::capture::Packet| {
        p.proto == 6 && [p.sport, p.dport].contains(&port) && [p.sport, p.dport].contains(&cport)
    };
    let tcp: Vec<_> = seen.iter().filter(|v| is_tcp(v)).collect();
    assert!(
        tcp.iter().filter(|v| active(v)).count() >= 2,
        "active records before each kill: {tcp:#?}"
    );
    assert!(
        tcp.iter().all(|v| v["flow_id"] == tcp[0]["flow_id"]),
        "one flow id: {tcp:#?}"
    );
    assert_eq!(
        total(&is_tcp, "client"),
        common::capture::sent_by(&pkts, a, keep),
        "client totals over three agents: {tcp:#?}"
    );
    assert_eq!(
        total(&is_tcp, "server"),
        common::capture::sent_by(&pkts, b, keep),
        "server totals over three agents: {tcp:#?}"
    );
    let quiet: Vec<_> = seen.iter().filter(|v| is_udp(v)).collect();
    assert_eq!(quiet.len(), 1, "the quiet flow's only record: {quiet:#?}");
    assert_eq!(quiet[0]["end_reason"], "shutdown");
    assert_eq!(quiet[0]["client"]["packets"], 5);
}

/// `v<FLOWLENS_LAYOUT_VERSION>`: where the agent pins its maps under the pin root.
fn layout_dir() -> String {
    let header = include_str!("../src/bpf/flowlens.h");
    let version = header
        .lines()
        .find_map(|l| l.strip_prefix("#define FLOWLENS_LAYOUT_VERSION "))
        .expect("the layout version in flowlens.h");
    format!("v{}", version.trim())
}

#[test]
fn every_directory_under_the_pin_root_is_checked_and_made_root_only() {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let fs = Bpffs::new("subdirs");
    let pins = fs.pins();
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    std::fs::create_dir(&pins).unwrap();
    mode(&pins, 0o755);
    let layout = format!("{pins}/{}", layout_dir());
    let links = format!("{layout}/links");
    // What flowlens makes, and something it does not know (a later version's pins).
    let later = format!("{layout}/scan");
    for dir in [&layout, &links, &later] {
        std::fs::create_dir_all(dir).unwrap();
        mode(dir, 0o700);
        chown(dir, Some(65534), None).unwrap();
        let err = run_fails(&["--pin-dir", &pins], &[]);
        assert_eq!(
            err,
            format!(
                "flowlens: pin directory {dir}: is owned by uid 65534, not root: another user \
                 could take over or move the agent's pins; remove it (`rm -r {dir}`), or pass \
                 another --pin-dir\n"
            )
        );
        chown(dir, Some(0), None).unwrap();
        mode(dir, 0o777);
        let err = run_fails(&["--pin-dir", &pins], &[]);
        assert!(
            err.contains(&format!(
                "pin directory {dir}: is writable by group or others (mode 0777)"
            )),
            "{err}"
        );
        mode(dir, 0o700);
    }
    // A symlink anywhere under the root is refused too.
    std::os::unix::fs::symlink("/tmp", format!("{links}/1-ingress")).unwrap();
    let err = run_fails(&["--pin-dir", &pins], &[]);
    assert!(
        err.contains(&format!("pin directory {links}/1-ingress: is a symlink")),
        "{err}"
    );
    std::fs::remove_file(format!("{links}/1-ingress")).unwrap();
    std::fs::remove_dir(&later).unwrap();
    std::fs::remove_dir(&links).unwrap();
    std::fs::remove_dir(&layout).unwrap();
    std::fs::remove_dir(&pins).unwrap();

    // What the agent makes is root's alone, whatever the umask.
    let net = NetPair::new();
    let mut agent = start(&net.a, &pinned(&net, &pins));
    agent.wait_log("attached to", Duration::from_secs(30));
    let links = format!("{pins}/{}/links", layout_dir());
    for dir in [&pins, &format!("{pins}/{}", layout_dir()), &links] {
        let m = std::fs::metadata(dir).expect("made by the agent");
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o700), "{dir}");
    }
    let (status, _) = agent.stop();
    assert!(status.success());
}

/// `flowlens run --check-config` with `args` and `env` (no other FLOWLENS_* variable),
/// on the host: it loads and binds nothing. Exit code and stderr.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "--check-config",
        "--interface",
        "lo",
        "--pin-dir",
        "off",
    ])
    .args(args)
    .env_remove("RUST_LOG");
    let out = common::bin::without_flowlens_env(&mut cmd)
        .envs(env.iter().copied())
        .output()
        .expect("flowlens");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn values_out_of_their_documented_range_are_refused_in_one_sentence() {
    let long_path = format!("unix:/tmp/{}", "s".repeat(103));
    let big_id = "x".repeat(100 << 10);
    // (flag, variable, value, the sentence after the flag or variable)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("--poll-interval", "FLOWLENS_POLL_INTERVAL", "1ns", " is out of range: give 10ms to 1h"),
        ("--poll-interval", "FLOWLENS_POLL_INTERVAL", "100000000000h", " is out of range: give 10ms to 1h"),
        ("--idle-timeout-tcp", "FLOWLENS_IDLE_TIMEOUT_TCP", "500ms", " is out of range: give 1s to 7days"),
        ("--idle-timeout-udp", "FLOWLENS_IDLE_TIMEOUT_UDP", "8days", " is out of range: give 1s to 7days"),
        ("--idle-timeout-icmp", "FLOWLENS_IDLE_TIMEOUT_ICMP", "100ms", " is out of range: give 1s to 7days"),
        ("--idle-timeout-other", "FLOWLENS_IDLE_TIMEOUT_OTHER", "30days", " is out of range: give 1s to 7days"),
        ("--active-timeout", "FLOWLENS_ACTIVE_TIMEOUT", "10ms", " is out of range: give 1s to 7days"),
        ("--tcp-close-grace", "FLOWLENS_TCP_CLOSE_GRACE", "2h", " is out of range: give 100ms to 1h"),
        ("--scan-threads", "FLOWLENS_SCAN_THREADS", "65", " is out of range: give 1 to 64"),
        ("--max-tcp-flows", "FLOWLENS_MAX_TCP_FLOWS", "16777217", " is out of range: give 1 to 16777216"),
        ("--grpc-max-connections", "FLOWLENS_GRPC_MAX_CONNECTIONS", "0", " is out of range: give 1 to 1048576"),
        ("--grpc-handshake-timeout", "FLOWLENS_GRPC_HANDSHAKE_TIMEOUT", "5m", " is out of range: give 1s to 1m"),
        ("--grpc-max-request-size", "FLOWLENS_GRPC_MAX_REQUEST_SIZE", "10", " is out of range: give 1024 to 67108864"),
        ("--grpc-keepalive-timeout", "FLOWLENS_GRPC_KEEPALIVE_TIMEOUT", "1h", " is out of range: give 1s to 10m"),
        ("--ipfix-mtu", "FLOWLENS_IPFIX_MTU", "575", " is out of range: give 576 to 65535"),
        ("--grpc-socket-group", "FLOWLENS_GRPC_SOCKET_GROUP", "4294967295", ": no such group \"4294967295\" on this host (`getent group` lists them)"),
        ("--grpc-listen", "FLOWLENS_GRPC_LISTEN", &long_path, ": the socket path is 108 bytes, and a unix socket's holds at most 107; use a shorter one"),
        ("--observer-id", "FLOWLENS_OBSERVER_ID", "rack1\nhost3", ": contains the control character '\\n'; use printable characters"),
        ("--observer-id", "FLOWLENS_OBSERVER_ID", &big_id, ": is 102400 bytes; an observer id has at most 255"),
    ];
    for (flag, var, value, why) in cases {
        let shown = format!("{value:?}");
        let (code, err) = check_config(&[flag, value], &[]);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        assert_eq!(err, format!("flowlens: {flag} {shown}{why}\n"));
        let (code, err) = check_config(&[], &[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {err}");
        assert_eq!(err, format!("flowlens: {var}={shown} ({flag}){why}\n"));
    }
    // Both ends of a range are in it.
    for (flag, value) in [
        ("--poll-interval", "10ms"),
        ("--poll-interval", "1h"),
        ("--idle-timeout-tcp", "7days"),
    ] {
        let (code, err) = check_config(&[flag, value], &[]);
        assert_eq!(code, Some(0), "{flag} {value}: {err}");
    }

    // Settings that nothing would use.
    let (code, err) = check_config(
        &["--grpc-listen", "off", "--grpc-tls-cert", "/missing.pem"],
        &[],
    );
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        "flowlens: --grpc-tls-cert is set but --grpc-listen is off: nothing would use it; give \
         --grpc-listen, or drop --grpc-tls-cert\n"
    );
    let (_, err) = check_config(
        &["--grpc-listen", "off"],
        &[("FLOWLENS_GRPC_CLIENT_CA", "/ca.pem")],
    );
    assert!(
        err.contains("--grpc-client-ca is set but --grpc-listen is off"),
        "{err}"
    );
    // Metrics for other hosts only when asked for.
    let (code, err) = check_config(&["--metrics-listen", "0.0.0.0:9464"], &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--metrics-listen 0.0.0.0:9464: refusing to serve the metrics in cleartext"),
        "{err}"
    );
    let (code, err) = check_config(
        &["--metrics-listen", "0.0.0.0:9464", "--metrics-allow-remote"],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn booleans_from_the_environment_take_the_usual_forms() {
    // Each form of each switch that changes whether check-config passes.
    let truthy = ["1", "true", "yes", "TRUE", "Yes"];
    let falsy = ["0", "false", "no", "NO"];
    for (var, args) in [
        (
            "FLOWLENS_GRPC_ALLOW_INSECURE",
            &["--grpc-listen", "0.0.0.0:50051"],
        ),
        (
            "FLOWLENS_METRICS_ALLOW_REMOTE",
            &["--metrics-listen", "0.0.0.0:9464"],
        ),
    ] {
        for form in truthy {
            let (code, err) = check_config(args, &[(var, form)]);
            assert_eq!(code, Some(0), "{var}={form}: {err}");
        }
        for form in falsy {
            let (code, err) = check_config(args, &[(var, form)]);
            assert_eq!(code, Some(1), "{var}={form}: {err}");
            assert!(err.contains("refusing to serve"), "{var}={form}: {err}");
        }
    }
    // Every other switch reads them too (the clients' as well), and names itself otherwise.
    for var in ["FLOWLENS_WIDE", "FLOWLENS_LEGEND"] {
        for form in truthy.iter().chain(&falsy) {
            let (code, err) = check_config(&[], &[(var, form)]);
            assert_eq!(code, Some(0), "{var}={form}: {err}");
        }
        let (code, err) = check_config(&[], &[(var, "maybe")]);
        assert_eq!(code, Some(2));
        assert!(
            err.starts_with(&format!("error: environment variable {var}: ")),
            "{err}"
        );
    }
    let out = Command::new(BIN)
        .args(["watch", "--server", "unix:/nonexistent/flowlens.sock"])
        .env("FLOWLENS_WATCH_JSON", "yes")
        .env("FLOWLENS_WATCH_NO_FOLLOW", "1")
        .output()
        .expect("watch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "parsed, then no agent: {err}");
    assert!(err.contains("no flowlens agent"), "{err}");
}

#[test]
fn libbpf_speaks_through_the_agent_log_at_debug_level() {
    let net = NetPair::new();
    let log_of = |args: &[&str]| -> Vec<String> {
        let mut agent = start(&net.a, args);
        agent.wait_log("attached to", Duration::from_secs(30));
        let lines: Vec<String> = agent.err_seen.drain(..).collect();
        let (status, _) = agent.stop();
        assert!(status.success());
        lines
    };
    let quiet = log_of(&["--interface", &net.if_a]);
    let libbpf: Vec<&String> = quiet.iter().filter(|l| l.contains("libbpf")).collect();
    assert!(libbpf.is_empty(), "at info level: {libbpf:#?}");
    let verbose = log_of(&["--interface", &net.if_a, "--log-level", "debug"]);
    let libbpf: Vec<&String> = verbose.iter().filter(|l| l.contains("libbpf")).collect();
    assert!(!libbpf.is_empty(), "libbpf says something while loading");
    for l in libbpf {
        assert!(l.contains(" DEBUG libbpf] "), "not through the logger: {l}");
    }
}

/// `run --check-config` with `args`: exit code and stdout (what would run).
fn check_config_out(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "--check-config",
        "--interface",
        "lo",
        "--pin-dir",
        "off",
    ])
    .args(args)
    .env_remove("RUST_LOG");
    let out = common::bin::without_flowlens_env(&mut cmd)
        .output()
        .expect("flowlens");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn extension_capacities_follow_max_flows_and_a_lower_setting_is_warned() {
    let (code, out) = check_config_out(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("maps           65536 flows, 16384 TCP, 4096 ICMP"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");
    let (code, out) = check_config_out(&["--max-flows", "200000"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("maps           200000 flows, 50000 TCP, 12500 ICMP"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");
    // Explicit settings above what --max-flows implies are taken as they are.
    let (_, out) = check_config_out(&["--max-flows", "1000", "--max-tcp-flows", "1000"]);
    assert!(
        out.contains("maps           1000 flows, 1000 TCP, 62 ICMP"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");
    // Below: said, per map, with what it costs.
    let (code, out) = check_config_out(&[
        "--max-flows",
        "200000",
        "--max-tcp-flows",
        "32768",
        "--max-icmp-flows",
        "8192",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "warning        --max-tcp-flows 32768 is below the 50000 that --max-flows 200000 \
             implies: TCP flows beyond 32768 at once get no latency samples"
        ),
        "{out}"
    );
    assert!(
        out.contains("--max-icmp-flows 8192 is below the 12500 that --max-flows 200000 implies"),
        "{out}"
    );
}
