// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * TC classifier that aggregates every packet of a selected interface into a flow
 * table (see docs/architecture.md). This file holds the program entry points and the
 * per-packet path (handle); the pieces are in headers: flow.h (the types shared with
 * userspace), maps.h (configuration and maps), parse.h (packet parsing), flow_table.h
 * (hashing, claiming and updating slots), ringbuf.h (the ring-buffer fallback).
 *
 * Only UAPI headers: no vmlinux.h, no CO-RE, so the object loads with libbpf >= 1.1 on
 * kernels 5.10 and later, with or without kernel BTF. Kernel features used: ringbuf
 * (5.8), mmapable arrays (5.5), bpf_spin_lock (5.1), bounded loops (5.3), JMP32/ALU32
 * (-mcpu=v3, 5.1), plain atomic add (XADD), and, only when the loader says the kernel
 * has them, bpf_ktime_get_coarse_ns (5.11) and the 5.12 atomics: compare-and-exchange
 * (`__sync_val_compare_and_swap`) and atomic OR without fetch (`__sync_fetch_and_or`,
 * result unused), both in the cmpxchg programs only. Not used: fetching atomics other
 * than compare-and-exchange, bpf_loop, kfuncs.
 *
 * Two pairs of programs differ only in how a new flow claims an empty slot:
 * tc_ingress/tc_egress with one compare-and-exchange (Linux 5.12+), and
 * tc_ingress_lock/tc_egress_lock under a spin lock (any kernel). The loader loads one
 * pair: a 5.10 verifier refuses a program holding a cmpxchg instruction even where it
 * cannot run.
 *
 * Every packet that reaches the program is counted exactly once: in the current table
 * (flows_outer[0]), or, when the MAX_PROBES slots tried hold other flows, as one
 * flow_record in the ring buffer; only when the ring buffer is full too is it lost, and
 * then counted in counters[COUNTER_RINGBUF_LOST].
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"
#include "maps.h"
#include "parse.h"
#include "flow_table.h"
#include "ringbuf.h"

/* Slots tried per packet before the ring buffer takes it. The verifier walks every
 * probe (its limit is 1M instructions; the counts are in docs/architecture.md). A table
 * at most half full (the loader makes 2 slots per flow of CACHE_MAX_FLOWS) keeps the
 * longest probe sequences well below it, also when each 5-tuple is seen on many
 * interfaces (simulated: docs/architecture.md, "Only 4 probes shared"). */
#define MAX_PROBES 32
/* Probes around the home slot that all flows of one 5-tuple share (see handle());
 * after them, a flow goes on from a home of its own. */
#define SHARED_PROBES 4

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline __u64 now_ns(void)
{
	/* The coarse clock (time of the last tick) costs a fraction of the exact one, whose
	 * ordered TSC read also waits for the slot's cache miss. The verifier drops the
	 * branch that agent_config (read-only, known at load) rules out, so a kernel
	 * without the coarse helper (5.10) still accepts the program. */
	if (agent_config.coarse_clock)
		return bpf_ktime_get_coarse_ns();
	return bpf_ktime_get_ns();
}

