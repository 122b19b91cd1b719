/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* ICMP and ICMPv6: last type/code per direction and echo round-trip time. */
#ifndef __FLOWLENS_ICMP_H
#define __FLOWLENS_ICMP_H

#include "parse.h"

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

#endif /* __FLOWLENS_ICMP_H */
