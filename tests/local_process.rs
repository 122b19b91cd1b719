//! Which service owns a flow: the cgroup, systemd unit and process of each local socket a flow ends at, against processes the test places in cgroups of a cgroup v2 hierarchy it mounts itself (the test machines boot cgroup v1), over loopback and through a veth pair.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::agent::{fast_config, Agent};
use common::netns::{sh, NetPair};
use flowlens::kernel::cgroup::CgroupNames;
use flowlens::kernel::datapath::Capacities;
use flowlens::poller::PollerConfig;
use flowlens::record::flow::{EndReason, FlowRecord, LocalProcess};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 hierarchy mounted by the test in a directory of its own, and a tree of
/// the test's cgroups in it; the tree is removed and the mount undone on drop.
struct Cgroups {
    mnt: tempfile::TempDir,
    /// The test's own cgroup, `<mount>/flowlens-test-<pid>-<n>`.
    top: PathBuf,
}

impl Cgroups {
    fn new() -> Cgroups {
        let mnt = tempfile::tempdir().expect("a mount point");
        let ok = Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2"])
            .arg(mnt.path())
            .status()
            .expect("mount");
        assert!(
            ok.success(),
            "mounting a cgroup v2 hierarchy at {} failed: this test needs a kernel with \
             cgroup v2 (4.5 or newer) and CAP_SYS_ADMIN",
            mnt.path().display()
        );
        let top = mnt.path().join(format!(
            "flowlens-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&top).expect("the test's cgroup");
        Cgroups { mnt, top }
    }

    /// Makes cgroup `sub` (slash-separated) under the test's: its directory and its
    /// path as the agent names it (from the hierarchy's root).
    fn make(&self, sub: &str) -> (PathBuf, String) {
        let dir = self.top.join(sub);
        std::fs::create_dir_all(&dir).expect("a test cgroup");
        (dir.clone(), self.path_of(&dir))
    }

    fn path_of(&self, dir: &Path) -> String {
        format!("/{}", dir.strip_prefix(self.mnt.path()).unwrap().display())
    }
}

/// Removes cgroup directories deepest first (each must be empty of processes).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        remove_tree(&self.top);
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mnt.path())
            .status();
    }
}

/// The test's socket programs: each names itself (its command, as the kernel keeps it)
/// before it opens a socket, and says on stdout when it is ready or done.
const PROGRAM: &str = r#"
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
print(open("/proc/self/comm").read().strip(), flush=True)
mode, host, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
if mode == "tcp-server":
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
        c.close()
elif mode == "udp-server":
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((host, port))
    print("ready", flush=True)
    while True:
        s.recv(65536)
elif mode == "tcp-client-thread":
    # A thread of its own name opens the socket: the process's name is what counts.
    import threading
    def run():
        ctypes.CDLL(None).prctl(15, b"not-the-process", 0, 0, 0)
        c = socket.socket(fam, socket.SOCK_STREAM)
        c.connect((host, port))
        c.sendall(b"x" * 1000)
        got = 0
        while got < 1000:
            got += len(c.recv(65536))
        c.close()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    print("done", flush=True)
elif mode in ("tcp-client", "tcp-client-leave"):
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.connect((host, port))
    c.sendall(b"x" * 1000)
    if mode == "tcp-client":
        got = 0
        while got < 1000:
            got += len(c.recv(65536))
        c.close()
    print("done", flush=True)
elif mode == "tcp-slow":
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.connect((host, port))
    import time
    for _ in range(20):
        c.sendall(b"z" * 100)
        got = 0
        while got < 100:
            got += len(c.recv(65536))
        time.sleep(0.15)
    c.close()
    print("done", flush=True)
elif mode == "tcp-try":
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(0.3)
    try:
        c.connect((host, port))
    except OSError:
        pass
    print("done", flush=True)
