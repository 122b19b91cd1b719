//! A flow record's `flowlens.v1.FlowRecord` encoding written straight from [`FlowRecord`]: byte for byte what prost writes for the converted message, without building it (no String, no `core::fmt`, one reservation).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use prost_types::Timestamp;

use crate::record::api::proto;
use crate::record::flow::{DirStats, FlowRecord, Hook, IcmpInfo, Latency, TcpInfo};

/// Longest textual IP address: eight groups of four hex digits and seven colons.
const ADDR_TEXT_MAX: usize = 39;

/// 0 to 255 in decimal: the digits, left-aligned, and how many there are.
const DECIMAL: [([u8; 3], usize); 256] = {
    let mut table = [([0u8; 3], 0usize); 256];
    let mut v = 0;
    while v < 256 {
        let (h, t, o) = ((v / 100) as u8, (v / 10 % 10) as u8, (v % 10) as u8);
        table[v] = if v >= 100 {
            ([b'0' + h, b'0' + t, b'0' + o], 3)
        } else if v >= 10 {
            ([b'0' + t, b'0' + o, 0], 2)
        } else {
            ([b'0' + o, 0, 0], 1)
        };
        v += 1;
    }
    table
};

/// An IP address as `Display` writes it, on the stack.
struct AddrText {
    buf: [u8; ADDR_TEXT_MAX],
    len: usize,
}

