/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The flow table: a BPF array used as an open-addressing hash table. The hash of the
 * flow key's addresses, ports and protocols picks a home slot, and SHARED_PROBES slots
 * are tried from there, at home + 0, 1, 3, 6; then, from a home slot that the whole key
 * picks, more up to MAX_PROBES in all, at + 0, 1, 3, 6, 10, ... (triangular probing; the
 * loop is handle() in flows.bpf.c). Unlike a BPF hash map, finding a flow costs no helper
 * call and one random memory access (the slot's two adjacent cache lines), and adding a
 * flow takes one compare-and-exchange (or one spin lock) instead of a bucket lock, a
 * free-list pop and a list insertion.
 *
 * Here: the hash, key comparison, a new flow's value, claiming an empty slot
 * (claim_slot, lock_slot) and adding a packet to a flow (add_packet).
 */
#ifndef EI_FLOW_TABLE_H
#define EI_FLOW_TABLE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"
#include "maps.h"
#include "parse.h"

/* Where tcp_flags (16 bits) sits in the 32-bit word it starts. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TCP_FLAGS_WORD_SHIFT 0
#else
#define TCP_FLAGS_WORD_SHIFT 16
#endif

/*
 * Adds one packet to a flow. packets/bytes/ip_bytes use atomic adds (XADD, result
 * unused) so no increment is lost between CPUs. last_seen_ns is a plain store (any
 * CPU's recent time is right). tcp_flags is written only when the packet adds a bit:
 * with an atomic OR where the kernel has one (`atomic_or`: the cmpxchg programs,
 * 5.12+), else with a plain one, where two CPUs adding different new bits to one flow
 * in the same instant may lose one of them (counts are unaffected).
 */
static __always_inline void add_packet(struct flow_value *v, const struct pkt_info *info,
				       __u64 now, const int atomic_or)
{
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, info->len);
	if (info->ip_bytes)
		__sync_fetch_and_add(&v->ip_bytes, info->ip_bytes);
	v->last_seen_ns = now;
	if ((v->tcp_flags | info->tcp_flags) == v->tcp_flags)
		return;
	if (atomic_or)
		/* BPF atomics are 32/64-bit: OR into the aligned word of tcp_flags, dscp and
		 * padding, with zeros for the last two. */
		__sync_fetch_and_or((__u32 *)&v->tcp_flags,
				    (__u32)info->tcp_flags << TCP_FLAGS_WORD_SHIFT);
	else
		v->tcp_flags |= info->tcp_flags;
}

/* Multiply-xorshift over the key's six words, seeded at load time. */
static __always_inline __u64 flow_hash(const struct flow_key *key)
{
	const __u64 *w = (const __u64 *)key;
	__u64 h = agent_config.hash_seed;
	int i;

#pragma unroll
	for (i = 0; i < (int)(sizeof(*key) / 8); i++) {
		h = (h ^ w[i]) * 0x9e3779b97f4a7c15ULL;
		h ^= h >> 32;
	}
	h *= 0xff51afd7ed558ccdULL;
	return h ^ (h >> 33);
}

/* A hash's upper half scaled to a slot index in [0, slots), without a division. */
static __always_inline __u32 home_slot(__u64 hash, __u32 slots)
{
	return ((hash >> 32) * slots) >> 32;
}

static __always_inline int key_equal(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
		(x[5] ^ y[5])) == 0;
}

/* A new flow's whole value, this packet counted: first and last seen, counters, TCP
 * flags, sampling rate, DSCP, MACs. */
static __always_inline void new_flow_value(struct flow_value *v, struct __sk_buff *skb,
					   const struct pkt_info *info, void *buf, __u64 now)
{
	const __u8 *eth = load_hdr(skb, 0, 2 * ETH_ALEN, buf);

	__builtin_memset(v, 0, sizeof(*v));
	v->packets = 1;
	v->bytes = info->len;
	v->ip_bytes = info->ip_bytes;
	v->first_seen_ns = now;
	v->last_seen_ns = now;
	v->sampling = agent_config.sampling;
	v->tcp_flags = info->tcp_flags;
	v->dscp = info->dscp;
	if (eth) {
		__builtin_memcpy(v->dst_mac, eth, ETH_ALEN);
		__builtin_memcpy(v->src_mac, eth + ETH_ALEN, ETH_ALEN);
	}
}

