/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one definition of every type shared between the kernel program and the
 * agent. src/ei_ebpf_agent/ebpf/layout.py mirrors it as numpy dtypes and
 * tests/unit/test_layout.py proves, from the compiled object's BTF, that both agree.
 * Fixed-width types, explicit padding, no bitfields, no pointers. The constants are
 * enums, so that they reach the BTF too (flows.bpf.c, btf_enums) and the same test
 * compares each value with layout.py.
 */
#ifndef EI_FLOW_H
#define EI_FLOW_H

#include <linux/types.h>

/* flow_key.direction: the TC hook that saw the packet. */
enum flow_direction {
	FLOW_DIRECTION_INGRESS = 0,
	FLOW_DIRECTION_EGRESS = 1,
};

/* Flow identity. Addresses are 16 bytes, IPv4 mapped as ::ffff:a.b.c.d.
 * Multi-byte integers are in host byte order. */
struct flow_key {
	__u8 src_ip[16];
	__u8 dst_ip[16];
	__u32 if_index;
	__u16 eth_protocol; /* EtherType of the payload after any VLAN tags */
	__u16 src_port;     /* TCP/UDP/SCTP; 0 otherwise */
	__u16 dst_port;
	__u8 protocol;  /* IP protocol number; 0 for non-IP */
	__u8 direction; /* enum flow_direction */
	__u8 icmp_type; /* ICMP/ICMPv6 only */
	__u8 icmp_code;
	__u8 _pad0[2];
};
_Static_assert(sizeof(struct flow_key) == 48, "flow_key must be 48 bytes");

/* Aggregated counters of one flow: exactly one 64-byte cache line. */
struct flow_value {
	__u64 packets;
	__u64 bytes;         /* skb->len: the whole frame as seen by TC */
	__u64 ip_bytes;      /* IP header + payload (RFC 7012 octets); 0 for non-IP */
	__u64 first_seen_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 last_seen_ns;
	__u32 sampling;  /* sampling rate in force when the flow was created */
	__u16 tcp_flags; /* OR of TCP flags, plus enum flow_flag bits */
	__u8 dscp;
	__u8 _pad0;
	__u8 src_mac[6];
	__u8 dst_mac[6];
	__u8 _pad1[4];
};
_Static_assert(sizeof(struct flow_value) == 64, "flow_value must fit one cache line");
_Static_assert(
	__builtin_offsetof(struct flow_value, tcp_flags) % 4 == 0,
	"tcp_flags must start a 32-bit word: the program ORs into that word atomically");

/* Bits of flow_value.tcp_flags above the TCP header's 8: SYN+ACK, FIN+ACK, RST+ACK seen
 * in one packet (pbflow "flags" semantics). */
enum flow_flag {
	FLOW_FLAG_SYN_ACK = 0x100,
	FLOW_FLAG_FIN_ACK = 0x200,
	FLOW_FLAG_RST_ACK = 0x400,
};

/* One slot of a flow table (a BPF array used as an open-addressing hash table with
 * triangular probing). Two cache lines: state and key in the first, the value alone in the
 * second. Userspace zeroes a slot when it drains it; the kernel claims an EMPTY slot
 * (compare-and-exchange to SLOT_BUSY, or a spin lock on kernels before 5.12), writes the
 * key and value, then state = SLOT_READY, and never empties one. */
struct flow_slot {
	__u32 state; /* enum slot_state */
	__u32 _pad0;
	struct flow_key key;
	__u8 _pad1[8];
	struct flow_value value;
};
_Static_assert(sizeof(struct flow_slot) == 128, "flow_slot must be two cache lines");
_Static_assert(__builtin_offsetof(struct flow_slot, value) == 64,
	       "flow_value must start a cache line of its slot");

/* flow_slot.state. */
enum slot_state {
	SLOT_EMPTY = 0,
	SLOT_READY = 1,
	SLOT_BUSY = 2, /* claimed, key being written */
};

/* A packet that found the flow table full: sent through the ring buffer. */
struct flow_record {
	struct flow_key key;
	struct flow_value value;
};
_Static_assert(sizeof(struct flow_record) == 112, "flow_record must be 112 bytes");

/* Load-time configuration: the only member of .rodata, set by the loader. */
struct agent_config {
	__u32 sampling;     /* 0 or 1: every packet; N: one packet in N on average */
	__u32 coarse_clock; /* 1: bpf_ktime_get_coarse_ns (Linux 5.11+), 0: bpf_ktime_get_ns */
	__u32 table_slots;  /* max_entries of flows_a and flows_b */
	__u32 stores_in_order; /* 1: CPUs make plain stores visible in order (x86) */
	__u64 hash_seed;       /* random, so that nobody can choose keys that collide */
};
_Static_assert(sizeof(struct agent_config) == 24, "agent_config must be 24 bytes");

/* Indexes of the per-CPU `counters` array. */
enum agent_counter {
	COUNTER_RINGBUF_RECORDS = 0, /* packets sent through the ring buffer */
	COUNTER_RINGBUF_LOST = 1,    /* ring buffer full too: packet not counted */
	COUNTER_MAX = 2,
};

#endif /* EI_FLOW_H */
