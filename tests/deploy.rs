//! systemd deployment: the unit verifies, the env file matches the flags, and the binary runs with only the unit's capabilities.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::netns::{ifindex_in, sh, sh_out, tcx_count, Bpffs};
use crossbeam_channel::Receiver;

const BIN: &str = env!("CARGO_BIN_EXE_flowlens");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// Where `make install` puts the binary (PREFIX=/usr/local), as the unit's ExecStart names it.
const INSTALLED_BIN: &str = "/usr/local/bin/flowlens";
/// Variables the env file may list before `flowlens run` reads them.
const PENDING_VARS: &[&str] = &[];

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("deploy/flowlens.service"))
        .expect("deploy/flowlens.service")
}

/// Values of `key=` in the unit (one per occurrence).
fn directive(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// Installs Debian package `pkg` when `bin` is not on PATH (CI machines start bare).
fn ensure_tool(bin: &str, pkg: &str) {
    static APT: Mutex<()> = Mutex::new(());
    let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
    if in_path(bin) {
        return;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        sh(&["apt-get", "update", "-qq"]);
        assert!(install(), "apt-get install {pkg} failed");
    }
    assert!(in_path(bin), "{bin} still missing after installing {pkg}");
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The unit in a temp dir, with ExecStart pointing at the freshly built binary.
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = unit_text();
    let exec = directive(&unit, "ExecStart");
    assert_eq!(exec, [format!("{INSTALLED_BIN} run")], "ExecStart");
    let path = dir.join("flowlens.service");
    std::fs::write(&path, unit.replace(INSTALLED_BIN, BIN)).expect("write unit copy");
    path
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    ensure_tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let report = text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{report}"
    );
    // Unknown keys and bad values are only warnings ("..., ignoring"): treat them as errors.
    let ours: Vec<&str> = report.lines().filter(|l| l.contains("flowlens")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warnings:\n{report}"
    );

    // The sandbox keeps its exposure low (systemd >= 250 scores offline).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let report = text(&out);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("flowlens.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{report}"));
    assert!(score <= 5.0, "exposure {score}:\n{report}");
}

#[test]
fn unit_settings() {
    let unit = unit_text();
    let one = |key: &str| {
        let v = directive(&unit, key);
        assert_eq!(v.len(), 1, "{key}= must appear once: {v:?}");
        v[0].clone()
    };
    assert_eq!(one("EnvironmentFile"), "-/etc/default/flowlens");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("RuntimeDirectory"), "flowlens");
    assert_eq!(one("RuntimeDirectoryMode"), "0755");
    assert_eq!(one("LimitMEMLOCK"), "infinity");
    assert_eq!(one("LimitNOFILE"), "16384");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("WantedBy"), "multi-user.target");
    let caps = |key: &str| -> BTreeSet<String> {
        one(key).split_whitespace().map(str::to_owned).collect()
    };
    let want: BTreeSet<String> = [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_PERFMON",
        "CAP_SYS_RESOURCE",
    ]
    .map(String::from)
    .into();
    assert_eq!(caps("CapabilityBoundingSet"), want);
    assert_eq!(caps("AmbientCapabilities"), want);
    // The Makefile installs the binary where ExecStart looks for it.
    let makefile = std::fs::read_to_string(Path::new(ROOT).join("Makefile")).expect("Makefile");
    assert!(makefile.contains("PREFIX ?= /usr/local"));
    assert!(makefile.contains("$(DESTDIR)$(PREFIX)/bin/flowlens"));
    assert!(
        makefile.contains("deploy/flowlens.service $(DESTDIR)/etc/systemd/system/flowlens.service")
    );
    assert!(makefile.contains("deploy/flowlens.env $(DESTDIR)/etc/default/flowlens"));
}

