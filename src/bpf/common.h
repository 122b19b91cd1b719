/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* What every flow program shares: the per-CPU counters (why a packet was
 * not accounted, and how many were) and small arithmetic helpers.
 */
#ifndef __FLOWLENS_COMMON_H
#define __FLOWLENS_COMMON_H

#include "flowlens.h"

#define EEXIST 17
#define TC_ACT_UNSPEC (-1)
#define U32_MAX 0xffffffffU

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Adds n (the wire segments of one skb) to a counter slot. */
static __always_inline void count(__u32 reason, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &reason);

	/* Per-CPU slot: no other CPU writes it, a plain add is exact. */
	if (v)
		*v += n;
}

/* The tick-resolution clock (CLOCK_MONOTONIC_COARSE), read at most once
 * per tick per CPU: jiffies is a load the verifier inlines, the clock a
 * helper call that costs more than a hash lookup.
 */
struct tick_clock {
	__u64 jiffies;
	__u64 ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tick_clock);
} tick SEC(".maps");

static __always_inline __u64 coarse_now(void)
{
	__u32 zero = 0;
	struct tick_clock *c = bpf_map_lookup_elem(&tick, &zero);
	__u64 j = bpf_jiffies64();

	if (!c)
		return bpf_ktime_get_coarse_ns();
	if (c->jiffies != j) {
		c->ns = bpf_ktime_get_coarse_ns();
		c->jiffies = j;
	}
	return c->ns;
}

static __always_inline __u32 sat_u32(__u64 v)
{
	return v > U32_MAX ? U32_MAX : (__u32)v;
}

#endif /* __FLOWLENS_COMMON_H */
