/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The poller's scan: one pass over the flow maps inside the kernel, run by
 * the agent through BPF_PROG_TEST_RUN every poll. It ends the flows that
 * are due (idle, TCP closed or reset past the grace, evicted under map
 * pressure, or every flow on shutdown), copying each out and deleting it
 * from every map, and copies out the flows due an active-timeout record,
 * taking the counts it copies out of their entries. Userspace then handles
 * only those instead of copying every flow out every poll.
 *
 * Records go to a ring buffer that the poller drains while the scan runs,
 * so what one pass hands out is not bounded by a buffer sized for it: a
 * pass stops early only when the poller falls a whole ring behind.
 *
 * Between spaced-out full scans, a pass over `closing` alone ends the TCP
 * flows the datapath noted as closed, so closes stay prompt at any size.
 *
 * Active-timeout windows are counted from a flow's first packet: a flow is
 * due when it is in a window no record of it was emitted in (the time of
 * its last record is in flow_base.meta, which only this program writes) and
 * has had packets since the previous scan; a quiet flow is left for its
 * idle end or for the first scan that finds it busy again, and a closed
 * TCP flow for its close.
 *
 * What a record carries is gone from the entry: an active-timeout record
 * takes its counts out with atomic subtractions of exactly what it copied,
 * so packets counted meanwhile stay, and an agent that crashes and restarts
 * never reports them twice.
 */
#ifndef __FLOWLENS_SCAN_H
#define __FLOWLENS_SCAN_H

/* The scan's records (struct scan_rec), drained by the poller as they come.
 * Its size bounds nothing but how far the poller may fall behind.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} scan_ring SEC(".maps");

/* TCP connections that ended idle, established and answered (struct
 * flow_ended), by key: a connection that resumes gets its identity back.
 * One-packet and evicted flows never enter it, so a flood cannot flush it.
 * Pinned, so the memory survives an agent restart.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow_key);
	__type(value, struct flow_ended);
} ended SEC(".maps");

/* The time of the latest full scan, pinned: the first poll of a restarted
 * agent judges "busy since the previous scan" against its predecessor's.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} last_scan SEC(".maps");

struct scan_ctx {
	struct scan_args a;
	__u32 stop;		/* enum scan_stop */
	__u32 written;
	__u32 ended;
	/* Ends left before a bulk stop, counted down from bulk_after (0:
	 * never). A count up from 0 compared with a bound would make the
	 * verifier walk every value of it through the callback.
	 */
	__u32 bulk_left;
};

/* How long the flow has been quiet at the scan's time. */
static __always_inline __u64 scan_idle(const struct flow_base *b,
				       const struct scan_args *a)
{
	return a->now_ns > b->last_seen_ns ? a->now_ns - b->last_seen_ns : 0;
}

/* The active-timeout window time t falls in (0: the first). */
static __always_inline __u64 window_of(const struct flow_base *b, __u64 t,
				       __u64 active)
{
	return t > b->first_seen_ns ? (t - b->first_seen_ns) / active : 0;
}

/* The time of the flow's last record (META_REPORTED), rounded down to the
 * unit: the latest time not after `now` with the bits meta keeps.
 */
static __always_inline __u64 report_time(const struct flow_base *b, __u64 now)
{
	__u64 cur = now >> REPORT_UNIT_SHIFT;
	__u64 ago = (cur - (b->meta >> META_REPORT_SHIFT)) & 0x7fffff;

	return (cur - ago) << REPORT_UNIT_SHIFT;
}

/* The window the flow's last record was emitted in; 0 before its first. */
static __always_inline __u64 reported_window(const struct flow_base *b,
					     __u64 now, __u64 active)
{
	if (!(b->meta & META_REPORTED))
		return 0;
	return window_of(b, report_time(b, now), active) +
	       !!(b->meta & META_REPORT_CARRY);
}

/* Notes that a record carried the flow's counts up to time t. The time is
 * kept rounded down; the carry bit says when that moved it into the window
 * before, so windows are judged exactly.
 */
static __always_inline void mark_reported(struct flow_base *b, __u64 t,
					  __u64 active)
{
	__u64 units = t >> REPORT_UNIT_SHIFT;
	__u32 meta = b->meta & (META_CLIENT_HI | META_EGRESS | META_EXT |
				META_CONTINUATION | META_IDENTIFIED |
				META_LOSSY);

	meta |= META_REPORTED | (__u32)(units & 0x7fffff) << META_REPORT_SHIFT;
	if (active && window_of(b, units << REPORT_UNIT_SHIFT, active) <
			      window_of(b, t, active))
		meta |= META_REPORT_CARRY;
	b->meta = meta;
}

