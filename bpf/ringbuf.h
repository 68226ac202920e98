/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The ring-buffer fallback: a packet for which no slot could be found or filled goes to
 * userspace whole, as one struct flow_record, and is merged by key at eviction. Only
 * when the ring buffer is full too is it lost, and then counted in
 * counters[COUNTER_RINGBUF_LOST].
 */
#ifndef EI_RINGBUF_H
#define EI_RINGBUF_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"
#include "maps.h"

static __always_inline void count(__u32 index)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &index);

	if (c)
		__sync_fetch_and_add(c, 1);
}

/*
 * Cold path, kept out of line: no slot was free around this flow's, or its slot was
 * being claimed by another CPU (or the table is missing), so the packet goes to
 * userspace as one record. Also the function whose signature puts struct flow_record
 * into the object's BTF (tests/unit/test_layout.py). `used` only makes clang emit it
 * here, ahead of btf_enums (flows.bpf.c), so it stays first in .text and the programs'
 * calls to it keep their offsets.
 */
static __noinline __attribute__((used)) void emit_record(struct flow_record *rec)
{
	if (bpf_ringbuf_output(&flows_ringbuf, rec, sizeof(*rec), 0))
		count(COUNTER_RINGBUF_LOST);
	else
		count(COUNTER_RINGBUF_RECORDS);
}

#endif /* EI_RINGBUF_H */
