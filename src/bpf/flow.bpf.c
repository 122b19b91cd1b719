// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Passive TC/TCX programs that account every IP packet into split flow
 * maps: one base entry per flow, plus a TCP or ICMP extension entry.
 * They never change a packet's fate.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowlens.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IP_OFFSET 0x1FFF
#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT 6

/* IPv6 next-header values that vmlinux.h only has as macros elsewhere */
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ICMPV6 58
#define IPPROTO_DSTOPTS 60
#define IPPROTO_MH 135
#define EEXIST 17

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

#define ECHO_REQUEST 1
#define ECHO_REPLY 2

#define TC_ACT_UNSPEC (-1)
#define U32_MAX 0xffffffffU

/* Capacities are set from userspace before load (bpf_map__set_max_entries). */
#ifdef FLOWLENS_MONOLITHIC
/* Benchmark-only variant (flow_mono.bpf.c): every flow carries the TCP
 * and ICMP fields in one value, to measure what the split saves.
 */
struct flow_mono {
	struct flow_base base;
	struct flow_tcp tcp;
	struct flow_icmp icmp;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_mono);
} flows SEC(".maps");

typedef struct flow_mono flow_value_t;
#else
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_base);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_tcp);
} flows_tcp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_icmp);
} flows_icmp SEC(".maps");

typedef struct flow_base flow_value_t;
#endif

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Read by userspace: pinned maps live under a directory named after it,
 * so maps of another layout are never reused.
 */
const volatile __u32 layout_version = FLOWLENS_LAYOUT_VERSION;

/* Puts the enums into BTF, so the skeleton's `types` module carries them
 * and Rust never restates their values.
 */
struct flow_enums {
	enum flow_dir dir;
	enum flow_hook hook;
	enum flow_ext ext;
	enum flow_counter counter;
	enum tcp_state state;
	enum tcp_bits bits;
	enum flow_key_flags key_flags;
};
const volatile struct flow_enums flow_enums_btf = {};

/* What the parser learned about one packet. */
struct pkt {
	struct flow_key key;
	__u32 l3_len;		/* IP bytes of this skb (all its GSO segments) */
	__u32 hdr_len;		/* IP + L4 header bytes, repeated per GSO segment */
	__u32 payload;		/* L4 payload bytes (TCP) */
	__u8 dir;
	__u8 ttl;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 has_ports;		/* TCP/UDP: ports still to be ordered */
	__u8 frag;		/* non-first fragment: no L4 header */
	__u8 echo;		/* ECHO_REQUEST / ECHO_REPLY, else 0 */
	__u16 echo_seq;
	__u16 sport;
	__u16 dport;
};

/* Adds n (the wire segments of one skb) to a counter slot. */
static __always_inline void count(__u32 reason, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &reason);

	/* Per-CPU slot: no other CPU writes it, a plain add is exact. */
	if (v)
		*v += n;
}

