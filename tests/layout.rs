//! The generated map types have the sizes the design promises, with no implicit padding,
//! and each map's hash element lands in the kmalloc size class the memory budget counts on.

use std::mem::{offset_of, size_of};

use flowlens::kernel::bpf::flow_mono_skel::types::{flow_naive, flow_packed};
use flowlens::kernel::bpf::types::{
    bpf_spin_lock, flow_base, flow_ended, flow_icmp, flow_key, flow_l4, flow_owner, flow_probe,
    flow_tcp, icmp_hot, owner_event, owner_resolve_io, owner_want, owner_want_event, port_hot,
    probe_port, probe_sketch, scan_args, scan_rec, tcp_hot, tcp_latency,
};

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

/// Bytes the kernel allocates for one element of a BPF_F_NO_PREALLOC hash map:
/// the `htab_elem` header (48 B), key and value each rounded up to 8, and the
/// bpf_mem_alloc free-list node (8 B), rounded up to a kmalloc size class.
fn kmalloc_class(key: usize, value: usize) -> (usize, usize) {
    const CLASSES: [usize; 12] = [16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192];
    let elem = 48 + key.next_multiple_of(8) + value.next_multiple_of(8) + 8;
    let class = *CLASSES.iter().find(|&&c| c >= elem).expect("class");
    (elem, class)
}

#[test]
fn flow_key_is_44_bytes_fully_explicit() {
    assert_eq!(size_of::<flow_key>(), 44);
    assert_tiled!(flow_key, addr_lo: [u8; 16], addr_hi: [u8; 16], port_lo: u16, port_hi: u16, ifindex: u32, proto: u8, ip_version: u8, flags: u8, __pad: u8);
}

