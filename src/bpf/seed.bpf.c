// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The start-up seed: gives the sockets opened before the agent their owner.
 * An object of its own, loaded once at start and dropped after its walks,
 * so the map of every socket open then holds no memory afterwards; it
 * shares owner_socks and owner_counters with the flow object (userspace
 * hands it that object's maps).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "flowlens.h"
#include "owner_sock.h"

/* The seed, run once at start for the sockets opened before the agent: a
 * walk of every task's open files notes which task holds each IPv4/IPv6
 * socket (by the socket's address: the walk may not hand the socket itself
 * to a helper), then walks of this namespace's TCP and UDP sockets give
 * each its owner, unless one was noted already.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct owner_sock);
} owner_seed_socks SEC(".maps");

SEC("iter/task_file")
int owner_seed_tasks(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct owner_sock o = {};
	struct socket *sock;
	struct sock *sk;
	__u16 family;
	__u64 k;

	if (!task || !file)
		return 0;
	sock = bpf_sock_from_file(file);
	if (!sock)
		return 0;
	sk = sock->sk;
	if (!sk)
		return 0;
	family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	o.pid = task->tgid;
	o.uid = task->cred->uid.val;
	bpf_probe_read_kernel_str(o.comm, sizeof(o.comm),
				  task->group_leader->comm);
	k = (__u64)sk;
	/* the first task found holding it keeps it */
	if (bpf_map_update_elem(&owner_seed_socks, &k, &o, BPF_NOEXIST) ==
	    -E2BIG)
		owner_count(OWN_SOCK_LOST);
	return 0;
}

static __always_inline void owner_seed(void *sk)
{
	__u64 k = (__u64)sk;
	struct owner_sock *o = bpf_map_lookup_elem(&owner_seed_socks, &k);
	struct owner_sock *s;

	if (!o)
		return;
	s = bpf_sk_storage_get(&owner_socks, sk, 0,
			       BPF_SK_STORAGE_GET_F_CREATE);
	if (!s) {
		owner_count(OWN_SOCK_LOST);
		return;
	}
	if (!s->pid)
		*s = *o;
}

SEC("iter/tcp")
int owner_seed_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (tp)
		owner_seed(tp);
	return 0;
}

SEC("iter/udp")
int owner_seed_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *u = ctx->udp_sk;

	if (u)
		owner_seed(u);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