#[test]
fn env_file_lists_every_run_flag_with_its_default() {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--help"]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOWLENS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("flowlens run --help");
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    // (variable, default) for every flag, from clap's `[env: X=] [default: Y]`.
    let mut flags: Vec<(String, Option<String>)> = Vec::new();
    let chunks: Vec<&str> = help.split("[env: ").skip(1).collect();
    for chunk in &chunks {
        let var = chunk.split(['=', ']']).next().unwrap_or("").to_owned();
        let default = chunk
            .split_once("[default: ")
            .map(|(_, d)| d.split(']').next().unwrap_or("").to_owned());
        flags.push((var, default));
    }
    assert!(flags.len() >= 18, "too few env vars in help:\n{help}");

    // The unit's Environment= settings are the service's defaults.
    let unit = unit_text();
    let unit_env: Vec<(String, String)> = directive(&unit, "Environment")
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(
        unit_env,
        [("FLOWLENS_OUTPUT".to_owned(), "none".to_owned())],
        "the service prints no record into the journal"
    );
    for (var, default) in flags.iter_mut() {
        if let Some((_, v)) = unit_env.iter().find(|(k, _)| k == var) {
            *default = Some(v.clone());
        }
    }
    let env = std::fs::read_to_string(Path::new(ROOT).join("deploy/flowlens.env"))
        .expect("deploy/flowlens.env");
    let mut listed: Vec<(String, String)> = Vec::new();
    for line in env.lines() {
        let l = line.trim();
        assert!(
            l.is_empty() || l.starts_with('#'),
            "every setting must be commented out: {line:?}"
        );
        if let Some((k, v)) = l.trim_start_matches('#').split_once('=') {
            if k.starts_with("FLOWLENS_") && !k.contains(' ') {
                listed.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    for (var, default) in &flags {
        let vals: Vec<&String> = listed
            .iter()
            .filter(|(k, _)| k == var)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            vals.len(),
            1,
            "{var} must be listed once in deploy/flowlens.env"
        );
        match default {
            Some(d) => assert_eq!(vals[0], d, "{var}: env file and flag default differ"),
            // Without a default the line is `VAR=`: uncommented as shipped, it changes
            // nothing (an empty variable is an unset one); examples go in the comments.
            None => assert!(
                vals[0].is_empty() || vals[0] == "false",
                "{var} has no default: list it as `#{var}=` (`false` for a switch)"
            ),
        }
    }
    for (k, _) in &listed {
        assert!(
            flags.iter().any(|(v, _)| v == k) || PENDING_VARS.contains(&k.as_str()),
            "deploy/flowlens.env lists {k}, which `flowlens run` does not read"
        );
    }
}

// ---------------------------------------------------------------------------
// Running with the unit's capabilities
// ---------------------------------------------------------------------------

/// Capability numbers (linux/capability.h) of the names the unit may use.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("add {other} to cap_number"),
    }
}

fn proc_caps(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(":"))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("cap mask")
}

/// The unit's capabilities this machine can grant (a container may lack some), as
/// (names, mask).
fn unit_caps() -> (Vec<String>, u64) {
    let unit = unit_text();
    let bounding = proc_caps(std::process::id(), "CapBnd");
    let mut names = Vec::new();
    let mut mask = 0;
    for cap in directive(&unit, "CapabilityBoundingSet")[0].split_whitespace() {
        let bit = 1u64 << cap_number(cap);
        if bounding & bit == 0 {
            eprintln!("note: this machine cannot grant {cap}; testing without it");
            continue;
        }
        names.push(cap.to_owned());
        mask |= bit;
    }
    (names, mask)
}

