/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Which local sockets a flow ends at, and so which cgroup, process and user
 * own it. Taken once per flow, as it is admitted into the base map (the
 * packet that answers it, probation.h: a flow never answered, a flood's,
 * costs none of it), and kept in a map of its own (flows_owner), so the
 * base entry does not grow.
 *
 * A socket's owner (the process that opened it: pid, command, uid) is kept
 * on the socket itself (owner_socks, socket-local storage freed with the
 * socket), noted when the socket is created (owner_sock_create, on the
 * cgroup v2 root) or, for sockets older than the agent, by a walk of every
 * task's open files at start (seed.bpf.c). The cgroup is the socket's own
 * (bpf_sk_cgroup_id): the cgroup v2 cgroup of the process that opened it.
 *
 * The admitting packet's sockets: on egress the one the packet carries;
 * the receiving one by a socket lookup (TCP, UDP), on ingress and, on
 * loopback (whose packets only cross egress), for the other end too. A
 * connection a server accepted is found as its listening socket (the
 * handshake's request socket stands for it).
 *
 * Entries are keyed by the flow's ext_id and the key endpoint the socket is
 * at: ext_id << 1 | 0 for addr_lo, | 1 for addr_hi. The scan (scan.h)
 * copies them out with the flow and deletes them when the flow ends; the
 * poller sweeps the orphans a race leaves, as for the extensions.
 */
#ifndef __FLOWLENS_OWNER_H
#define __FLOWLENS_OWNER_H

#include <bpf/bpf_core_read.h>

#define LOOPBACK_IFINDEX 1
/* The cgroup v2 root: every process on a host that does not use cgroup v2 */
#define CGROUP_ROOT_ID 1
#define PACKET_OTHERHOST 3

/* Off (set before load) for a datapath that attributes nothing: the
 * benchmark's "before", and kernels without the socket hooks.
 */
const volatile bool owner_attribution = true;

#include "owner_sock.h"

/* In BTF, so the skeleton's `types` module carries them. */
struct owner_enums {
	enum owner_counter counter;
};
const volatile struct owner_enums owner_enums_btf = {};

/* Capacity is set from userspace before load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct flow_owner);
} flows_owner SEC(".maps");

/* The local ends a flow's admitting packet found, by key endpoint. */
struct owner_take {
	struct flow_owner end[2];
	__u8 found[2];
	__u8 __pad[6];
};

/* A cast the verifier lets a TC program read kernel structs through. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

/* The socket's cgroup v2 id, as the kernel keeps it in the socket: TC has no
 * helper for a socket that is not the packet's own.
 */
static __always_inline __u64 owner_cgroup(struct bpf_sock *sk)
{
	struct sock *s = bpf_rdonly_cast(sk,
					 bpf_core_type_id_kernel(struct sock));
	struct cgroup *c = s->sk_cgrp_data.cgroup;

	return c ? c->kn->id : 0;
}

/* Fills `o` from a socket: its cgroup, and its owner when noted. False for
 * a socket nobody is known to own (the kernel's own, in the root cgroup).
 */
static __always_inline bool owner_of(struct bpf_sock *sk, struct flow_owner *o)
{
	struct owner_sock *s;
	struct bpf_sock *full = bpf_sk_fullsock(sk);

	/* a request socket (a SYN-ACK's) stands for its listener */
	if (!full)
		full = bpf_get_listener_sock(sk);
	if (!full)
		return false;
	o->cgroup_id = owner_cgroup(full);
	s = bpf_sk_storage_get(&owner_socks, full, 0, 0);
	if (!s)
		return o->cgroup_id > CGROUP_ROOT_ID;
	o->pid = s->pid;
	o->uid = s->uid;
	__builtin_memcpy(o->comm, s->comm, sizeof(o->comm));
	return true;
}

/* Whether a socket is bound to the wildcard address, so matches a packet to
 * any destination address.
 */
static __always_inline bool owner_any_addr(struct bpf_sock *sk)
{
	if (sk->family == AF_INET)
		return !sk->src_ip4;
	return !(sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] |
		 sk->src_ip6[3]);
}

/* Whether an arriving packet is for this host rather than one it forwards:
 * a socket lookup matches a wildcard-bound socket whatever the destination,
 * so a forwarded packet to a port a local service listens on would be
 * taken for that service's. The route says which: a forwarded packet's is a
 * unicast route elsewhere. Where this interface does not forward at all, it
 * is for this host or dropped.
 */