elif mode == "udp-clients":
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    socks = [socket.socket(fam, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        for _ in range(3):
            s.sendto(b"y" * 100, (host, port))
    print("done", flush=True)
"#;

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// One of the test's socket programs, in a network namespace and (when given) a cgroup
/// of the test's; killed on drop.
struct Proc {
    child: Child,
    out: BufReader<ChildStdout>,
    /// Its command name, as the kernel keeps it, once it named itself.
    comm: String,
}

impl Proc {
    fn spawn(ns: &str, cgroup: Option<&Path>, args: &[&str]) -> Proc {
        let netns = File::open(format!("/run/netns/{ns}")).expect("the test namespace");
        let fd = netns.as_raw_fd();
        let procs = cgroup
            .map(|c| CString::new(c.join("cgroup.procs").as_os_str().as_bytes()).expect("a path"));
        let mut cmd = Command::new(python());
        cmd.arg("-c")
            .arg(PROGRAM)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // system calls (setns, open, write, close) on values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(p) = &procs {
                    let f = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if f < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the process writing, moved into the cgroup.
                    let n = libc::write(f, b"0".as_ptr().cast(), 1);
                    libc::close(f);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("python3");
        drop(netns);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut comm = String::new();
        out.read_line(&mut comm).expect("its command name");
        Proc {
            child,
            out,
            comm: comm.trim().to_owned(),
        }
    }

    /// A server program, listening once this returns.
    fn server(ns: &str, cgroup: Option<&Path>, args: &[&str]) -> Proc {
        let mut p = Proc::spawn(ns, cgroup, args);
        p.expect("ready");
        p
    }

    /// A client program, run to its end: its pid.
    fn run(ns: &str, cgroup: Option<&Path>, args: &[&str]) -> u32 {
        let mut p = Proc::spawn(ns, cgroup, args);
        let pid = p.pid();
        p.expect("done");
        p.wait();
        pid
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the line `what` on its stdout.
    fn expect(&mut self, what: &str) {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("its stdout");
        assert_eq!(line.trim(), what, "the program said {line:?}");
    }

    /// Its command name as the kernel keeps it (read by itself before any socket).
    fn comm(&self) -> String {
        self.comm.clone()
    }

    /// Waits for it to exit by itself.
    fn wait(mut self) {
        let s = self.child.wait().expect("wait");
        assert!(s.success(), "the program failed: {s}");
        let pid = self.pid();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is still there"
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The inode of a cgroup directory: the cgroup's id.
fn cgroup_id(dir: &Path) -> u64 {
    std::fs::metadata(dir).expect("a cgroup").ino()
}

/// What a record must say of a side: exactly these fields.
fn want(dir: &Path, path: &str, unit: Option<&str>, pid: u32, comm: &str) -> LocalProcess {
    LocalProcess {
        cgroup_id: Some(cgroup_id(dir)),
        cgroup: Some(path.into()),
        unit: unit.map(Into::into),
        pid: Some(pid),
        comm: Some(comm.to_owned()),
        // SAFETY: getuid only reads this process's uid.
        uid: Some(unsafe { libc::getuid() }),
    }
}

fn the_flow(records: &[FlowRecord], proto: u8, port: u16) -> Vec<&FlowRecord> {
    records
        .iter()
        .filter(|r| r.protocol == proto && r.server_port == port)
        .collect()
}

fn port() -> u16 {
    30_000 + (std::process::id() % 10_000) as u16 + NEXT.fetch_add(1, Ordering::SeqCst) as u16
}

/// The flow is over and every map the datapath keeps for it is empty again: the base
/// entry, its extension and its local ends.
fn wait_maps_empty(agent: &Agent) {
    for _ in 0..100 {
        if agent.map_entries() == [0, 0, 0] && agent.owner_entries() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "maps not empty: {:?} flows/tcp/icmp, {} local ends",
        agent.map_entries(),
        agent.owner_entries()
    );
}

#[test]
fn each_side_of_a_loopback_connection_names_its_cgroup_unit_and_process() {
    let net = NetPair::new();
    let cg = Cgroups::new();
    let (srv_dir, srv_path) = cg.make("system.slice/foo.service");
    let (cli_dir, cli_path) = cg.make("app/client");
    let port = port();
    let p = port.to_string();
    // The server's listening socket is older than the agent: found by its walk at start.
    let server = Proc::server(
        &net.a,
        Some(&srv_dir),
        &["flowlens-srv", "tcp-server", "127.0.0.1", &p],
    );
    let mut agent = Agent::start_on(&net, &["lo"], fast_config(), Capacities::default());
    // The client's socket is opened while the agent runs, by a thread named otherwise:
    // noted by the socket hook, with the process's name.
    let mut client = Proc::spawn(
        &net.a,
        Some(&cli_dir),
        &["flowlens-cli", "tcp-client-thread", "127.0.0.1", &p],
    );
    let (cli_pid, cli_comm, srv_pid, srv_comm) =
        (client.pid(), client.comm(), server.pid(), server.comm());
    assert_eq!(
        (cli_comm.as_str(), srv_comm.as_str()),
        ("flowlens-cli", "flowlens-srv")
    );
    client.expect("done");
    client.wait();
    let records = agent.wait_for("the loopback connection", Duration::from_secs(15), |r| {
        the_flow(r, 6, port)
            .iter()
            .any(|f| f.end_reason == EndReason::TcpFin)
    });
    let flow = the_flow(records, 6, port);
    assert_eq!(flow.len(), 1, "{flow:#?}");
    let r = flow[0];
    assert_eq!(r.interface, "lo");
    assert_eq!(
        r.client_process.as_deref(),
        Some(&want(&cli_dir, &cli_path, None, cli_pid, "flowlens-cli")),
        "client side of {r:#?}"
    );
    assert_eq!(
        r.server_process.as_deref(),
        Some(&want(
            &srv_dir,
            &srv_path,
            Some("foo.service"),
            srv_pid,
            "flowlens-srv"
        )),
        "server side of {r:#?}"
    );
    assert!(
        srv_path.ends_with("/system.slice/foo.service"),
        "{srv_path}"
    );
    wait_maps_empty(&agent);
    drop(server);
    agent.stop();
}

#[test]
fn attribution_taken_as_the_flow_starts_outlives_the_process() {
    let net = NetPair::new();
    let cg = Cgroups::new();
    let (srv_dir, srv_path) = cg.make("system.slice/sink.service");
    let (cli_dir, cli_path) = cg.make("system.slice/gone.service");
    let (tcp_port, udp_port) = (port(), port());
    let mut agent = Agent::start_on(&net, &["lo"], fast_config(), Capacities::default());
    let tcp_server = Proc::server(
        &net.a,
        Some(&srv_dir),
        &["flowlens-srv", "tcp-server", "::1", &tcp_port.to_string()],
    );
    let udp_server = Proc::server(
        &net.a,
        Some(&srv_dir),
        &["flowlens-usrv", "udp-server", "::1", &udp_port.to_string()],
    );
    // Each client sends and exits at once: its socket closes with it (TCP) or is gone
    // long before the flow's idle end (UDP).
    let tcp_pid = Proc::run(
        &net.a,
        Some(&cli_dir),
        &[
            "flowlens-gone",
            "tcp-client-leave",
            "::1",
            &tcp_port.to_string(),
        ],
    );
    let udp_pid = Proc::run(
        &net.a,
        Some(&cli_dir),
        &[
            "flowlens-ugone",
            "udp-clients",
            "::1",
            &udp_port.to_string(),
        ],
    );
    let records = agent.wait_for("both flows' ends", Duration::from_secs(15), |r| {
        the_flow(r, 6, tcp_port)
            .iter()
            .any(|f| f.end_reason != EndReason::ActiveTimeout)
            && the_flow(r, 17, udp_port)
                .iter()
                .any(|f| f.end_reason == EndReason::IdleTimeout)
    });
    for (proto, port, pid, comm, srv_pid, srv_comm) in [
        (
            6,
            tcp_port,
            tcp_pid,
            "flowlens-gone",
            tcp_server.pid(),
            "flowlens-srv",
        ),
        (
            17,
            udp_port,
            udp_pid,
            "flowlens-ugone",
            udp_server.pid(),
            "flowlens-usrv",
        ),
    ] {
        let flow = the_flow(records, proto, port);
        assert_eq!(flow.len(), 1, "{flow:#?}");
        let r = flow[0];
        assert_eq!(r.ip_version, 6);
        assert_eq!(
            r.client_process.as_deref(),
            Some(&want(&cli_dir, &cli_path, Some("gone.service"), pid, comm)),
            "client side of {r:#?}"
        );
        assert_eq!(
            r.server_process.as_deref(),
            Some(&want(
                &srv_dir,
                &srv_path,
                Some("sink.service"),
                srv_pid,
                srv_comm
            )),
            "server side of {r:#?}"
        );
    }
    wait_maps_empty(&agent);
    drop((tcp_server, udp_server));
    agent.stop();
}

#[test]
fn flows_through_an_interface_carry_the_local_side_only() {
    let net = NetPair::new();
    let cg = Cgroups::new();
    let (srv_dir, srv_path) = cg.make("system.slice/web.service");
    let (cli_dir, cli_path) = cg.make("system.slice/fetch.service");
    let (in_port, out_port) = (port(), port());
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    // In: a client in the other namespace (a remote host, for this agent) reaches a
    // server here: its SYN's socket lookup finds the listening socket.
    let server = Proc::server(
        &net.a,
        Some(&srv_dir),
        &[
            "flowlens-web",
            "tcp-server",
            &net.v4_a.to_string(),
            &in_port.to_string(),
        ],
    );
    Proc::run(
        &net.b,
        None,
        &[
            "flowlens-rem",
            "tcp-client",
            &net.v4_a.to_string(),
            &in_port.to_string(),
        ],
    );
    // Out: a client here reaches a server in the other namespace: its packets carry
    // its socket.
    let listener = net.listen_b(false, out_port);
    let accept = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 1000];
        std::io::Read::read_exact(&mut s, &mut buf).expect("read");
        s.write_all(&buf).expect("write");
    });
    let cli_pid = Proc::run(
        &net.a,
        Some(&cli_dir),
        &[
            "flowlens-fetch",
            "tcp-client",
            &net.v4_b.to_string(),
            &out_port.to_string(),
        ],
    );
    accept.join().unwrap();
    let records = agent.wait_for("both connections", Duration::from_secs(15), |r| {
        [in_port, out_port].iter().all(|&p| {
            the_flow(r, 6, p)
                .iter()
                .any(|f| f.end_reason == EndReason::TcpFin)
        })
    });
    let inbound = the_flow(records, 6, in_port);
    assert_eq!(inbound.len(), 1, "{inbound:#?}");
    assert_eq!(inbound[0].client_process, None, "the client is remote");
    assert_eq!(
        inbound[0].server_process.as_deref(),
        Some(&want(
            &srv_dir,
            &srv_path,
            Some("web.service"),
            server.pid(),
            "flowlens-web"
        ))
    );
    let outbound = the_flow(records, 6, out_port);
    assert_eq!(outbound.len(), 1, "{outbound:#?}");
    assert_eq!(outbound[0].server_process, None, "the server is remote");
    assert_eq!(
        outbound[0].client_process.as_deref(),
        Some(&want(
            &cli_dir,
            &cli_path,
            Some("fetch.service"),
            cli_pid,
            "flowlens-fetch"
        ))
    );
    wait_maps_empty(&agent);
    drop(server);
    agent.stop();
}

#[test]
fn a_full_owner_map_loses_the_attribution_never_the_flow() {
    let net = NetPair::new();
    let cg = Cgroups::new();
    let (dir, path) = cg.make("system.slice/burst.service");
    let port = port();
    let caps = Capacities {
        owner: 1,
        ..Capacities::default()
    };
    let mut agent = Agent::start(&net, fast_config(), caps);
    // Three sockets, three flows to a host that does not answer: one local end fits.
    let pid = Proc::run(
        &net.a,
        Some(&dir),
        &[
            "flowlens-burst",
            "udp-clients",
            &net.v4_b.to_string(),
            &port.to_string(),
            "3",
        ],
    );
    let records = agent.wait_for("three flows", Duration::from_secs(15), |r| {
        the_flow(r, 17, port).len() == 3
    });
    let flows = the_flow(records, 17, port);
    for f in &flows {
        assert_eq!((f.client.packets, f.client.bytes), (3, 3 * 128), "{f:#?}");
        assert_eq!(f.server_process, None);
    }
    let attributed: Vec<_> = flows
        .iter()
        .filter_map(|f| f.client_process.as_deref())
        .collect();
    assert_eq!(
        attributed,
        [&want(
            &dir,
            &path,
            Some("burst.service"),
            pid,
            "flowlens-burst"
        )],
        "exactly one flow kept its attribution"
    );
    let counters = agent.maps.counters().expect("counters");
    assert_eq!(counters.get("owner_map_full"), Some(&2), "{counters:?}");
    wait_maps_empty(&agent);
    agent.stop();
}

#[test]
fn cgroups_are_named_as_they_come_and_go() {
    let cg = Cgroups::new();
    let (svc, svc_path) = cg.make("system.slice/foo.service");
    let mut names = CgroupNames::at(cg.mnt.path()).expect("the hierarchy's root");
    names.walk();
    let walks = names.walks();
    let n = names
        .name(cgroup_id(&svc))
        .expect("a cgroup made before the walk");
    assert_eq!(
        (&*n.path, n.unit.as_deref()),
        (svc_path.as_str(), Some("foo.service"))
    );
    // Known ids are answered from memory.
    names.name(cgroup_id(&svc));
    assert_eq!(names.walks(), walks);
    // A cgroup made since the walk: its id is newer than any the walk saw, so the next
    // lookup walks again and finds it.
    let (late, late_path) = cg.make("system.slice/foo.service/worker");
    let n = names
        .name(cgroup_id(&late))
        .expect("a cgroup made after the walk");
    assert_eq!(
        (&*n.path, n.unit.as_deref()),
        (late_path.as_str(), Some("foo.service"))
    );
    // A cgroup that went keeps its name for the records of flows it had.
    let gone_id = cgroup_id(&late);
    std::fs::remove_dir(&late).expect("rmdir");
    names.walk();
    assert_eq!(
        names.name(gone_id).map(|n| n.path.to_string()),
        Some(late_path)
    );
    let root = names.name(cgroup_id(cg.mnt.path())).expect("the root");
    assert_eq!((&*root.path, root.unit.as_deref()), ("/", None));
}

#[test]
fn forwarded_flows_carry_no_process_even_to_a_port_a_local_service_listens_on() {
    let net = NetPair::new();
    let cg = Cgroups::new();
    let (dir, path) = cg.make("system.slice/any.service");
    let (tcp_port, udp_port) = (port(), port());
    // Namespace a routes a "far" network for b, back out through b (no other device is
    // needed for a packet to be forwarded): what b sends there crosses a's interface on
    // its way through, to the same ports a's wildcard-bound services listen on.
    let IpAddr::V4(v4) = net.v4_a else {
        unreachable!()
    };
    let n = v4.octets()[2];
    let (far4, far6) = (format!("10.201.{n}.9"), format!("fd01:{n:x}::9"));
    for cmd in [
        "sysctl -qw net.ipv4.ip_forward=1",
        "sysctl -qw net.ipv6.conf.all.forwarding=1",
    ] {
        let mut args = vec!["ip", "netns", "exec", &net.a];
        args.extend(cmd.split(' '));
        sh(&args);
    }
    let (net4, net6) = (format!("10.201.{n}.0/24"), format!("fd01:{n:x}::/64"));
    let (a4, a6) = (net.v4_a.to_string(), net.v6_a.to_string());
    let (b4, b6) = (net.v4_b.to_string(), net.v6_b.to_string());
    sh(&["ip", "-n", &net.a, "route", "add", &net4, "via", &b4]);
    sh(&["ip", "-n", &net.a, "-6", "route", "add", &net6, "via", &b6]);
    sh(&["ip", "-n", &net.b, "route", "add", &net4, "via", &a4]);
    sh(&["ip", "-n", &net.b, "-6", "route", "add", &net6, "via", &a6]);
    let mut agent = Agent::start(&net, fast_config(), Capacities::default());
    let tcp_server = Proc::server(
        &net.a,
        Some(&dir),
        &[
            "flowlens-any",
            "tcp-server",
            "0.0.0.0",
            &tcp_port.to_string(),
        ],
    );
    let udp_server = Proc::server(
        &net.a,
        Some(&dir),
        &["flowlens-uany", "udp-server", "::", &udp_port.to_string()],
    );
    for (mode, host, port) in [
        ("tcp-try", far4.as_str(), tcp_port),
        ("udp-clients", far6.as_str(), udp_port),
        ("tcp-client", a4.as_str(), tcp_port),
        ("udp-clients", a6.as_str(), udp_port),
    ] {
        Proc::run(&net.b, None, &["flowlens-b", mode, host, &port.to_string()]);
    }
    let to = |r: &FlowRecord, proto: u8, host: &str, port: u16| {
        r.protocol == proto && r.server_addr.to_string() == host && r.server_port == port
    };
    let cases = [
        (6, far4.as_str(), tcp_port, None),
        (17, far6.as_str(), udp_port, None),
        (
            6,
            a4.as_str(),
            tcp_port,
            Some(("flowlens-any", tcp_server.pid())),
        ),
        (
            17,
            a6.as_str(),
            udp_port,
            Some(("flowlens-uany", udp_server.pid())),
        ),
    ];
    let records = agent.wait_for("the four flows' ends", Duration::from_secs(15), |rs| {
        cases.iter().all(|&(proto, host, port, _)| {
            rs.iter()
                .any(|r| to(r, proto, host, port) && r.end_reason != EndReason::ActiveTimeout)
        })
    });
    for (proto, host, port, local) in cases {
        let flow: Vec<_> = records
            .iter()
            .filter(|r| to(r, proto, host, port))
            .collect();
        assert_eq!(flow.len(), 1, "{flow:#?}");
        assert_eq!(
            flow[0].client_process, None,
            "the client is remote: {:#?}",
            flow[0]
        );
        let want = local.map(|(comm, pid)| want(&dir, &path, Some("any.service"), pid, comm));
        assert_eq!(
            flow[0].server_process.as_deref(),
            want.as_ref(),
            "{proto} to {host}: {:#?}",
            flow[0]
        );
    }
    wait_maps_empty(&agent);
    drop((tcp_server, udp_server));
    agent.stop();
}

#[test]
fn every_record_of_a_long_flow_carries_the_attribution_taken_at_its_start() {
    let net = NetPair::new();
    let cg = Cgroups::new();
    let (srv_dir, srv_path) = cg.make("system.slice/echo.service");
    let (cli_dir, cli_path) = cg.make("system.slice/talk.service");
    let port = port();
    let cfg = PollerConfig {
        active_timeout: Duration::from_secs(1),
        ..fast_config()
    };
    let mut agent = Agent::start_on(&net, &["lo"], cfg, Capacities::default());
    let server = Proc::server(
        &net.a,
        Some(&srv_dir),
        &[
            "flowlens-echo",
            "tcp-server",
            "127.0.0.1",
            &port.to_string(),
        ],
    );
    // Three seconds of exchanges: active-timeout records, then the final one.
    let cli_pid = Proc::run(
        &net.a,
        Some(&cli_dir),
        &["flowlens-talk", "tcp-slow", "127.0.0.1", &port.to_string()],
    );
    let records = agent.wait_for("the connection's end", Duration::from_secs(15), |r| {
        the_flow(r, 6, port)
            .iter()
            .any(|f| f.end_reason == EndReason::TcpFin)
    });
    let flow = the_flow(records, 6, port);
    let active = flow
        .iter()
        .filter(|f| f.end_reason == EndReason::ActiveTimeout)
        .count();
    assert!(active >= 2, "{flow:#?}");
    let client_side = want(
        &cli_dir,
        &cli_path,
        Some("talk.service"),
        cli_pid,
        "flowlens-talk",
    );
    let server_side = want(
        &srv_dir,
        &srv_path,
        Some("echo.service"),
        server.pid(),
        "flowlens-echo",
    );
    for r in &flow {
        assert_eq!(r.client_process.as_deref(), Some(&client_side), "{r:#?}");
        assert_eq!(r.server_process.as_deref(), Some(&server_side), "{r:#?}");
    }
    wait_maps_empty(&agent);
    drop(server);
    agent.stop();
}
