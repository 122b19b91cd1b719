/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Which local sockets a flow ends at, and so which cgroup, process and user
 * own it. Taken once per local end, kept in a map of its own (flows_owner),
 * so the base entry does not grow, and never inserted there on a packet's
 * path: the datapath sends each end's owner through a ring (owner_ring), and
 * the poller puts it into flows_owner, which the scan (scan.h) joins with the
 * flow and empties when the flow ends.
 *
 * A socket's owner (the process that opened it: pid, command, uid) is kept
 * on the socket itself (owner_socks, socket-local storage freed with the
 * socket), noted when the socket is created (owner_sock_create, on the
 * cgroup v2 root) or, for sockets older than the agent, by a walk of every
 * task's open files at start (seed.bpf.c). The cgroup is the socket's own:
 * the cgroup v2 cgroup of the process that opened it.
 *
 * Which end, from which packet: a local end sends on egress, and the packet
 * carries its socket (a SYN-ACK's request socket stands for its listener),
 * so an end is taken at the first packet it sends, at no lookup. Forwarded
 * packets carry none, and neither do the kernel's own (a reset to a closed
 * port), so they give their end nothing. An end that only receives (a UDP
 * service that never answers) is left to the poller: at the second packet
 * to it the datapath sends a request (owner_want_event) through the ring,
 * and the poller runs the kernel's socket lookup for it (owner_resolve)
 * off the packet's path. The flow's first packet is left alone so an
 * unanswered one-packet flow (a scan, a flood) costs nothing, and the wait
 * lets an answer carry the socket instead. Which ends are still due is a
 * byte of the base entry (flow_l4.port.own), so a flow's other packets test
 * a bit and no more.
 *
 * Entries are keyed by the flow's ext_id and the key endpoint the socket is
 * at: ext_id << 1 | 0 for addr_lo, | 1 for addr_hi. A flow without an
 * extension is given an ext_id as its first end is taken.
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

/* Written by the poller only (from owner_ring). Capacity is set from
 * userspace before load.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct flow_owner);
} flows_owner SEC(".maps");

/* Owners taken, as struct owner_event, on their way to flows_owner. Size set
 * from userspace before load.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 18);
} owner_ring SEC(".maps");

/* Bytes waiting in owner_ring past which the poller is woken to read it
 * (it reads it before each scan anyway): set from userspace before load.
 */
const volatile __u64 owner_ring_wake = 1 << 16;

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

/* A receiving end the poller looks up (owner_resolve), in, and its owner,
 * out: one request at a time, in slot 0.
 */
struct owner_resolve_io {
	struct owner_want want;
	__u8 local[16];		/* the local end's address */
	struct flow_owner owner;	/* out */
	__u32 found;		/* out */
	__u8 __pad[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct owner_resolve_io);
} owner_resolve_io SEC(".maps");

/* The socket a packet of `want` to `local` would be delivered to here, and
 * its owner, by the kernel's own socket lookup: run by the poller through
 * BPF_PROG_TEST_RUN for each end the datapath left to it (owner_want_event), so
 * the packet's path pays no lookup. The lookup is in the poller's network
 * namespace, the agent's, whose interfaces the datapath watches.
 */
SEC("tc")
int owner_resolve(struct __sk_buff *skb)
{
	struct bpf_sock_tuple t = {};
	struct owner_resolve_io *io;
	struct bpf_sock *sk, *full;
	__u32 zero = 0, size;

	io = bpf_map_lookup_elem(&owner_resolve_io, &zero);
	if (!io)
		return TC_ACT_UNSPEC;
	io->found = 0;
	if (io->want.ip_version == 4) {
		__builtin_memcpy(&t.ipv4.saddr, io->want.remote + 12, 4);
		__builtin_memcpy(&t.ipv4.daddr, io->local + 12, 4);
		t.ipv4.sport = bpf_htons(io->want.remote_port);
		t.ipv4.dport = bpf_htons(io->want.local_port);
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, io->want.remote, 16);
		__builtin_memcpy(t.ipv6.daddr, io->local, 16);
		t.ipv6.sport = bpf_htons(io->want.remote_port);
		t.ipv6.dport = bpf_htons(io->want.local_port);
		size = sizeof(t.ipv6);
	}
	if (io->want.proto == IPPROTO_TCP)
		sk = (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &t, size,
							   BPF_F_CURRENT_NETNS,
							   0);
	else if (io->want.proto == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	else
		return TC_ACT_UNSPEC;
	if (!sk)
		return TC_ACT_UNSPEC;
	/* one pointer type whichever lookup found it: the verifier lets an
	 * instruction read through one type only; a request socket stands for
	 * its listener
	 */
	full = bpf_sk_fullsock(sk);
	if (!full)
		full = bpf_get_listener_sock(sk);
	io->found = full && owner_of(full, &io->owner);
	bpf_sk_release(sk);
	return TC_ACT_UNSPEC;
}