static __always_inline bool tcp_flow(const struct flow_key *k,
				     const struct flow_base *b)
{
	return k->proto == IPPROTO_TCP && base_ext(b) == EXT_TCP;
}

/* What the scan does with a flow: a scan_kind, or -1 to leave it. */
static __always_inline int scan_due(const struct flow_key *k,
				    const struct flow_base *b,
				    const struct scan_args *a)
{
	__u64 now = a->now_ns;
	__u64 idle = scan_idle(b, a);
	__u32 p = proto_slot(k->proto);
	__u64 w;

	if (a->flush)
		return SCAN_END_FLUSH;
	/* the key's protocol shares a cache line with the times and counts,
	 * the TCP state and meta do not: most flows are judged without them
	 */
	if (k->proto == IPPROTO_TCP && idle >= a->close_grace_ns &&
	    base_ext(b) == EXT_TCP) {
		if (b->l4.tcp.state == TCP_ST_RESET)
			return SCAN_END_RST;
		if (b->l4.tcp.state == TCP_ST_CLOSED)
			return SCAN_END_FIN;
	}
	if (p < SCAN_PROTOS && idle >= a->idle_ns[p])
		return SCAN_END_IDLE;
	/* quiet since the previous scan, or nothing new to report */
	if (!a->active_ns || b->last_seen_ns < a->prev_ns ||
	    !(b->packets[0] | b->packets[1]))
		return -1;
	w = window_of(b, now, a->active_ns);
	if (!w || w <= reported_window(b, now, a->active_ns))
		return -1;
	/* a closed connection ends within the grace: its final record, with
	 * its own reason, carries the rest
	 */
	if (tcp_flow(k, b) && tcp_closed(b))
		return -1;
	return SCAN_ACTIVE;
}

/* Whether a flow no other rule ends may be evicted: it sent one packet
 * (no answer), was never reported, and has been quiet for the eviction age.
 */
static __always_inline bool scan_may_evict(const struct flow_base *b,
					   const struct scan_args *a)
{
	return a->evict_age_ns && scan_idle(b, a) >= a->evict_age_ns &&
	       b->packets[0] + b->packets[1] == 1 &&
	       !(b->meta & META_REPORTED);
}

/* Whether evicting a flow frees an entry some map must give up; takes
 * what it frees off the need.
 */
static __always_inline bool scan_take_need(struct scan_args *a, bool tcp,
					   bool icmp)
{
	__u64 *need = a->evict_need;

	if (!need[0] && !(tcp && need[1]) && !(icmp && need[2]))
		return false;
	if (need[0])
		need[0]--;
	if (tcp && need[1])
		need[1]--;
	if (icmp && need[2])
		need[2]--;
	return true;
}

/* Copies a base entry around its lock, which a program may not read. */
static __always_inline void scan_copy_base(__u8 *dst, const struct flow_base *b)
{
	const __u8 *src = (const __u8 *)b;
	const __u32 lock = __builtin_offsetof(struct flow_base, lock);
	const __u32 after = lock + sizeof(struct bpf_spin_lock);

	__builtin_memcpy(dst, src, lock);
	__builtin_memcpy(dst + after, src + after,
			 sizeof(struct flow_base) - after);
}

/* Which of `parts` concurrent scans takes the flow: a hash of the whole
 * key, so the parts are even whatever the traffic.
 */
static __always_inline __u32 scan_part(const struct flow_key *k, __u32 parts)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = 0;
	int i;

	for (i = 0; i < sizeof(*k) / 4; i++)
		h = (h ^ w[i]) * 0x9e3779b1;
	return (h >> 16) % parts;
}

/* What a resumed connection takes back from `ended` (see scan_identify). */
static __always_inline void identify_hot(struct flow_base *b,
					 const struct flow_ended *e)
{
	struct tcp_hot *h = &b->l4.tcp;
	__u8 hs = TCPB_SYN | TCPB_SYNACK | TCPB_HS_DONE | TCPB_CLIENT_HS |
		  TCPB_SERVER_HS;

	h->flags[0] |= e->hot.flags[0];
	h->flags[1] |= e->hot.flags[1];
	h->bits |= e->hot.bits & hs;
	if (!(e->hot.bits & TCPB_LATE_START))
		h->bits &= ~TCPB_LATE_START;
	h->syn_retrans = h->syn_retrans + e->hot.syn_retrans > 255 ?
				 255 : h->syn_retrans + e->hot.syn_retrans;
	if (e->hot.bits & TCPB_CLIENT_HS)
		b->handshake_client_ns = e->handshake_client_ns;
	if (e->hot.bits & TCPB_SERVER_HS)
		b->handshake_server_ns = e->handshake_server_ns;
}