/* Returns 0 when the packet should be accounted, or a CNT_* error. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p,
				    __u32 off, __u32 l4_avail, bool first_frag)
{
	__u8 proto = p->key.proto;

	if (!first_frag) {
		p->frag = 1;
		p->key.flags = KEY_FRAGMENT;
		return 0;
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr th;
		__u32 doff;

		if (l4_avail < sizeof(th) ||
		    bpf_skb_load_bytes(skb, off, &th, sizeof(th)))
			return CNT_TCP_TRUNC;
		doff = th.doff * 4;
		if (doff < sizeof(th) || doff > l4_avail)
			return CNT_TCP_BAD_DOFF;
		p->sport = bpf_ntohs(th.source);
		p->dport = bpf_ntohs(th.dest);
		p->has_ports = 1;
		p->tcp_flags = ((__u8 *)&th)[13];
		p->payload = l4_avail - doff;
		p->hdr_len += doff;
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr uh;

		if (l4_avail < sizeof(uh) ||
		    bpf_skb_load_bytes(skb, off, &uh, sizeof(uh)))
			return CNT_UDP_TRUNC;
		p->sport = bpf_ntohs(uh.source);
		p->dport = bpf_ntohs(uh.dest);
		p->has_ports = 1;
		p->hdr_len += sizeof(uh);
		return 0;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		/* type, code, checksum, then identifier and sequence for echo */
		__u8 ih[8];

		if (l4_avail < 4 || bpf_skb_load_bytes(skb, off, ih, 4))
			return CNT_ICMP_TRUNC;
		p->icmp_type = ih[0];
		p->icmp_code = ih[1];
		if (proto == IPPROTO_ICMP)
			p->echo = ih[0] == ICMP_ECHO ? ECHO_REQUEST :
				  ih[0] == ICMP_ECHOREPLY ? ECHO_REPLY : 0;
		else
			p->echo = ih[0] == ICMPV6_ECHO_REQUEST ? ECHO_REQUEST :
				  ih[0] == ICMPV6_ECHO_REPLY ? ECHO_REPLY : 0;
		/* set once here: ICMP keys are direction-independent */
		if (p->echo) {
			if (l4_avail < 8 ||
			    bpf_skb_load_bytes(skb, off, ih, sizeof(ih)))
				return CNT_ICMP_TRUNC;
			p->key.port_lo = ((__u16)ih[4] << 8) | ih[5];
			p->key.port_hi = p->key.port_lo;
			p->echo_seq = ((__u16)ih[6] << 8) | ih[7];
		} else {
			p->key.port_lo = ((__u16)ih[0] << 8) | ih[1];
			p->key.port_hi = ~p->key.port_lo;
		}
		p->hdr_len += l4_avail < 8 ? l4_avail : 8;
		return 0;
	}
	return 0;
}

static __always_inline bool ipv6_is_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING ||
	       nh == IPPROTO_FRAGMENT || nh == IPPROTO_DSTOPTS ||
	       nh == IPPROTO_AH || nh == IPPROTO_MH;
}

