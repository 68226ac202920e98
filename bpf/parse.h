/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Packet parsing: Ethernet, up to MAX_VLAN_TAGS VLAN tags, IPv4, IPv6 with up to
 * MAX_IPV6_EXT_HEADERS extension headers, then the ports (TCP, UDP, SCTP), TCP flags or
 * ICMP type and code. Every header is checked against data_end before it is read, or
 * copied with bpf_skb_load_bytes when it lies outside the linear data. Parsing never
 * fails: a packet is counted with what could be parsed.
 */
#ifndef EI_PARSE_H
#define EI_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "flow.h"

#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT_HEADERS 6
#define IPV4_FRAG_OFFSET_MASK 0x1fff /* fragment offset, in 8-byte units */
#define IPV6_FRAG_OFFSET_MASK 0xfff8
#define TCP_FLAGS_OFFSET 13 /* byte holding CWR ECE URG ACK PSH RST SYN FIN */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

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

#endif /* EI_PARSE_H */
