/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* TCP: handshake timing, connection state and transaction latency. */
#ifndef __FLOWLENS_TCP_H
#define __FLOWLENS_TCP_H

#include "parse.h"

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

#endif /* __FLOWLENS_TCP_H */
