//! The `flowlens` binary run in a test namespace: its stdout records and stderr log as line streams.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

pub const BIN: &str = env!("CARGO_BIN_EXE_flowlens");

pub struct Running {
    pub child: Child,
    pub stdout: Receiver<String>,
    pub stderr: Receiver<String>,
    pub err_seen: Vec<String>,
}

pub fn lines(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

/// `cmd` without the `FLOWLENS_*` variables of the test's own environment.
pub fn without_flowlens_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOWLENS_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Starts `flowlens run` in namespace `ns`; unless `args` say otherwise it
/// pins nothing and serves no gRPC, so parallel tests never share state.
pub fn start(ns: &str, args: &[&str]) -> Running {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        BIN,
        "run",
        "--output",
        "json",
        "--poll-interval",
        "200ms",
    ]);
    for (flag, off) in [("--pin-dir", "off"), ("--grpc-listen", "off")] {
        if !args.contains(&flag) {
            cmd.args([flag, off]);
        }
    }
    let mut child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowlens");
    let stdout = lines(child.stdout.take().expect("stdout"));
    let stderr = lines(child.stderr.take().expect("stderr"));
    Running {
        child,
        stdout,
        stderr,
        err_seen: Vec::new(),
    }
}

impl Running {
    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.err_seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle:?}; got {:#?}",
                self.err_seen
            );
            if let Ok(l) = self.stderr.recv_timeout(left) {
                self.err_seen.push(l);
            }
        }
    }

    /// The first JSON record on stdout that `want` accepts.
    pub fn record(
        &self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self
                .stdout
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let v: serde_json::Value = serde_json::from_str(&l).expect("a JSON record");
            if want(&v) {
                return v;
            }
        }
    }

    /// SIGTERM, then the exit status and every stdout line.
    pub fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        (status, self.stdout.iter().collect())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
