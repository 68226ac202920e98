// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * TC classifier that aggregates every packet of a selected interface into a flow
 * table (see docs/architecture.md). Only UAPI headers: no vmlinux.h, no CO-RE, so the
 * object loads with libbpf >= 1.1 on kernels 5.10 and later, with or without kernel
 * BTF. Kernel features used: ringbuf (5.8), mmapable arrays (5.5), bpf_spin_lock (5.1),
 * bounded loops (5.3), JMP32/ALU32 (-mcpu=v3, 5.1), plain atomic add (XADD), and, only
 * when the loader says the kernel has them, bpf_ktime_get_coarse_ns (5.11) and atomic
 * compare-and-exchange (5.12). Not used: atomic fetch/or, bpf_loop, kfuncs.
 *
 * Two pairs of programs differ only in how a new flow claims an empty slot:
 * tc_ingress/tc_egress with one compare-and-exchange (Linux 5.12+), and
 * tc_ingress_lock/tc_egress_lock under a spin lock (any kernel). The loader loads one
 * pair: a 5.10 verifier refuses a program holding a cmpxchg instruction even where it
 * cannot run.
 *
 * The flow table is a BPF array used as an open-addressing hash table: the hash of the
 * flow key's addresses, ports and protocols picks a home slot, and SHARED_PROBES slots
 * are tried from there, at home + 0, 1, 3, 6; then, from a home slot that the whole key
 * picks, more up to MAX_PROBES in all, at + 0, 1, 3, 6, 10, ... (triangular probing).
 * Unlike a BPF hash map, finding a flow costs no helper call and one random memory
 * access (the slot's two adjacent cache lines), and adding a flow takes one
 * compare-and-exchange (or one spin lock) instead of a bucket lock, a free-list pop and a
 * list insertion.
 *
 * Every packet that reaches the program is counted exactly once: in the current table
 * (flows_outer[0]), or, when the MAX_PROBES slots tried hold other flows, as one
 * flow_record in the ring buffer; only when the ring buffer is full too is it lost, and
 * then counted in counters[COUNTER_RINGBUF_LOST].
 */
#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"

/* Default table size; the loader sets flows_a/flows_b from CACHE_MAX_FLOWS. */
#define FLOW_TABLE_SLOTS 10000
/* Slots tried per packet before the ring buffer takes it. The verifier walks every
 * probe (80k instructions verified in all on Linux 6.18; its limit is 1M). In a
 * table at most half full (the loader makes 2 slots per flow of CACHE_MAX_FLOWS), the
 * longest probe sequence among 100k random flows is 14-19 slots when each 5-tuple is
 * seen on one interface, and at most 23 when each is seen on 2, 4, 8, 100 or 1000
 * (simulated, 6 seeds each). */
#define MAX_PROBES 32
/* Probes around the home slot that all flows of one 5-tuple share (see handle());
 * after them, a flow goes on from a home of its own. */
#define SHARED_PROBES 4
#define LOCK_STRIPES 1024
#define RINGBUF_BYTES (1 << 20)

#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT_HEADERS 6
#define IPV4_FRAG_OFFSET_MASK 0x1fff /* fragment offset, in 8-byte units */
#define IPV6_FRAG_OFFSET_MASK 0xfff8
#define TCP_FLAGS_OFFSET 13 /* byte holding CWR ECE URG ACK PSH RST SYN FIN */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
/* Where tcp_flags (16 bits) sits in the 32-bit word it starts. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TCP_FLAGS_WORD_SHIFT 0
#else
#define TCP_FLAGS_WORD_SHIFT 16
#endif

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

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* What parsing found besides the key. */
struct pkt_info {
	__u64 len; /* skb->len */
	__u32 ip_bytes;
	__u16 tcp_flags;
	__u8 dscp;
};

/*
 * Pointer to `len` bytes at offset `off` of the packet: into the linear data when the
 * bounds check passes, else a copy in `buf` (headers outside the linear part, e.g. from
 * packet sockets with mmap rings). NULL only when the packet is shorter than that.
 * Callers copy out what they need at once, so the two kinds of pointer never meet.
 */
static __always_inline const void *load_hdr(struct __sk_buff *skb, __u32 off, __u32 len,
					    void *buf)
{
	const __u8 *data = (const __u8 *)(long)skb->data;
	const __u8 *data_end = (const __u8 *)(long)skb->data_end;
	const __u8 *p = data + off;

	if (p + len <= data_end)
		return p;
	if (bpf_skb_load_bytes(skb, off, buf, len))
		return NULL;
	return buf;
}

static __always_inline void parse_l4(struct __sk_buff *skb, __u32 off, __u8 proto,
				     struct flow_key *key, struct pkt_info *info, void *buf)
{
	const __u8 *p;

	switch (proto) {
	case IPPROTO_TCP: {
		const struct tcphdr *th = load_hdr(skb, off, TCP_FLAGS_OFFSET + 1, buf);
		__u16 flags;

		if (!th)
			return;
		key->src_port = bpf_ntohs(th->source);
		key->dst_port = bpf_ntohs(th->dest);
		flags = ((const __u8 *)th)[TCP_FLAGS_OFFSET];
		if (flags & TCP_ACK) {
			if (flags & TCP_SYN)
				flags |= FLOW_FLAG_SYN_ACK;
			if (flags & TCP_FIN)
				flags |= FLOW_FLAG_FIN_ACK;
			if (flags & TCP_RST)
				flags |= FLOW_FLAG_RST_ACK;
		}
		info->tcp_flags = flags;
		return;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		/* Source and destination port are the first 4 bytes of both. */
		const struct udphdr *uh = load_hdr(skb, off, 4, buf);

		if (!uh)
			return;
		key->src_port = bpf_ntohs(uh->source);
		key->dst_port = bpf_ntohs(uh->dest);
		return;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		/* Type and code are the first 2 bytes of both. */
		p = load_hdr(skb, off, 2, buf);
		if (!p)
			return;
		key->icmp_type = p[0];
		key->icmp_code = p[1];
		return;
	}
}

static __always_inline void parse_ipv4(struct __sk_buff *skb, __u32 off, struct flow_key *key,
				       struct pkt_info *info, void *buf)
{
	const struct iphdr *ip = load_hdr(skb, off, sizeof(struct iphdr), buf);
	__u32 ihl;
	__u8 proto;

	if (!ip)
		return;
	/* Bitfields of struct iphdr follow the build host's byte order: read the byte. */
	ihl = *(const __u8 *)ip;
	if ((ihl >> 4) != 4)
		return;
	ihl = (ihl & 0x0f) * 4;
	proto = ip->protocol;
	info->ip_bytes = bpf_ntohs(ip->tot_len);
	info->dscp = ip->tos >> 2;
	/* ::ffff:a.b.c.d; bytes 0..7 are already zero. */
	*(__u32 *)&key->src_ip[8] = bpf_htonl(0x0000ffff);
	*(__u32 *)&key->src_ip[12] = ip->saddr;
	*(__u32 *)&key->dst_ip[8] = bpf_htonl(0x0000ffff);
	*(__u32 *)&key->dst_ip[12] = ip->daddr;
	key->protocol = proto;
	if (ihl < sizeof(struct iphdr))
		return;
	/* Only the first fragment carries the transport header. */
	if (ip->frag_off & bpf_htons(IPV4_FRAG_OFFSET_MASK))
		return;
	parse_l4(skb, off + ihl, proto, key, info, buf);
}

static __always_inline int ipv6_is_ext(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_FRAGMENT || nexthdr == IPPROTO_DSTOPTS ||
	       nexthdr == IPPROTO_AH;
}

static __always_inline void parse_ipv6(struct __sk_buff *skb, __u32 off, struct flow_key *key,
				       struct pkt_info *info, void *buf)
{
	const struct ipv6hdr *ip6 = load_hdr(skb, off, sizeof(struct ipv6hdr), buf);
	const __u8 *p;
	__u8 nexthdr;
	__u32 b0, b1;
	int i;

	if (!ip6)
		return;
	b0 = ((const __u8 *)ip6)[0];
	b1 = ((const __u8 *)ip6)[1];
	if ((b0 >> 4) != 6)
		return;
	/* Traffic class spans bytes 0 and 1; DSCP is its upper 6 bits. */
	info->dscp = ((b0 & 0x0f) << 2) | (b1 >> 6);
	info->ip_bytes = sizeof(struct ipv6hdr) + bpf_ntohs(ip6->payload_len);
	__builtin_memcpy(key->src_ip, &ip6->saddr, 16);
	__builtin_memcpy(key->dst_ip, &ip6->daddr, 16);
	nexthdr = ip6->nexthdr;
	off += sizeof(struct ipv6hdr);

	for (i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
		__u32 hdr_len;

		if (!ipv6_is_ext(nexthdr))
			break;
		/* Next header and length are the first 2 bytes of each; the fragment
		 * header also needs its offset (bytes 2..3). */
		p = load_hdr(skb, off, 4, buf);
		if (!p)
			break;
		if (nexthdr == IPPROTO_FRAGMENT) {
			if (*(const __u16 *)&p[2] & bpf_htons(IPV6_FRAG_OFFSET_MASK)) {
				/* Not the first fragment: no transport header. */
				key->protocol = p[0];
				return;
			}
			hdr_len = 8;
		} else if (nexthdr == IPPROTO_AH) {
			hdr_len = ((__u32)p[1] + 2) * 4;
		} else {
			hdr_len = ((__u32)p[1] + 1) * 8;
		}
		nexthdr = p[0];
		off += hdr_len;
	}
	key->protocol = nexthdr;
	if (ipv6_is_ext(nexthdr))
		return; /* too many extension headers, or a truncated one */
	parse_l4(skb, off, nexthdr, key, info, buf);
}

/* Fills the key (and info) with as much as can be parsed; never fails. */
static __always_inline void parse(struct __sk_buff *skb, struct flow_key *key,
				  struct pkt_info *info, void *buf)
{
	const __be16 *pp;
	__be16 proto;
	__u32 off = ETH_HLEN;
	int i;

	pp = load_hdr(skb, offsetof(struct ethhdr, h_proto), sizeof(__be16), buf);
	if (!pp)
		return;
	proto = *pp;
	for (i = 0; i < MAX_VLAN_TAGS; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		/* A tag: 2 bytes TCI, then the encapsulated EtherType. */
		pp = load_hdr(skb, off, 4, buf);
		if (!pp)
			break;
		proto = pp[1];
		off += 4;
	}
	key->eth_protocol = bpf_ntohs(proto);
	if (proto == bpf_htons(ETH_P_IP))
		parse_ipv4(skb, off, key, info, buf);
	else if (proto == bpf_htons(ETH_P_IPV6))
		parse_ipv6(skb, off, key, info, buf);
}

static __always_inline void count(__u32 index)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &index);

	if (c)
		__sync_fetch_and_add(c, 1);
}

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
 * kernels without compare-and-exchange (the *_lock programs). Measured ~50-90 ns more
 * per new flow than claim_slot: two helper calls, each saving or restoring interrupts.
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

/*
 * Cold path, kept out of line: no slot was free around this flow's, or its slot was
 * being claimed by another CPU (or the table is missing), so the packet goes to
 * userspace as one record. Also the function whose
 * signature puts struct flow_record into the object's BTF (tests/unit/test_layout.py).
 */
static __noinline void emit_record(struct flow_record *rec)
{
	if (bpf_ringbuf_output(&flows_ringbuf, rec, sizeof(*rec), 0))
		count(COUNTER_RINGBUF_LOST);
	else
		count(COUNTER_RINGBUF_RECORDS);
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
			 * at half load already makes some flows need more than 32 probes in a
			 * table of 100k slots. The first steps stay within a few cache lines. */
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
