//! RFC 7011 message encoding: templates and uniflow data records of flow records, split to a size limit.

use std::net::IpAddr;

use crate::record::flow::{
    EndReason, FlowRecord, Hook, Latency, LocalProcess, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
};

pub const VERSION: u16 = 10;
pub const MESSAGE_HEADER_LEN: usize = 16;
pub const SET_HEADER_LEN: usize = 4;
pub const TEMPLATE_SET_ID: u16 = 2;
pub const FIRST_TEMPLATE_ID: u16 = 256;
/// Bit 15 of an element id: an enterprise number follows the length.
const ENTERPRISE_BIT: u16 = 0x8000;
/// The length of a variable-length field in a template (RFC 7011 section 7).
pub const VARIABLE_LEN: u16 = 65535;

/// Element ids of the IANA "IPFIX Information Elements" registry.
pub mod ie {
    pub const OCTET_DELTA_COUNT: u16 = 1;
    pub const PACKET_DELTA_COUNT: u16 = 2;
    pub const PROTOCOL_IDENTIFIER: u16 = 4;
    pub const TCP_CONTROL_BITS: u16 = 6;
    pub const SOURCE_TRANSPORT_PORT: u16 = 7;
    pub const SOURCE_IPV4_ADDRESS: u16 = 8;
    pub const INGRESS_INTERFACE: u16 = 10;
    pub const DESTINATION_TRANSPORT_PORT: u16 = 11;
    pub const DESTINATION_IPV4_ADDRESS: u16 = 12;
    pub const EGRESS_INTERFACE: u16 = 14;
    pub const SOURCE_IPV6_ADDRESS: u16 = 27;
    pub const DESTINATION_IPV6_ADDRESS: u16 = 28;
    pub const ICMP_TYPE_CODE_IPV4: u16 = 32;
    pub const FLOW_DIRECTION: u16 = 61;
    pub const FLOW_END_REASON: u16 = 136;
    pub const ICMP_TYPE_CODE_IPV6: u16 = 139;
    pub const FLOW_ID: u16 = 148;
    pub const FLOW_START_MILLISECONDS: u16 = 152;
    pub const FLOW_END_MILLISECONDS: u16 = 153;
    pub const IP_TTL: u16 = 192;
}

/// Element ids under the user's enterprise number (`--ipfix-enterprise`): timing metrics with
/// no IANA element. All are unsigned, big-endian; 0 means "not measured".
pub mod pen {
    /// SYN -> SYN-ACK as seen here (client->server record only).
    pub const HANDSHAKE_SYN_TO_SYNACK_NS: u16 = 1;
    /// SYN-ACK -> the client's final ACK (client->server record only).
    pub const HANDSHAKE_SYNACK_TO_ACK_NS: u16 = 2;
    /// Samples of how long this record's sender took to answer the other side.
    pub const RESPONSE_COUNT: u16 = 3;
    pub const RESPONSE_SUM_NS: u16 = 4;
    pub const RESPONSE_MIN_NS: u16 = 5;
    pub const RESPONSE_MAX_NS: u16 = 6;
    /// Mean absolute difference of consecutive response samples (0 below two samples).
    pub const RESPONSE_JITTER_NS: u16 = 7;
    /// ICMP echo request -> reply round trips (client->server record only).
    pub const ECHO_RTT_COUNT: u16 = 8;
    pub const ECHO_RTT_SUM_NS: u16 = 9;
    pub const ECHO_RTT_MIN_NS: u16 = 10;
    pub const ECHO_RTT_MAX_NS: u16 = 11;
    /// The local socket this record's packets were sent from (1) or delivered to (2),
    /// and so whose the fields below are; 0: neither end is a local socket (a remote
    /// peer on both sides, forwarded traffic), and the fields below are empty. The
    /// sender is preferred: over loopback each direction's record names its own sender.
    pub const LOCAL_ROLE: u16 = 12;
    /// That socket's cgroup v2 id (unsigned64; 0: unknown).
    pub const LOCAL_CGROUP_ID: u16 = 13;
    /// The process that opened it (unsigned32; 0: unknown).
    pub const LOCAL_PID: u16 = 14;
    /// Its user id (unsigned32; 4294967295: unknown).
    pub const LOCAL_UID: u16 = 15;
    /// Its command name (string, variable length, at most 15 bytes; empty: unknown).
    pub const LOCAL_COMM: u16 = 16;
    /// The systemd unit its cgroup names (string, variable length, cut to
    /// [`super::UNIT_MAX`] bytes; empty: none).
    pub const LOCAL_UNIT: u16 = 17;
}

