// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * TC classifier that aggregates every packet of a selected interface into a flow
 * table (see docs/DESIGN.md §3). Only UAPI headers: no vmlinux.h, no CO-RE, so the
 * object loads with libbpf >= 1.1 on kernels 5.10 and later, with or without kernel
 * BTF. Kernel features used: ringbuf (5.8), bounded loops (5.3), JMP32/ALU32 (-mcpu=v3,
 * 5.1), plain atomic add (XADD). Not used: atomic fetch/or/cmpxchg (5.12), bpf_loop,
 * kfuncs.
 *
 * Every packet that reaches the program is counted exactly once: in the current inner
 * hash map (flows_outer[0]), or, when that map is full, as one flow_record in the ring
 * buffer; only when the ring buffer is full too is it lost, and then counted in
 * counters[COUNTER_RINGBUF_LOST].
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
#define FLOW_TABLE_ENTRIES 5000
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

/* Load-time configuration set by the loader: the whole .rodata section. */
const volatile struct agent_config agent_config = {};

/* One flow table. flows_a and flows_b must share type, key/value size and flags:
 * the kernel checks exactly these when userspace swaps one into flows_outer[0].
 * Preallocated (no BPF_F_NO_PREALLOC): cheaper per packet and per new flow. */
struct flow_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FLOW_TABLE_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct flow_value);
};

struct flow_table flows_a SEC(".maps");
struct flow_table flows_b SEC(".maps");

/* Slot 0 is the table the programs write to; userspace swaps it (lossless eviction).
 * Lookups in an ARRAY_OF_MAPS are inlined by the verifier. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct flow_table);
} flows_outer SEC(".maps") = {
	.values = {[0] = &flows_a},
};

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

/*
 * Adds one packet to an existing flow. packets/bytes/ip_bytes use atomic adds (XADD,
 * result unused) so no increment is lost between CPUs. last_seen_ns is a plain store
 * (any CPU's recent time is right). tcp_flags is written only when the packet adds a
 * bit, without an atomic OR (5.12+, and only 32/64-bit): two CPUs adding different new
 * bits to one flow in the same instant may lose one of them; counts are unaffected.
 */
static __always_inline void add_packet(struct flow_value *v, __u64 len, __u64 ip_bytes,
				       __u64 now, __u16 tcp_flags)
{
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
	if (ip_bytes)
		__sync_fetch_and_add(&v->ip_bytes, ip_bytes);
	v->last_seen_ns = now;
	if ((v->tcp_flags | tcp_flags) != v->tcp_flags)
		v->tcp_flags |= tcp_flags;
}

/*
 * Cold path, kept out of line: the table is full (or missing), so the packet goes to
 * userspace as one record. Also the function whose signature puts struct flow_record
 * into the object's BTF, where tests/unit/test_layout.py reads it.
 */
static __noinline void emit_record(struct flow_record *rec)
{
	if (bpf_ringbuf_output(&flows_ringbuf, rec, sizeof(*rec), 0))
		count(COUNTER_RINGBUF_LOST);
	else
		count(COUNTER_RINGBUF_RECORDS);
}

static __always_inline int handle(struct __sk_buff *skb, const __u8 direction)
{
	struct flow_record rec; /* key always written in full; value only for new flows */
	__u64 buf[5];           /* 40 bytes: the largest header read (IPv6) */
	struct pkt_info info = {};
	struct flow_value *v;
	const __u8 *eth;
	void *table;
	__u32 zero = 0;
	__u32 sampling = agent_config.sampling;
	__u64 now, len;
	long err;

	if (sampling > 1 && bpf_get_prandom_u32() % sampling != 0)
		return TC_ACT_UNSPEC;

	__builtin_memset(&rec.key, 0, sizeof(rec.key));
	rec.key.if_index = skb->ifindex;
	rec.key.direction = direction;
	parse(skb, &rec.key, &info, buf);

	now = bpf_ktime_get_ns();
	len = skb->len;
	table = bpf_map_lookup_elem(&flows_outer, &zero);
	if (table) {
		v = bpf_map_lookup_elem(table, &rec.key);
		if (v) {
			add_packet(v, len, info.ip_bytes, now, info.tcp_flags);
			return TC_ACT_UNSPEC;
		}
	}

	/* New flow: build the value once (every byte, padding included). */
	rec.value.packets = 1;
	rec.value.bytes = len;
	rec.value.ip_bytes = info.ip_bytes;
	rec.value.first_seen_ns = now;
	rec.value.last_seen_ns = now;
	rec.value.sampling = sampling;
	rec.value.tcp_flags = info.tcp_flags;
	rec.value.dscp = info.dscp;
	rec.value._pad0 = 0;
	*(__u32 *)rec.value._pad1 = 0;
	eth = load_hdr(skb, 0, 2 * ETH_ALEN, buf);
	if (eth) {
		__builtin_memcpy(rec.value.dst_mac, eth, ETH_ALEN);
		__builtin_memcpy(rec.value.src_mac, eth + ETH_ALEN, ETH_ALEN);
	} else {
		__builtin_memset(rec.value.src_mac, 0, ETH_ALEN);
		__builtin_memset(rec.value.dst_mac, 0, ETH_ALEN);
	}

	if (table) {
		err = bpf_map_update_elem(table, &rec.key, &rec.value, BPF_NOEXIST);
		if (!err)
			return TC_ACT_UNSPEC;
		if (err == -EEXIST) {
			/* Another CPU inserted the flow since our lookup: add to it. */
			v = bpf_map_lookup_elem(table, &rec.key);
			if (v) {
				add_packet(v, len, info.ip_bytes, now, info.tcp_flags);
				return TC_ACT_UNSPEC;
			}
		}
		/* -E2BIG/-ENOMEM: table full. */
	}
	emit_record(&rec);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIRECTION_INGRESS);
}

SEC("tc")
int tc_egress(struct __sk_buff *skb)
{
	return handle(skb, FLOW_DIRECTION_EGRESS);
}
