/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Admission: a flow enters the base map only once it has been answered.
 * Until then (a SYN without its handshake's final ACK, a datagram without a
 * second packet, a lone echo request) it lives in `probation`, an LRU map the
 * kernel evicts by itself, so a random-source flood of one-packet flows
 * churns probation and never takes the room answered flows need.
 *
 * A flow moves on its first admitting packet: for TCP any packet without SYN
 * or RST (a spoofed source never sends the handshake's final ACK, while the
 * host's own SYN-ACK or RST to it is no proof), for anything else its second
 * packet, either way. The move is exact across CPUs: the mover inserts the
 * base entry, flags the probation image as moving, then takes the image's
 * counts over with atomic exchanges; a CPU that added to the image meanwhile
 * sees the flag after its add and takes its own counts over the same way, so
 * each packet lands once. The scan (scan.h) ends the flows that end in
 * probation (idle, reset) with the same exchanges, and tallies the others.
 *
 * Admission holds only under pressure: while the base map has room, a new
 * flow's first packet goes straight in (base_new), as it did before
 * admission existed, so a host that is not flooded pays no move. A flood can
 * take the room below the gate and no more; past it, new flows wait here.
 */
#ifndef __FLOWLENS_PROBATION_H
#define __FLOWLENS_PROBATION_H

#include "tcp.h"
#include "icmp.h"

/* Capacity set from userspace before load (Capacities::probation). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, struct flow_key);
	__type(value, struct flow_probe);
} probation SEC(".maps");

/* flow_probe's lock word: the flow is moving to the base map. */
#define PROBE_MOVING 1

/* Which new flows wait here (enum admission_mode) and, under pressure, the
 * base map's entries below which a new flow goes straight in: half its
 * capacity, set from userspace before load.
 */
const volatile __u32 admission = ADMIT_UNDER_PRESSURE;
const volatile __s64 admission_room = 32768;

/* The base map's fill, estimated without a walk or a per-CPU sum on the
 * packet path: the datapath counts its inserts (base_inserted), and each scan
 * leaves its count of the map less the inserts counted before it
 * (base_offset, scan.h). Their sum never runs low (deletes come off only at
 * the next scan): a high estimate only sends new flows here early.
 */
__u64 base_inserted;
__s64 base_offset;

/* Whether probation may hold a flow (PROBE_BUSY), so that a new flow let
 * straight in must look there first: 0 only once a full scan walked it empty
 * with no insert meanwhile (PROBE_CHECKING while it walks; scan.h), so a
 * host that is not under pressure never looks.
 */
#define PROBE_BUSY 1
#define PROBE_CHECKING 2
__u32 probe_busy;

/* After a probation insert and a fully ordered atomic: a flow is there now.
 * The exchange orders the flag before the caller's look at the base map.
 */
static __always_inline void probe_mark_busy(void)
{
	if (*(volatile __u32 *)&probe_busy != PROBE_BUSY)
		__sync_lock_test_and_set(&probe_busy, PROBE_BUSY);
}

static __always_inline bool probe_maybe(void)
{
	return *(volatile __u32 *)&probe_busy;
}

/* Whether a new flow goes straight into the base map. */
static __always_inline bool base_has_room(void)
{
	if (admission == ADMIT_ALWAYS)
		return false;
	if (admission == ADMIT_NEVER)
		return true;
	return (__s64)(*(volatile __u64 *)&base_inserted +
		       *(volatile __s64 *)&base_offset) < admission_room;
}

static __always_inline __u32 proto_slot(__u8 proto)
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

static __always_inline __u32 *probe_flag(struct flow_base *pb)
{
	return (__u32 *)&pb->lock;
}

/* Takes the counts out of a probation image, each exactly once whichever
 * CPU runs it, into `out` (a record, or a base entry through its atomics).
 */
static __always_inline void probe_take(struct flow_base *pb, __u64 *pkts,
				       __u64 *bytes)
{
	pkts[0] = __sync_lock_test_and_set(&pb->packets[0], 0);
	pkts[1] = __sync_lock_test_and_set(&pb->packets[1], 0);
	bytes[0] = __sync_lock_test_and_set(&pb->bytes[0], 0);
	bytes[1] = __sync_lock_test_and_set(&pb->bytes[1], 0);
}

static __always_inline void probe_drain(struct flow_base *pb,
					struct flow_base *b)
{
	__u64 pkts[2], bytes[2];

	probe_take(pb, pkts, bytes);
	if (pkts[0] | bytes[0]) {
		__sync_fetch_and_add(&b->packets[0], pkts[0]);
		__sync_fetch_and_add(&b->bytes[0], bytes[0]);
	}
	if (pkts[1] | bytes[1]) {
		__sync_fetch_and_add(&b->packets[1], pkts[1]);
		__sync_fetch_and_add(&b->bytes[1], bytes[1]);
	}
}

/* An atomic add whose result is fetched: a fetching atomic is fully
 * ordered, a plain one is not (the flag's load must follow it).
 */
static __always_inline void add_ordered(__u64 *p, __u64 v)
{
	__u64 old = __sync_fetch_and_add(p, v);

	asm volatile("" : : "r"(old));
}

/* count(), fully ordered: see base_recheck. */
static __always_inline void count_ordered(__u32 slot, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &slot);

	if (v)
		add_ordered(v, n);
}

