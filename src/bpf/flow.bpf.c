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
};
const volatile struct flow_enums flow_enums_btf = {};

/* Inserts a new flow: base first, so an extension never exists without
 * it, and removed again when its extension cannot be created. Returns 0,
 * -EEXIST (another CPU created it first), or the CNT_* reason it failed.
 */
static __always_inline int flow_create(const struct acct *a, __u8 hook,
				       __u64 now)
{
	struct flow_base nb = {};
	long err;

	base_init(&nb, a, hook, now);
	err = bpf_map_update_elem(&flows, &a->p.key, &nb, BPF_NOEXIST);
	if (err == -EEXIST)
		return -EEXIST;
	if (err)
		return CNT_BASE_FULL;
	if (!a->ext)
		return 0;
	err = account_ext(&a->p, a->ext, now);
	if (err)
		bpf_map_delete_elem(&flows, &a->p.key);
	return err;
}

static __always_inline void handle(struct __sk_buff *skb, __u8 hook)
{
	struct acct a = {};
	struct flow_base *b;
	__u64 now;
	int err;

	if (!acct_of(skb, &a))
		return;
	now = bpf_ktime_get_ns();

	b = bpf_map_lookup_elem(&flows, &a.p.key);
	if (!b) {
		err = flow_create(&a, hook, now);
		if (!err) {
			count(CNT_PACKETS);
			return;
		}
		if (err != -EEXIST) {
			count(err);
			return;
		}
		/* another CPU created it first: account as an update */
		b = bpf_map_lookup_elem(&flows, &a.p.key);
		if (!b) {
			count(CNT_BASE_FULL);
			return;
		}
	}

	base_account(b, &a, now);
	/* a failure here only costs an existing flow its extension data */
	if (a.ext) {
		err = account_ext(&a.p, a.ext, now);
		if (err)
			count(err);
	}
	count(CNT_PACKETS);
}

FLOW_PROGRAMS(handle);