static __always_inline bool owner_for_host(struct __sk_buff *skb,
					   const struct pkt *p,
					   const __u8 *src, const __u8 *dst)
{
	struct bpf_fib_lookup f = {};
	long r;

	/* a frame for another station (a bridge port, promiscuous mode) */
	if (skb->pkt_type == PACKET_OTHERHOST)
		return false;
	f.l4_protocol = p->key.proto;
	f.sport = bpf_htons(p->sport);
	f.dport = bpf_htons(p->dport);
	f.ifindex = skb->ifindex;
	if (p->key.ip_version == 4) {
		f.family = AF_INET;
		__builtin_memcpy(&f.ipv4_src, src + 12, 4);
		__builtin_memcpy(&f.ipv4_dst, dst + 12, 4);
	} else {
		f.family = AF_INET6;
		__builtin_memcpy(f.ipv6_src, src, 16);
		__builtin_memcpy(f.ipv6_dst, dst, 16);
	}
	r = bpf_fib_lookup(skb, &f, sizeof(f), 0);
	return r == BPF_FIB_LKUP_RET_NOT_FWDED ||
	       r == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

/* The socket the packet is delivered to on this host, if any. */
static __always_inline bool owner_lookup(struct __sk_buff *skb,
					 const struct pkt *p, __u32 hook,
					 struct flow_owner *o)
{
	struct bpf_sock_tuple t = {};
	const __u8 *src = p->key.addr_lo, *dst = p->key.addr_hi;
	struct bpf_sock *sk, *full;
	__u32 size;
	bool found;

	if (p->dir == DIR_HI_TO_LO) {
		src = p->key.addr_hi;
		dst = p->key.addr_lo;
	}
	if (p->key.ip_version == 4) {
		__builtin_memcpy(&t.ipv4.saddr, src + 12, 4);
		__builtin_memcpy(&t.ipv4.daddr, dst + 12, 4);
		t.ipv4.sport = bpf_htons(p->sport);
		t.ipv4.dport = bpf_htons(p->dport);
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, src, 16);
		__builtin_memcpy(t.ipv6.daddr, dst, 16);
		t.ipv6.sport = bpf_htons(p->sport);
		t.ipv6.dport = bpf_htons(p->dport);
		size = sizeof(t.ipv6);
	}
	if (p->key.proto == IPPROTO_TCP)
		sk = (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &t, size,
							   BPF_F_CURRENT_NETNS,
							   0);
	else
		sk = bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return false;
	/* one pointer type whichever lookup found it: the verifier lets an
	 * instruction read through one type only; a request socket stands for
	 * its listener
	 */
	full = bpf_sk_fullsock(sk);
	if (!full)
		full = bpf_get_listener_sock(sk);
	/* on loopback every destination is this host's */
	if (!full || (hook == HOOK_INGRESS && skb->ifindex != LOOPBACK_IFINDEX &&
		      owner_any_addr(full) && !owner_for_host(skb, p, src, dst)))
		found = false;
	else
		found = owner_of(full, o);
	bpf_sk_release(sk);
	return found;
}

/* The local ends of a flow being admitted, from the packet admitting it:
 * how many it found.
 * A function of its own, verified once, apart from the flow programs.
 */
__noinline int owner_ends(struct __sk_buff *skb, const struct pkt *p,
			  __u32 hook, struct owner_take *t)
{
	struct bpf_sock *sk;
	bool from_hi;

	if (!skb || !p || !t || p->frag)
		return 0;
	from_hi = p->dir == DIR_HI_TO_LO;
	if (hook == HOOK_EGRESS) {
		sk = skb->sk;
		/* constant indexes: see base_init */
		if (sk && from_hi)
			t->found[1] = owner_of(sk, &t->end[1]);
		else if (sk)
			t->found[0] = owner_of(sk, &t->end[0]);
		if (skb->ifindex != LOOPBACK_IFINDEX)
			goto out;
	}
	if (p->key.proto != IPPROTO_TCP && p->key.proto != IPPROTO_UDP)
		goto out;
	if (from_hi)
		t->found[0] = owner_lookup(skb, p, hook, &t->end[0]);
	else
		t->found[1] = owner_lookup(skb, p, hook, &t->end[1]);
out:
	return t->found[0] + t->found[1];
}

/* Finds the local ends of a new flow and gives the flow an ext_id to key
 * them by when it has none.
 */