static __always_inline void identify_rest(const struct flow_key *key,
					  struct flow_base *b,
					  const struct flow_ended *e,
					  __u64 active)
{
	b->first_seen_ns = e->first_seen_ns;
	b->meta = (b->meta & ~META_CLIENT_HI) | (e->meta & META_CLIENT_HI) |
		  META_CONTINUATION;
	/* its window starts where the connection's last record left off */
	mark_reported(b, e->ended_ns, active);
	bpf_map_delete_elem(&ended, key);
}

/* The connection that ended idle with this key, if the flow (about to get
 * a record, its first packet not its SYN) may be it and was not looked up.
 */
static __always_inline struct flow_ended *
identify_lookup(const struct flow_key *key, struct flow_base *b)
{
	if (b->meta & META_IDENTIFIED)
		return NULL;
	b->meta |= META_IDENTIFIED;
	if (b->l4.tcp.bits & TCPB_SYN)
		return NULL;
	return bpf_map_lookup_elem(&ended, key);
}

/* A TCP flow about to get a record, whose first packet was not its SYN: if
 * it is a connection that ended idle (in `ended`), it takes that
 * connection's identity and history back, once. The TCP part is merged
 * under the entry's lock, as the datapath writes it there.
 */
static __noinline void scan_identify(const struct flow_key *key,
				     struct flow_base *b, __u64 active)
{
	struct flow_ended *e = identify_lookup(key, b);

	if (!e)
		return;
	bpf_spin_lock(&b->lock);
	identify_hot(b, e);
	bpf_spin_unlock(&b->lock);
	identify_rest(key, b, e, active);
}

/* The same for a TCP flow ending in probation (a resumed connection's lone
 * packet), on its record: the image has no lock, and is gone after.
 */
static __noinline void probe_identify(const struct flow_key *key,
				      struct flow_base *out, __u64 active)
{
	struct flow_ended *e = identify_lookup(key, out);

	if (!e)
		return;
	identify_hot(out, e);
	identify_rest(key, out, e, active);
}

/* A TCP flow ending idle: remembered when it is a connection that may
 * resume (established, and answered or already reported), never a probe.
 */
static __noinline void scan_remember(const struct flow_key *key,
				     const struct flow_base *b, __u64 now)
{
	struct flow_ended e = {};
	__u8 st = b->l4.tcp.state;

	if (st != TCP_ST_ESTABLISHED && st != TCP_ST_FIN_WAIT)
		return;
	if (!(b->meta & META_REPORTED) && !(b->packets[0] && b->packets[1]))
		return;
	e.first_seen_ns = b->first_seen_ns;
	e.ended_ns = now;
	e.handshake_client_ns = b->handshake_client_ns;
	e.handshake_server_ns = b->handshake_server_ns;
	e.hot = b->l4.tcp;
	e.meta = b->meta & META_CLIENT_HI;
	bpf_map_update_elem(&ended, key, &e, BPF_ANY);
}

/* Whether a flow the eviction rules allow frees an entry some map must give
 * up (then counted off the need).
 */
static __noinline bool scan_evict_frees(struct flow_base *b, struct scan_ctx *c)
{
	__u64 id = b->ext_id;
	__u32 ext = base_ext(b);
	bool tcp = false, icmp = false;

	if (id && ext == EXT_TCP)
		tcp = bpf_map_lookup_elem(&flows_tcp, &id);
	else if (id && ext == EXT_ICMP)
		icmp = bpf_map_lookup_elem(&flows_icmp, &id);
	return scan_take_need(&c->a, tcp, icmp);
}

/* Fills the record `r` (its kind already set) of a flow and does what the
 * kind says: takes the counts out (active) or the flow out of every map.
 * Returns 1 to stop the walk. A function of its own, whose paths the
 * verifier walks once for every way the flow was judged.
 */