/// Longest command name the kernel keeps.
const COMM_MAX: usize = 15;
/// A unit is cut to this many bytes, so two records of the largest kind fit one message
/// of a 576-byte path MTU (a Docker scope's name, 77 bytes, fits whole).
pub const UNIT_MAX: usize = 80;

/// flowEndReason values (IANA registry).
pub fn end_reason_code(r: EndReason) -> u8 {
    match r {
        EndReason::IdleTimeout => 0x01,
        // In-progress records (ListFlows) never reach an exporter; if one did, the flow
        // goes on like an active-timeout one.
        EndReason::ActiveTimeout | EndReason::InProgress => 0x02,
        // "end of Flow detected": the transport said so.
        EndReason::TcpFin | EndReason::TcpRst => 0x03,
        // "forced end": the metering process stopped.
        EndReason::Shutdown => 0x04,
        // "lack of resources": ended early to make room in a full flow map.
        EndReason::Evicted => 0x05,
    }
}

/// One field specifier of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub id: u16,
    pub len: u16,
    pub enterprise: Option<u32>,
}

/// What a template field carries, and so how one direction of a record fills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    FlowId,
    SrcAddr,
    DstAddr,
    SrcPort,
    DstPort,
    Protocol,
    Ingress,
    Egress,
    Direction,
    Start,
    End,
    Octets,
    Packets,
    EndReason,
    Ttl,
    TcpFlags,
    IcmpTypeCode,
    /// A timing metric under the user's PEN: an id of [`pen`].
    Pen(u16),
}

/// The timing metrics a TCP record adds when a PEN is configured.
const TCP_TIMING: [u16; 7] = [
    pen::HANDSHAKE_SYN_TO_SYNACK_NS,
    pen::HANDSHAKE_SYNACK_TO_ACK_NS,
    pen::RESPONSE_COUNT,
    pen::RESPONSE_SUM_NS,
    pen::RESPONSE_MIN_NS,
    pen::RESPONSE_MAX_NS,
    pen::RESPONSE_JITTER_NS,
];

/// The local socket's owner, every record adds when a PEN is configured.
const LOCAL_OWNER: [u16; 6] = [
    pen::LOCAL_ROLE,
    pen::LOCAL_CGROUP_ID,
    pen::LOCAL_PID,
    pen::LOCAL_UID,
    pen::LOCAL_COMM,
    pen::LOCAL_UNIT,
];

/// The timing metrics an ICMP record adds when a PEN is configured.
const ICMP_TIMING: [u16; 4] = [
    pen::ECHO_RTT_COUNT,
    pen::ECHO_RTT_SUM_NS,
    pen::ECHO_RTT_MIN_NS,
    pen::ECHO_RTT_MAX_NS,
];

/// The record shapes: which protocol detail a template carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// UDP and every other protocol: ports, no detail.
    Ports,
    Tcp,
    /// ICMP or ICMPv6: type/code instead of ports.
    Icmp,
}

const SHAPES: [Shape; 3] = [Shape::Ports, Shape::Tcp, Shape::Icmp];

/// A template: its id, the fields on the wire, and the record length they add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub id: u16,
    pub v6: bool,
    pub shape: Shape,
    elems: Vec<Elem>,
    pub fields: Vec<Field>,
    /// The fixed-length fields' bytes: a record's length without its variable-length
    /// fields (their bytes vary per record).
    pub record_len: usize,
    /// The most a record's variable-length fields take, length prefixes included.
    pub variable_max: usize,
}