/* The owner state bits of key endpoint `end` (0: addr_lo, 1: addr_hi). */
#define OWN_DUE(end) ((end) ? OWN_DUE_HI : OWN_DUE_LO)
#define OWN_SENT(end) ((end) ? OWN_SENT_HI : OWN_SENT_LO)

/* The sending end's owner, from the socket an egress packet carries. A
 * function of its own, verified once, apart from the flow programs.
 */
__noinline int owner_sender(struct __sk_buff *skb, struct flow_owner *o)
{
	struct bpf_sock *sk;

	if (!skb || !o)
		return 0;
	sk = skb->sk;
	return sk && owner_of(sk, o);
}

/* Whether to wake the poller with this record: it reads the ring before
 * each scan, and is woken early only when enough waits that the ring could
 * fill before then.
 */
static __always_inline __u64 owner_wake(void)
{
	return bpf_ringbuf_query(&owner_ring, BPF_RB_AVAIL_DATA) >=
			       owner_ring_wake ?
		       BPF_RB_FORCE_WAKEUP :
		       BPF_RB_NO_WAKEUP;
}

/* Sends a local end's owner to the poller; false when the ring had no room
 * (counted: that end goes without). Written in place, no copy.
 */
static __always_inline bool owner_send(__u64 ext_id, __u8 end,
				       const struct flow_owner *o)
{
	struct owner_event *r;

	r = bpf_ringbuf_reserve(&owner_ring, sizeof(*r), 0);
	if (!r) {
		owner_count(OWN_RING_FULL);
		return false;
	}
	r->key = ext_id << 1 | end;
	r->owner = *o;
	bpf_ringbuf_submit(r, owner_wake());
	return true;
}

/* Asks the poller to look up the receiving end of packet `p`: who sends to
 * it and how.
 */
static __always_inline bool owner_send_want(__u64 ext_id, __u8 end,
					    const struct pkt *p, bool check)
{
	const __u8 *src = p->key.addr_lo, *dst = p->key.addr_hi;
	struct owner_want_event *r;

	if (p->dir == DIR_HI_TO_LO) {
		src = p->key.addr_hi;
		dst = p->key.addr_lo;
	}
	r = bpf_ringbuf_reserve(&owner_ring, sizeof(*r), 0);
	if (!r) {
		owner_count(OWN_RING_FULL);
		return false;
	}
	r->key = ext_id << 1 | end;
	__builtin_memcpy(r->want.remote, src, sizeof(r->want.remote));
	__builtin_memcpy(r->local, dst, sizeof(r->local));
	r->want.remote_port = p->sport;
	r->want.local_port = p->dport;
	r->want.proto = p->key.proto;
	r->want.ip_version = p->key.ip_version;
	__builtin_memset(r->want.__pad, 0, sizeof(r->want.__pad));
	r->flags = check ? OWN_WANT_CHECK_LOCAL : 0;
	__builtin_memset(r->__pad, 0, sizeof(r->__pad));
	bpf_ringbuf_submit(r, owner_wake());
	return true;
}

/* A new flow's entry (`nb`, still on the stack): both ends due, for any
 * flow a socket can be found for by its ports and which has the byte.
 */
