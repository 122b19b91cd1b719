//! One Kafka message per flow record: the value is the record's `flowlens.v1.FlowRecord` encoding (the bytes a gRPC subscriber gets), the key its canonical 5-tuple, the headers name the schema and the observer.

use std::io::Write as _;

use crate::record::encoding::Endpoints;

/// Header naming the value's protobuf message.
pub const HEADER_SCHEMA: &str = "flowlens.schema";
/// Its value: the fully qualified message name in `proto/flowlens/v1/flowlens.proto`.
pub const SCHEMA: &str = "flowlens.v1.FlowRecord";
/// Header with the schema's major version: a change that is not wire-compatible gets a new
/// package (`flowlens.v2`) and a new number; fields added to `v1` keep it.
pub const HEADER_SCHEMA_VERSION: &str = "flowlens.schema_version";
pub const SCHEMA_VERSION: &str = "1";
/// Header with the record's `observer` (the agent that saw the flow).
pub const HEADER_OBSERVER: &str = "flowlens.observer";

/// Appends the message key of a record: its canonical 5-tuple as ASCII,
/// `PROTOCOL ADDR PORT ADDR PORT` (e.g. `6 10.0.0.1 443 10.0.0.2 51234`), the endpoint with
/// the lower (address, port) first. Both directions of a connection, and every host that saw
/// it, give the same key, so the `murmur2` partitioner puts all its records on one partition.
pub fn write_key(e: &Endpoints<'_>, out: &mut Vec<u8>) {
    let (lo, hi) = if e.client <= e.server {
        (e.client, e.server)
    } else {
        (e.server, e.client)
    };
    // Writes into a Vec cannot fail.
    let _ = write!(out, "{} {} {} {} {}", e.protocol, lo.0, lo.1, hi.0, hi.1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encoding::{encode_record, Stamp};
    use crate::record::flow::{DirStats, EndReason, FlowRecord, Hook};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::time::SystemTime;

    fn rec(c: IpAddr, cp: u16, s: IpAddr, sp: u16) -> FlowRecord {
        FlowRecord {
            flow_id: 1,
            observer: "h".into(),
            ip_version: if c.is_ipv4() { 4 } else { 6 },
            protocol: 6,
            client_addr: c,
            client_port: cp,
            server_addr: s,
            server_port: sp,
            ifindex: 1,
            interface: "eth0".into(),
            first_hook: Hook::Ingress,
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            window_start: SystemTime::UNIX_EPOCH,
            emitted: SystemTime::UNIX_EPOCH,
            continuation: false,
            fragment: false,
            partial: false,
            client: DirStats::default(),
            server: DirStats::default(),
            end_reason: EndReason::TcpFin,
            tcp: None,
            icmp: None,
            client_process: None,
            server_process: None,
        }
    }

    fn key(r: &FlowRecord) -> String {
        let mut bytes = Vec::new();
        encode_record(Stamp::default(), r, &mut bytes);
        let mut k = Vec::new();
        write_key(&Endpoints::read(&bytes).unwrap(), &mut k);
        String::from_utf8(k).unwrap()
    }

    #[test]
    fn both_directions_share_one_key() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));
        assert_eq!(
            key(&rec(a, 51234, b, 443)),
            "6 10.0.0.2 51234 10.0.0.10 443"
        );
        assert_eq!(
            key(&rec(b, 443, a, 51234)),
            "6 10.0.0.2 51234 10.0.0.10 443"
        );
        // Same address both sides: the port decides.
        assert_eq!(key(&rec(a, 9, a, 7)), "6 10.0.0.2 7 10.0.0.2 9");
        let v6 = |n| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n));
        assert_eq!(key(&rec(v6(2), 1, v6(1), 2)), "6 fd00::1 2 fd00::2 1");
    }
}
