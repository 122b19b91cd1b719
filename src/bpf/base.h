/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The base entry every flow has, whatever map layout holds it: how a
 * packet is turned into a key and counts, and how it fills and updates
 * struct flow_base.
 */
#ifndef __FLOWLENS_BASE_H
#define __FLOWLENS_BASE_H

#include "parse.h"

/* A parsed packet and what it adds to its flow. */
struct acct {
	struct pkt p;
	__u64 pkts;		/* GSO segments count as the packets they become */
	__u64 bytes;
	__u8 ext;		/* enum flow_ext the flow needs, 0 for none */
};

/* Parses the packet into a key and counts. A packet that cannot be
 * accounted is counted under its reason and gives false.
 */
static __always_inline bool acct_of(struct __sk_buff *skb, struct acct *a)
{
	int err;

	/* every counter counts wire segments, as the flows do */
	a->pkts = skb->gso_segs > 1 ? skb->gso_segs : 1;
	err = parse(skb, &a->p);
	if (err) {
		count(err, a->pkts);
		return false;
	}
	if (a->p.frag)
		count(CNT_FRAGMENTS, a->pkts);
	normalise(&a->p);
	a->p.key.ifindex = skb->ifindex;
	a->bytes = a->p.l3_len + (a->pkts - 1) * a->p.hdr_len;
	a->ext = a->p.frag ? 0 : ext_of(a->p.key.proto);
	return true;
}

/* Fills the base entry of a flow whose first packet is `a`, seen at `now`
 * on the fine clock: a flow's duration starts at its first packet.
 */
static __always_inline void base_init(struct flow_base *b, const struct acct *a,
				      __u8 hook, __u64 now)
{
	b->first_seen_ns = now;
	b->last_seen_ns = now;
	/* constant indexes: clang turns a variable one into pointer
	 * arithmetic on the stack that the verifier rejects
	 */
	if (a->p.dir == DIR_HI_TO_LO) {
		b->packets[1] = a->pkts;
		b->bytes[1] = a->bytes;
		b->ttl[1] = a->p.ttl;
	} else {
		b->packets[0] = a->pkts;
		b->bytes[0] = a->bytes;
		b->ttl[0] = a->p.ttl;
	}
	b->meta = (initiator_of(&a->p) == DIR_HI_TO_LO ? META_CLIENT_HI : 0) |
		  (hook == HOOK_EGRESS ? META_EGRESS : 0) |
		  ((__u32)a->ext << META_EXT_SHIFT);
}

/* The extension kind of a flow (enum flow_ext), 0 for none. */
static __always_inline __u32 base_ext(const struct flow_base *b)
{
	return (b->meta & META_EXT) >> META_EXT_SHIFT;
}

/* Adds a packet of an existing flow: exact across CPUs without a lock. */
static __always_inline void base_account(struct flow_base *b,
					 const struct acct *a, __u64 now)
{
	__u8 d = a->p.dir & 1;

	__sync_fetch_and_add(&b->packets[d], a->pkts);
	__sync_fetch_and_add(&b->bytes[d], a->bytes);
	b->last_seen_ns = now;
	b->ttl[d] = a->p.ttl;
}

/* The ingress and egress programs around a handler. Plain "tc" sections:
 * the same programs load on kernels without TCX and are attached as TCX
 * links or clsact filters, as userspace decides. Both are passive.
 */
#define FLOW_PROGRAMS(handler)						\
	SEC("tc")							\
	int flowlens_ingress(struct __sk_buff *skb)			\
	{								\
		handler(skb, HOOK_INGRESS);				\
		return TC_ACT_UNSPEC;					\
	}								\
									\
	SEC("tc")							\
	int flowlens_egress(struct __sk_buff *skb)			\
	{								\
		handler(skb, HOOK_EGRESS);				\
		return TC_ACT_UNSPEC;					\
	}								\
									\
	char LICENSE[] SEC("license") = "Dual BSD/GPL"

#endif /* __FLOWLENS_BASE_H */
