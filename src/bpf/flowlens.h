/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Map key and value layouts shared by the BPF programs and (through the
 * skeleton's generated `types` module) the Rust agent. Every struct has
 * explicit padding: keys are hashed byte for byte, so no byte may be left
 * to chance, and the Rust side asserts these sizes in tests/layout.rs.
 */
#ifndef __FLOWLENS_H
#define __FLOWLENS_H

/* Bumped whenever a key or value layout below changes, so pinned maps of
 * an older layout are never reused by a newer agent.
 */
#define FLOWLENS_LAYOUT_VERSION 1

/* Index of a per-direction slot. A flow key orders its two endpoints
 * ("lo" < "hi" by address, then port), so one conversation has one key.
 */
enum flow_dir {
	DIR_LO_TO_HI = 0,
	DIR_HI_TO_LO = 1,
};

enum flow_hook {
	HOOK_INGRESS = 0,
	HOOK_EGRESS = 1,
};

/* flow_base.ext: which extension entries the flow owns. */
enum flow_ext {
	EXT_TCP = 1,
	EXT_ICMP = 2,
};

/* ICMP keys carry no ports. An echo request/reply pair is keyed by its
 * identifier in both port slots (port_lo == port_hi); any other ICMP
 * message by type << 8 | code in port_lo and its bitwise complement in
 * port_hi, which never equal each other, so the two cannot collide.
 */

/* Slots of the per-CPU `counters` array. The first group are reasons a
 * packet was not accounted; the second are informational.
 */
enum flow_counter {
	CNT_ETH_TRUNC = 0,	/* shorter than an Ethernet header */
	CNT_VLAN_TRUNC,		/* VLAN tag cut short, or more than 2 tags */
	CNT_IPV4_TRUNC,		/* IPv4 header cut short */
	CNT_IPV4_BAD_IHL,	/* IHL < 5 */
	CNT_IPV4_BAD_LEN,	/* total length smaller than the header */
	CNT_IPV6_TRUNC,		/* IPv6 fixed header cut short */
	CNT_IPV6_BAD_EXT,	/* extension header cut short or chain too long */
	CNT_TCP_TRUNC,		/* TCP header cut short */
	CNT_TCP_BAD_DOFF,	/* data offset < 5 or beyond the packet */
	CNT_UDP_TRUNC,		/* UDP header cut short */
	CNT_ICMP_TRUNC,		/* ICMP/ICMPv6 header cut short */
	CNT_BASE_FULL,		/* new flow dropped: base map full */
	CNT_TCP_FULL,		/* new flow dropped: TCP extension map full */
	CNT_ICMP_FULL,		/* new flow dropped: ICMP extension map full */
	CNT_IP_BAD_VERSION,	/* IP version nibble does not match the EtherType */
	CNT_ERRORS_END,
	CNT_PACKETS = CNT_ERRORS_END, /* packets accounted in a flow */
	CNT_NON_IP,		/* not IPv4/IPv6: skipped by design */
	CNT_FRAGMENTS,		/* non-first IP fragments (accounted port-less) */
	CNT_MAX,
};

/* flow_key.flags */
enum flow_key_flags {
	/* Non-first fragments of the protocol in `proto`: no transport
	 * header, so no ports, and a key space of their own (an echo with
	 * identifier 0 or a UDP flow between ports 0 would collide).
	 */
	KEY_FRAGMENT = 1,
};

struct flow_key {
	__u8 addr_lo[16];	/* IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d) */
	__u8 addr_hi[16];
	__u16 port_lo;		/* host byte order; ICMP: see above */
	__u16 port_hi;
	__u32 ifindex;		/* the same packet on two interfaces is two flows */
	__u8 proto;		/* IPPROTO_* */
	__u8 ip_version;	/* 4 or 6 */
	__u8 flags;		/* enum flow_key_flags */
	__u8 __pad;
};

struct flow_base {
	__u64 first_seen_ns;	/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 last_seen_ns;
	__u64 packets[2];	/* indexed by enum flow_dir */
	__u64 bytes[2];		/* IP bytes: IP header and payload */
	__u8 ttl[2];		/* last TTL / hop limit seen per direction */
	__u8 initiator;		/* enum flow_dir of the client's packets */
	__u8 first_hook;	/* enum flow_hook of the first packet */
	__u8 ext;		/* enum flow_ext */
	__u8 __pad[3];
};

/* Transaction latency of one side: a sample is the gap between the last
 * payload of the other side and this side's next payload.
 */
struct tcp_latency {
	__u64 sum_ns;
	__u64 jitter_sum_ns;	/* sum of |sample(i) - sample(i-1)| */
	__u32 count;
	__u32 min_ns;		/* saturates at U32_MAX (~4.29 s) */
	__u32 max_ns;
	__u32 prev_ns;		/* last sample, for the next jitter term */
};

enum tcp_state {
	TCP_ST_NONE = 0,
	TCP_ST_SYN_SENT,
	TCP_ST_SYN_RECV,
	TCP_ST_ESTABLISHED,
	TCP_ST_FIN_WAIT,	/* FIN seen in one direction */
	TCP_ST_CLOSED,		/* FIN seen in both directions */
	TCP_ST_RESET,
};

/* flow_tcp.bits */
enum tcp_bits {
	TCPB_SYN = 1,		/* first SYN seen (handshake from the start) */
	TCPB_SYNACK = 2,	/* SYN-ACK seen */
	TCPB_HS_DONE = 4,	/* client's final ACK seen */
	TCPB_CLIENT_HS = 8,	/* handshake_client_ns is valid */
	TCPB_SERVER_HS = 16,	/* handshake_server_ns is valid */
	TCPB_PAYLOAD = 32,	/* last_ts_ns holds a payload time */
	TCPB_LAST_DIR_HI = 64,	/* last payload went DIR_HI_TO_LO */
	TCPB_LATE_START = 128,	/* first packet seen was mid-connection */
};

struct flow_tcp {
	__u64 last_ts_ns;	/* last handshake event, then last payload */
	__u32 handshake_client_ns;	/* SYN -> SYN-ACK (saturating) */
	__u32 handshake_server_ns;	/* SYN-ACK -> final ACK */
	struct tcp_latency lat[2];	/* indexed by the answering side's dir */
	struct bpf_spin_lock lock;
	__u8 flags[2];		/* OR of TCP flags per direction */
	__u8 state;		/* enum tcp_state */
	__u8 bits;		/* enum tcp_bits */
	__u16 syn_retrans;	/* SYNs re-sent before the SYN-ACK */
	__u8 __pad[6];
};

/* Echo round-trip time is paired by sequence number: a reply whose
 * sequence matches the pending request gives one sample.
 */
struct flow_icmp {
	__u64 req_ts_ns;	/* pending echo request (0: none) */
	__u64 rtt_sum_ns;
	__u32 rtt_count;
	__u32 rtt_min_ns;	/* saturates at U32_MAX (~4.29 s) */
	__u32 rtt_max_ns;
	__u16 req_seq;		/* sequence number of the pending request */
	__u8 type[2];		/* last type per direction */
	__u8 code[2];		/* last code per direction */
	__u8 __pad[6];
};

#endif /* __FLOWLENS_H */