static __noinline long scan_emit(const struct flow_key *key,
				 struct flow_base *b, struct scan_ctx *c,
				 struct scan_rec *r)
{
	struct flow_base *out = (struct flow_base *)r->base;
	struct flow_tcp *t = NULL;
	struct flow_icmp *i = NULL;
	__u64 packets[2], bytes[2];
	__u64 id = b->ext_id;
	__u32 ext = base_ext(b);
	__u8 kind = r->kind;

	if (kind != SCAN_END_EVICT && tcp_flow(key, b))
		scan_identify(key, b, c->a.active_ns);
	if (id && ext == EXT_TCP)
		t = bpf_map_lookup_elem(&flows_tcp, &id);
	else if (id && ext == EXT_ICMP)
		i = bpf_map_lookup_elem(&flows_icmp, &id);
	/* each counter read once: what the record says is what comes off */
	packets[0] = b->packets[0];
	packets[1] = b->packets[1];
	bytes[0] = b->bytes[0];
	bytes[1] = b->bytes[1];
	r->key = *key;
	r->has_tcp = !!t;
	r->has_icmp = !!i;
	scan_copy_base(r->base, b);
	out->packets[0] = packets[0];
	out->packets[1] = packets[1];
	out->bytes[0] = bytes[0];
	out->bytes[1] = bytes[1];
	__builtin_memset(&out->lock, 0, sizeof(out->lock));
	__builtin_memset(&r->tcp, 0, sizeof(r->tcp));
	__builtin_memset(&r->icmp, 0, sizeof(r->icmp));
	if (t)
		r->tcp = *t;
	if (i)
		r->icmp = *i;
	owner_scan(r, id, kind);
	if (kind == SCAN_ACTIVE) {
		/* the datapath only adds: what it adds meanwhile stays */
		__sync_fetch_and_sub(&b->packets[0], packets[0]);
		__sync_fetch_and_sub(&b->packets[1], packets[1]);
		__sync_fetch_and_sub(&b->bytes[0], bytes[0]);
		__sync_fetch_and_sub(&b->bytes[1], bytes[1]);
		mark_reported(b, c->a.now_ns, c->a.active_ns);
		return 0;
	}
	if (kind == SCAN_END_IDLE && tcp_flow(key, b))
		scan_remember(key, b, c->a.now_ns);
	/* The base goes first, so the datapath stops finding the flow; a
	 * sample taken on the way makes an orphan extension, which the
	 * poller's sweep removes.
	 */
	bpf_map_delete_elem(&flows, &r->key);
	if (t)
		bpf_map_delete_elem(&flows_tcp, &id);
	if (i)
		bpf_map_delete_elem(&flows_icmp, &id);
	/* its note, if the datapath took one */
	if (kind == SCAN_END_FIN || kind == SCAN_END_RST)
		bpf_map_delete_elem(&closing, &r->key);
	c->ended++;
	if (c->bulk_left == 1) {
		c->stop = SCAN_BULK;
		return 1;
	}
	if (c->bulk_left)
		c->bulk_left--;
	return 0;
}

static long scan_flow(struct bpf_map *map, const struct flow_key *key,
		      struct flow_base *b, struct scan_ctx *c)
{
	struct scan_rec *r;
	long stop;
	int kind;

	if (c->a.parts > 1 && scan_part(key, c->a.parts) != c->a.part)
		return 0;
	kind = scan_due(key, b, &c->a);
	if (kind < 0) {
		if (!scan_may_evict(b, &c->a) || !scan_evict_frees(b, c))
			return 0;
		kind = SCAN_END_EVICT;
	}
	/* room first: a flow with no room for its record is left as it is,
	 * for the next pass
	 */
	r = bpf_ringbuf_reserve(&scan_ring, sizeof(*r), 0);
	if (!r) {
		c->stop = SCAN_RING_FULL;
		return 1;
	}
	r->kind = kind;
	stop = scan_emit(key, b, c, r);
	/* no wakeup per record: the poller looks every millisecond while a
	 * scan runs
	 */
	bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
	c->written++;
	return stop;
}

/* A flow the datapath noted as closed: judged like any other (so it ends
 * once past the grace), and forgotten once it is gone or no longer closed.
 */
static long scan_closing(struct bpf_map *map, const struct flow_key *key,
			 __u8 *v, struct scan_ctx *c)
{
	struct flow_key k = *key;
	struct flow_base *b = bpf_map_lookup_elem(&flows, &k);
	long ret;

	if (!b || base_ext(b) != EXT_TCP || !tcp_closed(b)) {
		bpf_map_delete_elem(&closing, &k);
		return 0;
	}
	ret = scan_flow(map, &k, b, c);
	if (!bpf_map_lookup_elem(&flows, &k))
		bpf_map_delete_elem(&closing, &k);
	return ret;
}

