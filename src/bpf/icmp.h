/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* ICMP and ICMPv6: last type/code per direction and the pending echo
 * request, kept in the base entry, and echo round-trip time, kept in the
 * flow's flows_icmp entry.
 */
#ifndef __FLOWLENS_ICMP_H
#define __FLOWLENS_ICMP_H

#include "parse.h"

/* Whether this packet is the reply to the pending echo request: an RTT
 * sample, which needs the flow's flows_icmp entry.
 */
static __always_inline bool icmp_wants_sample(const struct flow_base *b,
					      const struct pkt *p)
{
	return p->echo == ECHO_REPLY && b->l4_ts_ns &&
	       b->l4.icmp.req_seq == p->echo_seq;
}

/* No lock: a request and its reply are written at different times, and a
 * lost race only costs one RTT sample. c is the flow's RTT entry, or NULL
 * when the packet gives no sample or the entry could not be made. Returns
 * the fine clock when it read it (echo), else 0.
 */
static __always_inline __u64 icmp_update(struct flow_base *b,
					 struct flow_icmp *c,
					 const struct pkt *p)
{
	struct icmp_hot *h = &b->l4.icmp;
	__u64 now;

	if (p->dir == DIR_HI_TO_LO) {
		h->type[1] = p->icmp_type;
		h->code[1] = p->icmp_code;
	} else {
		h->type[0] = p->icmp_type;
		h->code[0] = p->icmp_code;
	}
	if (!p->echo)
		return 0;
	/* only echo timing needs the fine clock */
	now = bpf_ktime_get_ns();
	if (p->echo == ECHO_REQUEST) {
		b->l4_ts_ns = now;
		h->req_seq = p->echo_seq;
	} else if (icmp_wants_sample(b, p)) {
		__u64 rtt = now - b->l4_ts_ns;
		__u32 s = sat_u32(rtt);

		b->l4_ts_ns = 0;
		if (!c)
			return now;
		if (!c->rtt_count || s < c->rtt_min_ns)
			c->rtt_min_ns = s;
		if (s > c->rtt_max_ns)
			c->rtt_max_ns = s;
		c->rtt_sum_ns += rtt;
		c->rtt_count++;
	}
	return now;
}

#endif /* __FLOWLENS_ICMP_H */
