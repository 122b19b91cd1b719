// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Baselines for `make bench`: what any passive TC program costs, and what
 * one hash lookup plus one atomic add costs, measured beside the flow
 * programs in the same run.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

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

/* The program bench_turn hands each packet to (set by the bench). */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bench_next SEC(".maps");

/* Swaps the two addresses of `len` bytes each at `off`. */
static __always_inline void swap_addrs(struct __sk_buff *skb, __u32 off,
				       __u32 len)
{
	__u8 b[32], t[16];

	if (len == 4) {
		if (bpf_skb_load_bytes(skb, off, b, 8))
			return;
		__builtin_memcpy(t, b, 4);
		__builtin_memcpy(b, b + 4, 4);
		__builtin_memcpy(b + 4, t, 4);
		bpf_skb_store_bytes(skb, off, b, 8, 0);
	} else {
		if (bpf_skb_load_bytes(skb, off, b, 32))
			return;
		__builtin_memcpy(t, b, 16);
		__builtin_memcpy(b, b + 16, 16);
		__builtin_memcpy(b + 16, t, 16);
		bpf_skb_store_bytes(skb, off, b, 32, 0);
	}
}

/* Turns an untagged IPv4 (IHL 5) or IPv6 frame around, addresses and
 * ports swapped (an echo request becomes its reply and back), and tail-calls
 * bench_next with it. BPF_PROG_TEST_RUN keeps the frame between repetitions,
 * so a program behind it sees a request, its answer, the next request...:
 * request/response timed in the kernel like any repeated packet.
 */
SEC("tc")
int bench_turn(struct __sk_buff *skb)
{
	__u16 eth;
	__u8 proto, ty;
	__u32 l4;
	__u16 ports[2], tmp;

	if (bpf_skb_load_bytes(skb, 12, &eth, 2))
		return TC_ACT_UNSPEC;
	if (eth == bpf_htons(0x0800)) {
		swap_addrs(skb, 26, 4);
		if (bpf_skb_load_bytes(skb, 23, &proto, 1))
			return TC_ACT_UNSPEC;
		l4 = 34;
	} else {
		swap_addrs(skb, 22, 16);
		if (bpf_skb_load_bytes(skb, 20, &proto, 1))
			return TC_ACT_UNSPEC;
		l4 = 54;
	}
	if (proto == 1 || proto == 58) {
		if (!bpf_skb_load_bytes(skb, l4, &ty, 1)) {
			/* echo request <-> reply: 8 <-> 0, 128 <-> 129 */
			ty = proto == 1 ? (ty == 8 ? 0 : 8) : (ty == 128 ? 129 : 128);
			bpf_skb_store_bytes(skb, l4, &ty, 1, 0);
		}
	} else if (!bpf_skb_load_bytes(skb, l4, ports, 4)) {
		tmp = ports[0];
		ports[0] = ports[1];
		ports[1] = tmp;
		bpf_skb_store_bytes(skb, l4, ports, 4, 0);
	}
	bpf_tail_call(skb, &bench_next, 0);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