/* Tallies a flow found in probation, once: its client in the sources'
 * sketch, the answering side's port in `probe_ports`.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_sketch);
} probe_sketch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct probe_port);
	__type(value, __u64);
} probe_ports SEC(".maps");

static __noinline void probe_tally(const struct flow_key *key,
				   struct flow_base *pb)
{
	bool client_hi = pb->meta & META_CLIENT_HI;
	const __u32 *w = (const __u32 *)(client_hi ? key->addr_hi :
						     key->addr_lo);
	struct probe_port pk = {};
	struct probe_sketch *s;
	__u32 zero = 0, h = 0, x, rank = 1;
	__u64 one = 1, *n;
	int i;

	pb->meta |= META_PROBE_TALLIED;
	s = bpf_map_lookup_elem(&probe_sketch, &zero);
	if (!s)
		return;
	s->tallied++;
	/* murmur3's finaliser over the client's address */
	for (i = 0; i < 4; i++)
		h = (h ^ w[i]) * 0xcc9e2d51;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	x = h >> 8;
	for (i = 0; i < 24 && !(x & 1); i++) {
		rank++;
		x >>= 1;
	}
	if (s->reg[h & (PROBE_SKETCH_REGS - 1)] < rank)
		s->reg[h & (PROBE_SKETCH_REGS - 1)] = rank;
	pk.proto = key->proto;
	if (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP)
		pk.port = client_hi ? key->port_lo : key->port_hi;
	n = bpf_map_lookup_elem(&probe_ports, &pk);
	if (n)
		*n += 1;
	else
		bpf_map_update_elem(&probe_ports, &pk, &one, BPF_NOEXIST);
}

/* A flow in probation: ended (and reported) when it ends as a base flow
 * would, idle or reset, never given an active-timeout record; else counted
 * and tallied. The counts go to the record with the same exchanges the
 * datapath's move uses, so a move racing the end loses nothing.
 */
static long scan_probe(struct bpf_map *map, const struct flow_key *key,
		       struct flow_probe *v, struct scan_ctx *c)
{
	struct flow_base *pb = (struct flow_base *)v;
	struct flow_base *out;
	struct scan_rec *r;
	__u32 slot = proto_slot(key->proto);
	__u64 pkts[2], bytes[2];
	int kind;

	if (c->a.parts > 1 && scan_part(key, c->a.parts) != c->a.part)
		return 0;
	/* being moved: the datapath deletes it */
	if (*(volatile __u32 *)probe_flag(pb))
		return 0;
	kind = scan_due(key, pb, &c->a);
	if (kind < 0 || kind == SCAN_ACTIVE) {
		if (slot < SCAN_PROTOS)
			c->a.probation[slot]++;
		if (!(pb->meta & META_PROBE_TALLIED))
			probe_tally(key, pb);
		return 0;
	}
	r = bpf_ringbuf_reserve(&scan_ring, sizeof(*r), 0);
	if (!r) {
		c->stop = SCAN_RING_FULL;
		return 1;
	}
	out = (struct flow_base *)r->base;
	r->kind = kind;
	r->key = *key;
	r->has_tcp = 0;
	r->has_icmp = 0;
	/* never answered, never admitted: no local sockets were taken */
	r->has_owner = 0;
	__builtin_memcpy(r->base, pb, sizeof(r->base));
	__builtin_memset(&r->tcp, 0, sizeof(r->tcp));
	__builtin_memset(&r->icmp, 0, sizeof(r->icmp));
	__builtin_memset(r->owner, 0, sizeof(r->owner));
	probe_take(pb, pkts, bytes);
	out->packets[0] = pkts[0];
	out->packets[1] = pkts[1];
	out->bytes[0] = bytes[0];
	out->bytes[1] = bytes[1];
	__builtin_memset(&out->lock, 0, sizeof(out->lock));
	out->meta &= ~META_PROBE_TALLIED;
	if (tcp_flow(key, pb))
		probe_identify(key, out, c->a.active_ns);
	bpf_map_delete_elem(&probation, &r->key);
	count(CNT_PROBE_ENDED + slot, 1);
	bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
	c->written++;
	c->ended++;
	return 0;
}

