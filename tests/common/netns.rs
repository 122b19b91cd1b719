//! Test network: two namespaces joined by a veth pair, torn down on drop (even on panic).
#![allow(dead_code)]

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn sh(args: &[&str]) {
    sh_out(args);
}
/// Namespaces `a` and `b`, veth `if_a` (in a) <-> `if_b` (in b), with
/// 10.200.N.1/24 + fd00:N::1/64 on a and .2 / ::2 on b. Offloads are off,
/// so every skb is one wire packet and captures agree with the datapath.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub if_a: String,
    pub if_b: String,
    pub v4_a: IpAddr,
    pub v4_b: IpAddr,
    pub v6_a: IpAddr,
    pub v6_b: IpAddr,
}

impl NetPair {
    pub fn new() -> NetPair {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        // Subnet byte unique within this process; processes run one at a time.
        let subnet = (std::process::id() % 50) * 4 + n % 4 + 10;
        let p = NetPair {
            a: format!("flt{id}a"),
            b: format!("flt{id}b"),
            if_a: format!("fa{id}"),
            if_b: format!("fb{id}"),
            v4_a: IpAddr::V4(Ipv4Addr::new(10, 200, subnet as u8, 1)),
            v4_b: IpAddr::V4(Ipv4Addr::new(10, 200, subnet as u8, 2)),
            v6_a: IpAddr::V6(Ipv6Addr::new(0xfd00, subnet as u16, 0, 0, 0, 0, 0, 1)),
            v6_b: IpAddr::V6(Ipv6Addr::new(0xfd00, subnet as u16, 0, 0, 0, 0, 0, 2)),
        };
        sh(&["ip", "netns", "add", &p.a]);
        sh(&["ip", "netns", "add", &p.b]);
        sh(&[
            "ip", "link", "add", &p.if_a, "netns", &p.a, "type", "veth", "peer", "name", &p.if_b,
            "netns", &p.b,
        ]);
        for (ns, ifc, v4, v6) in [
            (&p.a, &p.if_a, p.v4_a, p.v6_a),
            (&p.b, &p.if_b, p.v4_b, p.v6_b),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                ifc,
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifc,
                "nodad",
            ]);
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", ifc, "tso", "off", "gso", "off", "gro",
                "off",
            ]);
            sh(&["ip", "-n", ns, "link", "set", ifc, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // Resolve neighbours now: a fresh veth can hold the first packets
        // for up to a second, and tests want traffic to flow as sent.
        for to in [p.v4_b, p.v6_b] {
            p.ping_from_a(to, 1);
        }
        p
    }

    /// Runs `f` on a thread that has entered namespace `ns`.
    pub fn in_ns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// GET /metrics from inside namespace `ns` (HTTP/1.0: the body ends with the stream).
    pub fn scrape(&self, ns: &str, addr: &'static str) -> String {
        self.in_ns(ns, move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(addr).expect("metrics port");
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                .expect("request");
            let mut body = String::new();
            c.read_to_string(&mut body).expect("response");
            body
        })
        .join()
        .expect("scrape")
    }

    /// `count` pings from namespace a to `to`, which must all be answered.
    pub fn ping_from_a(&self, to: IpAddr, count: u32) {
        let (to, count) = (to.to_string(), count.to_string());
        sh(&[
            "ip", "netns", "exec", &self.a, "ping", "-c", &count, "-i", "0.05", "-W", "5", &to,
        ]);
    }

    /// (a's address, b's address) of one IP version.
    pub fn addrs(&self, v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            (self.v6_a, self.v6_b)
        } else {
            (self.v4_a, self.v4_b)
        }
    }

    /// A TCP listener on b's address and `port` (0: an ephemeral one), bound inside b.
    pub fn listen_b(&self, v6: bool, port: u16) -> std::net::TcpListener {
        let (_, b) = self.addrs(v6);
        self.in_ns(&self.b, move || {
            std::net::TcpListener::bind(std::net::SocketAddr::new(b, port)).expect("listen")
        })
        .join()
        .expect("listener")
    }

    pub fn ifindex_a(&self) -> u32 {
        ifindex_in(&self.a, &self.if_a)
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: valid netns fd; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace takes its veth end, and so the peer, with it.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Programs attached with TCX at `attach_type` on `ifindex` of namespace `ns`.
pub fn tcx_count(ns: &str, ifindex: u32, attach_type: libbpf_sys::bpf_attach_type) -> u32 {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path);
        // SAFETY: zero is a valid start for these plain option structs.
        let mut opts: libbpf_sys::bpf_prog_query_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as _;
        // SAFETY: opts is valid; a null id array asks for the count only.
        let r = unsafe { libbpf_sys::bpf_prog_query_opts(ifindex as i32, attach_type, &mut opts) };
        if r != 0 {
            return 0; // interface gone
        }
        // SAFETY: the kernel filled the count member.
        unsafe { opts.__bindgen_anon_1.count }
    })
    .join()
    .expect("query thread")
}

/// ifindex of `name` in namespace `ns` (0: no such interface).
pub fn ifindex_in(ns: &str, name: &str) -> u32 {
    let path = format!("/run/netns/{ns}");
    let name = std::ffi::CString::new(name).expect("name");
    std::thread::spawn(move || {
        enter(&path);
        // SAFETY: valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })
    .join()
    .expect("ifindex thread")
}

/// Output of a command, which must succeed.
pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private bpffs mount for pins: `ip netns exec` remounts /sys, hiding
/// the host's /sys/fs/bpf from the agent, so pins shared across runs live
/// here instead. Unmounted on drop.
pub struct Bpffs {
    pub dir: std::path::PathBuf,
}

impl Bpffs {
    pub fn new(tag: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("flowlens-bpffs-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bpffs dir");
        sh(&[
            "mount",
            "-t",
            "bpf",
            "bpf",
            dir.to_str().expect("utf-8 path"),
        ]);
        Bpffs { dir }
    }

    pub fn pins(&self) -> String {
        self.dir.join("pins").to_string_lossy().into_owned()
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
