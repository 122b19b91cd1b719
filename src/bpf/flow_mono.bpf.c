// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Benchmark only: the flow programs with one map, so `make bench` can
 * compare the split maps with the best single map in the same run. Each
 * flow's value is its base entry plus the union of the two extensions;
 * same parser, same TCP/ICMP logic, only where the fields live differs.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowlens.h"
#include "base.h"
#include "tcp.h"
#include "icmp.h"

union flow_packed_ext {
	struct flow_tcp tcp;
	struct flow_icmp icmp;
};

/* The best-packed single value: 152 bytes, kmalloc-256. */
struct flow_packed {
	struct flow_base base;
	union flow_packed_ext ext;
};

/* The naive single value, every extension in every flow: 176 bytes,
 * kmalloc-512. Only its map's memory is measured; no program uses it.
 */
struct flow_naive {
	struct flow_base base;
	struct flow_tcp tcp;
	struct flow_icmp icmp;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_packed);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct flow_naive);
} flows_naive SEC(".maps");

/* The extension fields live in the flow's own value. Returns the fine
 * clock when it read it, else 0.
 */
static __always_inline __u64 packed_l4(struct flow_packed *v,
				       const struct acct *a)
{
	__u64 now = 0;

	if (a->ext == EXT_TCP) {
		enum tcp_path path = tcp_fast(&v->base, &a->p, &now);

		if (path == TCP_PATH_TURN) {
			now = bpf_ktime_get_ns();
			tcp_turn(&v->base, &v->ext.tcp, &a->p, now);
		} else if (path == TCP_PATH_LOCKED) {
			now = tcp_locked(&v->base, &v->ext.tcp, &a->p);
		}
	} else if (a->ext == EXT_ICMP) {
		now = icmp_update(&v->base, &v->ext.icmp, &a->p);
	}
	return now;
}

static __always_inline void packed_handle(struct __sk_buff *skb, __u8 hook)
{
	struct acct a = {};
	struct flow_packed *v;
	__u64 now;
	long err;

	if (!acct_of(skb, &a))
		return;
	v = bpf_map_lookup_elem(&flows, &a.p.key);
	if (!v) {
		struct flow_packed nv = {};
		__u64 first = bpf_ktime_get_ns();

		base_init(&nv.base, &a, hook, first);
		/* a stack value no other CPU sees: no lock, no sample */
		if (a.ext == EXT_TCP)
			tcp_update(&nv.base, NULL, &a.p, first);
		else if (a.ext == EXT_ICMP)
			icmp_update(&nv.base, NULL, &a.p);
		err = bpf_map_update_elem(&flows, &a.p.key, &nv, BPF_NOEXIST);
		if (!err) {
			count(CNT_PACKETS, a.pkts);
			return;
		}
		v = err == -EEXIST ? bpf_map_lookup_elem(&flows, &a.p.key) :
				     NULL;
		if (!v) {
			count(CNT_BASE_FULL, a.pkts);
			return;
		}
	}
	now = packed_l4(v, &a);
	base_account(&v->base, &a, now ?: coarse_now());
	count(CNT_PACKETS, a.pkts);
}

FLOW_PROGRAMS(packed_handle);
