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
#define FLOWLENS_LAYOUT_VERSION 5

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

/* flow_base.ext: which extension map holds the flow's samples, once it
 * has one to keep (see struct flow_base).
 */
enum flow_ext {
	EXT_TCP = 1,
	EXT_ICMP = 2,
};

/* flow_base.meta: who the flow is, set by the datapath when it creates the
 * entry (client side, first hook, extension kind, lossy), and what the
 * poller's scan has done with it since (the other bits; only scan.h writes
 * them, and the datapath never writes meta after creation). Bits 9-31 hold
 * the time of the flow's last record: the BPF clock in units of
 * 2^REPORT_UNIT_SHIFT ns (~8.4 ms), modulo 2^23 units (~19.5 h), read back
 * as the latest such time
 * not after the scan's own (see scan.h).
 */
enum flow_meta {
	META_CLIENT_HI = 1,	/* the client's packets go DIR_HI_TO_LO */
	META_EGRESS = 2,	/* the first packet was seen at egress */
	META_EXT = 12,		/* enum flow_ext << META_EXT_SHIFT */
	META_REPORTED = 16,	/* a record carried the flow's counts up to
				 * the time in bits 8-31 (the entry holds
				 * only what came since)
				 */
	META_CONTINUATION = 32,	/* a connection that ended idle and resumed:
				 * identity and history from `ended`
				 */
	META_IDENTIFIED = 64,	/* the scan looked the flow up in `ended` */
	META_REPORT_CARRY = 128,/* the record's time was in the window after
				 * the one its rounded-down time falls in
				 */
	/* The flow was answered while the base map was full and waited in
	 * probation, where the kernel may have evicted it: it may have lost
	 * packets (set by the datapath, kept by the scan).
	 */
	META_LOSSY = 256,
	/* In probation only, where no record time is kept: the scan has
	 * tallied the flow's source and port (scan_probe). Cleared on the move.
	 */
	META_PROBE_TALLIED = 512,
	META_EXT_SHIFT = 2,
	META_REPORT_SHIFT = 9,
	REPORT_UNIT_SHIFT = 23,
};

