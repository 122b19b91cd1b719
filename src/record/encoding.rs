//! A flow record's `flowlens.v1.FlowRecord` encoding written straight from [`FlowRecord`] (byte for byte what prost writes for the converted message, without building it: no String, no `core::fmt`, one reservation), read straight back into one, and records framed as the gRPC message a subscriber receives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use prost_types::Timestamp;

use crate::record::api::{end_reason_from_proto, proto, tcp_state_from_proto};
use crate::record::flow::{
    DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess, TcpInfo,
};

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

    /// A nested message whose body `write` appends. Nearly every nested message of a
    /// record is shorter than 128 bytes, so its length is one byte, patched in
    /// afterwards; a longer one (a long cgroup path) moves its body along for the rest.
    fn message(&mut self, tag: u32, write: impl FnOnce(&mut Self)) {
        self.key(tag, LEN);
        let at = self.0.len();
        self.0.push(0);
        write(self);
        let len = self.0.len() - at - 1;
        if len < 0x80 {
            self.0[at] = len as u8;
            return;
        }
        let mut head = Vec::with_capacity(5);
        Fields(&mut head).varint(len as u64);
        self.0.splice(at..at + 1, head);
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

    fn process(&mut self, tag: u32, p: &Option<Box<LocalProcess>>) {
        if let Some(p) = p {
            self.message(tag, |f| {
                f.opt(1, p.cgroup_id);
                f.bytes(2, p.cgroup.as_deref().unwrap_or_default().as_bytes());
                f.bytes(3, p.unit.as_deref().unwrap_or_default().as_bytes());
                f.opt(4, p.pid.map(u64::from));
                f.bytes(5, p.comm.as_deref().unwrap_or_default().as_bytes());
                f.opt(6, p.uid.map(u64::from));
            });
        }
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

/// Where a record stands in an agent's emission: the run that emitted it and its number
/// in that run (`FlowRecord.run` and `.seq` on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub run: u64,
    pub seq: u64,
}

/// Appends `r`'s encoding stamped `at` to `buf`: the same bytes as
/// `proto::FlowRecord::from(r)` with `seq` and `run` set, encoded by prost (fields in tag
/// order).
pub fn encode_record(at: Stamp, r: &FlowRecord, buf: &mut Vec<u8>) {
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
    let strings: usize = r
        .processes()
        .map(|p| {
            p.cgroup.as_deref().map_or(0, str::len)
                + p.unit.as_deref().map_or(0, str::len)
                + p.comm.as_deref().map_or(0, str::len)
        })
        .sum();
    buf.reserve(RECORD_FIXED_MAX + r.interface.len() + r.observer.len() + strings);
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
    f.uint(21, at.seq);
    f.uint(22, u64::from(r.fragment));
    f.uint(23, at.run);
    f.timestamp(24, &Timestamp::from(r.emitted));
    f.uint(25, u64::from(r.partial));
    f.process(26, &r.client_process);
    f.process(27, &r.server_process);
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Bytes that are not a `FlowRecord` this agent wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FlowRecord encoding: {0}")]
pub struct DecodeError(&'static str);

/// A cursor over protobuf bytes.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(v);
            }
        }
        Err(DecodeError("truncated or overlong varint"))
    }

    /// The next field's tag and wire type; None at the end.
    fn key(&mut self) -> Result<Option<(u32, u32)>, DecodeError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some(((k >> 3) as u32, (k & 7) as u32)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError("field runs past the end"));
        }
        let (v, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(v)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| DecodeError("length"))?)
    }

    fn skip(&mut self, wire_type: u32) -> Result<(), DecodeError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            LEN => self.len_delimited().map(drop),
            1 => self.take(8).map(drop),
            5 => self.take(4).map(drop),
            _ => Err(DecodeError("unknown wire type")),
        }
    }

    /// Each field of a message: `visit(tag, value or bytes)`; unknown fields are skipped
    /// by the caller returning `Ok(false)`.
    fn fields(
        mut self,
        mut visit: impl FnMut(u32, Field<'a>) -> Result<bool, DecodeError>,
    ) -> Result<(), DecodeError> {
        while let Some((tag, wt)) = self.key()? {
            let field = match wt {
                VARINT => Field::Int(self.varint()?),
                LEN => Field::Bytes(self.len_delimited()?),
                other => {
                    self.skip(other)?;
                    continue;
                }
            };
            visit(tag, field)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl<'a> Field<'a> {
    fn int(self) -> Result<u64, DecodeError> {
        match self {
            Field::Int(v) => Ok(v),
            Field::Bytes(_) => Err(DecodeError("a number field holds bytes")),
        }
    }

    fn narrow<T: TryFrom<u64>>(self) -> Result<T, DecodeError> {
        T::try_from(self.int()?).map_err(|_| DecodeError("a number out of its field's range"))
    }

    fn bytes(self) -> Result<&'a [u8], DecodeError> {
        match self {
            Field::Bytes(b) => Ok(b),
            Field::Int(_) => Err(DecodeError("a message field holds a number")),
        }
    }

    fn text(self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError("a string is not UTF-8"))
    }

    fn addr(self) -> Result<IpAddr, DecodeError> {
        let b = self.bytes()?;
        if let Some(v4) = dotted_quad(b) {
            return Ok(IpAddr::V4(v4));
        }
        std::str::from_utf8(b)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or(DecodeError("an address is not an IP address"))
    }

    fn time(self) -> Result<SystemTime, DecodeError> {
        // What the encoder writes from a SystemTime after 1970, read without the general
        // loop: seconds (field 1), then nanos (field 2) when not zero.
        let b = self.bytes()?;
        if let [0x08, rest @ ..] = b {
            let mut w = Wire(rest);
            let secs = w.varint()?;
            let nanos = match w.0 {
                [] => Some(0),
                [0x10, ..] => {
                    w.0 = &w.0[1..];
                    let n = w.varint()?;
                    (w.0.is_empty() && n < 1_000_000_000).then_some(n as u32)
                }
                _ => None,
            };
            if let (Some(nanos), true) = (nanos, secs <= i64::MAX as u64) {
                return SystemTime::UNIX_EPOCH
                    .checked_add(std::time::Duration::new(secs, nanos))
                    .ok_or(DecodeError("a timestamp out of range"));
            }
        }
        let mut t = Timestamp::default();
        Wire(self.bytes()?).fields(|tag, f| {
            match tag {
                1 => t.seconds = f.int()? as i64,
                2 => t.nanos = f.int()? as i64 as i32,
                _ => {}
            }
            Ok(true)
        })?;
        // What the encoder wrote from a SystemTime: nanos within 0..1e9.
        if let (Ok(secs), Ok(nanos)) = (u64::try_from(t.seconds), u32::try_from(t.nanos)) {
            if nanos < 1_000_000_000 {
                return SystemTime::UNIX_EPOCH
                    .checked_add(std::time::Duration::new(secs, nanos))
                    .ok_or(DecodeError("a timestamp out of range"));
            }
        }
        SystemTime::try_from(t).map_err(|_| DecodeError("a timestamp out of range"))
    }

    fn dir(self) -> Result<DirStats, DecodeError> {
        let mut d = DirStats::default();
        Wire(self.bytes()?).fields(|tag, f| {
            match tag {
                1 => d.packets = f.int()?,
                2 => d.bytes = f.int()?,
                3 => d.ttl = f.narrow()?,
                _ => {}
            }
            Ok(true)
        })?;
        Ok(d)
    }

    fn latency(self) -> Result<Latency, DecodeError> {
        let mut l = Latency::default();
        Wire(self.bytes()?).fields(|tag, f| {
            match tag {
                1 => l.count = f.narrow()?,
                2 => l.sum_ns = f.int()?,
                3 => l.min_ns = f.narrow()?,
                4 => l.max_ns = f.narrow()?,
                5 => l.jitter_ns = Some(f.int()?),
                _ => {}
            }
            Ok(true)
        })?;
        Ok(l)
    }

    fn tcp(self) -> Result<TcpInfo, DecodeError> {
        let mut t = TcpInfo {
            client_flags: 0,
            server_flags: 0,
            state: crate::record::flow::TcpState::None,
            handshake_client_ns: None,
            handshake_server_ns: None,
            syn_retransmits: 0,
            late_start: false,
            client_latency: None,
            server_latency: None,
        };
        Wire(self.bytes()?).fields(|tag, f| {
            match tag {
                1 => t.client_flags = f.narrow()?,
                2 => t.server_flags = f.narrow()?,
                3 => {
                    let v = proto::TcpState::try_from(f.int()? as i32)
                        .map_err(|_| DecodeError("unknown TCP state"))?;
                    t.state = tcp_state_from_proto(v);
                }
                4 => t.handshake_client_ns = Some(f.narrow()?),
                5 => t.handshake_server_ns = Some(f.narrow()?),
                6 => t.syn_retransmits = f.narrow()?,
                7 => t.late_start = f.int()? != 0,
                8 => t.client_latency = Some(f.latency()?),
                9 => t.server_latency = Some(f.latency()?),
                _ => {}
            }
            Ok(true)
        })?;
        Ok(t)
    }

    fn process(self) -> Result<Box<LocalProcess>, DecodeError> {
        let mut p = LocalProcess::default();
        let text = |f: Field<'_>| -> Result<Option<Arc<str>>, DecodeError> {
            let t = f.text()?;
            Ok((!t.is_empty()).then(|| Arc::from(t)))
        };
        Wire(self.bytes()?).fields(|tag, f| {
            match tag {
                1 => p.cgroup_id = Some(f.int()?),
                2 => p.cgroup = text(f)?,
                3 => p.unit = text(f)?,
                4 => p.pid = Some(f.narrow()?),
                5 => p.comm = Some(f.text()?.to_owned()).filter(|c| !c.is_empty()),
                6 => p.uid = Some(f.narrow()?),
                _ => {}
            }
            Ok(true)
        })?;
        Ok(Box::new(p))
    }

    fn icmp(self) -> Result<IcmpInfo, DecodeError> {
        let mut i = IcmpInfo {
            client_type: None,
            client_code: None,
            server_type: None,
            server_code: None,
            echo_id: None,
            echo_rtt: None,
        };
        Wire(self.bytes()?).fields(|tag, f| {
            match tag {
                1 => i.client_type = Some(f.narrow()?),
                2 => i.client_code = Some(f.narrow()?),
                3 => i.server_type = Some(f.narrow()?),
                4 => i.server_code = Some(f.narrow()?),
                5 => i.echo_id = Some(f.narrow()?),
                6 => i.echo_rtt = Some(f.latency()?),
                _ => {}
            }
            Ok(true)
        })?;
        Ok(i)
    }
}

