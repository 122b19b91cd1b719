//! The gRPC API shared by the server and the `watch` client: the generated proto types, conversions between them and flow records, and request validation.

use std::net::IpAddr;
use std::time::SystemTime;

use crate::record::filter::{Cidr, CidrError, Filter, PortRange, Selector, SubscribeOptions};
use crate::record::flow::{
    DirStats, EndReason, FlowRecord, Hook, IcmpInfo, Latency, LocalProcess, TcpInfo, TcpState,
};

/// Generated protocol types and the file descriptor set served by reflection.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("flowlens.v1");

    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/flowlens_descriptor.bin"));
}

// ---------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------

/// A request field that cannot be honoured; the message starts with the field's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{field}: invalid CIDR {value:?}: {source}")]
    Cidr {
        field: String,
        value: String,
        source: CidrError,
    },
    #[error("{field}: port {value} out of range 0..=65535")]
    PortOutOfRange { field: String, value: u32 },
    #[error("{field}: reversed port range: lo {lo} > hi {hi}")]
    PortRangeReversed { field: String, lo: u32, hi: u32 },
    #[error("{field}: IP protocol {value} out of range 0..=255")]
    Protocol { field: String, value: u32 },
    #[error("{field}: unknown {kind} value {value}")]
    UnknownEnum {
        field: String,
        kind: &'static str,
        value: i32,
    },
    #[error("{field}: TCP flags {value:#x} out of range 0x01..=0xff")]
    TcpFlags { field: String, value: u32 },
    #[error("{field}: must not be empty")]
    Empty { field: String },
    #[error("{field}: {count} filters exceed the limit of {limit} (--grpc-max-filters)")]
    TooManyFilters {
        field: String,
        count: usize,
        limit: usize,
    },
    #[error("{field}: {len} bytes exceed the limit of {limit} (--grpc-max-string-length)")]
    TooLong {
        field: String,
        len: usize,
        limit: usize,
    },
    #[error("{field}: {source}")]
    Pattern {
        field: String,
        source: crate::record::filter::PatternError,
    },
    #[error("{field}: invalid timestamp: {reason}")]
    Timestamp { field: String, reason: String },
    #[error("{field}: cgroup path {value:?} must start with \"/\" (a path below the cgroup v2 root, e.g. /system.slice)")]
    CgroupPath { field: String, value: String },
    #[error("{field}: pid 0 is no process: give 1..=4294967295")]
    Pid { field: String },
}

impl From<RequestError> for tonic::Status {
    fn from(e: RequestError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// How much one Subscribe request may ask for; the server's flags set these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Filters in `include`, and separately in `exclude`.
    pub max_filters: usize,
    /// Bytes in any string field of a filter.
    pub max_string_len: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_filters: 64,
            max_string_len: 256,
        }
    }
}

/// Validates a request into hub subscription options.
pub fn parse_request(
    req: &proto::SubscribeRequest,
    peer: String,
    limits: &RequestLimits,
) -> Result<SubscribeOptions, RequestError> {
    let since = req.since.map(|t| timestamp_arg(t, "since")).transpose()?;
    Ok(SubscribeOptions {
        selector: parse_selector(&req.include, &req.exclude, limits)?,
        replay: usize::try_from(req.replay).unwrap_or(usize::MAX),
        since,
        after_seq: req.after_seq,
        run: req.run,
        follow: req.follow.unwrap_or(true),
        peer,
    })
}

