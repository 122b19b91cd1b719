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

static __always_inline void count(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &reason);

	/* Per-CPU slot: no other CPU writes it, a plain add is exact. */
	if (v)
		*v += 1;
}

static __always_inline __u32 sat_u32(__u64 v)
{
	return v > U32_MAX ? U32_MAX : (__u32)v;
}

#endif /* __FLOWLENS_COMMON_H */
