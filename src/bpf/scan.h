/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The poller's scan: one pass over the flow maps inside the kernel, run by
 * the agent through BPF_PROG_TEST_RUN every poll. It ends the flows that
 * are due (idle, TCP closed or reset past the grace, evicted under map
 * pressure, or every flow on shutdown), copying each out and deleting it
 * from every map, and copies out the flows due an active-timeout record. Userspace then handles only
 * those instead of copying every flow out every poll.
 *
 * Between spaced-out full scans, a pass over `closing` alone ends the TCP
 * flows the datapath noted as closed, so closes stay prompt at any size.
 *
 * Active-timeout windows are counted from a flow's first packet: a flow is
 * due when it has entered a window it has not been reported in
 * (flow_base.windows, which only this program writes) and has had packets
 * since the previous scan; a quiet flow is left for its idle end or for
 * the first scan that finds it busy again.
 */
#ifndef __FLOWLENS_SCAN_H
#define __FLOWLENS_SCAN_H

/* Capacity is set from userspace before load. Mapped by the poller, which
 * reads a pass's records where they were written: no copy through a
 * syscall, no buffer to fault in per pass.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct scan_rec);
} scan_out SEC(".maps");

struct scan_ctx {
	struct scan_args a;
	__u32 n;		/* the next slot of scan_out to fill */
	__u32 end;		/* the first slot past this scan's part */
	bool full;
};

static __always_inline __u32 scan_proto(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return SCAN_TCP;
	case IPPROTO_UDP:
		return SCAN_UDP;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return SCAN_ICMP;
	default:
		return SCAN_OTHER;
	}
}

/* How long the flow has been quiet at the scan's time. */
static __always_inline __u64 scan_idle(const struct flow_base *b,
				       const struct scan_args *a)
{
	return a->now_ns > b->last_seen_ns ? a->now_ns - b->last_seen_ns : 0;
}

/* What the scan does with a flow: a scan_kind, or -1 to leave it. */
static __always_inline int scan_due(const struct flow_key *k,
				    const struct flow_base *b,
				    const struct scan_args *a, __u64 *window)
{
	__u64 now = a->now_ns;
	__u64 idle = scan_idle(b, a);
	__u32 p = scan_proto(k->proto);

	if (a->flush)
		return SCAN_END_FLUSH;
	/* the key's protocol shares a cache line with the times, the TCP
	 * state does not: most flows are judged without touching it
	 */
	if (k->proto == IPPROTO_TCP && idle >= a->close_grace_ns &&
	    b->ext == EXT_TCP) {
		if (b->l4.tcp.state == TCP_ST_RESET)
			return SCAN_END_RST;
		if (b->l4.tcp.state == TCP_ST_CLOSED)
			return SCAN_END_FIN;
	}
	if (p < SCAN_PROTOS && idle >= a->idle_ns[p])
		return SCAN_END_IDLE;
	if (!a->active_ns || now <= b->first_seen_ns ||
	    b->last_seen_ns < a->prev_ns)
		return -1;
	*window = (now - b->first_seen_ns) / a->active_ns;
	if (*window && (__u8)*window != b->windows)
		return SCAN_ACTIVE;
	return -1;
}

/* Whether a flow no other rule ends may be evicted: it sent one packet
 * (no answer), was never reported, and has been quiet for the eviction age.
 */
static __always_inline bool scan_may_evict(const struct flow_base *b,
					   const struct scan_args *a)
{
	return a->evict_age_ns && scan_idle(b, a) >= a->evict_age_ns &&
	       !b->windows &&
	       b->packets[0] + b->packets[1] == 1;
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

static long scan_flow(struct bpf_map *map, const struct flow_key *key,
		      struct flow_base *b, struct scan_ctx *c)
{
	struct scan_rec *r;
	struct flow_tcp *t = NULL;
	struct flow_icmp *i = NULL;
	__u64 window = 0;
	__u64 id = b->ext_id;
	__u32 slot = c->n;
	int kind;

	if (c->a.parts > 1 && scan_part(key, c->a.parts) != c->a.part)
		return 0;
	kind = scan_due(key, b, &c->a, &window);
	if (kind < 0 && !scan_may_evict(b, &c->a))
		return 0;
	if (slot >= c->end) {
		/* the rest waits for the next pass, which finds it due again */
		c->full = true;
		return 1;
	}
	if (id && b->ext == EXT_TCP)
		t = bpf_map_lookup_elem(&flows_tcp, &id);
	else if (id && b->ext == EXT_ICMP)
		i = bpf_map_lookup_elem(&flows_icmp, &id);
	if (kind < 0) {
		if (!scan_take_need(&c->a, t, i))
			return 0;
		kind = SCAN_END_EVICT;
	}
	r = bpf_map_lookup_elem(&scan_out, &slot);
	if (!r)
		return 1;
	c->n = slot + 1;
	r->key = *key;
	r->kind = kind;
	scan_copy_base(r->base, b);
	r->has_tcp = !!t;
	r->has_icmp = !!i;
	if (t)
		r->tcp = *t;
	if (i)
		r->icmp = *i;
	owner_scan(slot, id, kind != SCAN_ACTIVE);
	if (kind == SCAN_ACTIVE) {
		b->windows = (__u8)window;
		return 0;
	}
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
	return 0;
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

	if (!b || b->ext != EXT_TCP || !tcp_closed(b)) {
		bpf_map_delete_elem(&closing, &k);
		return 0;
	}
	ret = scan_flow(map, &k, b, c);
	if (!bpf_map_lookup_elem(&flows, &k))
		bpf_map_delete_elem(&closing, &k);
	return ret;
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

SEC("syscall")
int flowlens_scan(struct scan_args *args)
{
	struct scan_ctx c = {};

	c.a = *args;
	c.n = c.a.first_slot;
	c.end = c.a.first_slot + c.a.capacity;
	if (c.a.evict_age_ns) {
		c.a.evict_need[0] = scan_over(&flows, c.a.evict_keep[0]);
		c.a.evict_need[1] = scan_over(&flows_tcp, c.a.evict_keep[1]);
		c.a.evict_need[2] = scan_over(&flows_icmp, c.a.evict_keep[2]);
	}
	if (c.a.closing_only)
		bpf_for_each_map_elem(&closing, scan_closing, &c, 0);
	else
		bpf_for_each_map_elem(&flows, scan_flow, &c, 0);
	args->truncated = c.full;
	args->copied = c.n - c.a.first_slot;
	args->entries[0] = scan_entries(&flows);
	args->entries[1] = scan_entries(&flows_tcp);
	args->entries[2] = scan_entries(&flows_icmp);
	args->evict_need[0] = c.a.evict_need[0];
	args->evict_need[1] = c.a.evict_need[1];
	args->evict_need[2] = c.a.evict_need[2];
	return 0;
}

#endif /* __FLOWLENS_SCAN_H */
