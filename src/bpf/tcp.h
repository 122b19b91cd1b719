/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* TCP: handshake timing and connection state, kept in the base entry, and
 * transaction latency, kept in the flow's flows_tcp entry.
 */
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

/* Whether this packet answers the other side's payload: a latency sample,
 * which needs the flow's flows_tcp entry.
 */
static __always_inline bool tcp_wants_sample(const struct flow_base *b,
					     const struct pkt *p)
{
	__u8 bits = b->l4.tcp.bits;

	return p->payload && (bits & TCPB_PAYLOAD) &&
	       !!(bits & TCPB_LAST_DIR_HI) != (p->dir & 1);
}

/* Handshake timing, state and direction-agnostic transaction latency.
 * Called with b->lock held (or on a base entry no other CPU sees yet), so
 * the multi-field updates are consistent. t is the flow's latency entry,
 * or NULL when the packet gives no sample or the entry could not be made.
 */
static __always_inline void tcp_update(struct flow_base *b, struct flow_tcp *t,
				       const struct pkt *p, __u64 now)
{
	struct tcp_hot *h = &b->l4.tcp;
	__u8 f = p->tcp_flags, d = p->dir & 1;

	/* constant indexes: b may be on the stack (see base_init) */
	if (d)
		h->flags[1] |= f;
	else
		h->flags[0] |= f;

	if ((f & TCP_SYN) && !(f & TCP_ACK)) {
		if (!(h->bits & TCPB_SYN) && h->state == TCP_ST_NONE) {
			h->bits |= TCPB_SYN;
			b->l4_ts_ns = now;
			h->state = TCP_ST_SYN_SENT;
		} else if ((h->bits & TCPB_SYN) && !(h->bits & TCPB_SYNACK) &&
			   h->syn_retrans < 255) {
			h->syn_retrans++;
		}
	} else if ((f & TCP_SYN) && (f & TCP_ACK)) {
		if (!(h->bits & TCPB_SYNACK) &&
		    (h->state == TCP_ST_NONE || h->state == TCP_ST_SYN_SENT)) {
			if (h->bits & TCPB_SYN) {
				b->handshake_client_ns =
					sat_u32(now - b->l4_ts_ns);
				h->bits |= TCPB_CLIENT_HS;
			}
			h->bits |= TCPB_SYNACK;
			b->l4_ts_ns = now;
			h->state = TCP_ST_SYN_RECV;
			/* remembered so the final ACK is taken from the client */
			if (d)
				h->bits |= TCPB_LAST_DIR_HI;
			else
				h->bits &= ~TCPB_LAST_DIR_HI;
		}
	} else if ((f & TCP_ACK) && h->state == TCP_ST_SYN_RECV &&
		   !!(h->bits & TCPB_LAST_DIR_HI) != d) {
		b->handshake_server_ns = sat_u32(now - b->l4_ts_ns);
		h->bits |= TCPB_HS_DONE | TCPB_SERVER_HS;
		h->state = TCP_ST_ESTABLISHED;
	}

	/* the first packet seen is not the handshake's: monitoring started
	 * mid-connection, or the connection resumed after its entry ended
	 * (FIN or RST included, so the scan can tell either way)
	 */
	if (h->state == TCP_ST_NONE && !(f & TCP_SYN))
		h->bits |= TCPB_LATE_START;

	if (f & TCP_RST) {
		h->state = TCP_ST_RESET;
	} else if (f & TCP_FIN) {
		if (h->state != TCP_ST_RESET)
			h->state = ((h->flags[0] & TCP_FIN) &&
				    (h->flags[1] & TCP_FIN)) ?
					   TCP_ST_CLOSED : TCP_ST_FIN_WAIT;
	} else if (h->state == TCP_ST_NONE) {
		h->state = TCP_ST_ESTABLISHED;
	}

	if (!p->payload)
		return;
	if (t && (h->bits & TCPB_PAYLOAD) &&
	    !!(h->bits & TCPB_LAST_DIR_HI) != d)
		latency_sample(d ? &t->lat[1] : &t->lat[0], now - b->l4_ts_ns);
	b->l4_ts_ns = now;
	h->bits |= TCPB_PAYLOAD;
	if (d)
		h->bits |= TCPB_LAST_DIR_HI;
	else
		h->bits &= ~TCPB_LAST_DIR_HI;
	if (h->state < TCP_ST_ESTABLISHED)
		h->state = TCP_ST_ESTABLISHED;
}

/* What tcp_fast() left to do. */
enum tcp_path {
	TCP_PATH_LOCKED = 0,	/* the whole update, under the lock */
	TCP_PATH_DONE,		/* nothing more */
	TCP_PATH_TURN,		/* a turn: tcp_turn() */
};

/* The common cases without the lock: an established packet that sets no
 * flag its side has not sent before and carries no payload, or continues
 * its own side's payload, changes nothing tcp_update() would, except the
 * payload time (done here; *now is the fine clock when it read it, else
 * left alone). One whose payload answers the other side's is a turn: the
 * payload time and direction, and a latency sample (tcp_turn()).
 */
static __always_inline enum tcp_path tcp_fast(struct flow_base *b,
					      const struct pkt *p, __u64 *now)
{
	struct tcp_hot *h = &b->l4.tcp;
	__u8 f = p->tcp_flags, d = p->dir & 1;

	if ((f & (TCP_SYN | TCP_FIN | TCP_RST)) ||
	    h->state != TCP_ST_ESTABLISHED || (h->flags[d] & f) != f)
		return TCP_PATH_LOCKED;
	if (!p->payload)
		return TCP_PATH_DONE;
	if (!(h->bits & TCPB_PAYLOAD))
		return TCP_PATH_LOCKED;
	if (!!(h->bits & TCPB_LAST_DIR_HI) != d)
		return TCP_PATH_TURN;
	*now = bpf_ktime_get_ns();
	b->l4_ts_ns = *now;
	return TCP_PATH_DONE;
}

/* A turn of an established conversation (see tcp_fast()), without the lock,
 * which is what request/response traffic pays per packet. Two turns never
 * overlap: the answer follows what it answers, and one side's packets of a
 * connection are not processed on two CPUs at once in practice; so the lock
 * only kept a state change (FIN, RST, a new flag) racing the turn from
 * costing that turn's sample, as an ICMP reply racing its request may. The
 * bits byte is written whole: in the established state only the payload
 * bits in it change. t is the flow's latency entry, or NULL.
 */
static __always_inline void tcp_turn(struct flow_base *b, struct flow_tcp *t,
				     const struct pkt *p, __u64 now)
{
	struct tcp_hot *h = &b->l4.tcp;
	__u8 d = p->dir & 1;

	if (t)
		latency_sample(d ? &t->lat[1] : &t->lat[0], now - b->l4_ts_ns);
	b->l4_ts_ns = now;
	if (d)
		h->bits |= TCPB_LAST_DIR_HI;
	else
		h->bits &= ~TCPB_LAST_DIR_HI;
}

/* Every other packet: the whole update under the base entry's lock. t is
 * the flow's latency entry, or NULL when it has none to give. Returns the
 * fine clock it read.
 */
static __always_inline __u64 tcp_locked(struct flow_base *b,
					struct flow_tcp *t, const struct pkt *p)
{
	/* timing samples need the fine clock; no helper runs under the lock */
	__u64 now = bpf_ktime_get_ns();

	bpf_spin_lock(&b->lock);
	tcp_update(b, t, p, now);
	bpf_spin_unlock(&b->lock);
	return now;
}

#endif /* __FLOWLENS_TCP_H */