/* `cmpxchg`: claim new slots with claim_slot (else lock_slot); a constant per program. */
static __always_inline int handle(struct __sk_buff *skb, const __u8 direction,
				  const int cmpxchg)
{
	struct flow_record rec; /* key always written in full; value only for new flows */
	__u64 buf[5];           /* 40 bytes: the largest header read (IPv6) */
	struct pkt_info info = {};
	struct flow_slot *s;
	void *table;
	__u32 zero = 0, slots = agent_config.table_slots, idx = 0, step = 0;
	__u32 sampling = agent_config.sampling;
	int i, filled, have_value = 0;
	__u64 now, hash;

	if (sampling > 1 && bpf_get_prandom_u32() % sampling != 0)
		return TC_ACT_UNSPEC;

	__builtin_memset(&rec.key, 0, sizeof(rec.key));
	info.len = skb->len;
	parse(skb, &rec.key, &info, buf);
	/* The first home slot depends on addresses, ports and protocols, not on the
	 * interface and direction: one packet seen on several interfaces (both ends of a
	 * veth, a pod's veth and the interface it is routed to) makes flows that sit side
	 * by side, so every lookup after the first finds their lines in cache. Only
	 * SHARED_PROBES are shared: a packet flooded to a hundred bridge ports, or ARP on
	 * every interface, must not make a hundred flows walk one probe sequence. */
	hash = flow_hash(&rec.key);
	rec.key.if_index = skb->ifindex;
	rec.key.direction = direction;

	table = bpf_map_lookup_elem(&flows_outer, &zero);
	if (table) {
		idx = home_slot(hash, slots);
		/* Start loading the flow's slot (usually a cache miss), and read the clock
		 * while that load is pending. */
		s = bpf_map_lookup_elem(table, &idx);
		if (s)
			(void)*(volatile __u32 *)&s->state;
	}
	now = now_ns();
	if (table) {
#pragma nounroll
		for (i = 0; i < MAX_PROBES; i++) {
			s = bpf_map_lookup_elem(table, &idx);
			if (!s)
				break;
			if (*(volatile __u32 *)&s->state == SLOT_READY) {
				if (key_equal(&s->key, &rec.key)) {
					add_packet(&s->value, &info, now, cmpxchg);
					return TC_ACT_UNSPEC;
				}
			} else {
				/* Slots are not emptied while their table is active: at the
				 * first empty slot the flow is new. */
				if (!have_value) {
					new_flow_value(&rec.value, skb, &info, buf, now);
					have_value = 1;
				}
				if (cmpxchg)
					filled = claim_slot(s, &rec.key, &rec.value);
				else
					filled = lock_slot(s, idx, &rec.key, &rec.value);
				if (filled == FILL_NEW)
					return TC_ACT_UNSPEC;
				if (filled == FILL_MINE) {
					add_packet(&s->value, &info, now, cmpxchg);
					return TC_ACT_UNSPEC;
				}
				if (filled == FILL_BUSY)
					break; /* to the ring buffer */
			}
			if (i == SHARED_PROBES - 1) {
				/* On from the flow's own home slot. Multiplicative hashing: the
				 * upper half that home_slot uses depends on every input bit. */
				idx = home_slot(
					(hash ^ ((__u64)rec.key.if_index << 8 | direction)) *
						0x9e3779b97f4a7c15ULL,
					slots);
				step = 0;
				continue;
			}
			/* Triangular steps (+1, +2, +3, ...): runs of filled slots do not
			 * merge into long clusters as with linear probing (+1, +1, ...), which
			 * at half load already pushes some flows past MAX_PROBES
			 * (docs/architecture.md, "Load"). The first steps stay within a few
			 * cache lines. */
			step++;
			idx += step;
			if (idx >= slots)
				idx %= slots;
		}
	}

	if (!have_value)
		new_flow_value(&rec.value, skb, &info, buf, now);
	emit_record(&rec);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIRECTION_INGRESS, 1);
}

SEC("tc")
int tc_egress(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIRECTION_EGRESS, 1);
}

SEC("tc")
int tc_ingress_lock(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIRECTION_INGRESS, 0);
}

SEC("tc")
int tc_egress_lock(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIRECTION_EGRESS, 0);
}

/* Never called, and so never loaded (libbpf loads only the subprograms a program
 * calls): its signature puts the enums of flow.h into the object's BTF, where
 * tests/unit/test_layout.py compares their values with src/ei_ebpf_agent/ebpf/layout.py.
 * An enum used only for its constants leaves no type behind. */
static __attribute__((used, noinline)) void btf_enums(enum flow_direction direction,
						      enum flow_flag flag,
						      enum slot_state state,
						      enum agent_counter counter)
{
}