/* Whether the packet `a` admits its flow, which is in probation. */
static __always_inline bool probe_admits(const struct acct *a)
{
	if (a->ext == EXT_TCP)
		return !(a->p.tcp_flags & (TCP_SYN | TCP_RST));
	return true;
}

/* A new flow's first packet: into probation, its TCP or ICMP state set
 * from it as for any first packet. 0, -EEXIST, or another error.
 */
static __always_inline long probe_new(const struct acct *a, __u8 hook)
{
	struct flow_base nb = {};
	__u64 now = bpf_ktime_get_ns();

	base_init(&nb, a, hook, now);
	owner_init(&nb, a);
	if (a->ext == EXT_TCP)
		tcp_update(&nb, NULL, &a->p, now);
	else if (a->ext == EXT_ICMP)
		icmp_update(&nb, NULL, &a->p);
	return bpf_map_update_elem(&probation, &a->p.key, &nb, BPF_NOEXIST);
}

/* Moves an admitted flow to the base map. Returns the base entry, in which
 * the admitting packet is then accounted like any other, or NULL when the
 * base map is full (the flow stays, flagged lossy: LRU may evict it). The
 * flow's owners (owner.h) are taken from here on: a flow that is never
 * answered costs no attribution.
 */
static __always_inline struct flow_base *probe_move(struct __sk_buff *skb,
						    const struct acct *a,
						    struct flow_base *pb,
						    __u32 slot, __u8 hook)
{
	struct flow_base nb;
	struct flow_base *b;
	long err;

	__builtin_memcpy(&nb, pb, sizeof(nb));
	__builtin_memset(&nb.lock, 0, sizeof(nb.lock));
	nb.packets[0] = 0;
	nb.packets[1] = 0;
	nb.bytes[0] = 0;
	nb.bytes[1] = 0;
	nb.meta &= ~META_PROBE_TALLIED;
	if (a->ext)
		nb.ext_id = ext_id_next();
	err = bpf_map_update_elem(&flows, &a->p.key, &nb, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		count(CNT_ADMIT_DEFERRED, a->pkts);
		__sync_fetch_and_or(&pb->meta, META_LOSSY);
		return NULL;
	}
	b = bpf_map_lookup_elem(&flows, &a->p.key);
	if (!b || err)
		/* another CPU moved it: it takes the image's counts */
		return b;
	__sync_fetch_and_add(&base_inserted, 1);
	__sync_fetch_and_or(probe_flag(pb), PROBE_MOVING);
	probe_drain(pb, b);
	bpf_map_delete_elem(&probation, &a->p.key);
	count(CNT_PROBE_MOVED + slot, 1);
	return b;
}

/* An image found beside the flow's base entry joins it, as in a move. */
static __always_inline void probe_fold(const struct acct *a,
				       struct flow_base *pb,
				       struct flow_base *b, __u32 slot)
{
	__sync_fetch_and_or(probe_flag(pb), PROBE_MOVING);
	probe_drain(pb, b);
	bpf_map_delete_elem(&probation, &a->p.key);
	count(CNT_PROBE_MOVED + slot, 1);
}

/* Another CPU may have moved or made the flow in the base map between this
 * one's lookup of the base map and its insert into probation: then the new
 * image joins the base entry, so the flow is never in both maps.
 */
static __always_inline void probe_recheck(const struct acct *a, __u32 slot)
{
	struct flow_base *b, *pb;

	b = bpf_map_lookup_elem(&flows, &a->p.key);
	if (!b)
		return;
	pb = bpf_map_lookup_elem(&probation, &a->p.key);
	if (pb)
		probe_fold(a, pb, b, slot);
}

/* The same from the other side: a flow just made in the base map (base_new)
 * whose packet on another CPU went to probation meanwhile (the gate closed
 * between the two lookups). Each side inserts, then a fully ordered atomic,
 * then looks at the other (probation's side marks it busy first), so at
 * least one of them sees both.
 */
