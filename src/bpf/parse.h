/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Packet parsing: Ethernet (up to two VLAN tags), IPv4/IPv6 (extension
 * headers, fragments), then the TCP, UDP or ICMP header, into a struct pkt
 * whose key is ordered so both directions of a conversation share it.
 */
#ifndef __FLOWLENS_PARSE_H
#define __FLOWLENS_PARSE_H

#include "common.h"

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

/* Returns 0 when the packet should be accounted, or a CNT_* error. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p,
				    __u32 off, __u32 l4_avail, bool first_frag)
{
	__u8 proto = p->key.proto;

	if (!first_frag) {
		p->frag = 1;
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
		if (nh == IPPROTO_FRAGMENT) {
			len = 8;
			if ((((__u16)eh[2] << 8) | eh[3]) & 0xFFF8)
				first_frag = false;
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
	if (ipv6_is_ext(nh))
		return CNT_IPV6_BAD_EXT;
	if (!first_frag)
		count(CNT_FRAGMENTS);
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
	if (!first_frag)
		count(CNT_FRAGMENTS);
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

static __always_inline __u8 ext_of(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return EXT_TCP;
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
		return EXT_ICMP;
	return 0;
}

#endif /* __FLOWLENS_PARSE_H */