/// `a.b.c.d` in decimal (as [`AddrText`] writes an IPv4 address), without `str::parse`.
fn dotted_quad(b: &[u8]) -> Option<Ipv4Addr> {
    if !(7..=15).contains(&b.len()) {
        return None;
    }
    let mut octets = [0u8; 4];
    let (mut i, mut n, mut digits) = (0, 0u16, 0);
    for &c in b {
        match c {
            b'0'..=b'9' if digits < 3 => {
                n = n * 10 + u16::from(c - b'0');
                digits += 1;
            }
            b'.' if digits > 0 && i < 3 => {
                octets[i] = u8::try_from(n).ok()?;
                (i, n, digits) = (i + 1, 0, 0);
            }
            _ => return None,
        }
    }
    if i != 3 || digits == 0 {
        return None;
    }
    octets[3] = u8::try_from(n).ok()?;
    Some(Ipv4Addr::from(octets))
}

/// Reads records back from their encoding, the inverse of [`encode_record`]. Keeps the
/// last observer name it made, so the records of one agent share one allocation of it.
#[derive(Debug, Default)]
pub struct RecordDecoder {
    observer: Option<Arc<str>>,
}

impl RecordDecoder {
    /// The record `bytes` encode (a `FlowRecord` message, without a length prefix) and its
    /// stamp. Fields this agent does not know are skipped.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<(Stamp, FlowRecord), DecodeError> {
        let observer = self.observer.clone().unwrap_or_else(|| Arc::from(""));
        let mut r = blank(String::new(), observer);
        let at = self.decode_into(bytes, &mut r)?;
        Ok((at, r))
    }

    /// [`decode`](Self::decode) into `r`, reusing what it holds (its interface name's
    /// buffer, the observer name): a sink that reads every record allocates nothing per
    /// record for them. On an error `r` holds part of the record.
    pub fn decode_into(&mut self, bytes: &[u8], r: &mut FlowRecord) -> Result<Stamp, DecodeError> {
        let mut interface = std::mem::take(&mut r.interface);
        interface.clear();
        *r = blank(interface, r.observer.clone());
        let mut at = Stamp::default();
        let mut first_seen = None;
        let mut window_start = None;
        let mut emitted = None;
        let mut observer: &[u8] = b"";
        Wire(bytes).fields(|tag, f| {
            match tag {
                1 => r.ip_version = f.narrow()?,
                2 => r.protocol = f.narrow()?,
                3 => r.client_addr = f.addr()?,
                4 => r.client_port = f.narrow()?,
                5 => r.server_addr = f.addr()?,
                6 => r.server_port = f.narrow()?,
                7 => r.ifindex = f.narrow()?,
                8 => {
                    r.interface.clear();
                    r.interface.push_str(f.text()?);
                }
                9 => {
                    r.first_hook = match proto::Hook::try_from(f.int()? as i32) {
                        Ok(proto::Hook::Egress) => Hook::Egress,
                        _ => Hook::Ingress,
                    }
                }
                10 => first_seen = Some(f.time()?),
                11 => r.last_seen = f.time()?,
                12 => r.client = f.dir()?,
                13 => r.server = f.dir()?,
                14 => {
                    let e = proto::EndReason::try_from(f.int()? as i32)
                        .map_err(|_| DecodeError("unknown end reason"))?;
                    r.end_reason = end_reason_from_proto(e).unwrap_or(EndReason::IdleTimeout);
                }
                15 => r.tcp = Some(f.tcp()?),
                16 => r.icmp = Some(f.icmp()?),
                17 => r.flow_id = f.int()?,
                18 => observer = f.bytes()?,
                19 => window_start = Some(f.time()?),
                20 => r.continuation = f.int()? != 0,
                21 => at.seq = f.int()?,
                22 => r.fragment = f.int()? != 0,
                23 => at.run = f.int()?,
                24 => emitted = Some(f.time()?),
                25 => r.partial = f.int()? != 0,
                26 => r.client_process = Some(f.process()?),
                27 => r.server_process = Some(f.process()?),
                _ => {}
            }
            Ok(true)
        })?;
        r.first_seen = first_seen.unwrap_or(SystemTime::UNIX_EPOCH);
        // Absent from encodings made before window_start existed: the flow's first packet.
        r.window_start = window_start.unwrap_or(r.first_seen);
        // Absent from encodings made before emitted existed: the latest packet.
        r.emitted = emitted.unwrap_or(r.last_seen);
        if r.observer.as_bytes() != observer {
            r.observer = self.observer(observer)?;
        }
        Ok(at)
    }

    fn observer(&mut self, bytes: &[u8]) -> Result<Arc<str>, DecodeError> {
        if let Some(o) = self.observer.as_ref().filter(|o| o.as_bytes() == bytes) {
            return Ok(o.clone());
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError("observer is not UTF-8"))?;
        let o: Arc<str> = Arc::from(text);
        self.observer = Some(o.clone());
        Ok(o)
    }
}