#[test]
fn base_entry_fills_kmalloc_192_exactly() {
    assert_eq!(size_of::<tcp_hot>(), 6);
    assert_tiled!(tcp_hot, flags: [u8; 2], state: u8, bits: u8, syn_retrans: u8, own: u8);
    // The owner state byte is the same byte for TCP and every other non-ICMP flow.
    assert_eq!(size_of::<port_hot>(), 6);
    assert_tiled!(port_hot, __pad: [u8; 5], own: u8);
    assert_eq!(size_of::<icmp_hot>(), 6);
    assert_tiled!(icmp_hot, req_seq: u16, r#type: [u8; 2], code: [u8; 2]);
    assert_eq!(size_of::<flow_l4>(), 6);
    assert_eq!(size_of::<flow_base>(), 88);
    assert_tiled!(flow_base, first_seen_ns: u64, last_seen_ns: u64, packets: [u64; 2], bytes: [u64; 2], ext_id: u64, l4_ts_ns: u64, handshake_client_ns: u32, handshake_server_ns: u32, lock: bpf_spin_lock, l4: flow_l4, ttl: [u8; 2], meta: u32);
    // 48 + 48 + 88 + 8: not a byte to spare before kmalloc-256.
    assert_eq!(
        kmalloc_class(size_of::<flow_key>(), size_of::<flow_base>()),
        (192, 192)
    );
}

#[test]
fn tcp_extension_is_keyed_by_id_and_fills_kmalloc_128() {
    assert_eq!(size_of::<tcp_latency>(), 32);
    assert_tiled!(tcp_latency, sum_ns: u64, jitter_sum_ns: u64, count: u32, min_ns: u32, max_ns: u32, prev_ns: u32);
    assert_eq!(size_of::<flow_tcp>(), 64);
    assert_tiled!(flow_tcp, lat: [tcp_latency; 2]);
    assert_eq!(
        kmalloc_class(size_of::<u64>(), size_of::<flow_tcp>()),
        (128, 128)
    );
}

#[test]
fn icmp_extension_is_keyed_by_id_and_lands_in_kmalloc_96() {
    assert_eq!(size_of::<flow_icmp>(), 24);
    assert_tiled!(flow_icmp, rtt_sum_ns: u64, rtt_count: u32, rtt_min_ns: u32, rtt_max_ns: u32, __pad: [u8; 4]);
    assert_eq!(
        kmalloc_class(size_of::<u64>(), size_of::<flow_icmp>()),
        (88, 96)
    );
}

/// The scan's context and its output records, which userspace reads by these sizes.
#[test]
fn scan_args_and_records_are_fully_explicit() {
    assert_eq!(size_of::<scan_args>(), 208);
    assert_tiled!(scan_args, now_ns: u64, prev_ns: u64, idle_ns: [u64; 4], close_grace_ns: u64, active_ns: u64, flush: u32, closing_only: u32, part: u32, parts: u32, bulk_after: u32, stopped: u32, written: u32, ended: u32, entries: [u64; 3], evict_age_ns: u64, evict_keep: [u64; 3], evict_need: [u64; 3], probation: [u64; 4]);
    // A ring record, not a map element: the owners of the flow's local ends ride with it
    // (+64 B over the 224 it had), so the base entry keeps its kmalloc-192.
    assert_eq!(size_of::<scan_rec>(), 288);
    assert_tiled!(scan_rec, key: flow_key, kind: u8, has_tcp: u8, has_icmp: u8, has_owner: u8, base: [u8; 88], tcp: flow_tcp, icmp: flow_icmp, owner: [flow_owner; 2]);
}

/// A flow's local end and its owner: its own map keyed by ext_id and end, so the base
/// entry does not grow, in kmalloc-96 like an ICMP extension.
#[test]
fn a_local_end_is_kept_in_kmalloc_96() {
    assert_eq!(size_of::<flow_owner>(), 32);
    assert_tiled!(flow_owner, cgroup_id: u64, pid: u32, uid: u32, comm: [u8; 16]);
    assert_eq!(
        kmalloc_class(size_of::<u64>(), size_of::<flow_owner>()),
        (96, 96)
    );
    // On its way there, a record of owner_ring: 40 bytes and the ring's 8-byte header.
    assert_eq!(size_of::<owner_event>(), 40);
    assert_tiled!(owner_event, key: u64, owner: flow_owner);
    // An end the poller is to look up: the ring's other record, told apart by its size.
    assert_eq!(size_of::<owner_want>(), 32);
    assert_tiled!(owner_want, remote: [u8; 16], remote_port: u16, local_port: u16, proto: u8, ip_version: u8, __pad: [u8; 10]);
    assert_eq!(size_of::<owner_want_event>(), 64);
    assert_tiled!(owner_want_event, key: u64, want: owner_want, local: [u8; 16], flags: u32, __pad: [u8; 4]);
    assert_eq!(size_of::<owner_resolve_io>(), 88);
    assert_tiled!(owner_resolve_io, want: owner_want, local: [u8; 16], owner: flow_owner, found: u32, __pad: [u8; 4]);
}

/// The memory of ended connections: an LRU map, so preallocated, 48 B of element header,
/// the key and this value per connection: 128 B, 2 MiB for the 16,384 it keeps.
#[test]
fn an_ended_connection_is_remembered_in_128_bytes() {
    assert_eq!(size_of::<flow_ended>(), 32);
    assert_tiled!(flow_ended, first_seen_ns: u64, ended_ns: u64, handshake_client_ns: u32, handshake_server_ns: u32, hot: tcp_hot, meta: u8, __pad: u8);
    assert_eq!(
        48 + size_of::<flow_key>().next_multiple_of(8) + size_of::<flow_ended>(),
        128
    );
}

/// A flow in probation is its base entry's image: an LRU element of 48 B of header, the
/// key and the image, 184 B, preallocated (6 MiB for the default 32,768). The scan's tally
/// of what waits there: a 256-register sketch and 4-byte port keys.
#[test]
fn a_flow_in_probation_costs_184_bytes() {
    assert_eq!(size_of::<flow_probe>(), size_of::<flow_base>());
    assert_eq!(
        48 + size_of::<flow_key>().next_multiple_of(8) + size_of::<flow_probe>(),
        184
    );
    assert_eq!(size_of::<probe_sketch>(), 264);
    assert_tiled!(probe_sketch, tallied: u64, reg: [u8; 256]);
    assert_eq!(size_of::<probe_port>(), 4);
    assert_tiled!(probe_port, port: u16, proto: u8, __pad: u8);
}

/// The single-map layouts the benchmark measures the split against.
#[test]
fn single_map_values_land_in_256_and_512() {
    assert_eq!(size_of::<flow_packed>(), 152);
    assert_eq!(
        kmalloc_class(size_of::<flow_key>(), size_of::<flow_packed>()).1,
        256
    );
    assert_eq!(size_of::<flow_naive>(), 176);
    assert_eq!(
        kmalloc_class(size_of::<flow_key>(), size_of::<flow_naive>()).1,
        512
    );
}
