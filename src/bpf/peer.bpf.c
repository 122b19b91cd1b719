// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* A peer-like flow program for `make bench`, written here (no third-party
 * code): per packet, what a per-direction flow collector's TC program such as
 * netobserv-ebpf-agent's does. It reads the fine clock, looks the packet's
 * per-direction key up in one hash map and, under the entry's spin lock, adds
 * the packet and its bytes, ORs the TCP flags and sets the last-seen time; a
 * new key is inserted with its first-seen time. No latency, no handshake, no
 * extension map: the same packets through flowlens cost what its extra
 * function costs beyond this.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowlens.h"
#include "parse.h"

struct peer_flow {
	struct bpf_spin_lock lock;
	__u16 eth_protocol;
	__u16 flags;		/* OR of the TCP flags seen */
	__u64 packets;
	__u64 bytes;
	__u64 first_ns;
	__u64 last_ns;
	__u8 dscp;
	__u8 __pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct flow_key);
	__type(value, struct peer_flow);
} peer_flows SEC(".maps");

static __always_inline void peer_handle(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct peer_flow *f;
	__u64 now = bpf_ktime_get_ns();
	long err;

	if (parse(skb, &p))
		return;
	/* per direction: source first, as the packet has it */
	p.key.port_lo = p.sport;
	p.key.port_hi = p.dport;
	p.key.ifindex = skb->ifindex;

	f = bpf_map_lookup_elem(&peer_flows, &p.key);
	if (!f) {
		struct peer_flow nf = {
			.eth_protocol = p.key.ip_version == 6 ? 0x86dd : 0x0800,
			.flags = p.tcp_flags,
			.packets = 1,
			.bytes = skb->len,
			.first_ns = now,
			.last_ns = now,
		};

		err = bpf_map_update_elem(&peer_flows, &p.key, &nf, BPF_NOEXIST);
		if (err != -EEXIST)
			return;
		f = bpf_map_lookup_elem(&peer_flows, &p.key);
		if (!f)
			return;
	}
	bpf_spin_lock(&f->lock);
	f->packets += 1;
	f->bytes += skb->len;
	f->last_ns = now;
	f->flags |= p.tcp_flags;
	bpf_spin_unlock(&f->lock);
}

SEC("tc")
int peer_tc(struct __sk_buff *skb)
{
	peer_handle(skb);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
