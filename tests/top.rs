//! `flowlens top` as a person sees it: in tmux, against an agent in the test's namespaces, with a paced transfer whose rate it must show.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::netns::NetPair;

const BIN: &str = env!("CARGO_BIN_EXE_flowlens");
/// The transfer: CHUNK bytes every TICK, 1 MB/s of payload.
const CHUNK: usize = 10_000;
const TICK: Duration = Duration::from_millis(10);
const TRANSFER: Duration = Duration::from_secs(14);

/// A tmux server of the test's own (its own socket), killed on drop even on panic.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// A tmux server whose one pane runs a shell.
    fn start(cols: u16, rows: u16) -> Tmux {
        Tmux::start_with(
            cols,
            rows,
            "env -i TERM=xterm-256color PATH=/usr/bin:/bin sh",
        )
    }

    /// A tmux server whose one pane runs `command`.
    fn start_with(cols: u16, rows: u16, command: &str) -> Tmux {
        if Command::new("tmux").arg("-V").output().is_err() {
            let ok = Command::new("sh")
                .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "tmux is missing and could not be installed");
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let t = Tmux {
            socket: format!(
                "flowlens-top-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ),
        };
        t.cmd(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            command,
        ]);
        t
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "top"])
    }

    fn alternate_screen(&self) -> bool {
        self.cmd(&["display-message", "-p", "-t", "top", "#{alternate_on}"])
            .trim()
            == "1"
    }

    fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

struct Agent(Child);

