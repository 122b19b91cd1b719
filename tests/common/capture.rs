//! A packet capture (AF_PACKET) on one interface, to cross-check what flowlens counted.
#![allow(dead_code)]

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub struct Capture {
    fd: OwnedFd,
}

/// One captured IP packet.
#[derive(Debug, Clone)]
pub struct Packet {
    pub outgoing: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// IP bytes (header + payload), as the datapath counts them.
    pub ip_bytes: u64,
}

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

impl Capture {
    /// Must run on a thread inside the interface's namespace.
    pub fn open(ifindex: u32) -> Capture {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let buf: libc::c_int = 16 << 20;
        // SAFETY: valid fd and option value.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&buf as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        Capture { fd }
    }

    /// Like `open`, keeping only IPv4 packets between `a` and `b` (either way), filtered
    /// in the kernel so that a flood of other packets cannot overrun the socket buffer.
    pub fn open_between(ifindex: u32, a: std::net::Ipv4Addr, b: std::net::Ipv4Addr) -> Capture {
        let cap = Capture::open(ifindex);
        let (a, b) = (u32::from(a), u32::from(b));
        let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        // ldh [12]; IPv4? ld [26] (source); a->b or b->a on ld [30] (destination).
        let prog = [
            op(0x28, 0, 0, 12),
            op(0x15, 0, 9, 0x0800),
            op(0x20, 0, 0, 26),
            op(0x15, 0, 2, a),
            op(0x20, 0, 0, 30),
            op(0x15, 4, 5, b),
            op(0x15, 0, 4, b),
            op(0x20, 0, 0, 30),
            op(0x15, 1, 2, a),
            op(0x06, 0, 0, 0),
            op(0x06, 0, 0, 0x0004_0000),
            op(0x06, 0, 0, 0),
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: fprog points at `prog`, which outlives the call (the kernel copies it).
        let r = unsafe {
            libc::setsockopt(
                cap.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as u32,
            )
        };
        assert_eq!(
            r,
            0,
            "SO_ATTACH_FILTER: {}",
            std::io::Error::last_os_error()
        );
        // What arrived before the filter was attached.
        drop(cap.drain());
        cap
    }

    /// Everything captured so far, IP packets only.
    pub fn drain(&self) -> Vec<Packet> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and sll are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return out;
            }
            if let Some(p) = parse(&buf[..n as usize], sll.sll_pkttype == PACKET_OUTGOING) {
                out.push(p);
            }
        }
    }
}

fn parse(f: &[u8], outgoing: bool) -> Option<Packet> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = &f[14..];
    let (src, dst, proto, l4, ip_bytes) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0xf) * 4;
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let tot = u16::from_be_bytes([ip[2], ip[3]]);
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                ip[9],
                ip.get(ihl..)?,
                u64::from(tot),
            )
        }
        0x86DD => {
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let plen = u16::from_be_bytes([ip[4], ip[5]]);
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                ip[6],
                ip.get(40..)?,
                u64::from(plen) + 40,
            )
        }
        _ => return None,
    };
    let (sport, dport) = if matches!(proto, 6 | 17) && l4.len() >= 4 {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    } else if proto == 1 && matches!(l4.first(), Some(0 | 8)) && l4.len() >= 6 {
        // an echo's identifier, in both: what flowlens keys an echo flow by
        let id = u16::from_be_bytes([l4[4], l4[5]]);
        (id, id)
    } else {
        (0, 0)
    };
    Some(Packet {
        outgoing,
        src,
        dst,
        proto,
        sport,
        dport,
        ip_bytes,
    })
}

/// Packets and IP bytes sent by `from` among the packets that `keep` selects.
pub fn sent_by(pkts: &[Packet], from: IpAddr, keep: impl Fn(&Packet) -> bool) -> (u64, u64) {
    pkts.iter()
        .filter(|p| p.src == from && keep(p))
        .fold((0, 0), |(n, b), p| (n + 1, b + p.ip_bytes))
}
