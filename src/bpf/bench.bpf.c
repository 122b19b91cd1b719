// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Baselines for `make bench`: what any passive TC program costs, and what
 * one hash lookup plus one atomic add costs, measured beside the flow
 * programs in the same run.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define TC_ACT_UNSPEC (-1)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_counts SEC(".maps");

struct locked_count {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct locked_count);
} bench_locked SEC(".maps");

SEC("tc")
int bench_empty(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

SEC("tc")
int bench_lookup_add(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *v = bpf_map_lookup_elem(&bench_counts, &key);

	if (v)
		__sync_fetch_and_add(v, skb->len);
	return TC_ACT_UNSPEC;
}

/* Two counters under a spin lock: the alternative to two atomic adds
 * that the flow base entry uses.
 */
SEC("tc")
int bench_lookup_lock(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct locked_count *v = bpf_map_lookup_elem(&bench_locked, &key);

	if (v) {
		bpf_spin_lock(&v->lock);
		v->packets++;
		v->bytes += skb->len;
		bpf_spin_unlock(&v->lock);
	}
	return TC_ACT_UNSPEC;
}

/* The same two counters with atomic adds. */
SEC("tc")
int bench_lookup_atomic2(struct __sk_buff *skb)
{
	__u32 key = 0;
	struct locked_count *v = bpf_map_lookup_elem(&bench_locked, &key);

	if (v) {
		__sync_fetch_and_add(&v->packets, 1);
		__sync_fetch_and_add(&v->bytes, skb->len);
	}
	return TC_ACT_UNSPEC;
}

/* What the flow programs pay beyond one small-key lookup: the flow key's
 * size, and each clock.
 */
struct key44 {
	__u8 b[44];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct key44);
	__type(value, __u64);
} bench_key44 SEC(".maps");

static __always_inline void key44_add(struct __sk_buff *skb)
{
	struct key44 key = {};
	__u64 *v = bpf_map_lookup_elem(&bench_key44, &key);

	if (v)
		__sync_fetch_and_add(v, skb->len);
}

SEC("tc")
int bench_lookup_key44(struct __sk_buff *skb)
{
	key44_add(skb);
	return TC_ACT_UNSPEC;
}

/* The floor of any packet whose time a latency or RTT sample needs: the
 * flow key's lookup and add, and one fine clock read.
 */
SEC("tc")
int bench_key44_clock(struct __sk_buff *skb)
{
	key44_add(skb);
	skb->mark = bpf_ktime_get_ns();
	return TC_ACT_UNSPEC;
}

SEC("tc")
int bench_clock(struct __sk_buff *skb)
{
	skb->mark = bpf_ktime_get_ns();
	return TC_ACT_UNSPEC;
}

SEC("tc")
int bench_clock_coarse(struct __sk_buff *skb)
{
	skb->mark = bpf_ktime_get_coarse_ns();
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
