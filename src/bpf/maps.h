/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The split flow maps: one base entry per flow, keyed by the flow key, and
 * for TCP and ICMP flows an extension entry for their samples, keyed by
 * the small id the base entry holds. The extension is made with the first
 * sample, from a base entry that exists; ids are never reused, so an
 * extension whose base is gone stays unjoined until the poller sweeps it.
 */
#ifndef __FLOWLENS_MAPS_H
#define __FLOWLENS_MAPS_H

#include "tcp.h"
#include "icmp.h"

/* Capacities are set from userspace before load (bpf_map__set_max_entries). */
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
	__type(key, __u64);
	__type(value, struct flow_tcp);
} flows_tcp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct flow_icmp);
} flows_icmp SEC(".maps");

/* TCP flows that have seen their close (FIN both ways, or RST), so the
 * poller can end them after the grace period without walking every flow
 * when its full scans are spaced out. A full map only makes an end wait
 * for the next full scan.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, __u8);
} closing SEC(".maps");

/* FIN both ways or RST: the states a TCP flow ends in. */
static __always_inline bool tcp_closed(const struct flow_base *b)
{
	return b->l4.tcp.state == TCP_ST_CLOSED ||
	       b->l4.tcp.state == TCP_ST_RESET;
}

static __always_inline void tcp_note_close(const struct flow_base *b,
					   const struct pkt *p)
{
	__u8 one = 1;

	if (tcp_closed(b))
		bpf_map_update_elem(&closing, &p->key, &one, BPF_ANY);
}

/* A fresh extension id: this CPU's sequence above the CPU number, so ids
 * are unique without a shared counter. The sequence lives in the pinned
 * counters map, so an agent that reuses pinned maps never reissues one.
 */
static __always_inline __u64 ext_id_next(void)
{
	__u32 slot = CNT_EXT_IDS;
	__u64 *seq = bpf_map_lookup_elem(&counters, &slot);

	if (!seq)
		return 0;
	*seq += 1;
	return (*seq << 16) | (bpf_get_smp_processor_id() & 0xffff);
}

/* The extension entry `id` in `map`, made empty when missing. NULL, with
 * `full` counted, when the map has no room.
 */
static __always_inline void *ext_get(void *map, __u64 id, __u32 full)
{
	/* the larger extension value; the ICMP map reads its first bytes */
	struct flow_tcp zero = {};
	void *v;
	long err;

	if (!id)
		return NULL;
	v = bpf_map_lookup_elem(map, &id);
	if (v)
		return v;
	err = bpf_map_update_elem(map, &id, &zero, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		count(full, 1);
		return NULL;
	}
	v = bpf_map_lookup_elem(map, &id);
	if (!v)
		count(full, 1);
	return v;
}

/* Returns the fine clock when it read it, else 0. */
static __always_inline __u64 tcp_account(struct flow_base *b,
					 const struct pkt *p)
{
	struct flow_tcp *t = NULL;
	enum tcp_path path;
	__u64 now = 0;

	path = tcp_fast(b, p, &now);
	if (path == TCP_PATH_DONE)
		return now;
	if (path == TCP_PATH_TURN) {
		/* the entry first: the lookup is not part of the sample */
		t = ext_get(&flows_tcp, b->ext_id, CNT_TCP_FULL);
		now = bpf_ktime_get_ns();
		tcp_turn(b, t, p, now);
		return now;
	}
	/* no map calls under the lock: the entry is fetched first, on a
	 * guess that the locked update confirms or ignores
	 */
	if (tcp_wants_sample(b, p))
		t = ext_get(&flows_tcp, b->ext_id, CNT_TCP_FULL);
	now = tcp_locked(b, t, p);
	/* the fast path never takes FIN or RST: only this one can close */
	if (p->tcp_flags & (TCP_FIN | TCP_RST))
		tcp_note_close(b, p);
	return now;
}

static __always_inline __u64 icmp_account(struct flow_base *b,
					  const struct pkt *p)
{
	struct flow_icmp *c = NULL;

	if (icmp_wants_sample(b, p))
		c = ext_get(&flows_icmp, b->ext_id, CNT_ICMP_FULL);
	return icmp_update(b, c, p);
}

#endif /* __FLOWLENS_MAPS_H */
