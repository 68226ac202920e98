/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The load-time configuration and every map of the object: what the loader finds by
 * name (MAPS in src/ei_ebpf_agent/ebpf/loader.py) and sizes before load.
 */
#ifndef EI_MAPS_H
#define EI_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"

/* Default table size; the loader sets flows_a/flows_b from CACHE_MAX_FLOWS. */
#define FLOW_TABLE_SLOTS 10000
#define LOCK_STRIPES 1024
#define RINGBUF_BYTES (1 << 20)

/* Load-time configuration set by the loader: the whole .rodata section. */
const volatile struct agent_config agent_config = {.table_slots = FLOW_TABLE_SLOTS};

/* One flow table: struct flow_slot entries, mmapped by userspace to drain them.
 * flows_a and flows_b must share type, sizes and flags: the kernel checks exactly these
 * (and, for arrays, max_entries) when userspace swaps one into flows_outer[0]. */
struct flow_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOW_TABLE_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct flow_slot);
};

struct flow_table flows_a SEC(".maps");
struct flow_table flows_b SEC(".maps");

/* Slot 0 is the table the programs write to; userspace swaps it (lossless eviction).
 * Lookups in an ARRAY_OF_MAPS, and in the arrays inside it, are inlined by the verifier. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct flow_table);
} flows_outer SEC(".maps") = {
	.values = {[0] = &flows_a},
};

/* Locks that serialise filling an empty slot in the *_lock programs; slot i uses lock
 * i % LOCK_STRIPES. (A slot cannot hold its own lock: mmapable arrays may not contain a
 * bpf_spin_lock.) */
struct slot_lock {
	struct bpf_spin_lock lock;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LOCK_STRIPES);
	__type(key, __u32);
	__type(value, struct slot_lock);
} slot_locks SEC(".maps");

/* Packets that found the table full: one struct flow_record each. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RINGBUF_BYTES);
} flows_ringbuf SEC(".maps");

/* Per-CPU event counters, indexed by enum agent_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

#endif /* EI_MAPS_H */