impl Template {
    fn new(id: u16, v6: bool, shape: Shape, enterprise: Option<u32>) -> Template {
        use Elem::*;
        let mut elems = vec![FlowId, SrcAddr, DstAddr];
        if shape != Shape::Icmp {
            elems.extend([SrcPort, DstPort]);
        }
        elems.extend([
            Protocol, Ingress, Egress, Direction, Start, End, Octets, Packets, EndReason, Ttl,
        ]);
        match shape {
            Shape::Ports => {}
            Shape::Tcp => elems.push(TcpFlags),
            Shape::Icmp => elems.push(IcmpTypeCode),
        }
        if enterprise.is_some() {
            match shape {
                Shape::Ports => {}
                Shape::Tcp => elems.extend(TCP_TIMING.map(Pen)),
                Shape::Icmp => elems.extend(ICMP_TIMING.map(Pen)),
            }
            elems.extend(LOCAL_OWNER.map(Pen));
        }
        let fields: Vec<Field> = elems.iter().map(|e| field(*e, v6, enterprise)).collect();
        let record_len = fields
            .iter()
            .filter(|f| f.len != VARIABLE_LEN)
            .map(|f| usize::from(f.len))
            .sum();
        let variable_max = elems
            .iter()
            .map(|e| match e {
                Elem::Pen(pen::LOCAL_COMM) => 1 + COMM_MAX,
                Elem::Pen(pen::LOCAL_UNIT) => 1 + UNIT_MAX,
                _ => 0,
            })
            .sum();
        Template {
            id,
            v6,
            shape,
            elems,
            fields,
            record_len,
            variable_max,
        }
    }

    /// The most bytes one record of this template takes.
    pub fn record_max(&self) -> usize {
        self.record_len + self.variable_max
    }

    /// Length of this template's record in a template set.
    pub fn wire_len(&self) -> usize {
        4 + self
            .fields
            .iter()
            .map(|f| if f.enterprise.is_some() { 8 } else { 4 })
            .sum::<usize>()
    }

    fn write(&self, buf: &mut Vec<u8>) {
        put16(buf, self.id);
        put16(buf, self.fields.len() as u16);
        for f in &self.fields {
            match f.enterprise {
                Some(pen) => {
                    put16(buf, f.id | ENTERPRISE_BIT);
                    put16(buf, f.len);
                    put32(buf, pen);
                }
                None => {
                    put16(buf, f.id);
                    put16(buf, f.len);
                }
            }
        }
    }
}

fn field(e: Elem, v6: bool, enterprise: Option<u32>) -> Field {
    use Elem::*;
    let std = |id, len| Field {
        id,
        len,
        enterprise: None,
    };
    let ent = |id, len| Field {
        id,
        len,
        enterprise,
    };
    match e {
        FlowId => std(ie::FLOW_ID, 8),
        SrcAddr if v6 => std(ie::SOURCE_IPV6_ADDRESS, 16),
        SrcAddr => std(ie::SOURCE_IPV4_ADDRESS, 4),
        DstAddr if v6 => std(ie::DESTINATION_IPV6_ADDRESS, 16),
        DstAddr => std(ie::DESTINATION_IPV4_ADDRESS, 4),
        SrcPort => std(ie::SOURCE_TRANSPORT_PORT, 2),
        DstPort => std(ie::DESTINATION_TRANSPORT_PORT, 2),
        Protocol => std(ie::PROTOCOL_IDENTIFIER, 1),
        Ingress => std(ie::INGRESS_INTERFACE, 4),
        Egress => std(ie::EGRESS_INTERFACE, 4),
        Direction => std(ie::FLOW_DIRECTION, 1),
        Start => std(ie::FLOW_START_MILLISECONDS, 8),
        End => std(ie::FLOW_END_MILLISECONDS, 8),
        Octets => std(ie::OCTET_DELTA_COUNT, 8),
        Packets => std(ie::PACKET_DELTA_COUNT, 8),
        EndReason => std(ie::FLOW_END_REASON, 1),
        Ttl => std(ie::IP_TTL, 1),
        // unsigned16 since RFC 7125; the low 8 bits are the classic flags.
        TcpFlags => std(ie::TCP_CONTROL_BITS, 2),
        IcmpTypeCode if v6 => std(ie::ICMP_TYPE_CODE_IPV6, 2),
        IcmpTypeCode => std(ie::ICMP_TYPE_CODE_IPV4, 2),
        // Sums and jitter are unsigned64; counts, handshakes, minima and maxima unsigned32.
        Pen(
            id @ (pen::RESPONSE_SUM_NS
            | pen::RESPONSE_JITTER_NS
            | pen::ECHO_RTT_SUM_NS
            | pen::LOCAL_CGROUP_ID),
        ) => ent(id, 8),
        Pen(id @ pen::LOCAL_ROLE) => ent(id, 1),
        Pen(id @ (pen::LOCAL_COMM | pen::LOCAL_UNIT)) => ent(id, VARIABLE_LEN),
        Pen(id) => ent(id, 4),
    }
}