static __always_inline void base_recheck(const struct acct *a)
{
	struct flow_base *b, *pb;

	if (!probe_maybe())
		return;
	pb = bpf_map_lookup_elem(&probation, &a->p.key);
	if (!pb)
		return;
	b = bpf_map_lookup_elem(&flows, &a->p.key);
	if (b)
		probe_fold(a, pb, b, proto_slot(a->p.key.proto));
}

/* A new flow's first packet while the base map has room: straight in, as
 * before admission existed, its sender's owner taken now when it is local
 * (owner.h). Returns the base entry the packet is still to be accounted in
 * when another CPU made the flow first; else NULL, with *done set when the
 * packet was accounted here, clear when the map took no entry.
 */
static __always_inline struct flow_base *base_new(struct __sk_buff *skb,
						  const struct acct *a,
						  __u8 hook, bool *done)
{
	struct flow_owner own = {};
	struct flow_base nb = {};
	/* one fine clock read: the first packet's time and the handshake's */
	__u64 now = bpf_ktime_get_ns();
	bool owned;
	long err;

	base_init(&nb, a, hook, now);
	owner_init(&nb, a);
	if (a->ext) {
		nb.ext_id = ext_id_next();
		/* a stack entry no other CPU sees: no lock, no sample */
		if (a->ext == EXT_TCP)
			tcp_update(&nb, NULL, &a->p, now);
		else
			icmp_update(&nb, NULL, &a->p);
	}
	owned = owner_start(skb, a, hook, &nb, &own);
	err = bpf_map_update_elem(&flows, &a->p.key, &nb, BPF_NOEXIST);
	if (err == -EEXIST)
		return bpf_map_lookup_elem(&flows, &a->p.key);
	if (err)
		return NULL;
	*done = true;
	count(CNT_PACKETS, a->pkts);
	if (owned)
		owner_start_sent(a, nb.ext_id, &own);
	if (a->ext == EXT_TCP && (a->p.tcp_flags & TCP_RST))
		tcp_note_close(&nb, &a->p);
	/* no probation to meet without admission (the bench's before) */
	if (admission != ADMIT_NEVER) {
		add_ordered(&base_inserted, 1);
		base_recheck(a);
	}
	return NULL;
}

/* A packet of a flow not in the base map. Returns the base entry to
 * account it in (the flow was just admitted), or NULL when it was
 * accounted in probation (or counted as lost).
 */
static __always_inline struct flow_base *probe_account(struct __sk_buff *skb,
						       const struct acct *a,
						       __u8 hook)
{
	__u32 slot = proto_slot(a->p.key.proto);
	struct flow_base *pb, *b;
	__u8 d = a->p.dir & 1;
	__u64 now = 0;
	long err;

	pb = bpf_map_lookup_elem(&probation, &a->p.key);
	if (!pb) {
		err = probe_new(a, hook);
		if (!err) {
			count(CNT_PACKETS, a->pkts);
			count_ordered(CNT_PROBE_NEW + slot, 1);
			probe_mark_busy();
			probe_recheck(a, slot);
			return NULL;
		}
		pb = err == -EEXIST ?
			     bpf_map_lookup_elem(&probation, &a->p.key) : NULL;
		if (!pb) {
			/* moved meanwhile, or no element to be had */
			b = bpf_map_lookup_elem(&flows, &a->p.key);
			if (!b)
				count(CNT_BASE_FULL, a->pkts);
			return b;
		}
	}
	if (probe_admits(a)) {
		b = probe_move(skb, a, pb, slot, hook);
		if (b)
			return b;
	}
	count(CNT_PACKETS, a->pkts);
	if (a->ext == EXT_TCP) {
		now = bpf_ktime_get_ns();
		tcp_update(pb, NULL, &a->p, now);
	} else if (a->ext == EXT_ICMP) {
		now = icmp_update(pb, NULL, &a->p);
	}
	/* constant indexes: see base_init */
	if (d) {
		__sync_fetch_and_add(&pb->bytes[1], a->bytes);
		add_ordered(&pb->packets[1], a->pkts);
		pb->ttl[1] = a->p.ttl;
	} else {
		__sync_fetch_and_add(&pb->bytes[0], a->bytes);
		add_ordered(&pb->packets[0], a->pkts);
		pb->ttl[0] = a->p.ttl;
	}
	pb->last_seen_ns = now ?: coarse_now();
	if (*(volatile __u32 *)probe_flag(pb)) {
		b = bpf_map_lookup_elem(&flows, &a->p.key);
		if (b)
			probe_drain(pb, b);
	}
	return NULL;
}

#endif /* __FLOWLENS_PROBATION_H */