impl AddrText {
    fn new() -> AddrText {
        AddrText {
            buf: [0; ADDR_TEXT_MAX],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn push_str(&mut self, s: &[u8]) {
        self.buf[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }

    fn push_decimal(&mut self, v: u8) {
        // All three bytes go in; only the digits count. An address never ends closer than
        // three bytes to the end of the buffer.
        let (digits, n) = DECIMAL[usize::from(v)];
        self.buf[self.len..self.len + 3].copy_from_slice(&digits);
        self.len += n;
    }

    /// Lowercase hex without leading zeros, as `{:x}` writes it.
    fn push_hex(&mut self, v: u16) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut shift = 12;
        while shift > 0 && v >> shift == 0 {
            shift -= 4;
        }
        loop {
            self.push(DIGITS[usize::from((v >> shift) & 0xf)]);
            if shift == 0 {
                break;
            }
            shift -= 4;
        }
    }

    fn push_v4(&mut self, a: Ipv4Addr) {
        let [a, b, c, d] = a.octets();
        self.push_decimal(a);
        for o in [b, c, d] {
            self.push(b'.');
            self.push_decimal(o);
        }
    }

    fn push_groups(&mut self, groups: &[u16]) {
        for (i, &g) in groups.iter().enumerate() {
            if i > 0 {
                self.push(b':');
            }
            self.push_hex(g);
        }
    }

    /// RFC 5952 text, as `Ipv6Addr`'s `Display`: IPv4-mapped addresses end in dotted
    /// decimal, and the first longest run of two or more zero groups becomes "::".
    fn push_v6(&mut self, a: Ipv6Addr) {
        if let Some(v4) = a.to_ipv4_mapped() {
            self.push_str(b"::ffff:");
            self.push_v4(v4);
            return;
        }
        let groups = a.segments();
        let (mut best_start, mut best_len) = (0, 0);
        let (mut start, mut len) = (0, 0);
        for (i, &g) in groups.iter().enumerate() {
            if g == 0 {
                if len == 0 {
                    start = i;
                }
                len += 1;
                if len > best_len {
                    (best_start, best_len) = (start, len);
                }
            } else {
                len = 0;
            }
        }
        if best_len > 1 {
            self.push_groups(&groups[..best_start]);
            self.push_str(b"::");
            self.push_groups(&groups[best_start + best_len..]);
        } else {
            self.push_groups(&groups);
        }
    }

    fn of(addr: IpAddr) -> AddrText {
        let mut t = AddrText::new();
        match addr {
            IpAddr::V4(a) => t.push_v4(a),
            IpAddr::V6(a) => t.push_v6(a),
        }
        t
    }
}

const VARINT: u32 = 0;
const LEN: u32 = 2;

/// Protobuf fields appended to a buffer, with prost's rules for what is left out: scalars
/// at their default value, empty strings, absent optionals and messages.
struct Fields<'a>(&'a mut Vec<u8>);

impl Fields<'_> {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, tag: u32, wire_type: u32) {
        self.varint(u64::from(tag << 3 | wire_type));
    }

    /// A proto3 scalar: absent when zero.
    fn uint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, VARINT);
            self.varint(v);
        }
    }

    /// An `optional` scalar: present, even at zero, when set.
    fn opt(&mut self, tag: u32, v: Option<u64>) {
        if let Some(v) = v {
            self.key(tag, VARINT);
            self.varint(v);
        }
    }

    /// An int32 (enums, Timestamp.nanos): negative values sign-extend to ten bytes.
    fn int32(&mut self, tag: u32, v: i32) {
        self.uint(tag, i64::from(v) as u64);
    }

    fn bytes(&mut self, tag: u32, v: &[u8]) {
        if !v.is_empty() {
            self.key(tag, LEN);
            self.varint(v.len() as u64);
            self.0.extend_from_slice(v);
        }
    }

    /// A nested message whose body `write` appends. Every nested message of a record is
    /// shorter than 128 bytes, so its length is one byte, patched in afterwards.
    fn message(&mut self, tag: u32, write: impl FnOnce(&mut Self)) {
        self.key(tag, LEN);
        let at = self.0.len();
        self.0.push(0);
        write(self);
        let len = self.0.len() - at - 1;
        assert!(len < 0x80, "nested message of {len} bytes");
        self.0[at] = len as u8;
    }

    fn timestamp(&mut self, tag: u32, t: &Timestamp) {
        self.message(tag, |f| {
            f.uint(1, t.seconds as u64);
            f.int32(2, t.nanos);
        });
    }

    fn dir(&mut self, tag: u32, d: &DirStats) {
        self.message(tag, |f| {
            f.uint(1, d.packets);
            f.uint(2, d.bytes);
            f.uint(3, u64::from(d.ttl));
        });
    }

    fn latency(&mut self, tag: u32, l: &Option<Latency>) {
        if let Some(l) = l {
            self.message(tag, |f| {
                f.uint(1, u64::from(l.count));
                f.uint(2, l.sum_ns);
                f.uint(3, u64::from(l.min_ns));
                f.uint(4, u64::from(l.max_ns));
                f.opt(5, l.jitter_ns);
            });
        }
    }

    fn tcp(&mut self, tag: u32, t: &TcpInfo) {
        self.message(tag, |f| {
            f.uint(1, u64::from(t.client_flags));
            f.uint(2, u64::from(t.server_flags));
            f.int32(3, proto::TcpState::from(t.state).into());
            f.opt(4, t.handshake_client_ns.map(u64::from));
            f.opt(5, t.handshake_server_ns.map(u64::from));
            f.uint(6, u64::from(t.syn_retransmits));
            f.uint(7, u64::from(t.late_start));
            f.latency(8, &t.client_latency);
            f.latency(9, &t.server_latency);
        });
    }

    fn icmp(&mut self, tag: u32, i: &IcmpInfo) {
        self.message(tag, |f| {
            f.opt(1, i.client_type.map(u64::from));
            f.opt(2, i.client_code.map(u64::from));
            f.opt(3, i.server_type.map(u64::from));
            f.opt(4, i.server_code.map(u64::from));
            f.opt(5, i.echo_id.map(u64::from));
            f.latency(6, &i.echo_rtt);
        });
    }
}

/// Room for everything but the strings of a record's encoding.
const RECORD_FIXED_MAX: usize = 512;

