//! The generated map types have the sizes the design promises, with no implicit padding.

use std::mem::{offset_of, size_of};

use flowlens::bpf::types::{flow_base, flow_icmp, flow_key, flow_tcp, tcp_latency};

/// Asserts that fields tile the struct: each starts where the previous ended.
macro_rules! assert_tiled {
    ($ty:ty, $($field:ident: $fty:ty),+ $(,)?) => {{
        let mut end = 0usize;
        $(
            assert_eq!(offset_of!($ty, $field), end, "{}.{} has implicit padding before it", stringify!($ty), stringify!($field));
            end += size_of::<$fty>();
        )+
        assert_eq!(end, size_of::<$ty>(), "{} has implicit tail padding", stringify!($ty));
    }};
}

#[test]
fn flow_key_is_44_bytes_fully_explicit() {
    assert_eq!(size_of::<flow_key>(), 44);
    assert_tiled!(flow_key, addr_lo: [u8; 16], addr_hi: [u8; 16], port_lo: u16, port_hi: u16, ifindex: u32, proto: u8, ip_version: u8, flags: u8, __pad: u8);
}

#[test]
fn base_value_fits_the_120_byte_target() {
    assert_eq!(size_of::<flow_base>(), 56);
    assert!(size_of::<flow_base>() <= 120);
    assert_tiled!(flow_base, first_seen_ns: u64, last_seen_ns: u64, packets: [u64; 2], bytes: [u64; 2], ttl: [u8; 2], initiator: u8, first_hook: u8, ext: u8, __pad: [u8; 3]);
}

#[test]
fn tcp_extension_layout() {
    // 96 bytes, over the 56-byte target: per-direction count/sum/min/max
    // and jitter at nanosecond resolution need 32 bytes a side.
    assert_eq!(size_of::<tcp_latency>(), 32);
    assert_tiled!(tcp_latency, sum_ns: u64, jitter_sum_ns: u64, count: u32, min_ns: u32, max_ns: u32, prev_ns: u32);
    assert_eq!(size_of::<flow_tcp>(), 96);
    assert_tiled!(flow_tcp, last_ts_ns: u64, handshake_client_ns: u32, handshake_server_ns: u32, lat: [tcp_latency; 2], lock: u32, flags: [u8; 2], state: u8, bits: u8, syn_retrans: u16, __pad: [u8; 6]);
}

#[test]
fn icmp_extension_layout() {
    // 40 bytes: type/code per direction (4) plus echo RTT pairing and stats.
    assert_eq!(size_of::<flow_icmp>(), 40);
    assert_tiled!(flow_icmp, req_ts_ns: u64, rtt_sum_ns: u64, rtt_count: u32, rtt_min_ns: u32, rtt_max_ns: u32, req_seq: u16, r#type: [u8; 2], code: [u8; 2], __pad: [u8; 6]);
}