/// Validates the `include` and `exclude` filters of a request, within `limits`.
pub fn parse_selector(
    include: &[proto::Filter],
    exclude: &[proto::Filter],
    limits: &RequestLimits,
) -> Result<Selector, RequestError> {
    let parse_all = |list: &[proto::Filter], name: &str| {
        if list.len() > limits.max_filters {
            return Err(RequestError::TooManyFilters {
                field: name.to_owned(),
                count: list.len(),
                limit: limits.max_filters,
            });
        }
        list.iter()
            .enumerate()
            .map(|(i, f)| {
                let path = format!("{name}[{i}]");
                check_strings(f, &path, limits.max_string_len)?;
                parse_filter(f, &path)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Selector {
        include: parse_all(include, "include")?,
        exclude: parse_all(exclude, "exclude")?,
    })
}

/// Refuses an oversized string before any parsing spends time on it.
fn check_strings(f: &proto::Filter, path: &str, limit: usize) -> Result<(), RequestError> {
    let fields = [
        ("src_cidr", &f.src_cidr),
        ("dst_cidr", &f.dst_cidr),
        ("cidr", &f.cidr),
        ("interface", &f.interface),
        ("unit", &f.unit),
        ("cgroup", &f.cgroup),
    ];
    for (name, v) in fields {
        if let Some(v) = v.as_deref().filter(|v| v.len() > limit) {
            return Err(RequestError::TooLong {
                field: format!("{path}.{name}"),
                len: v.len(),
                limit,
            });
        }
    }
    Ok(())
}

/// The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

fn timestamp_arg(t: prost_types::Timestamp, field: &str) -> Result<SystemTime, RequestError> {
    let err = |reason: String| RequestError::Timestamp {
        field: field.into(),
        reason,
    };
    if !TIMESTAMP_SECONDS.contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(err(format!(
            "{}s {}ns is outside 0001-01-01..9999-12-31 or has nanos outside 0..1e9",
            t.seconds, t.nanos
        )));
    }
    SystemTime::try_from(t).map_err(|e| err(e.to_string()))
}

/// Validates one filter; `path` names it in errors (e.g. `include[2]`).
pub fn parse_filter(f: &proto::Filter, path: &str) -> Result<Filter, RequestError> {
    let field = |name: &str| format!("{path}.{name}");
    let cidr = |v: &Option<String>, name: &str| -> Result<Option<Cidr>, RequestError> {
        v.as_deref()
            .map(|s| {
                s.parse().map_err(|source| RequestError::Cidr {
                    field: field(name),
                    value: s.to_owned(),
                    source,
                })
            })
            .transpose()
    };
    let ports = |v: &Option<proto::PortRange>, name: &str| {
        v.as_ref()
            .map(|p| parse_port_range(p, &field(name)))
            .transpose()
    };
    let protocol = f
        .protocol
        .map(|p| {
            u8::try_from(p).map_err(|_| RequestError::Protocol {
                field: field("protocol"),
                value: p,
            })
        })
        .transpose()?;
    let ip_version = match proto::IpVersion::try_from(f.ip_version) {
        Ok(proto::IpVersion::Unspecified) => None,
        Ok(proto::IpVersion::IpVersion4) => Some(4),
        Ok(proto::IpVersion::IpVersion6) => Some(6),
        Err(_) => {
            return Err(RequestError::UnknownEnum {
                field: field("ip_version"),
                kind: "IpVersion",
                value: f.ip_version,
            });
        }
    };
    let end_reason = match proto::EndReason::try_from(f.end_reason) {
        Ok(e) => end_reason_from_proto(e),
        Err(_) => {
            return Err(RequestError::UnknownEnum {
                field: field("end_reason"),
                kind: "EndReason",
                value: f.end_reason,
            });
        }
    };
    let tcp_flags = f
        .tcp_flags
        .map(|v| {
            u8::try_from(v)
                .ok()
                .filter(|&b| b != 0)
                .ok_or(RequestError::TcpFlags {
                    field: field("tcp_flags"),
                    value: v,
                })
        })
        .transpose()?;
    let pattern = |v: &Option<String>, name: &str| match v {
        Some(i) if i.is_empty() => Err(RequestError::Empty { field: field(name) }),
        Some(i) => crate::record::filter::NamePattern::parse(i)
            .map(Some)
            .map_err(|source| RequestError::Pattern {
                field: field(name),
                source,
            }),
        None => Ok(None),
    };
    let interface = pattern(&f.interface, "interface")?;
    let unit = pattern(&f.unit, "unit")?;
    let cgroup = f
        .cgroup
        .as_deref()
        .map(|c| {
            cgroup_path(c).ok_or_else(|| RequestError::CgroupPath {
                field: field("cgroup"),
                value: c.to_owned(),
            })
        })
        .transpose()?;
    if f.pid == Some(0) {
        return Err(RequestError::Pid {
            field: field("pid"),
        });
    }
    Ok(Filter {
        src: cidr(&f.src_cidr, "src_cidr")?,
        dst: cidr(&f.dst_cidr, "dst_cidr")?,
        addr: cidr(&f.cidr, "cidr")?,
        src_port: ports(&f.src_port, "src_port")?,
        dst_port: ports(&f.dst_port, "dst_port")?,
        port: ports(&f.port, "port")?,
        protocol,
        ip_version,
        interface,
        tcp_flags,
        end_reason,
        min_bytes: f.min_bytes,
        unit,
        cgroup,
        pid: f.pid,
    })
}

/// A cgroup path as filters compare it: from the root, without a trailing `/` (but `/`
/// itself); None when it does not start at the root.
pub fn cgroup_path(s: &str) -> Option<String> {
    if !s.starts_with('/') {
        return None;
    }
    let t = s.trim_end_matches('/');
    Some(if t.is_empty() {
        "/".into()
    } else {
        t.to_owned()
    })
}

fn parse_port_range(p: &proto::PortRange, field: &str) -> Result<PortRange, RequestError> {
    let port = |v: u32| {
        u16::try_from(v).map_err(|_| RequestError::PortOutOfRange {
            field: field.to_owned(),
            value: v,
        })
    };
    let hi = p.hi.unwrap_or(p.lo);
    if p.lo > hi {
        return Err(RequestError::PortRangeReversed {
            field: field.to_owned(),
            lo: p.lo,
            hi,
        });
    }
    Ok(PortRange {
        lo: port(p.lo)?,
        hi: port(hi)?,
    })
}

// ---------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------

pub(crate) fn end_reason_from_proto(e: proto::EndReason) -> Option<EndReason> {
    match e {
        proto::EndReason::Unspecified => None,
        proto::EndReason::IdleTimeout => Some(EndReason::IdleTimeout),
        proto::EndReason::ActiveTimeout => Some(EndReason::ActiveTimeout),
        proto::EndReason::TcpFin => Some(EndReason::TcpFin),
        proto::EndReason::TcpRst => Some(EndReason::TcpRst),
        proto::EndReason::Shutdown => Some(EndReason::Shutdown),
        proto::EndReason::Evicted => Some(EndReason::Evicted),
        proto::EndReason::InProgress => Some(EndReason::InProgress),
    }
}

impl From<EndReason> for proto::EndReason {
    fn from(e: EndReason) -> proto::EndReason {
        match e {
            EndReason::IdleTimeout => proto::EndReason::IdleTimeout,
            EndReason::ActiveTimeout => proto::EndReason::ActiveTimeout,
            EndReason::TcpFin => proto::EndReason::TcpFin,
            EndReason::TcpRst => proto::EndReason::TcpRst,
            EndReason::Shutdown => proto::EndReason::Shutdown,
            EndReason::Evicted => proto::EndReason::Evicted,
            EndReason::InProgress => proto::EndReason::InProgress,
        }
    }
}

impl From<TcpState> for proto::TcpState {
    fn from(s: TcpState) -> proto::TcpState {
        match s {
            TcpState::None => proto::TcpState::None,
            TcpState::SynSent => proto::TcpState::SynSent,
            TcpState::SynRecv => proto::TcpState::SynRecv,
            TcpState::Established => proto::TcpState::Established,
            TcpState::FinWait => proto::TcpState::FinWait,
            TcpState::Closed => proto::TcpState::Closed,
            TcpState::Reset => proto::TcpState::Reset,
        }
    }
}

pub(crate) fn tcp_state_from_proto(s: proto::TcpState) -> TcpState {
    match s {
        proto::TcpState::Unspecified | proto::TcpState::None => TcpState::None,
        proto::TcpState::SynSent => TcpState::SynSent,
        proto::TcpState::SynRecv => TcpState::SynRecv,
        proto::TcpState::Established => TcpState::Established,
        proto::TcpState::FinWait => TcpState::FinWait,
        proto::TcpState::Closed => TcpState::Closed,
        proto::TcpState::Reset => TcpState::Reset,
    }
}

fn dir_to_proto(d: &DirStats) -> proto::DirStats {
    proto::DirStats {
        packets: d.packets,
        bytes: d.bytes,
        ttl: u32::from(d.ttl),
    }
}

fn latency_to_proto(l: &Latency) -> proto::Latency {
    proto::Latency {
        count: l.count,
        sum_ns: l.sum_ns,
        min_ns: l.min_ns,
        max_ns: l.max_ns,
        jitter_ns: l.jitter_ns,
    }
}

fn tcp_to_proto(t: &TcpInfo) -> proto::TcpInfo {
    proto::TcpInfo {
        client_flags: u32::from(t.client_flags),
        server_flags: u32::from(t.server_flags),
        state: proto::TcpState::from(t.state).into(),
        handshake_client_ns: t.handshake_client_ns,
        handshake_server_ns: t.handshake_server_ns,
        syn_retransmits: u32::from(t.syn_retransmits),
        late_start: t.late_start,
        client_latency: t.client_latency.as_ref().map(latency_to_proto),
        server_latency: t.server_latency.as_ref().map(latency_to_proto),
    }
}

fn process_to_proto(p: &LocalProcess) -> proto::LocalProcess {
    proto::LocalProcess {
        cgroup_id: p.cgroup_id,
        cgroup: p.cgroup.as_deref().unwrap_or_default().to_owned(),
        unit: p.unit.as_deref().unwrap_or_default().to_owned(),
        pid: p.pid,
        comm: p.comm.clone().unwrap_or_default(),
        uid: p.uid,
    }
}

fn process_from_proto(p: &proto::LocalProcess) -> LocalProcess {
    let text = |s: &str| (!s.is_empty()).then(|| s.into());
    LocalProcess {
        cgroup_id: p.cgroup_id,
        cgroup: text(&p.cgroup),
        unit: text(&p.unit),
        pid: p.pid,
        comm: (!p.comm.is_empty()).then(|| p.comm.clone()),
        uid: p.uid,
    }
}

fn icmp_to_proto(i: &IcmpInfo) -> proto::IcmpInfo {
    proto::IcmpInfo {
        client_type: i.client_type.map(u32::from),
        client_code: i.client_code.map(u32::from),
        server_type: i.server_type.map(u32::from),
        server_code: i.server_code.map(u32::from),
        echo_id: i.echo_id.map(u32::from),
        echo_rtt: i.echo_rtt.as_ref().map(latency_to_proto),
    }
}

/// The message `encoding::encode_record` writes without building it; ListFlows
/// and the tests use this one.
impl From<&FlowRecord> for proto::FlowRecord {
    fn from(r: &FlowRecord) -> proto::FlowRecord {
        let ip_version = match r.ip_version {
            4 => proto::IpVersion::IpVersion4,
            6 => proto::IpVersion::IpVersion6,
            _ => proto::IpVersion::Unspecified,
        };
        proto::FlowRecord {
            ip_version: ip_version.into(),
            protocol: u32::from(r.protocol),
            client_addr: r.client_addr.to_string(),
            client_port: u32::from(r.client_port),
            server_addr: r.server_addr.to_string(),
            server_port: u32::from(r.server_port),
            ifindex: r.ifindex,
            interface: r.interface.clone(),
            first_hook: match r.first_hook {
                Hook::Ingress => proto::Hook::Ingress,
                Hook::Egress => proto::Hook::Egress,
            }
            .into(),
            first_seen: Some(r.first_seen.into()),
            last_seen: Some(r.last_seen.into()),
            window_start: Some(r.window_start.into()),
            emitted: Some(r.emitted.into()),
            flow_id: r.flow_id,
            observer: r.observer.to_string(),
            continuation: r.continuation,
            fragment: r.fragment,
            partial: r.partial,
            seq: 0,
            run: 0,
            client: Some(dir_to_proto(&r.client)),
            server: Some(dir_to_proto(&r.server)),
            end_reason: proto::EndReason::from(r.end_reason).into(),
            tcp: r.tcp.as_ref().map(tcp_to_proto),
            icmp: r.icmp.as_ref().map(icmp_to_proto),
            client_process: r.client_process.as_deref().map(process_to_proto),
            server_process: r.server_process.as_deref().map(process_to_proto),
        }
    }
}

/// A proto record that does not fit the Rust type (clients only see this with a buggy or
/// newer server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RecordError {
    pub field: &'static str,
    pub reason: String,
}

