/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* A socket's owner, kept on the socket: what the flow programs (owner.h) and
 * the start-up seed (seed.bpf.c) share. The seed is an object of its own,
 * loaded once at start and dropped, so its map of every socket open then
 * holds no memory afterwards; it reuses these two maps of the flow object.
 */
#ifndef __FLOWLENS_OWNER_SOCK_H
#define __FLOWLENS_OWNER_SOCK_H

#define AF_INET 2
#define AF_INET6 10
#define E2BIG 7

/* The process that opened a socket, kept on the socket. */
struct owner_sock {
	__u32 pid;		/* thread group id */
	__u32 uid;
	__u8 comm[16];		/* its command name (NUL-terminated) */
};

enum owner_counter {
	OWN_FULL = 0,		/* a flow's attribution lost: flows_owner full
				 * (counted by the poller, which fills it)
				 */
	OWN_SOCK_LOST,		/* a socket's owner not noted: no storage */
	OWN_RING_FULL,		/* a flow's attribution lost: owner_ring full */
	OWN_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct owner_sock);
} owner_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OWN_MAX);
	__type(key, __u32);
	__type(value, __u64);
} owner_counters SEC(".maps");

static __always_inline void owner_count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&owner_counters, &slot);

	if (v)
		*v += 1;
}

#endif /* __FLOWLENS_OWNER_SOCK_H */