static __always_inline void owner_init(struct flow_base *nb,
				       const struct acct *a)
{
	if (owner_attribution && !a->p.frag && a->ext != EXT_ICMP)
		nb->l4.port.own = OWN_DUE_LO | OWN_DUE_HI;
}

/* A new flow's first packet, on its entry still on the stack (`nb`, after
 * owner_init): leaving through a local socket, it gives its sender's owner
 * (into `o`, true: owner_start_sent once the entry is in, with the ext_id it
 * now has). Received, it gives nothing yet (see the top of this file).
 */
static __always_inline bool owner_start(struct __sk_buff *skb,
					const struct acct *a, __u8 hook,
					struct flow_base *nb, struct flow_owner *o)
{
	__u8 end = a->p.dir == DIR_HI_TO_LO;
	bool found;

	if (!owner_attribution || hook != HOOK_EGRESS || a->p.frag)
		return false;
	found = owner_sender(skb, o);
	if (a->ext != EXT_ICMP)
		nb->l4.port.own = (nb->l4.port.own & ~OWN_DUE(end)) |
				  (found ? OWN_SENT(end) : 0);
	if (found && !nb->ext_id)
		nb->ext_id = ext_id_next();
	return found;
}

static __always_inline void owner_start_sent(const struct acct *a,
					     __u64 ext_id,
					     const struct flow_owner *o)
{
	owner_send(ext_id, a->p.dir == DIR_HI_TO_LO, o);
}

/* The flow's ext_id, given one now if it has none (a flow without an
 * extension): two CPUs racing agree on one.
 */
static __always_inline __u64 owner_ext_id(struct flow_base *b)
{
	__u64 id = *(volatile __u64 *)&b->ext_id, n;

	if (id)
		return id;
	n = ext_id_next();
	if (!n)
		return 0;
	id = __sync_val_compare_and_swap(&b->ext_id, 0, n);
	return id ?: n;
}

/* A packet of a flow with an end still due: takes the sender's owner on
 * egress, or looks the receiver up on ingress (on loopback, where every
 * packet crosses egress only, either). Each end once: its bit is cleared
 * before the work, so two CPUs racing may both take it, which gives the
 * poller the same owner twice, never a wrong one.
 */
static __always_inline void owner_due(struct __sk_buff *skb,
				      const struct acct *a, __u8 hook,
				      struct flow_base *b, __u8 own)
{
	struct flow_owner o = {};
	__u8 from = a->p.dir == DIR_HI_TO_LO, to = !from, end;
	bool want, sent;
	__u64 id;

	if (hook == HOOK_EGRESS && (own & OWN_DUE(from))) {
		end = from;
		b->l4.port.own = own & ~OWN_DUE(from);
		if (!owner_sender(skb, &o))
			return;
		want = false;
	} else if ((hook == HOOK_INGRESS ||
		    skb->ifindex == LOOPBACK_IFINDEX) &&
		   (own & OWN_DUE(to)) &&
		   (a->p.key.proto == IPPROTO_TCP ||
		    a->p.key.proto == IPPROTO_UDP)) {
		end = to;
		b->l4.port.own = own & ~OWN_DUE(to);
		/* an arriving frame for another station (a bridge port,
		 * promiscuous mode) is nobody's here
		 */
		if (hook == HOOK_INGRESS && skb->pkt_type == PACKET_OTHERHOST)
			return;
		want = true;
	} else {
		return;
	}
	id = owner_ext_id(b);
	if (!id)
		return;
	/* on loopback every destination is this host's */
	sent = want ? owner_send_want(id, end, &a->p,
				      skb->ifindex != LOOPBACK_IFINDEX) :
		      owner_send(id, end, &o);
	if (sent)
		b->l4.port.own |= OWN_SENT(end);
}

/* Every packet of a flow in the base map: a bit test, unless an end is due. */
static __always_inline void owner_check(struct __sk_buff *skb,
					const struct acct *a, __u8 hook,
					struct flow_base *b)
{
	__u8 own;

	if (a->ext == EXT_ICMP)
		return;
	own = *(volatile __u8 *)&b->l4.port.own;
	if (own & (OWN_DUE_LO | OWN_DUE_HI))
		owner_due(skb, a, hook, b, own);
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