fn narrow<T: TryFrom<u32>>(v: u32, field: &'static str) -> Result<T, RecordError> {
    T::try_from(v).map_err(|_| RecordError {
        field,
        reason: format!("{v} out of range"),
    })
}

fn time_from_proto(
    t: Option<prost_types::Timestamp>,
    field: &'static str,
) -> Result<SystemTime, RecordError> {
    let t = t.ok_or(RecordError {
        field,
        reason: "missing".into(),
    })?;
    SystemTime::try_from(t).map_err(|e| RecordError {
        field,
        reason: e.to_string(),
    })
}

fn dir_from_proto(
    d: Option<proto::DirStats>,
    field: &'static str,
) -> Result<DirStats, RecordError> {
    let d = d.unwrap_or_default();
    Ok(DirStats {
        packets: d.packets,
        bytes: d.bytes,
        ttl: narrow(d.ttl, field)?,
    })
}

fn latency_from_proto(l: &proto::Latency) -> Latency {
    Latency {
        count: l.count,
        sum_ns: l.sum_ns,
        min_ns: l.min_ns,
        max_ns: l.max_ns,
        jitter_ns: l.jitter_ns,
    }
}

/// The inverse of `From<&FlowRecord>`; `watch` uses it to print records as the agent's type.
impl TryFrom<&proto::FlowRecord> for FlowRecord {
    type Error = RecordError;

