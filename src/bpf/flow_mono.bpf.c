// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Benchmark only: the flow programs with one monolithic map, every flow
 * carrying the TCP and ICMP fields in its own value, so `make bench` can
 * compare it with the split maps in the same run. Same parser, same
 * TCP/ICMP logic; only where the fields live differs.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowlens.h"
#include "base.h"
#include "tcp.h"
#include "icmp.h"

struct flow_mono {
	struct flow_base base;
	struct flow_tcp tcp;
	struct flow_icmp icmp;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_mono);
} flows SEC(".maps");

/* The extension fields live in the flow's own value. */
static __always_inline void mono_ext(struct flow_mono *v, const struct acct *a,
				     __u64 now)
{
	if (a->ext == EXT_TCP) {
		bpf_spin_lock(&v->tcp.lock);
		tcp_update(&v->tcp, &a->p, now);
		bpf_spin_unlock(&v->tcp.lock);
	} else if (a->ext == EXT_ICMP) {
		icmp_update(&v->icmp, &a->p, now);
	}
}

static __always_inline void mono_handle(struct __sk_buff *skb, __u8 hook)
{
	struct acct a = {};
	struct flow_mono *v;
	__u64 now;
	int err;

	if (!acct_of(skb, &a))
		return;
	now = bpf_ktime_get_ns();
	v = bpf_map_lookup_elem(&flows, &a.p.key);
	if (v) {
		base_account(&v->base, &a, now);
	} else {
		struct flow_mono nv = {};

		base_init(&nv.base, &a, hook, now);
		err = bpf_map_update_elem(&flows, &a.p.key, &nv, BPF_NOEXIST);
		if (err && err != -EEXIST) {
			count(CNT_BASE_FULL);
			return;
		}
		/* the spin lock must be taken in the map value, not on the stack */
		v = bpf_map_lookup_elem(&flows, &a.p.key);
		if (!v) {
			count(CNT_BASE_FULL);
			return;
		}
		if (err == -EEXIST)
			base_account(&v->base, &a, now);
	}
	mono_ext(v, &a, now);
	count(CNT_PACKETS);
}

FLOW_PROGRAMS(mono_handle);