/* The map's element count, kept per CPU by the kernel (6.6 and later):
 * no walk. Weak, so older kernels load the program and count by walking.
 */
extern __s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym __weak;

static long scan_count(struct bpf_map *map, const void *key, void *value,
		       __u64 *n)
{
	*n += 1;
	return 0;
}

static __always_inline __u64 scan_entries(void *map)
{
	__s64 n = 0;

	if (bpf_ksym_exists(bpf_map_sum_elem_count)) {
		n = bpf_map_sum_elem_count((const struct bpf_map *)map);
		return n > 0 ? (__u64)n : 0;
	}
	bpf_for_each_map_elem(map, scan_count, &n, 0);
	return n;
}

/* Entries a map has beyond `keep`. */
static __always_inline __u64 scan_over(void *map, __u64 keep)
{
	__u64 n = scan_entries(map);

	return n > keep ? n - keep : 0;
}

/* Stops a walk at probation's first flow. */
static long probe_any(struct bpf_map *map, const void *key, void *value,
		      __u32 *found)
{
	*found = 1;
	return 1;
}

/* Walks probation, and tells the datapath when it is empty (probe_busy,
 * probation.h): marked as checking before the walk, so an insert meanwhile
 * (which marks it busy) keeps it from being cleared after. Only a whole walk
 * can find it empty, by a look of its own: branching on what the walk counts
 * would make the verifier follow the count value by value.
 */
static __always_inline void scan_probation(struct scan_ctx *c)
{
	bool whole = c->a.parts <= 1 &&
		     *(volatile __u32 *)&probe_busy != 0;
	__u32 found = 0;

	if (whole)
		__sync_lock_test_and_set(&probe_busy, PROBE_CHECKING);
	bpf_for_each_map_elem(&probation, scan_probe, c, 0);
	if (!whole)
		return;
	if (c->stop == SCAN_DONE)
		bpf_for_each_map_elem(&probation, probe_any, &found, 0);
	if (found || c->stop != SCAN_DONE)
		__sync_lock_test_and_set(&probe_busy, PROBE_BUSY);
	else
		__sync_val_compare_and_swap(&probe_busy, PROBE_CHECKING, 0);
}

SEC("syscall")
int flowlens_scan(struct scan_args *args)
{
	struct scan_ctx c = {};
	__u32 zero = 0;
	__u64 *last, inserted;

	c.a = *args;
	/* outputs of a pass before (a ring stop runs it again) */
	__builtin_memset(c.a.probation, 0, sizeof(c.a.probation));
	c.bulk_left = c.a.bulk_after;
	if (c.a.evict_age_ns) {
		c.a.evict_need[0] = scan_over(&flows, c.a.evict_keep[0]);
		c.a.evict_need[1] = scan_over(&flows_tcp, c.a.evict_keep[1]);
		c.a.evict_need[2] = scan_over(&flows_icmp, c.a.evict_keep[2]);
	}
	if (c.a.closing_only) {
		bpf_for_each_map_elem(&closing, scan_closing, &c, 0);
	} else {
		/* a walk costs every bucket, empty or not: none without flows */
		if (scan_entries(&flows))
			bpf_for_each_map_elem(&flows, scan_flow, &c, 0);
		/* a bulk or ring stop scans again from the start */
		if (c.stop == SCAN_DONE)
			scan_probation(&c);
		last = bpf_map_lookup_elem(&last_scan, &zero);
		if (last && !c.a.flush)
			*last = c.a.now_ns;
	}
	args->stopped = c.stop;
	args->written = c.written;
	args->ended = c.ended;
	/* the gate's estimate (probation.h): the inserts read before the
	 * count, so one made between is counted twice, never missed
	 */
	inserted = __sync_fetch_and_add(&base_inserted, 0);
	args->entries[0] = scan_entries(&flows);
	base_offset = (__s64)args->entries[0] - (__s64)inserted;
	args->entries[1] = scan_entries(&flows_tcp);
	args->entries[2] = scan_entries(&flows_icmp);
	args->evict_need[0] = c.a.evict_need[0];
	args->evict_need[1] = c.a.evict_need[1];
	args->evict_need[2] = c.a.evict_need[2];
	args->probation[0] = c.a.probation[0];
	args->probation[1] = c.a.probation[1];
	args->probation[2] = c.a.probation[2];
	args->probation[3] = c.a.probation[3];
	return 0;
}

#endif /* __FLOWLENS_SCAN_H */