    fn try_from(p: &proto::FlowRecord) -> Result<FlowRecord, RecordError> {
        let addr = |s: &str, field: &'static str| {
            s.parse::<IpAddr>().map_err(|e| RecordError {
                field,
                reason: format!("{s:?}: {e}"),
            })
        };
        let opt8 = |v: Option<u32>, field| v.map(|v| narrow::<u8>(v, field)).transpose();
        let tcp = p
            .tcp
            .as_ref()
            .map(|t| -> Result<TcpInfo, RecordError> {
                Ok(TcpInfo {
                    client_flags: narrow(t.client_flags, "tcp.client_flags")?,
                    server_flags: narrow(t.server_flags, "tcp.server_flags")?,
                    state: tcp_state_from_proto(t.state()),
                    handshake_client_ns: t.handshake_client_ns,
                    handshake_server_ns: t.handshake_server_ns,
                    syn_retransmits: narrow(t.syn_retransmits, "tcp.syn_retransmits")?,
                    late_start: t.late_start,
                    client_latency: t.client_latency.as_ref().map(latency_from_proto),
                    server_latency: t.server_latency.as_ref().map(latency_from_proto),
                })
            })
            .transpose()?;
        let icmp = p
            .icmp
            .as_ref()
            .map(|i| -> Result<IcmpInfo, RecordError> {
                Ok(IcmpInfo {
                    client_type: opt8(i.client_type, "icmp.client_type")?,
                    client_code: opt8(i.client_code, "icmp.client_code")?,
                    server_type: opt8(i.server_type, "icmp.server_type")?,
                    server_code: opt8(i.server_code, "icmp.server_code")?,
                    echo_id: i
                        .echo_id
                        .map(|v| narrow::<u16>(v, "icmp.echo_id"))
                        .transpose()?,
                    echo_rtt: i.echo_rtt.as_ref().map(latency_from_proto),
                })
            })
            .transpose()?;
        Ok(FlowRecord {
            ip_version: match p.ip_version() {
                proto::IpVersion::IpVersion6 => 6,
                _ => 4,
            },
            protocol: narrow(p.protocol, "protocol")?,
            client_addr: addr(&p.client_addr, "client_addr")?,
            client_port: narrow(p.client_port, "client_port")?,
            server_addr: addr(&p.server_addr, "server_addr")?,
            server_port: narrow(p.server_port, "server_port")?,
            ifindex: p.ifindex,
            interface: p.interface.clone(),
            first_hook: match p.first_hook() {
                proto::Hook::Egress => Hook::Egress,
                _ => Hook::Ingress,
            },
            first_seen: time_from_proto(p.first_seen, "first_seen")?,
            last_seen: time_from_proto(p.last_seen, "last_seen")?,
            // Absent from servers before window_start existed: the flow's first packet.
            window_start: match p.window_start {
                Some(_) => time_from_proto(p.window_start, "window_start")?,
                None => time_from_proto(p.first_seen, "first_seen")?,
            },
            // Absent from servers before emitted existed: the last packet is the closest.
            emitted: match p.emitted {
                Some(_) => time_from_proto(p.emitted, "emitted")?,
                None => time_from_proto(p.last_seen, "last_seen")?,
            },
            flow_id: p.flow_id,
            observer: p.observer.as_str().into(),
            continuation: p.continuation,
            fragment: p.fragment,
            partial: p.partial,
            client: dir_from_proto(p.client, "client.ttl")?,
            server: dir_from_proto(p.server, "server.ttl")?,
            end_reason: end_reason_from_proto(p.end_reason()).unwrap_or(EndReason::IdleTimeout),
            tcp,
            icmp,
            client_process: p
                .client_process
                .as_ref()
                .map(|p| Box::new(process_from_proto(p))),
            server_process: p
                .server_process
                .as_ref()
                .map(|p| Box::new(process_from_proto(p))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_reason_round_trips() {
        for e in EndReason::ALL {
            assert_eq!(end_reason_from_proto(proto::EndReason::from(e)), Some(e));
        }
    }
}