/// The templates of one exporter: {IPv4, IPv6} x {ports, TCP, ICMP}, ids from 256.
pub fn templates(enterprise: Option<u32>) -> Vec<Template> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        for shape in SHAPES {
            let id = FIRST_TEMPLATE_ID + out.len() as u16;
            out.push(Template::new(id, v6, shape, enterprise));
        }
    }
    out
}

fn template_index(rec: &FlowRecord) -> usize {
    let shape = match rec.protocol {
        IPPROTO_TCP => 1,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => 2,
        _ => 0,
    };
    usize::from(rec.ip_version == 6) * SHAPES.len() + shape
}

fn millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One direction of a flow record: what one side sent.
struct Side<'a> {
    rec: &'a FlowRecord,
    from_client: bool,
}

/// What both directions of a record share, worked out once per record.
struct Shared {
    start_ms: u64,
    end_ms: u64,
}

impl Side<'_> {
    /// The sender's packets crossed the interface inbound: the client's come
    /// through the hook that saw the flow's first packet.
    fn inbound(&self) -> bool {
        (self.rec.first_hook == Hook::Ingress) == self.from_client
    }

    /// The local socket of this record's packets and its role (`pen::LOCAL_ROLE`): the
    /// sender's when it is local, else the receiver's.
    fn local(&self) -> (u8, Option<&LocalProcess>) {
        let r = self.rec;
        let (sender, receiver) = if self.from_client {
            (&r.client_process, &r.server_process)
        } else {
            (&r.server_process, &r.client_process)
        };
        match (sender.as_deref(), receiver.as_deref()) {
            (Some(p), _) => (1, Some(p)),
            (None, Some(p)) => (2, Some(p)),
            (None, None) => (0, None),
        }
    }

    /// The bytes of this record's variable-length fields among `elems`.
    fn variable_len(&self, elems: &[Elem]) -> usize {
        let (_, p) = self.local();
        elems
            .iter()
            .map(|e| match e {
                Elem::Pen(pen::LOCAL_COMM) => 1 + local_comm(p).len(),
                Elem::Pen(pen::LOCAL_UNIT) => 1 + local_unit(p).len(),
                _ => 0,
            })
            .sum()
    }

    fn latency(&self) -> Option<Latency> {
        let t = self.rec.tcp.as_ref()?;
        if self.from_client {
            t.client_latency
        } else {
            t.server_latency
        }
    }

    fn write(&self, e: Elem, flow_id: u64, shared: &Shared, buf: &mut Vec<u8>) {
        use Elem::*;
        let r = self.rec;
        let c = self.from_client;
        let stats = if c { &r.client } else { &r.server };
        let pick = |client: IpAddr, server: IpAddr| if c { client } else { server };
        let tcp = r.tcp.as_ref();
        let rtt = r.icmp.as_ref().and_then(|i| i.echo_rtt).filter(|_| c);
        let lat = self.latency();
        match e {
            FlowId => put64(buf, flow_id),
            SrcAddr => put_addr(buf, pick(r.client_addr, r.server_addr)),
            DstAddr => put_addr(buf, pick(r.server_addr, r.client_addr)),
            SrcPort => put16(buf, if c { r.client_port } else { r.server_port }),
            DstPort => put16(buf, if c { r.server_port } else { r.client_port }),
            Protocol => buf.push(r.protocol),
            Ingress => put32(buf, if self.inbound() { r.ifindex } else { 0 }),
            Egress => put32(buf, if self.inbound() { 0 } else { r.ifindex }),
            Direction => buf.push(u8::from(!self.inbound())),
            Start => put64(buf, shared.start_ms),
            End => put64(buf, shared.end_ms),
            Octets => put64(buf, stats.bytes),
            Packets => put64(buf, stats.packets),
            EndReason => buf.push(end_reason_code(r.end_reason)),
            Ttl => buf.push(stats.ttl),
            TcpFlags => put16(
                buf,
                tcp.map_or(0, |t| if c { t.client_flags } else { t.server_flags })
                    .into(),
            ),
            IcmpTypeCode => {
                let (ty, code) = match r.icmp.as_ref() {
                    Some(i) if c => (i.client_type, i.client_code),
                    Some(i) => (i.server_type, i.server_code),
                    None => (None, None),
                };
                buf.extend_from_slice(&[ty.unwrap_or(0), code.unwrap_or(0)]);
            }
            Pen(id) => {
                let hs = tcp.filter(|_| c);
                match id {
                    pen::HANDSHAKE_SYN_TO_SYNACK_NS => {
                        put32(buf, hs.and_then(|t| t.handshake_client_ns).unwrap_or(0))
                    }
                    pen::HANDSHAKE_SYNACK_TO_ACK_NS => {
                        put32(buf, hs.and_then(|t| t.handshake_server_ns).unwrap_or(0))
                    }
                    pen::RESPONSE_COUNT => put32(buf, lat.map_or(0, |l| l.count)),
                    pen::RESPONSE_SUM_NS => put64(buf, lat.map_or(0, |l| l.sum_ns)),
                    pen::RESPONSE_MIN_NS => put32(buf, lat.map_or(0, |l| l.min_ns)),
                    pen::RESPONSE_MAX_NS => put32(buf, lat.map_or(0, |l| l.max_ns)),
                    pen::RESPONSE_JITTER_NS => {
                        put64(buf, lat.and_then(|l| l.jitter_ns).unwrap_or(0))
                    }
                    pen::ECHO_RTT_COUNT => put32(buf, rtt.map_or(0, |l| l.count)),
                    pen::ECHO_RTT_SUM_NS => put64(buf, rtt.map_or(0, |l| l.sum_ns)),
                    pen::ECHO_RTT_MIN_NS => put32(buf, rtt.map_or(0, |l| l.min_ns)),
                    pen::ECHO_RTT_MAX_NS => put32(buf, rtt.map_or(0, |l| l.max_ns)),
                    pen::LOCAL_ROLE => buf.push(self.local().0),
                    pen::LOCAL_CGROUP_ID => {
                        put64(buf, self.local().1.and_then(|p| p.cgroup_id).unwrap_or(0))
                    }
                    pen::LOCAL_PID => put32(buf, self.local().1.and_then(|p| p.pid).unwrap_or(0)),
                    pen::LOCAL_UID => {
                        put32(buf, self.local().1.and_then(|p| p.uid).unwrap_or(u32::MAX))
                    }
                    pen::LOCAL_COMM => put_text(buf, local_comm(self.local().1)),
                    pen::LOCAL_UNIT => put_text(buf, local_unit(self.local().1)),
                    _ => unreachable!("enterprise element {id} has no writer"),
                }
            }
        }
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn local_comm(p: Option<&LocalProcess>) -> &str {
    cut(p.and_then(|p| p.comm.as_deref()).unwrap_or(""), COMM_MAX)
}

fn local_unit(p: Option<&LocalProcess>) -> &str {
    cut(p.and_then(|p| p.unit.as_deref()).unwrap_or(""), UNIT_MAX)
}

/// A variable-length field of fewer than 255 bytes: a one-byte length, then the bytes.
fn put_text(buf: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() < 255);
    buf.push(s.len() as u8);
    buf.extend_from_slice(s.as_bytes());
}

