//! `flowlens top` as a person sees it: in tmux, against an agent in the test's namespaces, with a paced transfer whose rate it must show.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
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
    fn start(cols: u16, rows: u16) -> Tmux {
        if Command::new("tmux").arg("-V").output().is_err() {
            let ok = Command::new("sh")
                .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "tmux is missing and could not be installed");
        }
        let t = Tmux {
            socket: format!("flowlens-top-test-{}", std::process::id()),
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
            "env -i TERM=xterm-256color PATH=/usr/bin:/bin sh",
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

/// "1.0M/s" or "993K/s" in bytes per second.
fn parse_rate(s: &str) -> Option<f64> {
    let v = s.strip_suffix("/s")?;
    let (num, mult) = match v.chars().last()? {
        'B' => (&v[..v.len() - 1], 1.0),
        'K' => (&v[..v.len() - 1], 1024.0),
        'M' => (&v[..v.len() - 1], 1024.0 * 1024.0),
        'G' => (&v[..v.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => return None,
    };
    Some(num.parse::<f64>().ok()? * mult)
}

/// The first flow row under the column header: (client, server, rate in bytes/s).
fn top_row(screen: &str) -> Option<(String, String, Option<f64>)> {
    let mut lines = screen
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("PROTO"));
    lines.next()?;
    let cols: Vec<&str> = lines.next()?.split_whitespace().collect();
    // PROTO CLIENT SERVER IFACE STATE RATE ...
    Some((
        cols.get(1)?.to_string(),
        cols.get(2)?.to_string(),
        parse_rate(cols.get(5)?),
    ))
}

#[test]
fn top_shows_a_paced_transfer_on_top_at_its_rate_and_q_restores_the_terminal() {
    let net = NetPair::new();
    let sock = format!("/tmp/flowlens-top-test-{}.sock", std::process::id());
    let listen = format!("unix:{sock}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &net.a, BIN])
        .args(["run", "--interface", &net.if_a])
        .args(["--grpc-listen", &listen, "--metrics-listen", "off"])
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
    let mut err = child.stderr.take().expect("stderr");
    let agent = Agent(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::path::Path::new(&sock).exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never listened on {sock}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::spawn(move || {
        // Drained so the agent never blocks on a full stderr pipe.
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });

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
        s.contains("sorted by total bytes")
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