static __always_inline void owner_take(struct __sk_buff *skb,
				       const struct acct *a, __u8 hook,
				       struct owner_take *t, __u64 *ext_id)
{
	if (owner_attribution && owner_ends(skb, &a->p, hook, t) && !*ext_id)
		*ext_id = ext_id_next();
}

/* Keeps the ends found for flow `ext_id`, once its base entry is in. A full
 * map loses the attribution, counted, never the flow.
 */
__noinline int owner_keep(__u64 ext_id, const struct owner_take *t)
{
	__u64 k = ext_id << 1;

	if (!t)
		return 0;
	if (t->found[0] &&
	    bpf_map_update_elem(&flows_owner, &k, &t->end[0], BPF_NOEXIST))
		owner_count(OWN_FULL);
	k |= 1;
	if (t->found[1] &&
	    bpf_map_update_elem(&flows_owner, &k, &t->end[1], BPF_NOEXIST))
		owner_count(OWN_FULL);
	return 0;
}

static __always_inline void owner_put(__u64 ext_id, const struct owner_take *t)
{
	if (ext_id && (t->found[0] || t->found[1]))
		owner_keep(ext_id, t);
}

/* The scan's side: copies flow `ext_id`'s ends into its record, and deletes
 * them when the flow ends (so a finished flow leaves nothing here). A
 * global function, verified once apart from the scan's paths (inline, they
 * took the scan past the verifier's budget).
 */
__noinline int owner_scan(struct scan_rec *r, __u64 ext_id, __u32 kind)
{
	bool ended = kind != SCAN_ACTIVE;
	struct flow_owner *o;
	__u64 k = ext_id << 1;

	if (!r)
		return 0;
	r->has_owner = 0;
	__builtin_memset(r->owner, 0, sizeof(r->owner));
	if (!ext_id)
		return 0;
	o = bpf_map_lookup_elem(&flows_owner, &k);
	if (o) {
		r->owner[0] = *o;
		r->has_owner |= 1;
		if (ended)
			bpf_map_delete_elem(&flows_owner, &k);
	}
	k |= 1;
	o = bpf_map_lookup_elem(&flows_owner, &k);
	if (o) {
		r->owner[1] = *o;
		r->has_owner |= 2;
		if (ended)
			bpf_map_delete_elem(&flows_owner, &k);
	}
	return 0;
}

/* The owners map's entry count, for the map fill figures the poller gives: a
 * program of its own, so the scan's arguments stay as they are.
 */
struct owner_count_args {
	__u64 entries;
};

extern __s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym __weak;

static long owner_count_one(struct bpf_map *map, const void *key,
			    void *value, __u64 *n)
{
	*n += 1;
	return 0;
}

SEC("syscall")
int owner_entries(struct owner_count_args *a)
{
	__s64 n;

	if (bpf_ksym_exists(bpf_map_sum_elem_count)) {
		n = bpf_map_sum_elem_count((const struct bpf_map *)&flows_owner);
		a->entries = n > 0 ? (__u64)n : 0;
		return 0;
	}
	a->entries = 0;
	bpf_for_each_map_elem(&flows_owner, owner_count_one, &a->entries, 0);
	return 0;
}

/* A socket being opened: the process opening it is its owner. Attached to
 * the cgroup v2 root, so it runs for every process's inet and inet6 socket
 * (the kernel's own are not run through it); it never refuses one.
 */
SEC("cgroup/sock_create")
int owner_sock_create(struct bpf_sock *sk)
{
	struct task_struct *task;
	struct owner_sock *s;

	s = bpf_sk_storage_get(&owner_socks, sk, 0,
			       BPF_SK_STORAGE_GET_F_CREATE);
	if (!s) {
		owner_count(OWN_SOCK_LOST);
		return 1;
	}
	s->pid = bpf_get_current_pid_tgid() >> 32;
	s->uid = (__u32)bpf_get_current_uid_gid();
	/* the process's name (its main thread's, as /proc/PID/comm and ps
	 * show it), not the opening thread's own
	 */
	task = bpf_get_current_task_btf();
	if (bpf_probe_read_kernel_str(s->comm, sizeof(s->comm),
				      task->group_leader->comm) < 0)
		bpf_get_current_comm(s->comm, sizeof(s->comm));
	return 1;
}

#endif /* __FLOWLENS_OWNER_H */