/* What filling an empty slot came to. */
enum fill_result {
	FILL_OTHER = 0, /* another CPU filled the slot with another flow: probe on */
	FILL_MINE = 1,  /* the slot holds this flow, this packet not yet counted: add it */
	FILL_BUSY = 2,  /* another CPU is filling it, its key not yet visible */
	FILL_NEW = 3,   /* filled here with this flow, this packet counted */
};

/* Writes a claimed slot: key and value in plain stores, then the state, last, so that a
 * CPU that sees SLOT_READY finds them in place. No other CPU touches the slot before
 * that, and plain stores, unlike atomic adds, do not wait for the value's cache line
 * (usually a miss) to arrive. That holds where CPUs make stores visible in order (x86).
 * Elsewhere (arm64) another CPU may see READY first and add to counters that a late
 * plain store would then overwrite: there the counters are left out here, and the
 * first packet is added atomically once READY, as any later one (FILL_MINE). A CPU that
 * sees READY before the key makes a second row for the flow, never loses a count. */
static __always_inline void write_slot(struct flow_slot *s, const struct flow_key *key,
				       const struct flow_value *value)
{
	__builtin_memcpy(&s->key, key, sizeof(*key));
	if (agent_config.stores_in_order) {
		__builtin_memcpy(&s->value, value, sizeof(*value));
	} else {
		s->value.first_seen_ns = value->first_seen_ns;
		s->value.sampling = value->sampling;
		s->value.dscp = value->dscp;
		__builtin_memcpy(s->value.src_mac, value->src_mac, ETH_ALEN);
		__builtin_memcpy(s->value.dst_mac, value->dst_mac, ETH_ALEN);
	}
	/* A compiler barrier: the state must not be stored before the rest. */
	asm volatile("" ::: "memory");
	s->state = SLOT_READY;
}

/*
 * Claims the empty slot `s` for `key` with one compare-and-exchange (EMPTY -> BUSY),
 * then writes it (Linux 5.12+). A slot another CPU is still writing is FILL_BUSY: its
 * key is unknown, so the caller sends the packet through the ring buffer rather than
 * wait or risk storing the flow twice; userspace merges it by key.
 */
static __always_inline int claim_slot(struct flow_slot *s, const struct flow_key *key,
				      const struct flow_value *value)
{
	__u32 seen = __sync_val_compare_and_swap(&s->state, SLOT_EMPTY, SLOT_BUSY);

	if (seen == SLOT_EMPTY) {
		write_slot(s, key, value);
		return agent_config.stores_in_order ? FILL_NEW : FILL_MINE;
	}
	if (seen != SLOT_READY)
		return FILL_BUSY;
	return key_equal(&s->key, key) ? FILL_MINE : FILL_OTHER;
}

/*
 * Fills the empty slot `s` (index `idx`) with `key` under the slot's spin lock, for
 * kernels without compare-and-exchange (the *_lock programs). It costs a new flow more
 * than claim_slot (docs/architecture.md, "New flows"): two helper calls, each saving or
 * restoring interrupts.
 */
static __always_inline int lock_slot(struct flow_slot *s, __u32 idx,
				     const struct flow_key *key,
				     const struct flow_value *value)
{
	__u32 stripe = idx % LOCK_STRIPES;
	struct slot_lock *l = bpf_map_lookup_elem(&slot_locks, &stripe);
	int result;

	if (!l)
		return FILL_BUSY;
	bpf_spin_lock(&l->lock);
	if (s->state == SLOT_EMPTY) {
		write_slot(s, key, value);
		result = agent_config.stores_in_order ? FILL_NEW : FILL_MINE;
	} else {
		result = key_equal(&s->key, key) ? FILL_MINE : FILL_OTHER;
	}
	bpf_spin_unlock(&l->lock);
	return result;
}

#endif /* EI_FLOW_TABLE_H */