fn put16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_addr(buf: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
    }
}

/// One finished message, as handed to the transport.
#[derive(Debug)]
pub struct Message<'a> {
    pub bytes: &'a [u8],
    /// Flow records whose data records are all in this message (a flow is never split).
    pub flows: usize,
    pub data_records: u32,
    pub has_templates: bool,
}

/// Encodes messages of one observation domain in one transport session.
pub struct Encoder {
    templates: Vec<Template>,
    domain: u32,
    max_len: usize,
    /// Data records sent before the next message, modulo 2^32 (RFC 7011 section 3.1).
    sequence: u32,
    buf: Vec<u8>,
    /// Template id and start offset of the set being filled.
    open_set: Option<(u16, usize)>,
    flows: usize,
    data_records: u32,
    has_templates: bool,
}

/// Why a message limit cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a {max_len}-byte message cannot hold the largest template or flow ({need} bytes)")]
pub struct TooSmall {
    pub max_len: usize,
    pub need: usize,
}

impl Encoder {
    /// `max_len`: largest message in bytes (the path MTU less IP and UDP headers).
    pub fn new(domain: u32, max_len: usize, enterprise: Option<u32>) -> Result<Encoder, TooSmall> {
        let templates = templates(enterprise);
        let need = MESSAGE_HEADER_LEN
            + SET_HEADER_LEN
            + templates
                .iter()
                .map(|t| t.wire_len().max(2 * t.record_max()))
                .max()
                .unwrap_or(0);
        let max_len = max_len.min(usize::from(u16::MAX));
        if max_len < need {
            return Err(TooSmall { max_len, need });
        }
        Ok(Encoder {
            templates,
            domain,
            max_len,
            sequence: 0,
            buf: Vec::with_capacity(max_len),
            open_set: None,
            flows: 0,
            data_records: 0,
            has_templates: false,
        })
    }