/// A network namespace with its loopback up, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("fldep{}{tag}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Nothing of ours (TCX link or TC filter) is attached to its loopback.
    fn assert_lo_clean(&self) {
        let lo = ifindex_in(&self.0, "lo");
        assert_ne!(lo, 0, "no lo in {}", self.0);
        for t in [libbpf_sys::BPF_TCX_INGRESS, libbpf_sys::BPF_TCX_EGRESS] {
            assert_eq!(tcx_count(&self.0, lo, t), 0, "TCX program left on lo");
        }
        for dir in ["ingress", "egress"] {
            let f = sh_out(&["tc", "-n", &self.0, "filter", "show", "dev", "lo", dir]);
            assert!(f.trim().is_empty(), "TC filter left on lo {dir}: {f}");
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

/// `caps` as setpriv's capability sets take them: "-all,+bpf,+net_admin,...".
fn setpriv_caps(caps: &[String]) -> String {
    std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",")
}

/// `flowlens run --interface lo` in `ns` as root holding only `caps` (bounding, inheritable
/// and ambient sets), as systemd starts it with the unit's CapabilityBoundingSet=.
fn start_with_caps(ns: &Netns, caps: &[String], pins: &str) -> (Child, Receiver<String>) {
    ensure_tool("setpriv", "util-linux");
    ensure_tool("ip", "iproute2");
    ensure_tool("tc", "iproute2");
    let set = setpriv_caps(caps);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, "setpriv"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .args([
            "--",
            BIN,
            "run",
            "--interface",
            "lo",
            "--grpc-listen",
            "off",
            "--output",
            "none",
            "--metrics-listen",
            "off",
            // a bpffs the test mounted: `ip netns exec` hides the host's
            // /sys/fs/bpf, and without CAP_SYS_ADMIN none can be mounted
            "--pin-dir",
            pins,
        ]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOWLENS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG").env("FLOWLENS_LOG_LEVEL", "info");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip netns exec setpriv flowlens");
    let stderr = lines(child.stderr.take().expect("stderr"));
    (child, stderr)
}

/// Every remaining line, until the writer closes the pipe (or `timeout`).
fn drain(rx: &Receiver<String>, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        out.push(l);
    }
    out
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flowlens did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn runs_with_only_the_unit_capabilities() {
    let (caps, mask) = unit_caps();
    assert!(
        caps.iter().any(|c| c == "CAP_BPF") && caps.iter().any(|c| c == "CAP_NET_ADMIN"),
        "this machine cannot grant CAP_BPF + CAP_NET_ADMIN"
    );
    let ns = Netns::new("ok");
    let fs = Bpffs::new(&format!("caps{}", caps.len()));
    let (mut child, stderr) = start_with_caps(&ns, &caps, &fs.pins());
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l: &String| l.contains("attached to lo")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match stderr.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no \"attached to lo\" log line; got {seen:#?}");
            }
        }
    }
    // `ip netns exec` and setpriv exec, so the child is flowlens itself: check what it holds.
    let pid = child.id();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "flowlens", "child is not flowlens itself");
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            proc_caps(pid, field),
            mask,
            "{field} of flowlens is not exactly {caps:?}"
        );
    }
    let lo = ifindex_in(&ns.0, "lo");
    // loopback gets the egress hook only (each packet crosses both)
    let attached = tcx_count(&ns.0, lo, libbpf_sys::BPF_TCX_EGRESS)
        + sh_out(&["tc", "-n", &ns.0, "filter", "show", "dev", "lo", "egress"])
            .lines()
            .count() as u32;
    assert!(attached > 0, "nothing attached to lo while running");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let st = wait_exit(&mut child, Duration::from_secs(30));
    seen.extend(drain(&stderr, Duration::from_secs(5)));
    assert_eq!(st.code(), Some(0), "exit after SIGTERM; log: {seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("detached from lo")),
        "no detach logged: {seen:#?}"
    );
    ns.assert_lo_clean();
}

#[test]
fn without_cap_bpf_it_fails_clearly() {
    let (caps, _) = unit_caps();
    let caps: Vec<String> = caps.into_iter().filter(|c| c != "CAP_BPF").collect();
    let ns = Netns::new("nobpf");
    let fs = Bpffs::new(&format!("caps{}", caps.len()));
    let (mut child, stderr) = start_with_caps(&ns, &caps, &fs.pins());
    let st = wait_exit(&mut child, Duration::from_secs(30));
    let log = drain(&stderr, Duration::from_secs(5));
    assert_eq!(
        st.code(),
        Some(1),
        "exit status without CAP_BPF; log: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("missing capabilities: CAP_BPF")),
        "no clear capability error: {log:#?}"
    );
    ns.assert_lo_clean();
}

// ---------------------------------------------------------------------------
// The unit's file system: read-only but its runtime directory
// ---------------------------------------------------------------------------

/// What systemd does for the unit, done by hand in a mount namespace of the test's own
/// (this machine's PID 1 is not systemd, so `systemd-run` cannot apply the unit): the
/// host's bpffs mounted as systemd mounts it, a fresh /run with the unit's
/// RuntimeDirectory=flowlens (mode RuntimeDirectoryMode=), then ProtectSystem=strict:
/// every mount read-only except the API file systems (/proc, /sys, /dev), with the
/// runtime directory bound writable again. The agent then runs with the unit's
/// capabilities and Environment=, no flags but `--interface lo`, while `flowlens status`
/// and `flowlens flows --json | jq length` use the default socket over a pipe.
const READ_ONLY_SCRIPT: &str = r#"
set -u -o pipefail
bin=$1; caps=$2; host_ns=$3
# Never on the host's mounts: this must be a mount namespace of its own.
if [ "$(readlink /proc/self/ns/mnt)" = "$host_ns" ]; then
  echo "REFUSED: not in a private mount namespace"; exit 9