/// Appends `r`'s encoding with sequence number `seq` to `buf`: the same bytes as
/// `proto::FlowRecord::from(r)` with `seq` set, encoded by prost (fields in tag order).
pub fn encode_record(seq: u64, r: &FlowRecord, buf: &mut Vec<u8>) {
    let ip_version = match r.ip_version {
        4 => proto::IpVersion::IpVersion4,
        6 => proto::IpVersion::IpVersion6,
        _ => proto::IpVersion::Unspecified,
    };
    let hook = match r.first_hook {
        Hook::Ingress => proto::Hook::Ingress,
        Hook::Egress => proto::Hook::Egress,
    };
    let first_seen = Timestamp::from(r.first_seen);
    // A flow's first record starts its window at its first packet: converted once.
    let window_start = if r.window_start == r.first_seen {
        first_seen
    } else {
        Timestamp::from(r.window_start)
    };
    let client_addr = AddrText::of(r.client_addr);
    let server_addr = AddrText::of(r.server_addr);
    buf.reserve(RECORD_FIXED_MAX + r.interface.len() + r.observer.len());
    let mut f = Fields(buf);
    f.int32(1, ip_version.into());
    f.uint(2, u64::from(r.protocol));
    f.bytes(3, client_addr.as_bytes());
    f.uint(4, u64::from(r.client_port));
    f.bytes(5, server_addr.as_bytes());
    f.uint(6, u64::from(r.server_port));
    f.uint(7, u64::from(r.ifindex));
    f.bytes(8, r.interface.as_bytes());
    f.int32(9, hook.into());
    f.timestamp(10, &first_seen);
    f.timestamp(11, &Timestamp::from(r.last_seen));
    f.dir(12, &r.client);
    f.dir(13, &r.server);
    f.int32(14, proto::EndReason::from(r.end_reason).into());
    if let Some(t) = &r.tcp {
        f.tcp(15, t);
    }
    if let Some(i) = &r.icmp {
        f.icmp(16, i);
    }
    f.uint(17, r.flow_id);
    f.bytes(18, r.observer.as_bytes());
    f.timestamp(19, &window_start);
    f.uint(20, u64::from(r.continuation));
    f.uint(21, seq);
    f.uint(22, u64::from(r.fragment));
    f.timestamp(24, &Timestamp::from(r.emitted));
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use prost::Message;

    use super::*;
    use crate::record::flow::{EndReason, TcpState};

    fn base() -> FlowRecord {
        FlowRecord::example()
    }

    fn variants() -> Vec<FlowRecord> {
        let lat = Latency {
            count: 2,
            sum_ns: 300,
            min_ns: 100,
            max_ns: 200,
            jitter_ns: Some(0),
        };
        let mut out = vec![base()];
        let mut r = base();
        r.protocol = 6;
        r.tcp = Some(TcpInfo {
            client_flags: 0x1b,
            server_flags: 0x12,
            state: TcpState::Established,
            handshake_client_ns: Some(0),
            handshake_server_ns: None,
            syn_retransmits: 2,
            late_start: true,
            client_latency: Some(lat),
            server_latency: Some(Latency {
                jitter_ns: None,
                ..lat
            }),
        });
        r.continuation = true;
        r.end_reason = EndReason::TcpRst;
        out.push(r);
        let mut r = base();
        r.ip_version = 6;
        r.protocol = 58;
        r.client_addr = "2001:db8::1".parse().unwrap();
        r.server_addr = "::ffff:192.0.2.1".parse().unwrap();
        r.client_port = 0;
        r.server_port = 0;
        r.first_hook = Hook::Ingress;
        r.window_start = r.first_seen;
        r.icmp = Some(IcmpInfo {
            client_type: Some(128),
            client_code: Some(0),
            server_type: None,
            server_code: None,
            echo_id: Some(0),
            echo_rtt: Some(Latency::default()),
        });
        out.push(r);
        let mut r = base();
        r.fragment = true;
        r.client_port = 0;
        r.server_port = 0;
        r.interface.clear();
        r.observer = "".into();
        r.ifindex = 0;
        r.flow_id = 0;
        r.client = DirStats::default();
        r.end_reason = EndReason::Evicted;
        out.push(r);
        let mut r = base();
        // Before the epoch, and the epoch itself: negative seconds, zero nanos.
        r.first_seen = UNIX_EPOCH - Duration::new(5, 250);
        r.last_seen = UNIX_EPOCH;
        r.window_start = UNIX_EPOCH - Duration::from_secs(1);
        r.emitted = UNIX_EPOCH;
        r.ip_version = 0;
        r.protocol = 255;
        r.end_reason = EndReason::InProgress;
        out.push(r);
        let mut r = base();
        r.last_seen = SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64 * 4);
        r.client.bytes = u64::MAX;
        r.server.packets = u64::MAX;
        r.interface = "a-rather-long-interface-name-é".into();
        out.push(r);
        // Every nested field at its widest: the longest nested messages there can be.
        let widest = Latency {
            count: u32::MAX,
            sum_ns: u64::MAX,
            min_ns: u32::MAX,
            max_ns: u32::MAX,
            jitter_ns: Some(u64::MAX),
        };
        let mut r = base();
        r.client = DirStats {
            packets: u64::MAX,
            bytes: u64::MAX,
            ttl: u8::MAX,
        };
        r.tcp = Some(TcpInfo {
            client_flags: u8::MAX,
            server_flags: u8::MAX,
            state: TcpState::Reset,
            handshake_client_ns: Some(u32::MAX),
            handshake_server_ns: Some(u32::MAX),
            syn_retransmits: u16::MAX,
            late_start: true,
            client_latency: Some(widest),
            server_latency: Some(widest),
        });
        r.icmp = Some(IcmpInfo {
            client_type: Some(u8::MAX),
            client_code: Some(u8::MAX),
            server_type: Some(u8::MAX),
            server_code: Some(u8::MAX),
            echo_id: Some(u16::MAX),
            echo_rtt: Some(widest),
        });
        r.first_seen = UNIX_EPOCH - Duration::new(u32::MAX as u64 * 8, 999_999_999);
        out.push(r);
        out
    }

    #[test]
    fn same_bytes_as_the_prost_message() {
        for (i, r) in variants().iter().enumerate() {
            for seq in [0, 1, 127, 128, u64::MAX] {
                let mut p = proto::FlowRecord::from(r);
                p.seq = seq;
                let mut fast = vec![0xaa];
                encode_record(seq, r, &mut fast);
                assert_eq!(fast[1..], p.encode_to_vec()[..], "variant {i}, seq {seq}");
            }
        }
    }

    fn text(a: IpAddr) -> String {
        String::from_utf8(AddrText::of(a).as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn ipv4_text_matches_display() {
        for v in [
            0u32,
            1,
            9,
            10,
            99,
            100,
            255,
            256,
            0x0a00_0001,
            0xc0a8_6401,
            u32::MAX,
        ] {
            let a = IpAddr::V4(Ipv4Addr::from(v));
            assert_eq!(text(a), a.to_string());
        }
        for o in 0..=255u8 {
            let a = IpAddr::V4(Ipv4Addr::new(o, 255 - o, o / 3, o.wrapping_mul(7)));
            assert_eq!(text(a), a.to_string());
        }
    }

    #[test]
    fn ipv6_text_matches_display_for_every_zero_pattern() {
        let values = [1u16, 0xf, 0x10, 0xff, 0x100, 0xfff, 0x1000, 0xdb8, 0xffff];
        for pattern in 0..256u32 {
            for (k, v) in values.iter().enumerate() {
                let mut groups = [0u16; 8];
                for (i, g) in groups.iter_mut().enumerate() {
                    if pattern & (1 << i) != 0 {
                        *g = values[(k + i) % values.len()].wrapping_mul(*v | 1);
                    }
                }
                let a = IpAddr::V6(Ipv6Addr::from(groups));
                assert_eq!(text(a), a.to_string(), "{groups:x?}");
            }
        }
        for a in [
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::10.0.0.1",
            "64:ff9b::192.0.2.33",
            "fe80::1:0:0:1",
            "2001:db8:0:0:1:0:0:1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let a: IpAddr = a.parse().unwrap();
            assert_eq!(text(a), a.to_string());
        }
    }
}
