// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Passive TC/TCX programs that account every IP packet into split flow
 * maps: one base entry per flow, plus a TCP or ICMP extension entry.
 * They never change a packet's fate.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowlens.h"
#include "base.h"
#include "maps.h"
#include "owner.h"
#include "scan.h"

/* Read by userspace: pinned maps live under a directory named after it,
 * so maps of another layout are never reused.
 */
const volatile __u32 layout_version = FLOWLENS_LAYOUT_VERSION;

/* Puts the enums into BTF, so the skeleton's `types` module carries them
 * and Rust never restates their values.
 */
struct flow_enums {
	enum flow_dir dir;
	enum flow_hook hook;
	enum flow_ext ext;
	enum flow_counter counter;
	enum tcp_state state;
	enum tcp_bits bits;
	enum flow_key_flags key_flags;
	enum scan_kind scan_kind;
	enum scan_proto scan_proto;
	enum scan_stop scan_stop;
	enum flow_meta meta;
};
const volatile struct flow_enums flow_enums_btf = {};

/* The same for the structs only the scan's ring buffer carries (a ring
 * buffer's records have no type of their own).
 */
struct scan_types {
	struct scan_rec rec;
	struct flow_ended ended;
};
const volatile struct scan_types *scan_types_btf;

/* Inserts a new flow: one base entry, its TCP or ICMP state already
 * updated from this first packet (which never gives a sample). Returns 0,
 * -EEXIST (another CPU created it first), or CNT_BASE_FULL.
 */
static __always_inline int flow_create(struct __sk_buff *skb,
				       const struct acct *a, __u8 hook)
{
	struct flow_base nb = {};
	struct owner_take own = {};
	/* one fine clock read: the first packet's time and the handshake's */
	__u64 now = bpf_ktime_get_ns();
	long err;

	base_init(&nb, a, hook, now);
	if (a->ext) {
		nb.ext_id = ext_id_next();
		/* a stack entry no other CPU sees: no lock, no sample */
		if (a->ext == EXT_TCP)
			tcp_update(&nb, NULL, &a->p, now);
		else
			icmp_update(&nb, NULL, &a->p);
	}
	owner_take(skb, a, hook, &own, &nb.ext_id);
	err = bpf_map_update_elem(&flows, &a->p.key, &nb, BPF_NOEXIST);
	if (err == -EEXIST)
		return -EEXIST;
	if (err)
		return CNT_BASE_FULL;
	owner_put(nb.ext_id, &own);
	if (a->ext == EXT_TCP && (a->p.tcp_flags & TCP_RST))
		tcp_note_close(&nb, &a->p);
	return 0;
}

static __always_inline void handle(struct __sk_buff *skb, __u8 hook)
{
	struct acct a = {};
	struct flow_base *b;
	__u64 now = 0;
	int err;

	if (!acct_of(skb, &a))
		return;

	b = bpf_map_lookup_elem(&flows, &a.p.key);
	if (!b) {
		err = flow_create(skb, &a, hook);
		if (!err) {
			count(CNT_PACKETS, a.pkts);
			return;
		}
		if (err != -EEXIST) {
			count(err, a.pkts);
			return;
		}
		/* another CPU created it first: account as an update */
		b = bpf_map_lookup_elem(&flows, &a.p.key);
		if (!b) {
			count(CNT_BASE_FULL, a.pkts);
			return;
		}
	}
	count(CNT_PACKETS, a.pkts);

	if (a.ext == EXT_TCP)
		now = tcp_account(b, &a.p);
	else if (a.ext == EXT_ICMP)
		now = icmp_account(b, &a.p);
	/* last seen: the fine clock if the packet needed it, else the tick's,
	 * which may be up to a tick behind the fine first seen (userspace
	 * clamps; the scan judges idleness on it either way)
	 */
	base_account(b, &a, now ?: coarse_now());
}

FLOW_PROGRAMS(handle);