    pub fn templates(&self) -> &[Template] {
        &self.templates
    }

    pub fn sequence(&self) -> u32 {
        self.sequence
    }

    /// A new transport session (a TCP connection) counts from zero again.
    pub fn reset_sequence(&mut self) {
        self.sequence = 0;
    }

    /// Encodes `records` (templates first when asked) into as many messages as the size limit
    /// needs, handing each to `emit`. `export_time`: seconds since the epoch. Any iterator of
    /// records will do, so a sink can pass what its queue holds without copying.
    pub fn encode<'r>(
        &mut self,
        records: impl IntoIterator<Item = &'r FlowRecord>,
        export_time: u32,
        with_templates: bool,
        emit: &mut dyn FnMut(Message<'_>),
    ) {
        self.start(export_time);
        if with_templates {
            for i in 0..self.templates.len() {
                let len = self.templates[i].wire_len();
                self.make_room(TEMPLATE_SET_ID, len, export_time, emit);
                self.templates[i].write(&mut self.buf);
                self.has_templates = true;
            }
        }
        for rec in records {
            let mut sides = [
                (rec.client.packets > 0).then_some(true),
                (rec.server.packets > 0).then_some(false),
            ];
            // A flow's final record may carry nothing new (its last active-timeout record
            // had it all): it still goes out, client -> server with zero counts, so the
            // collector learns how the flow ended.
            let last = !matches!(
                rec.end_reason,
                EndReason::ActiveTimeout | EndReason::InProgress
            );
            if sides == [None, None] && last {
                sides[0] = Some(true);
            }
            let n = sides.iter().flatten().count();
            if n == 0 {
                continue;
            }
            let t = template_index(rec);
            let tpl = &self.templates[t];
            let id = tpl.id;
            let len: usize = sides
                .iter()
                .flatten()
                .map(|&from_client| {
                    tpl.record_len + Side { rec, from_client }.variable_len(&tpl.elems)
                })
                .sum();
            self.make_room(id, len, export_time, emit);
            let fid = rec.flow_id;
            let shared = Shared {
                start_ms: millis(rec.window_start),
                end_ms: millis(rec.last_seen),
            };
            for from_client in sides.into_iter().flatten() {
                let side = Side { rec, from_client };
                for e in &self.templates[t].elems {
                    side.write(*e, fid, &shared, &mut self.buf);
                }
            }
            self.flows += 1;
            self.data_records += n as u32;
        }
        if self.data_records > 0 || self.has_templates {
            self.finish(emit);
        }
    }

    fn start(&mut self, export_time: u32) {
        self.buf.clear();
        put16(&mut self.buf, VERSION);
        put16(&mut self.buf, 0); // length, set by finish
        put32(&mut self.buf, export_time);
        put32(&mut self.buf, self.sequence);
        put32(&mut self.buf, self.domain);
        self.open_set = None;
        self.flows = 0;
        self.data_records = 0;
        self.has_templates = false;
    }

    /// Makes sure `len` more bytes of set `set_id` fit, ending the message if not.
    fn make_room(
        &mut self,
        set_id: u16,
        len: usize,
        export_time: u32,
        emit: &mut dyn FnMut(Message<'_>),
    ) {
        let same_set = matches!(self.open_set, Some((id, _)) if id == set_id);
        let need = len + if same_set { 0 } else { SET_HEADER_LEN };
        if self.buf.len() + need > self.max_len {
            self.finish(emit);
            self.start(export_time);
        } else if same_set {
            return;
        }
        self.close_set();
        self.open_set = Some((set_id, self.buf.len()));
        put16(&mut self.buf, set_id);
        put16(&mut self.buf, 0); // length, set by close_set
    }

    fn close_set(&mut self) {
        if let Some((_, at)) = self.open_set.take() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at + 2..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    fn finish(&mut self, emit: &mut dyn FnMut(Message<'_>)) {
        self.close_set();
        let len = self.buf.len() as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        self.sequence = self.sequence.wrapping_add(self.data_records);
        emit(Message {
            bytes: &self.buf,
            flows: self.flows,
            data_records: self.data_records,
            has_templates: self.has_templates,
        });
    }
}