/* Walks at most MAX_IPV6_EXT extension headers. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p,
				      __u32 off)
{
	struct ipv6hdr ip6;
	__u32 avail, l3_len, claimed;
	bool first_frag = true;
	__u8 nh;
	int i;

	if (skb->len < off + sizeof(ip6) ||
	    bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
		return CNT_IPV6_TRUNC;
	if (ip6.version != 6)
		return CNT_IP_BAD_VERSION;
	avail = skb->len - off;
	claimed = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
	/* payload_len 0 is a jumbogram or BIG TCP: trust the skb */
	l3_len = (ip6.payload_len && claimed < avail) ? claimed : avail;

	__builtin_memcpy(p->key.addr_lo, &ip6.saddr, 16);
	__builtin_memcpy(p->key.addr_hi, &ip6.daddr, 16);
	p->key.ip_version = 6;
	p->ttl = ip6.hop_limit;
	p->l3_len = l3_len;
	off += sizeof(ip6);
	p->hdr_len = sizeof(ip6);
	nh = ip6.nexthdr;

	for (i = 0; i < MAX_IPV6_EXT; i++) {
		__u8 eh[8];
		__u32 len;

		if (!ipv6_is_ext(nh))
			break;
		if (p->hdr_len + 8 > l3_len ||
		    bpf_skb_load_bytes(skb, off, eh, sizeof(eh)))
			return CNT_IPV6_BAD_EXT;
		if (nh == IPPROTO_FRAGMENT &&
		    ((((__u16)eh[2] << 8) | eh[3]) & 0xFFF8)) {
			/* Non-first fragment: what follows is payload, not
			 * headers. It belongs to the fragment flow of the
			 * protocol the Fragment header names.
			 */
			first_frag = false;
			nh = eh[0];
			p->hdr_len += 8;
			break;
		}
		if (nh == IPPROTO_FRAGMENT) {
			len = 8;
		} else if (nh == IPPROTO_AH) {
			len = ((__u32)eh[1] + 2) * 4;
		} else {
			len = ((__u32)eh[1] + 1) * 8;
		}
		if (p->hdr_len + len > l3_len)
			return CNT_IPV6_BAD_EXT;
		nh = eh[0];
		off += len;
		p->hdr_len += len;
	}
	if (first_frag && ipv6_is_ext(nh))
		return CNT_IPV6_BAD_EXT;
	p->key.proto = nh;
	return parse_l4(skb, p, off, l3_len - p->hdr_len, first_frag);
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p,
				      __u32 off)
{
	struct iphdr ip;
	__u32 avail, ihl, claimed, l3_len;
	bool first_frag;

	if (skb->len < off + sizeof(ip) ||
	    bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
		return CNT_IPV4_TRUNC;
	if (ip.version != 4)
		return CNT_IP_BAD_VERSION;
	ihl = ip.ihl * 4;
	if (ihl < sizeof(ip))
		return CNT_IPV4_BAD_IHL;
	avail = skb->len - off;
	if (ihl > avail)
		return CNT_IPV4_TRUNC;
	claimed = bpf_ntohs(ip.tot_len);
	/* tot_len 0 is BIG TCP (or TSO) on egress: trust the skb */
	if (claimed && claimed < ihl)
		return CNT_IPV4_BAD_LEN;
	/* trailing Ethernet padding is not part of the flow */
	l3_len = (claimed && claimed < avail) ? claimed : avail;

	/* IPv4-mapped IPv6: ::ffff:a.b.c.d */
	p->key.addr_lo[10] = 0xff;
	p->key.addr_lo[11] = 0xff;
	__builtin_memcpy(&p->key.addr_lo[12], &ip.saddr, 4);
	p->key.addr_hi[10] = 0xff;
	p->key.addr_hi[11] = 0xff;
	__builtin_memcpy(&p->key.addr_hi[12], &ip.daddr, 4);
	p->key.ip_version = 4;
	p->key.proto = ip.protocol;
	p->ttl = ip.ttl;
	p->l3_len = l3_len;
	p->hdr_len = ihl;

	first_frag = !(bpf_ntohs(ip.frag_off) & IP_OFFSET);
	return parse_l4(skb, p, off + ihl, l3_len - ihl, first_frag);
}

/* Returns 0 and fills p, or a CNT_* reason (CNT_NON_IP included). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	__u32 off = ETH_HLEN;
	__u16 proto;
	int i, err;

	if (skb->len < ETH_HLEN ||
	    bpf_skb_load_bytes(skb, 12, &proto, sizeof(proto)))
		return CNT_ETH_TRUNC;
	proto = bpf_ntohs(proto);

	for (i = 0; i < MAX_VLAN_TAGS + 1; i++) {
		if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
			break;
		if (i == MAX_VLAN_TAGS ||
		    bpf_skb_load_bytes(skb, off + 2, &proto, sizeof(proto)))
			return CNT_VLAN_TRUNC;
		proto = bpf_ntohs(proto);
		off += 4;
	}

	if (proto == ETH_P_IP)
		err = parse_ipv4(skb, p, off);
	else if (proto == ETH_P_IPV6)
		err = parse_ipv6(skb, p, off);
	else
		return CNT_NON_IP;
	return err;
}

/* Orders the endpoints so both directions of a conversation share a key. */
static __always_inline void normalise(struct pkt *p)
{
	struct flow_key *k = &p->key;
	int cmp = 0, i;

	for (i = 0; i < 16; i++) {
		if (k->addr_lo[i] != k->addr_hi[i]) {
			cmp = k->addr_lo[i] < k->addr_hi[i] ? -1 : 1;
			break;
		}
	}
	if (!cmp && p->has_ports)
		cmp = p->sport <= p->dport ? -1 : 1;

	if (cmp <= 0) {
		p->dir = DIR_LO_TO_HI;
	} else {
		__u8 tmp[16];

		__builtin_memcpy(tmp, k->addr_lo, 16);
		__builtin_memcpy(k->addr_lo, k->addr_hi, 16);
		__builtin_memcpy(k->addr_hi, tmp, 16);
		p->dir = DIR_HI_TO_LO;
	}
	if (!p->has_ports)
		return;
	k->port_lo = p->dir == DIR_LO_TO_HI ? p->sport : p->dport;
	k->port_hi = p->dir == DIR_LO_TO_HI ? p->dport : p->sport;
}

/* The side that opened the flow, judged from its first packet. */
static __always_inline __u8 initiator_of(const struct pkt *p)
{
	__u8 other = p->dir ^ 1;
	__u8 t = p->icmp_type;

	/* no transport header: a fragment's type or flags are unknown */
	if (p->frag)
		return p->dir;
	switch (p->key.proto) {
	case IPPROTO_TCP:
		if (p->tcp_flags & TCP_SYN)
			return (p->tcp_flags & TCP_ACK) ? other : p->dir;
		/* mid-stream: the ephemeral (higher) port is the client's */
		return p->sport >= p->dport ? p->dir : other;
	case IPPROTO_ICMP:
		return t == ICMP_ECHOREPLY ? other : p->dir;
	case IPPROTO_ICMPV6:
		return t == ICMPV6_ECHO_REPLY ? other : p->dir;
	}
	return p->dir;
}

static __always_inline __u32 sat_u32(__u64 v)
{
	return v > U32_MAX ? U32_MAX : (__u32)v;
}

static __always_inline void latency_sample(struct tcp_latency *l, __u64 gap)
{
	__u32 s = sat_u32(gap);

	if (l->count) {
		l->jitter_sum_ns += s > l->prev_ns ? s - l->prev_ns :
						      l->prev_ns - s;
		if (s < l->min_ns)
			l->min_ns = s;
		if (s > l->max_ns)
			l->max_ns = s;
	} else {
		l->min_ns = s;
		l->max_ns = s;
	}
	l->prev_ns = s;
	l->sum_ns += gap;
	l->count++;
}

/* Handshake timing, state and direction-agnostic transaction latency.
 * Called with t->lock held, so the multi-field updates are consistent.
 */
static __always_inline void tcp_update(struct flow_tcp *t,
				       const struct pkt *p, __u64 now)
{
	__u8 f = p->tcp_flags, d = p->dir & 1;

	t->flags[d] |= f;

	if ((f & TCP_SYN) && !(f & TCP_ACK)) {
		if (!(t->bits & TCPB_SYN) && t->state == TCP_ST_NONE) {
			t->bits |= TCPB_SYN;
			t->last_ts_ns = now;
			t->state = TCP_ST_SYN_SENT;
		} else if ((t->bits & TCPB_SYN) && !(t->bits & TCPB_SYNACK)) {
			t->syn_retrans++;
		}
	} else if ((f & TCP_SYN) && (f & TCP_ACK)) {
		if (!(t->bits & TCPB_SYNACK) &&
		    (t->state == TCP_ST_NONE || t->state == TCP_ST_SYN_SENT)) {
			if (t->bits & TCPB_SYN) {
				t->handshake_client_ns =
					sat_u32(now - t->last_ts_ns);
				t->bits |= TCPB_CLIENT_HS;
			}
			t->bits |= TCPB_SYNACK;
			t->last_ts_ns = now;
			t->state = TCP_ST_SYN_RECV;
			/* remembered so the final ACK is taken from the client */
			if (d)
				t->bits |= TCPB_LAST_DIR_HI;
			else
				t->bits &= ~TCPB_LAST_DIR_HI;
		}
	} else if ((f & TCP_ACK) && t->state == TCP_ST_SYN_RECV &&
		   !!(t->bits & TCPB_LAST_DIR_HI) != d) {
		t->handshake_server_ns = sat_u32(now - t->last_ts_ns);
		t->bits |= TCPB_HS_DONE | TCPB_SERVER_HS;
		t->state = TCP_ST_ESTABLISHED;
	}

	if (f & TCP_RST) {
		t->state = TCP_ST_RESET;
	} else if (f & TCP_FIN) {
		if (t->state != TCP_ST_RESET)
			t->state = ((t->flags[0] & TCP_FIN) &&
				    (t->flags[1] & TCP_FIN)) ?
					   TCP_ST_CLOSED : TCP_ST_FIN_WAIT;
	} else if (t->state == TCP_ST_NONE) {
		/* monitoring started mid-connection */
		t->state = TCP_ST_ESTABLISHED;
		t->bits |= TCPB_LATE_START;
	}

	if (!p->payload)
		return;
	if ((t->bits & TCPB_PAYLOAD) && !!(t->bits & TCPB_LAST_DIR_HI) != d)
		latency_sample(&t->lat[d], now - t->last_ts_ns);
	t->last_ts_ns = now;
	t->bits |= TCPB_PAYLOAD;
	if (d)
		t->bits |= TCPB_LAST_DIR_HI;
	else
		t->bits &= ~TCPB_LAST_DIR_HI;
	if (t->state < TCP_ST_ESTABLISHED)
		t->state = TCP_ST_ESTABLISHED;
}


/* Type/code per direction and echo round-trip time. No lock: a request
 * and its reply are written at different times, and a lost race only
 * costs one RTT sample.
 */
static __always_inline void icmp_update(struct flow_icmp *c,
					const struct pkt *p, __u64 now)
{
	if (p->dir == DIR_HI_TO_LO) {
		c->type[1] = p->icmp_type;
		c->code[1] = p->icmp_code;
	} else {
		c->type[0] = p->icmp_type;
		c->code[0] = p->icmp_code;
	}
	if (p->echo == ECHO_REQUEST) {
		c->req_ts_ns = now;
		c->req_seq = p->echo_seq;
	} else if (p->echo == ECHO_REPLY && c->req_ts_ns &&
		   c->req_seq == p->echo_seq) {
		__u64 rtt = now - c->req_ts_ns;
		__u32 s = sat_u32(rtt);

		if (!c->rtt_count || s < c->rtt_min_ns)
			c->rtt_min_ns = s;
		if (s > c->rtt_max_ns)
			c->rtt_max_ns = s;
		c->rtt_sum_ns += rtt;
		c->rtt_count++;
		c->req_ts_ns = 0;
	}
}

#ifndef FLOWLENS_MONOLITHIC
/* Inserts an empty extension entry; returns 0 or the error to count. */
static __always_inline int ext_insert(const struct pkt *p, __u8 ext)
{
	long err;

	if (ext == EXT_TCP) {
		struct flow_tcp t = {};

		err = bpf_map_update_elem(&flows_tcp, &p->key, &t, BPF_NOEXIST);
		if (err && err != -EEXIST)
			return CNT_TCP_FULL;
	} else {
		struct flow_icmp c = {};

		err = bpf_map_update_elem(&flows_icmp, &p->key, &c, BPF_NOEXIST);
		if (err && err != -EEXIST)
			return CNT_ICMP_FULL;
	}
	return 0;
}

#endif

#ifdef FLOWLENS_MONOLITHIC
/* The extension fields live in the flow's own value. */
static __always_inline int account_ext(const struct pkt *p, __u8 ext,
				       __u64 now, flow_value_t *v)
{
	if (ext == EXT_TCP) {
		bpf_spin_lock(&v->tcp.lock);
		tcp_update(&v->tcp, p, now);
		bpf_spin_unlock(&v->tcp.lock);
	} else {
		icmp_update(&v->icmp, p, now);
	}
	return 0;
}
#else
/* Updates the flow's extension entry, creating it when missing (a new
 * flow, or one whose extension a concurrent end-of-flow delete removed).
 * Returns 0 or the CNT_* reason it could not be created.
 */
static __always_inline int account_ext(const struct pkt *p, __u8 ext,
				       __u64 now, flow_value_t *v)
{
	int err;

	if (ext == EXT_TCP) {
		struct flow_tcp *t = bpf_map_lookup_elem(&flows_tcp, &p->key);

		if (!t) {
			err = ext_insert(p, ext);
			if (err)
				return err;
			t = bpf_map_lookup_elem(&flows_tcp, &p->key);
			if (!t)
				return CNT_TCP_FULL;
		}
		bpf_spin_lock(&t->lock);
		tcp_update(t, p, now);
		bpf_spin_unlock(&t->lock);
	} else {
		struct flow_icmp *c = bpf_map_lookup_elem(&flows_icmp, &p->key);

		if (!c) {
			err = ext_insert(p, ext);
			if (err)
				return err;
			c = bpf_map_lookup_elem(&flows_icmp, &p->key);
			if (!c)
				return CNT_ICMP_FULL;
		}
		icmp_update(c, p, now);
	}
	return 0;
}
#endif

static __always_inline __u8 ext_of(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return EXT_TCP;
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
		return EXT_ICMP;
	return 0;
}

/* Inserts a new flow: base first, so an extension never exists without
 * it, and removed again when its extension cannot be created. Returns 0,
 * -EEXIST (another CPU created it first), or the CNT_* reason it failed.
 */
static __always_inline int flow_create(const struct pkt *p, __u8 hook,
				       __u8 ext, __u64 now, __u64 pkts,
				       __u64 bytes)
{
	flow_value_t nv = {};
	struct flow_base *nb = (struct flow_base *)&nv;
	flow_value_t *v = NULL;
	long err;

	nb->first_seen_ns = now;
	nb->last_seen_ns = now;
	/* constant indexes: clang turns a variable one into pointer
	 * arithmetic on the stack that the verifier rejects
	 */
	if (p->dir == DIR_HI_TO_LO) {
		nb->packets[1] = pkts;
		nb->bytes[1] = bytes;
		nb->ttl[1] = p->ttl;
	} else {
		nb->packets[0] = pkts;
		nb->bytes[0] = bytes;
		nb->ttl[0] = p->ttl;
	}
	nb->initiator = initiator_of(p);
	nb->first_hook = hook;
	nb->ext = ext;
	err = bpf_map_update_elem(&flows, &p->key, &nv, BPF_NOEXIST);
	if (err == -EEXIST)
		return -EEXIST;
	if (err)
		return CNT_BASE_FULL;
	if (!ext)
		return 0;
#ifdef FLOWLENS_MONOLITHIC
	/* the spin lock must be taken in the map value, not on the stack */
	v = bpf_map_lookup_elem(&flows, &p->key);
	if (!v)
		return CNT_BASE_FULL;
#endif
	err = account_ext(p, ext, now, v);
	if (err)
		bpf_map_delete_elem(&flows, &p->key);
	return err;
}

static __always_inline void handle(struct __sk_buff *skb, __u8 hook)
{
	struct pkt p = {};
	struct flow_base *b;
	flow_value_t *v;
	__u64 now, pkts, bytes;
	__u8 ext;
	int err;

	/* every counter counts wire segments, as the flows do */
	pkts = skb->gso_segs > 1 ? skb->gso_segs : 1;
	err = parse(skb, &p);
	if (err) {
		count(err, pkts);
		return;
	}
	if (p.frag)
		count(CNT_FRAGMENTS, pkts);
	normalise(&p);
	p.key.ifindex = skb->ifindex;

	bytes = p.l3_len + (pkts - 1) * p.hdr_len;
	ext = p.frag ? 0 : ext_of(p.key.proto);
	now = bpf_ktime_get_ns();

	v = bpf_map_lookup_elem(&flows, &p.key);
	if (!v) {
		err = flow_create(&p, hook, ext, now, pkts, bytes);
		if (!err) {
			count(CNT_PACKETS, pkts);
			return;
		}
		if (err != -EEXIST) {
			count(err, pkts);
			return;
		}
		/* another CPU created it first: account as an update */
		v = bpf_map_lookup_elem(&flows, &p.key);
		if (!v) {
			count(CNT_BASE_FULL, pkts);
			return;
		}
	}

	b = (struct flow_base *)v;
	__sync_fetch_and_add(&b->packets[p.dir & 1], pkts);
	__sync_fetch_and_add(&b->bytes[p.dir & 1], bytes);
	b->last_seen_ns = now;
	b->ttl[p.dir & 1] = p.ttl;
	/* a failure here only costs an existing flow its extension data */
	if (ext) {
		err = account_ext(&p, ext, now, v);
		if (err)
			count(err, pkts);
	}
	count(CNT_PACKETS, pkts);
}

/* Plain "tc" sections: the same programs load on kernels without TCX and
 * are attached as TCX links or clsact filters, as userspace decides.
 */
SEC("tc")
int flowlens_ingress(struct __sk_buff *skb)
{
	handle(skb, HOOK_INGRESS);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int flowlens_egress(struct __sk_buff *skb)
{
	handle(skb, HOOK_EGRESS);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