fi
mount --make-rprivate /
mountpoint -q /sys/fs/bpf || mount -t bpf -o mode=0700 bpf /sys/fs/bpf
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -m 0755 /run/flowlens
mount --bind /run/flowlens /run/flowlens
# (Field 5 is the mount point; after the " - " separator, the file system type.)
for m in $(awk '{ for (i = 7; $i != "-"; i++) ; if ($(i + 1) != "nsfs") print $5 }' \
    /proc/self/mountinfo | sort -u); do
  # API file systems stay writable; the host's mounts under /run are hidden by ours.
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/run/*) continue ;; esac
  mount -o remount,bind,ro "$m" 2>/dev/null || echo "NOTE: $m stays writable"
done
# (Nothing may be open for writing on a mount made read-only: the agent logs to a pipe.)
touch /run/probe 2>/dev/null && echo "WRITABLE: /run"
touch /etc/flowlens-probe 2>/dev/null && echo "WRITABLE: /etc" && rm -f /etc/flowlens-probe
touch /run/flowlens/probe && rm /run/flowlens/probe && echo "RUNTIME-DIR-WRITABLE"
setpriv --inh-caps="$caps" --ambient-caps="$caps" --bounding-set="$caps" -- \
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin FLOWLENS_OUTPUT=none \
  "$bin" run --interface lo 2> >(sed 's/^/LOG: /') &
agent=$!
i=0
while [ ! -S /run/flowlens/flowlens.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
ls -l /run/flowlens | sed 's/^/SOCKET: /'
ping -c 3 -i 0.2 -q 127.0.0.1 >/dev/null
sleep 1
echo "STATUS-BEGIN"
"$bin" status | cat; echo "STATUS-EXIT=$?"
"$bin" status --json | jq -r '"STATUS-JSON interfaces=\(.interfaces | length) version=\(.version)"'
echo "STATUS-END"
n=$("$bin" flows --json | jq length); echo "FLOWS=$n"
kill -TERM $agent; wait $agent; echo "AGENT-EXIT=$?"
[ ! -e /run/flowlens/flowlens.sock ] || echo "SOCKET-LEFT"
"#;

#[test]
fn the_default_socket_works_with_only_the_runtime_directory_writable() {
    ensure_tool("setpriv", "util-linux");
    ensure_tool("unshare", "util-linux");
    ensure_tool("jq", "jq");
    ensure_tool("ping", "iputils-ping");
    let (caps, _) = unit_caps();
    let set = setpriv_caps(&caps);
    let ns = Netns::new("ro");
    let work = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.0,
        "unshare",
        "--mount",
        "--propagation",
        "private",
    ])
    .args(["bash", "-c", READ_ONLY_SCRIPT, "read-only", BIN, &set])
    .arg(std::fs::read_link("/proc/self/ns/mnt").expect("our mount namespace"))
    .current_dir(work.path());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLOWLENS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.env_remove("RUST_LOG").output().expect("run the script");
    let report = text(&out);
    eprintln!("{report}");
    assert_eq!(out.status.code(), Some(0), "{report}");
    let has = |s: &str| report.lines().any(|l| l.contains(s));
    assert!(!has("REFUSED"), "{report}");
    assert!(
        !has("WRITABLE: "),
        "the sandbox is not read-only:\n{report}"
    );
    assert!(has("RUNTIME-DIR-WRITABLE"), "{report}");
    assert!(
        has("SOCKET: srw-rw----"),
        "the socket, mode 0660:\n{report}"
    );
    assert!(has("STATUS-EXIT=0"), "{report}");
    assert!(has("interfaces:   lo ("), "{report}");
    assert!(has("flows:"), "{report}");
    assert!(has("STATUS-JSON interfaces=1 version="), "{report}");
    let flows: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("FLOWS="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no flow count:\n{report}"));
    assert!(flows >= 1, "the ping is a flow in progress:\n{report}");
    assert!(has("AGENT-EXIT=0"), "{report}");
    assert!(
        !has("SOCKET-LEFT"),
        "the socket is removed on exit:\n{report}"
    );
    assert!(
        !has("Read-only file system"),
        "something wanted to write outside the runtime directory:\n{report}"
    );
}