/// A record with nothing read into it yet, holding `interface` (emptied) and `observer`.
fn blank(interface: String, observer: Arc<str>) -> FlowRecord {
    FlowRecord {
        flow_id: 0,
        observer,
        ip_version: 0,
        protocol: 0,
        client_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        client_port: 0,
        server_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        server_port: 0,
        ifindex: 0,
        interface,
        first_hook: Hook::Ingress,
        first_seen: SystemTime::UNIX_EPOCH,
        last_seen: SystemTime::UNIX_EPOCH,
        window_start: SystemTime::UNIX_EPOCH,
        emitted: SystemTime::UNIX_EPOCH,
        client: DirStats::default(),
        server: DirStats::default(),
        end_reason: EndReason::IdleTimeout,
        continuation: false,
        fragment: false,
        partial: false,
        tcp: None,
        icmp: None,
        client_process: None,
        server_process: None,
    }
}

/// What a record's routing needs (a Kafka message's key and observer header), read from its
/// encoding without decoding the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints<'a> {
    pub protocol: u8,
    pub client: (IpAddr, u16),
    pub server: (IpAddr, u16),
    pub observer: &'a [u8],
}

impl<'a> Endpoints<'a> {
    /// The endpoints of the `FlowRecord` `bytes` encode (without a length prefix).
    pub fn read(bytes: &'a [u8]) -> Result<Endpoints<'a>, DecodeError> {
        let none = (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let mut e = Endpoints {
            protocol: 0,
            client: none,
            server: none,
            observer: b"",
        };
        Wire(bytes).fields(|tag, f| {
            match tag {
                2 => e.protocol = f.narrow()?,
                3 => e.client.0 = f.addr()?,
                4 => e.client.1 = f.narrow()?,
                5 => e.server.0 = f.addr()?,
                6 => e.server.1 = f.narrow()?,
                18 => e.observer = f.bytes()?,
                _ => {}
            }
            Ok(true)
        })?;
        Ok(e)
    }
}

// ---------------------------------------------------------------------------
// Batches as gRPC messages
// ---------------------------------------------------------------------------

/// Bytes before a batch's entries kept for the head of its gRPC message: the 5-byte
/// length prefix, `SubscribeResponse.flows`' key and its length (a varint of at most 5).
const HEAD_ROOM: usize = 5 + 1 + 5;

/// The gRPC length prefix: the compressed flag and the message's length.
pub const GRPC_PREFIX: usize = 5;

/// `FlowRecord`s written as `FlowBatch.records` entries (key, length, record), end to end,
/// after room for the head that makes them one `SubscribeResponse` gRPC message.
#[derive(Debug)]
pub struct BatchWriter {
    buf: Vec<u8>,
    /// Where each entry ends in `buf`.
    ends: Vec<u32>,
    scratch: Vec<u8>,
}

impl BatchWriter {
    /// Room for about `records` records.
    pub fn with_capacity(records: usize) -> BatchWriter {
        let mut buf = Vec::with_capacity(HEAD_ROOM + records * 200);
        buf.resize(HEAD_ROOM, 0);
        BatchWriter {
            buf,
            ends: Vec::with_capacity(records),
            scratch: Vec::with_capacity(256),
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends `r` stamped `at`.
    pub fn record(&mut self, at: Stamp, r: &FlowRecord) {
        self.scratch.clear();
        encode_record(at, r, &mut self.scratch);
        let mut f = Fields(&mut self.buf);
        f.key(1, LEN);
        f.varint(self.scratch.len() as u64);
        self.buf.extend_from_slice(&self.scratch);
        self.ends.push(self.buf.len() as u32);
    }

    /// The batch, its head written.
    pub fn finish(mut self) -> EncodedBatch {
        let entries = self.buf.len() - HEAD_ROOM;
        let mut head = Vec::with_capacity(HEAD_ROOM);
        let mut f = Fields(&mut head);
        f.key(1, LEN);
        f.varint(entries as u64);
        let message = head.len() + entries;
        let start = HEAD_ROOM - GRPC_PREFIX - head.len();
        self.buf[start] = 0;
        self.buf[start + 1..start + GRPC_PREFIX].copy_from_slice(&(message as u32).to_be_bytes());
        self.buf[start + GRPC_PREFIX..HEAD_ROOM].copy_from_slice(&head);
        EncodedBatch {
            bytes: Bytes::from(self.buf),
            start,
            ends: self.ends.into_boxed_slice(),
        }
    }
}

/// Records encoded once, as the `SubscribeResponse` gRPC message of one batch of them;
/// every reader shares it (cheap to clone: the bytes are reference-counted).
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    bytes: Bytes,
    /// Where the gRPC message (its 5-byte prefix) starts in `bytes`.
    start: usize,
    ends: Box<[u32]>,
}

impl EncodedBatch {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The whole batch as one uncompressed gRPC message, length prefix included.
    pub fn frame(&self) -> Bytes {
        self.bytes.slice(self.start..)
    }

    /// The `SubscribeResponse` message alone (what a compressed frame compresses).
    pub fn message(&self) -> &[u8] {
        &self.bytes[self.start + GRPC_PREFIX..]
    }

    /// Entries `start..end` (key, length, record each), end to end.
    pub fn entries(&self, start: usize, end: usize) -> &[u8] {
        if start >= end {
            return &[];
        }
        let from = if start == 0 {
            HEAD_ROOM
        } else {
            self.ends[start - 1] as usize
        };
        &self.bytes[from..self.ends[end - 1] as usize]
    }

    /// Record `i`'s `FlowRecord` bytes, without its entry's key and length.
    pub fn record(&self, i: usize) -> &[u8] {
        let mut entry = Wire(self.entries(i, i + 1));
        // Written by `BatchWriter::record`: a key and a length, never malformed.
        let _ = entry.key();
        entry.len_delimited().unwrap_or_default()
    }

    /// Heap bytes this batch holds.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.len() + self.ends.len() * std::mem::size_of::<u32>()
    }
}

/// `msg` as one gRPC message: the length prefix (with the compressed flag) and `msg`.
pub fn grpc_frame(msg: &[u8], compressed: bool) -> Bytes {
    let mut out = Vec::with_capacity(GRPC_PREFIX + msg.len());
    out.push(u8::from(compressed));
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

/// Entries taken from batches ([`EncodedBatch::entries`]) as one uncompressed
/// `SubscribeResponse` gRPC message: a batch of its own, for what is not a whole batch
/// (a filter's matches, a catch-up over small batches).
pub fn batch_frame(entries: &[&[u8]]) -> Vec<u8> {
    let len: usize = entries.iter().map(|e| e.len()).sum();
    let mut head = Vec::with_capacity(HEAD_ROOM);
    let mut f = Fields(&mut head);
    f.key(1, LEN);
    f.varint(len as u64);
    let mut out = Vec::with_capacity(GRPC_PREFIX + head.len() + len);
    out.push(0);
    out.extend_from_slice(&((head.len() + len) as u32).to_be_bytes());
    out.extend_from_slice(&head);
    for e in entries {
        out.extend_from_slice(e);
    }
    out
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
        r.partial = true;
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
        // The local processes: every field, none (an owner nobody is known for), and a
        // cgroup path long enough that its message's length takes two bytes.
        let mut r = base();
        r.client_process = Some(Box::new(LocalProcess {
            cgroup_id: Some(u64::MAX),
            cgroup: Some("/system.slice/nginx.service".into()),
            unit: Some("nginx.service".into()),
            pid: Some(u32::MAX),
            comm: Some("nginx".into()),
            uid: Some(0),
        }));
        r.server_process = Some(Box::default());
        out.push(r);
        let mut r = base();
        let deep = format!("/machine.slice/{}/payload.scope", "x".repeat(300));
        r.server_process = Some(Box::new(LocalProcess {
            cgroup_id: Some(1),
            cgroup: Some(deep.into()),
            unit: Some("payload.scope".into()),
            pid: None,
            comm: None,
            uid: None,
        }));
        out.push(r);
        out
    }

    #[test]
    fn same_bytes_as_the_prost_message() {
        for (i, r) in variants().iter().enumerate() {
            for (seq, run) in [
                (0, 0),
                (1, 1),
                (127, u64::MAX),
                (128, 0x8000),
                (u64::MAX, 7),
            ] {
                let mut p = proto::FlowRecord::from(r);
                p.seq = seq;
                p.run = run;
                let mut fast = vec![0xaa];
                encode_record(Stamp { run, seq }, r, &mut fast);
                assert_eq!(fast[1..], p.encode_to_vec()[..], "variant {i}, seq {seq}");
            }
        }
    }

    #[test]
    fn decoding_gives_back_every_record_and_its_stamp() {
        let mut dec = RecordDecoder::default();
        for (i, r) in variants().iter().enumerate() {
            let at = Stamp {
                run: 0xdead_beef_0000_0000 + i as u64,
                seq: 1 << (i * 7),
            };
            let mut buf = Vec::new();
            encode_record(at, r, &mut buf);
            let (got_at, got) = dec.decode(&buf).unwrap();
            assert_eq!((got_at, &got), (at, r), "variant {i}");
            // What prost's generated client decodes is the same record.
            let p = proto::FlowRecord::decode(buf.as_slice()).unwrap();
            assert_eq!((p.seq, p.run), (at.seq, at.run));
        }
        // A field this agent does not know (a newer agent's) is skipped.
        let mut buf = Vec::new();
        encode_record(Stamp { run: 1, seq: 2 }, &base(), &mut buf);
        buf.extend_from_slice(&[0xc0, 0x02, 0x05]); // field 40, varint 5
        assert_eq!(dec.decode(&buf).unwrap().1, base());
        assert!(dec.decode(&buf[..buf.len() - 10]).is_err(), "truncated");
    }

    #[test]
    fn timestamps_read_back_exactly_before_and_after_1970() {
        use std::time::Duration;
        let e = SystemTime::UNIX_EPOCH;
        for t in [
            e,
            e + Duration::from_nanos(1),
            e + Duration::from_secs(1),
            e + Duration::new(1_800_000_000, 999_999_999),
            SystemTime::now(),
            e - Duration::from_millis(1500),
            e - Duration::from_secs(1),
        ] {
            let mut buf = Vec::new();
            let mut f = Fields(&mut buf);
            f.timestamp(1, &Timestamp::from(t));
            let mut w = Wire(&buf);
            assert_eq!(w.key().unwrap(), Some((1, LEN)));
            assert_eq!(Field::Bytes(w.len_delimited().unwrap()).time(), Ok(t));
        }
    }

    #[test]
    fn decoding_into_a_used_record_leaves_nothing_of_the_one_before() {
        let mut dec = RecordDecoder::default();
        let recs = variants();
        let mut into = base();
        into.interface = "a-much-longer-interface-name".into();
        // Every variant after every other: what one had and the next has not is gone.
        for (i, r) in recs.iter().chain(recs.iter().rev()).enumerate() {
            let mut buf = Vec::new();
            let at = Stamp {
                run: 7,
                seq: i as u64,
            };
            encode_record(at, r, &mut buf);
            assert_eq!(dec.decode_into(&buf, &mut into).unwrap(), at);
            assert_eq!(&into, r, "variant {i}");
        }
    }

    #[test]
    fn a_batch_is_one_subscribe_response_message() {
        let recs = variants();
        let mut w = BatchWriter::with_capacity(recs.len());
        for (i, r) in recs.iter().enumerate() {
            w.record(
                Stamp {
                    run: 9,
                    seq: 100 + i as u64,
                },
                r,
            );
        }
        let b = w.finish();
        assert_eq!(b.len(), recs.len());
        let frame = b.frame();
        assert_eq!(frame[0], 0, "not compressed");
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5);
        assert_eq!(&frame[5..], b.message());
        let msg = proto::SubscribeResponse::decode(b.message()).unwrap();
        let Some(proto::subscribe_response::Event::Flows(batch)) = msg.event else {
            panic!("{msg:?}")
        };
        assert_eq!(batch.records.len(), recs.len());
        for (i, (p, r)) in batch.records.iter().zip(&recs).enumerate() {
            let mut want = proto::FlowRecord::from(r);
            want.seq = 100 + i as u64;
            want.run = 9;
            assert_eq!(p, &want);
            assert_eq!(b.record(i), want.encode_to_vec());
        }
        // Entries picked from it make a message of their own.
        let picked = batch_frame(&[b.entries(1, 3), b.entries(5, 6)]);
        let msg = proto::SubscribeResponse::decode(&picked[5..]).unwrap();
        let Some(proto::subscribe_response::Event::Flows(batch)) = msg.event else {
            panic!("{msg:?}")
        };
        let seqs: Vec<u64> = batch.records.iter().map(|p| p.seq).collect();
        assert_eq!(seqs, [101, 102, 105]);
        assert_eq!(
            u32::from_be_bytes(picked[1..5].try_into().unwrap()) as usize,
            picked.len() - 5
        );
    }

    fn text(a: IpAddr) -> String {
        String::from_utf8(AddrText::of(a).as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn dotted_quads_read_back_as_display_wrote_them() {
        for v in [0u32, 1, 0x0a00_0001, 0xc0a8_6401, 0x6464_6464, u32::MAX] {
            let a = Ipv4Addr::from(v);
            assert_eq!(dotted_quad(a.to_string().as_bytes()), Some(a));
        }
        for bad in [
            "1.2.3",
            "1.2.3.4.5",
            "256.1.1.1",
            "1..2.3",
            "1.2.3.",
            "01234.1.1.1",
            "::1",
        ] {
            assert_eq!(dotted_quad(bad.as_bytes()), None, "{bad}");
        }
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