impl Agent {
    /// `flowlens run` on the pair's veth in namespace a, serving gRPC on the unix socket
    /// `sock`; returns once it listens.
    fn start(net: &NetPair, sock: &str) -> Agent {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.a, BIN])
            .args(["run", "--interface", &net.if_a])
            .args([
                "--grpc-listen",
                &format!("unix:{sock}"),
                "--metrics-listen",
                "off",
            ])
            .args([
                "--pin-dir",
                "off",
                "--output",
                "none",
                "--poll-interval",
                "500ms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn flowlens run");
        let err = child.stderr.take().expect("stderr");
        let agent = Agent(child);
        // The agent listens before it attaches: traffic sent before "monitoring" would
        // miss its first packets (a handshake, so client and server would come out
        // swapped). The rest of stderr is drained, so the agent never blocks on the pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("monitoring ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(15))
            .expect("the agent never attached to its interface");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !std::path::Path::new(sock).exists() {
            assert!(
                Instant::now() < deadline,
                "the agent never listened on {sock}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// "1.0MB/s", "993KB/s" or "840B/s" in bytes per second.
fn parse_rate(s: &str) -> Option<f64> {
    let v = s.strip_suffix("B/s")?;
    let (num, mult) = match v.chars().last()? {
        'K' => (&v[..v.len() - 1], 1024.0),
        'M' => (&v[..v.len() - 1], 1024.0 * 1024.0),
        'G' => (&v[..v.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => (v, 1.0),
    };
    Some(num.parse::<f64>().ok()? * mult)
}

/// The first flow row under the column header: (client, server, rate in bytes/s).
fn top_row(screen: &str) -> Option<(String, String, Option<f64>)> {
    let mut lines = screen
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("PROTO"));
    // PROTO CLIENT SERVER IFACE [UNIT] STATE RATE ...: RATE where the header puts it.
    let rate = lines
        .next()?
        .split_whitespace()
        .position(|t| t.trim_end_matches(['▼', '▲']) == "RATE")?;
    let cols: Vec<&str> = lines.next()?.split_whitespace().collect();
    Some((
        cols.get(1)?.to_string(),
        cols.get(2)?.to_string(),
        parse_rate(cols.get(rate)?),
    ))
}

#[test]
fn top_shows_a_paced_transfer_on_top_at_its_rate_and_q_restores_the_terminal() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-top-test-{}-rate.sock", std::process::id());
    let listen = format!("unix:{sock}");
    let agent = Agent::start(&net, &sock);

    let tmux = Tmux::start(160, 40);
    tmux.send(&[
        &format!("{BIN} top --server {listen} --interval 500ms; echo TOP-EXIT=$?"),
        "Enter",
    ]);
    tmux.wait_for("the top screen", Duration::from_secs(10), |s| {
        s.contains("flowlens top") && s.contains("PROTO")
    });
    assert!(tmux.alternate_screen(), "top uses the alternate screen");

    // A background flow with more bytes in total but no rate to speak of.
    let listener = net.listen_b(false, 0);
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        for conn in listener.incoming().take(2) {
            let mut s = conn.expect("accept");
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while s.read(&mut buf).is_ok_and(|k| k > 0) {}
            });
        }
    });
    let b = net.v4_b;
    let idle = net.in_ns(&net.a, move || {
        let mut c = TcpStream::connect(SocketAddr::new(b, port)).expect("connect");
        c.write_all(&vec![1u8; 30_000_000]).expect("burst");
        std::thread::sleep(TRANSFER);
    });
    std::thread::sleep(Duration::from_millis(500));
    let paced = net.in_ns(&net.a, move || {
        let mut c = TcpStream::connect(SocketAddr::new(b, port)).expect("connect");
        let local = c.local_addr().expect("local").port();
        let chunk = vec![2u8; CHUNK];
        let start = Instant::now();
        let mut next = start;
        let mut sent = 0usize;
        while start.elapsed() < TRANSFER {
            c.write_all(&chunk).expect("send");
            sent += CHUNK;
            next += TICK;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (local, sent as f64 / start.elapsed().as_secs_f64())
    });

    // Read the screen as a person would: the paced flow comes to the top with a rate.
    let want_server = format!("{b}:{port}");
    let mut rates = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut last = String::new();
    while rates.len() < 6 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = tmux.screen();
        if let Some((_, server, Some(rate))) = top_row(&last) {
            if server == want_server && rate > 0.0 {
                rates.push(rate);
            }
        }
    }
    assert!(
        rates.len() >= 3,
        "the transfer never stayed on top:\n{last}"
    );
    eprintln!("top showed {rates:?} B/s; screen:\n{last}");
    let (paced_port, sent_rate) = paced.join().expect("paced sender");
    idle.join().expect("idle sender");
    rates.sort_by(f64::total_cmp);
    let shown = rates[rates.len() / 2];
    let off = (shown - sent_rate).abs() / sent_rate;
    assert!(
        off < 0.2,
        "top shows {shown:.0} B/s (median of {rates:?}), the sender sent {sent_rate:.0} B/s:\n{last}"
    );

    // Sorting by total bytes puts the burst, the bigger flow, first.
    tmux.send(&["t"]);
    let s = tmux.wait_for("sorted by total bytes", Duration::from_secs(5), |s| {
        s.contains("sort: total bytes")
    });
    let (client, _, _) = top_row(&s).expect("a flow row");
    assert!(
        !client.ends_with(&format!(":{paced_port}")),
        "the burst is first by total bytes:\n{s}"
    );

    // q leaves the alternate screen and the raw mode; the shell prompt is back.
    tmux.send(&["q"]);
    // The typed command line holds "TOP-EXIT=$?" too: look only at the echo's output.
    let exit_line = |s: &str| {
        s.lines()
            .find(|l| l.contains("TOP-EXIT=") && !l.contains("echo"))
            .map(str::to_owned)
    };
    let s = tmux.wait_for("top to exit", Duration::from_secs(5), |s| {
        exit_line(s).is_some()
    });
    assert!(
        exit_line(&s).is_some_and(|l| l.ends_with("TOP-EXIT=0")),
        "{s}"
    );
    assert!(!tmux.alternate_screen(), "the alternate screen is left");
    tmux.send(&[
        "stty -a | tr ' ;' '\\n\\n' | grep -x -- '-*icanon'",
        "Enter",
    ]);
    let s = tmux.wait_for("stty output", Duration::from_secs(5), |s| {
        s.lines()
            .any(|l| l.trim() == "icanon" || l.trim() == "-icanon")
    });
    assert!(
        s.lines().any(|l| l.trim() == "icanon"),
        "the terminal is back in canonical mode:\n{s}"
    );
    drop(tmux);
    drop(agent);
    let _ = server.join();
    let _ = std::fs::remove_file(&sock);
}