/* Which new flows go through probation (probation.h), fixed at load. */
enum admission_mode {
	/* Only under pressure: while the base map is below its admission
	 * room (half its capacity), a new flow goes straight in.
	 */
	ADMIT_UNDER_PRESSURE = 0,
	ADMIT_ALWAYS,		/* every new flow waits to be answered */
	ADMIT_NEVER,		/* none: straight in, a full map loses the
				 * packet (the path before admission; benches)
				 */
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
	CNT_BASE_FULL,		/* packet lost: no room in probation either */
	CNT_TCP_FULL,		/* latency sample lost: TCP extension map full */
	CNT_ICMP_FULL,		/* RTT sample lost: ICMP extension map full */
	CNT_IP_BAD_VERSION,	/* IP version nibble does not match the EtherType */
	CNT_ERRORS_END,
	CNT_PACKETS = CNT_ERRORS_END, /* packets accounted in a flow */
	CNT_NON_IP,		/* not IPv4/IPv6: skipped by design */
	CNT_FRAGMENTS,		/* non-first IP fragments (accounted port-less) */
	CNT_ADMIT_DEFERRED,	/* answered flow's packet kept in probation:
				 * base map full (accounted there)
				 */
	/* Probation (probation.h), by enum scan_proto: flows that entered it,
	 * that moved to the base map (answered), and that the scan ended
	 * there (reported). What entered and is in none of these, nor still
	 * in the map, the kernel evicted.
	 */
	CNT_PROBE_NEW,
	CNT_PROBE_MOVED = CNT_PROBE_NEW + 4,
	CNT_PROBE_ENDED = CNT_PROBE_MOVED + 4,
	CNT_EXT_IDS = CNT_PROBE_ENDED + 4,		/* not a counter: this CPU's extension id sequence */
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

/* The fields a TCP packet may change, kept in the base entry so that an
 * established packet that changes no state never touches flows_tcp.
 */
struct tcp_hot {
	__u8 flags[2];		/* OR of TCP flags per direction */
	__u8 state;		/* enum tcp_state */
	__u8 bits;		/* enum tcp_bits */
	__u8 syn_retrans;	/* SYNs re-sent before the SYN-ACK (saturating) */
	__u8 own;		/* enum flow_owner_state */
};

/* The same for ICMP: the last type/code and the pending echo request. */
struct icmp_hot {
	__u16 req_seq;		/* sequence number of the pending request */
	__u8 type[2];		/* last type per direction */
	__u8 code[2];		/* last code per direction */
};

/* Any flow but ICMP's: only whose owners are still to be taken. */
struct port_hot {
	__u8 __pad[5];
	__u8 own;		/* enum flow_owner_state, where tcp_hot has it */
};

union flow_l4 {
	struct tcp_hot tcp;	/* extension kind EXT_TCP */
	struct icmp_hot icmp;	/* extension kind EXT_ICMP */
	struct port_hot port;	/* the owner state of any non-ICMP flow */
};

_Static_assert(__builtin_offsetof(struct tcp_hot, own) ==
		       __builtin_offsetof(struct port_hot, own),
	       "one owner state byte whatever the protocol");

/* flow_l4.port.own: which local ends' owners (owner.h) are still to be taken,
 * by key endpoint, and which were sent to userspace (through owner_ring), so
 * a record that went out before userspace read them is known to lack them.
 */
enum flow_owner_state {
	OWN_DUE_LO = 1,
	OWN_DUE_HI = 2,
	OWN_SENT_LO = 4,
	OWN_SENT_HI = 8,
};

/* 88 bytes: with the 44-byte key a hash element of 48 + 48 + 88 + 8
 * bytes, which is kmalloc-192 exactly (tests/layout.rs pins it).
 */
struct flow_base {
	__u64 first_seen_ns;	/* the fine clock, at creation */
	__u64 last_seen_ns;	/* the tick's clock (CLOCK_MONOTONIC_COARSE)
				 * unless the packet read the fine one: may be
				 * a tick before first_seen_ns
				 */
	/* What no record has carried yet: the scan subtracts what it reports
	 * (META_REPORTED), so a crashed agent's successor never reports it twice.
	 */
	__u64 packets[2];	/* indexed by enum flow_dir */
	__u64 bytes[2];		/* IP bytes: IP header and payload */
	__u64 ext_id;		/* key of the flow's extension entry; 0: none */
	__u64 l4_ts_ns;		/* TCP: last handshake event, then last
				 * payload; ICMP: pending echo request (0: none)
				 */
	__u32 handshake_client_ns;	/* TCP: SYN -> SYN-ACK (saturating) */
	__u32 handshake_server_ns;	/* TCP: SYN-ACK -> final ACK */
	struct bpf_spin_lock lock;	/* TCP: state changes and samples */
	union flow_l4 l4;
	__u8 ttl[2];		/* last TTL / hop limit seen per direction */
	__u32 meta;		/* enum flow_meta */
};

/* A flow not yet answered, in `probation` (probation.h): the image of the
 * base entry it will have, held as bytes because an LRU map takes no spin
 * lock. The lock's word, unused there, is the move flag (PROBE_MOVING).
 * Element: 48 + 48 + 88 bytes, preallocated, as LRU maps are.
 */
struct flow_probe {
	__u8 base[sizeof(struct flow_base)];
};

/* What the scan tallies of the flows it finds in probation, for operators
 * to see where unanswered flows come from and go to: a HyperLogLog sketch
 * of their clients' addresses (`probe_sketch`) and counts by the answering
 * side's port (`probe_ports`, keyed by struct probe_port).
 */
#define PROBE_SKETCH_REGS 256

struct probe_sketch {
	__u64 tallied;		/* flows tallied, whether or not a port slot */
	__u8 reg[PROBE_SKETCH_REGS];
};

struct probe_port {
	__u16 port;		/* host byte order; 0 for ICMP and others */
	__u8 proto;
	__u8 __pad;
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

/* tcp_hot.bits */
enum tcp_bits {
	TCPB_SYN = 1,		/* first SYN seen (handshake from the start) */
	TCPB_SYNACK = 2,	/* SYN-ACK seen */
	TCPB_HS_DONE = 4,	/* client's final ACK seen */
	TCPB_CLIENT_HS = 8,	/* handshake_client_ns is valid */
	TCPB_SERVER_HS = 16,	/* handshake_server_ns is valid */
	TCPB_PAYLOAD = 32,	/* l4_ts_ns holds a payload time */
	TCPB_LAST_DIR_HI = 64,	/* last payload went DIR_HI_TO_LO */
	TCPB_LATE_START = 128,	/* first packet seen was mid-connection */
};

/* Extension entries are keyed by flow_base.ext_id (a __u64) and made with
 * the flow's first sample, so a flow without one costs its base entry
 * only. Element: 48 + 8 + 64 + 8 bytes, kmalloc-128.
 */
struct flow_tcp {
	struct tcp_latency lat[2];	/* indexed by the answering side's dir */
};

/* Echo round-trip time, paired by sequence number: a reply whose
 * sequence matches the pending request gives one sample. Element:
 * 48 + 8 + 24 + 8 bytes, kmalloc-96.
 */
struct flow_icmp {
	__u64 rtt_sum_ns;
	__u32 rtt_count;
	__u32 rtt_min_ns;	/* saturates at U32_MAX (~4.29 s) */
	__u32 rtt_max_ns;
	__u8 __pad[4];
};

/* One local end of a flow: the socket's cgroup and the process that opened
 * it, taken once per end (owner.h), keyed in flows_owner by
 * ext_id << 1 | the key endpoint (0: addr_lo, 1: addr_hi). Element:
 * 48 + 8 + 32 + 8 bytes, kmalloc-96.
 */
struct flow_owner {
	__u64 cgroup_id;	/* the socket's cgroup v2 id */
	__u32 pid;		/* 0: the socket's owner is not known */
	__u32 uid;
	__u8 comm[16];
};

/* A local end's owner as the datapath took it, a record of owner_ring: the
 * poller puts it into flows_owner (the datapath makes no hash element on a
 * packet's path) under `key`, ext_id << 1 | the key endpoint.
 */
struct owner_event {
	__u64 key;
	struct flow_owner owner;
};

/* A receiving end the datapath leaves the poller to look up (owner.h,
 * owner_resolve), the other record of owner_ring, told apart by its size:
 * the packet's sender and the ports (host byte order).
 */
struct owner_want {
	__u8 remote[16];
	__u16 remote_port;
	__u16 local_port;
	__u8 proto;
	__u8 ip_version;
	__u8 __pad[10];
};

struct owner_want_event {
	__u64 key;
	struct owner_want want;
	__u8 local[16];		/* the local end's address */
	__u32 flags;		/* enum owner_want_flags */
	__u8 __pad[4];
};

enum owner_want_flags {
	/* A socket lookup matches a wildcard-bound socket whatever the
	 * destination, so a forwarded packet to a port a local service
	 * listens on would be taken for that service's: the poller first
	 * checks that `local` is one of this host's. Not on loopback.
	 */
	OWN_WANT_CHECK_LOCAL = 1,
};

/* A TCP connection that ended idle, established and answered, kept in
 * `ended` (LRU) so that when it resumes, the scan gives the new entry (a
 * late start) the connection's identity and history back: its flow id (the
 * first packet's time), its client, the time of its last record, and the
 * TCP state that records carry for the whole connection.
 */
struct flow_ended {
	__u64 first_seen_ns;
	__u64 ended_ns;		/* when its last record was emitted */
	__u32 handshake_client_ns;
	__u32 handshake_server_ns;
	struct tcp_hot hot;
	__u8 meta;		/* META_CLIENT_HI of the connection */
	__u8 __pad;
};

/* What the poller's scan (scan.h) did with a flow it copied out. */
enum scan_kind {
	SCAN_ACTIVE = 0,	/* due an active-timeout record: left in place,
				 * less the counts the record carries
				 */
	SCAN_END_IDLE,		/* ended and deleted: idle timeout */
	SCAN_END_FIN,		/* ended and deleted: FIN both ways, then grace */
	SCAN_END_RST,		/* ended and deleted: reset, then grace */
	SCAN_END_FLUSH,		/* ended and deleted: the agent shuts down */
	SCAN_END_EVICT,		/* ended and deleted: evicted under pressure */
};

/* Index of scan_args.idle_ns by protocol. */
enum scan_proto {
	SCAN_TCP = 0,
	SCAN_UDP,
	SCAN_ICMP,
	SCAN_OTHER,
	SCAN_PROTOS,
};

/* Why a scan pass stopped before the end of its walk. */
enum scan_stop {
	SCAN_DONE = 0,		/* it walked every flow */
	SCAN_RING_FULL,		/* scan_ring had no room: scan again once drained */
	SCAN_BULK,		/* it ended bulk_after flows: split the rest */
};

/* The scan program's context: set by the poller, with the results
 * written back. Times are on the BPF clock (CLOCK_MONOTONIC).
 */
struct scan_args {
	__u64 now_ns;
	__u64 prev_ns;		/* the previous scan: flows seen since are busy */
	__u64 idle_ns[SCAN_PROTOS];
	__u64 close_grace_ns;
	__u64 active_ns;
	__u32 flush;		/* end every flow */
	__u32 closing_only;	/* only the flows in `closing` (scan.h) */
	/* Concurrent scans split the flows by key hash: this one takes part
	 * `part` of `parts` (0 or 1: every flow).
	 */
	__u32 part;
	__u32 parts;
	__u32 bulk_after;	/* stop once this many flows ended (0: never) */
	__u32 stopped;		/* out: enum scan_stop */
	__u32 written;		/* out: records written to scan_ring */
	__u32 ended;		/* out: flows ended (of those records) */
	__u64 entries[3];	/* out: flows, flows_tcp, flows_icmp */
	/* Eviction under map pressure: flows that sent one packet, never had
	 * an active-timeout record and were quiet this long (0: none) are
	 * ended until each map is down to the entries it may keep.
	 */
	__u64 evict_age_ns;
	__u64 evict_keep[3];	/* flows, flows_tcp, flows_icmp */
	__u64 evict_need[3];	/* out: what each map still had to give up */
	/* out: flows left in probation, by enum scan_proto (of this part) */
	__u64 probation[SCAN_PROTOS];
};

/* One flow the scan copied out, a record of scan_ring. The extension is
 * the one the base names, copied before it was deleted (ended flows) or as
 * it is (active ones). The base is bytes, as the entry was just before the
 * scan took the record's counts out of it (its lock bytes zero).
 */
struct scan_rec {
	struct flow_key key;
	__u8 kind;		/* enum scan_kind */
	__u8 has_tcp;
	__u8 has_icmp;
	__u8 has_owner;		/* bit 0: owner[0] is set, bit 1: owner[1] */
	__u8 base[sizeof(struct flow_base)];
	struct flow_tcp tcp;
	struct flow_icmp icmp;
	/* The local sockets at the key's endpoints (addr_lo, addr_hi) and their
	 * owners, from flows_owner (owner.h).
	 */
	struct flow_owner owner[2];
};

#endif /* __FLOWLENS_H */
