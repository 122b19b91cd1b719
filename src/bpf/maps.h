/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The split flow maps: one base entry per flow, plus a TCP or ICMP
 * extension entry under the same key. A base entry is inserted before its
 * extension and removed when the extension cannot be made, so an extension
 * never outlives the moment its base is deleted (the poller sweeps the few
 * a concurrent end-of-flow leaves behind).
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
	__type(key, struct flow_key);
	__type(value, struct flow_tcp);
} flows_tcp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_icmp);
} flows_icmp SEC(".maps");

/* Inserts an empty extension entry; returns 0 or the error to count. */
static __always_inline int ext_insert(const struct pkt *p, __u8 ext)
{
	long err;

	if (ext == EXT_TCP) {
		struct flow_tcp t = {};

		err = bpf_map_update_elem(&flows_tcp, &p->key, &t, BPF_NOEXIST);
		if (err && err != -EEXIST)
			return CNT_TCP_FULL;
	} else {
		struct flow_icmp c = {};

		err = bpf_map_update_elem(&flows_icmp, &p->key, &c, BPF_NOEXIST);
		if (err && err != -EEXIST)
			return CNT_ICMP_FULL;
	}
	return 0;
}

/* Updates the flow's extension entry, creating it when missing (a new
 * flow, or one whose extension a concurrent end-of-flow delete removed).
 * Returns 0 or the CNT_* reason it could not be created.
 */
static __always_inline int account_ext(const struct pkt *p, __u8 ext,
				       __u64 now)
{
	int err;

	if (ext == EXT_TCP) {
		struct flow_tcp *t = bpf_map_lookup_elem(&flows_tcp, &p->key);

		if (!t) {
			err = ext_insert(p, ext);
			if (err)
				return err;
			t = bpf_map_lookup_elem(&flows_tcp, &p->key);
			if (!t)
				return CNT_TCP_FULL;
		}
		bpf_spin_lock(&t->lock);
		tcp_update(t, p, now);
		bpf_spin_unlock(&t->lock);
	} else {
		struct flow_icmp *c = bpf_map_lookup_elem(&flows_icmp, &p->key);

		if (!c) {
			err = ext_insert(p, ext);
			if (err)
				return err;
			c = bpf_map_lookup_elem(&flows_icmp, &p->key);
			if (!c)
				return CNT_ICMP_FULL;
		}
		icmp_update(c, p, now);
	}
	return 0;
}

#endif /* __FLOWLENS_MAPS_H */