/// CPU ticks (user + system) a process has used, from /proc/PID/stat; None once it is gone.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Whether a process is gone or has exited (a zombie waiting for its parent).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The pid of the process running in the tmux pane.
fn pane_pid(tmux: &Tmux) -> u32 {
    tmux.cmd(&["list-panes", "-t", "top", "-F", "#{pane_pid}"])
        .trim()
        .parse()
        .expect("pane pid")
}

/// `flowlens top` as the pane's own process, as in a tmux window or an ssh session.
fn top_in_pane(sock: &str) -> Tmux {
    let tmux = Tmux::start_with(
        100,
        24,
        &format!("exec env TERM=xterm-256color {BIN} top --server unix:{sock} --interval 500ms"),
    );
    tmux.wait_for("the top screen", Duration::from_secs(10), |s| {
        s.contains("flowlens top") && s.contains("PROTO")
    });
    tmux
}

#[test]
fn top_ends_within_a_second_of_its_terminal_going_away() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-top-test-{}-hup.sock", std::process::id());
    let agent = Agent::start(&net, &sock);
    let tmux = top_in_pane(&sock);
    let pid = pane_pid(&tmux);
    tmux.cmd(&["kill-session", "-t", "top"]);
    let killed = Instant::now();
    while !exited(pid) && killed.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    let spinning = cpu_ticks(pid);
    if !exited(pid) {
        // SAFETY: killing the process the test's tmux started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(
        took < Duration::from_secs(1),
        "top still ran {took:?} after its terminal went away (cpu ticks {spinning:?})"
    );
    drop(agent);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn top_and_watch_reconnect_stay_quiet_while_their_agent_is_stopped() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-top-test-{}-quiet.sock", std::process::id());
    let agent = Agent::start(&net, &sock);
    let tmux = top_in_pane(&sock);
    let top = pane_pid(&tmux);
    let mut watch = Command::new(BIN)
        .args(["watch", "--reconnect", "--server", &format!("unix:{sock}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flowlens watch");
    std::thread::sleep(Duration::from_secs(1));
    drop(agent);
    let _ = std::fs::remove_file(&sock);
    // Both notice the agent is gone, then wait for it.
    std::thread::sleep(Duration::from_secs(2));
    let before = [cpu_ticks(top), cpu_ticks(watch.id())];
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let after = [cpu_ticks(top), cpu_ticks(watch.id())];
    let secs = started.elapsed().as_secs_f64();
    let _ = watch.kill();
    let _ = watch.wait();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for (name, (b, a)) in ["top", "watch --reconnect"]
        .iter()
        .zip(before.iter().zip(after.iter()))
    {
        let (Some(b), Some(a)) = (b, a) else {
            panic!("{name} exited while its agent was stopped");
        };
        let share = (a - b) as f64 / hz / secs;
        eprintln!("{name}: {:.2} % of a CPU over {secs:.1} s", share * 100.0);
        assert!(
            share < 0.01,
            "{name} used {:.2} % of a CPU over {secs:.1} s with its agent stopped",
            share * 100.0
        );
    }
    drop(tmux);
}

/// Endpoints as a cell may show them: whole, or cut in the middle around "…".
fn shows(cell: &str, endpoint: &str) -> bool {
    if cell == endpoint {
        return true;
    }
    let Some((head, tail)) = cell.split_once('…') else {
        return false;
    };
    !head.is_empty() && !tail.is_empty() && endpoint.starts_with(head) && endpoint.ends_with(tail)
}

/// A number with its unit: rates in B/s or b/s with a multiplier, sizes, durations.
fn has_unit(cell: &str) -> bool {
    let num = |s: &str| !s.is_empty() && s.parse::<f64>().is_ok();
    for unit in [
        "KB/s", "MB/s", "GB/s", "TB/s", "B/s", "kb/s", "Mb/s", "Gb/s", "Tb/s", "b/s", "KB", "MB",
        "GB", "TB", "B", "ns", "µs", "ms", "s", "d", "h",
    ] {
        if let Some(n) = cell.strip_suffix(unit) {
            if num(n) {
                return true;
            }
        }
    }
    // Packet rates ("120/s", "12k/s") and compound durations ("9m59s", "3h7m").
    let compact = |s: &str| {
        let s = s.trim_end_matches(['k', 'M', 'G']);
        num(s)
    };
    cell.strip_suffix("/s").is_some_and(compact)
        || cell.chars().next().is_some_and(|c| c.is_ascii_digit())
            && cell
                .chars()
                .all(|c| c.is_ascii_digit() || "mhds".contains(c))
}

#[test]
fn top_reads_at_80_100_and_200_columns_with_ipv4_and_ipv6_flows() {
    let net = NetPair::new();
    // Who owns the flows' local sockets: this process (its name), or the unit or cgroup
    // the agent names where it sees a cgroup v2 hierarchy.
    let comm = std::fs::read_to_string("/proc/self/comm")
        .expect("comm")
        .trim()
        .to_owned();
    let unit_named = |cell: &str| cell.starts_with('/') || cell.contains('.');
    // Long IPv6 addresses of a /64 of the test's own, beside the pair's short ones.
    let subnet = match net.v4_a {
        std::net::IpAddr::V4(a) => a.octets()[2],
        _ => unreachable!(),
    };
    let long = |host: u16| -> std::net::IpAddr {
        std::net::Ipv6Addr::new(
            0xfd00,
            0x100 + u16::from(subnet),
            0xabcd,
            0xef01,
            0x2345,
            0x6789,
            0xabcd,
            host,
        )
        .into()
    };
    for (ns, ifc, host) in [(&net.a, &net.if_a, 1), (&net.b, &net.if_b, 2)] {
        common::netns::sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/64", long(host)),
            "dev",
            ifc,
            "nodad",
        ]);
    }
    let sock = format!("/tmp/flowlens-top-test-{}-widths.sock", std::process::id());
    let agent = Agent::start(&net, &sock);

    // Three connections, each trickling 1 KB every 50 ms so every rate has a value: IPv4,
    // IPv6 on the pair's addresses, IPv6 on the long ones.
    let mut endpoints = Vec::new();
    let mut senders = Vec::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (client, server) in [
        (net.v4_a, net.v4_b),
        (net.v6_a, net.v6_b),
        (long(1), long(2)),
    ] {
        let listener = net
            .in_ns(&net.b, move || {
                std::net::TcpListener::bind(SocketAddr::new(server, 0)).expect("bind")
            })
            .join()
            .expect("listener");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; 65_536];
            while s.read(&mut buf).is_ok_and(|k| k > 0) {}
        });
        let stop = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        senders.push(net.in_ns(&net.a, move || {
            let c = std::net::TcpStream::connect(SocketAddr::new(server, port)).expect("connect");
            let _ = tx.send(c.local_addr().expect("local").port());
            let mut c = c;
            while !stop.load(Ordering::SeqCst) {
                if c.write_all(&[3u8; 1000]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        let cport = rx.recv().expect("client port");
        let show = |a: std::net::IpAddr, p: u16| match a {
            std::net::IpAddr::V4(_) => format!("{a}:{p}"),
            std::net::IpAddr::V6(_) => format!("[{a}]:{p}"),
        };
        endpoints.push((show(client, cport), show(server, port)));
        let _ = client;
    }

    let tmux = Tmux::start_with(
        200,
        30,
        &format!("exec env TERM=xterm-256color {BIN} top --server unix:{sock} --interval 500ms"),
    );
    let mut report = String::new();
    for width in [200u16, 100, 80] {
        tmux.cmd(&[
            "resize-window",
            "-t",
            "top",
            "-x",
            &width.to_string(),
            "-y",
            "30",
        ]);
        // Every connection on screen with a rate.
        let screen = tmux.wait_for(
            &format!("three flows with rates at {width} columns"),
            Duration::from_secs(15),
            |s| {
                let rows: Vec<&str> = s
                    .lines()
                    .filter(|l| l.starts_with("tcp "))
                    .filter(|l| l.contains("B/s"))
                    .collect();
                // Laid out for this width: the header holds whole column titles, and no
                // column without every one that gives way after it (a screen drawn for a
                // wider pane, cut at the pane's edge, keeps C>S and loses BYTES). UNIT is
                // left out while no flow has a local socket.
                let keep_order = [
                    "CLIENT", "SERVER", "RATE", "PROTO", "STATE", "BYTES", "AGE", "C>S", "S>C",
                    "UNIT", "RTT", "PKT/s", "SRV", "IFACE",
                ];
                let shown: Vec<&str> = s
                    .lines()
                    .find(|l| l.trim_start().starts_with("PROTO"))
                    .map(|h| {
                        h.split_whitespace()
                            .map(|t| t.trim_end_matches(['▼', '▲']))
                            .collect()
                    })
                    .unwrap_or_default();
                let laid_out = shown.iter().all(|t| keep_order.contains(t))
                    && keep_order.iter().enumerate().all(|(i, t)| {
                        !shown.contains(t)
                            || keep_order[..i]
                                .iter()
                                .all(|before| *before == "UNIT" || shown.contains(before))
                    });
                rows.len() >= 3 && laid_out
            },
        );
        report.push_str(&format!("--- {width} columns ---\n{screen}\n"));
        let header = screen
            .lines()
            .find(|l| l.trim_start().starts_with("PROTO"))
            .expect("column header");
        let cols: Vec<&str> = header.split_whitespace().collect();
        for (client, server) in &endpoints {
            let row = screen
                .lines()
                .find(|l| {
                    let c: Vec<&str> = l.split_whitespace().collect();
                    c.len() > 2 && shows(c[1], client) && shows(c[2], server)
                })
                .unwrap_or_else(|| panic!("{client} > {server} at {width} columns:\n{screen}"));
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(
                cells.len(),
                cols.len(),
                "a cell per column:\n{header}\n{row}"
            );
            for (title, cell) in cols.iter().zip(&cells).skip(3) {
                match title.trim_end_matches(['▼', '▲']) {
                    "IFACE" | "STATE" => continue,
                    // The test's own sockets, in namespace a: this process, by its name (a
                    // host without cgroup v2 names no unit).
                    "UNIT" => {
                        assert!(
                            comm.starts_with(cell.trim_end_matches('…')) || unit_named(cell),
                            "UNIT {cell:?}, not this process ({comm}) at {width} columns:\n{screen}"
                        );
                        continue;
                    }
                    _ => {}
                }
                assert!(
                    *cell == "-" || has_unit(cell),
                    "{title} {cell:?} without its unit at {width} columns:\n{screen}"
                );
            }
            if width == 200 {
                assert!(
                    row.contains(client.as_str()) && row.contains(server.as_str()),
                    "whole at 200:\n{row}"
                );
            }
        }
        let expect: &[&str] = match width {
            200 => &["IFACE", "UNIT", "PKT/s", "SRV", "C>S", "S>C"],
            100 => &["C>S", "S>C", "BYTES", "AGE"],
            _ => &["RATE▼", "BYTES", "AGE", "STATE"],
        };
        for c in expect {
            assert!(cols.contains(c), "{c} at {width} columns:\n{header}");
        }
    }
    eprintln!("{report}");
    // The long IPv6 address was whole at 200 columns and shortened, not cut, at 80.
    assert!(report.contains('…'), "{report}");
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        let _ = s.join();
    }
    drop(tmux);
    drop(agent);
    let _ = std::fs::remove_file(&sock);
}
