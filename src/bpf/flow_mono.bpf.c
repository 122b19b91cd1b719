// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Benchmark-only build of the flow programs with one monolithic map, so
 * `make bench` can compare it with the split maps in the same run.
 */
#define FLOWLENS_MONOLITHIC
#include "flow.bpf.c"
