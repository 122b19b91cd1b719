// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Passive TC/TCX programs that account every IP packet into split flow
 * maps: one base entry per flow, plus a TCP or ICMP extension entry; once
 * the base map is under pressure, a new flow waits in probation until
 * answered (probation.h). They never change a packet's fate.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "flowlens.h"
#include "base.h"
#include "maps.h"
#include "owner.h"
#include "probation.h"
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
	enum admission_mode admission;
	enum flow_owner_state own;
	enum owner_want_flags own_want;
};
const volatile struct flow_enums flow_enums_btf = {};

/* The same for the structs only the scan's ring buffer carries (a ring
 * buffer's records have no type of their own).
 */
struct scan_types {
	struct scan_rec rec;
	struct flow_ended ended;
	struct flow_probe probe;
	struct probe_sketch sketch;
	struct probe_port port;
	struct owner_event owner;
	struct owner_want_event owner_want;
};
const volatile struct scan_types *scan_types_btf;

static __always_inline void handle(struct __sk_buff *skb, __u8 hook)
{
	struct acct a = {};
	struct flow_base *b;
	__u64 now = 0;

	if (!acct_of(skb, &a))
		return;

	b = bpf_map_lookup_elem(&flows, &a.p.key);
	if (!b) {
		bool done = false;

		/* straight in, unless it waits in probation from a time
		 * under pressure (looked for only while probation has flows)
		 */
		if (base_has_room() &&
		    (!probe_maybe() ||
		     !bpf_map_lookup_elem(&probation, &a.p.key)))
			b = base_new(skb, &a, hook, &done);
		if (done)
			return;
		if (!b && admission == ADMIT_NEVER) {
			count(CNT_BASE_FULL, a.pkts);
			return;
		}
		/* not admitted yet: probation, unless this packet admits it */
		if (!b)
			b = probe_account(skb, &a, hook);
		if (!b)
			return;
	}
	owner_check(skb, &a, hook, b);
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
