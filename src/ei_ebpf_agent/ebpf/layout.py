"""numpy mirrors of the structs in bpf/flow.h (the one definition of the layout).

tests/unit/test_layout.py compares every size and offset below with the BTF of the
compiled objects, and every constant of flow.h's enums with the constant of the same
name here, so the two cannot drift silently.
"""

from __future__ import annotations

import numpy as np

# struct flow_key (48 bytes). Byte order "=": the host's, like the kernel's.
FLOW_KEY = np.dtype(
    {
        "names": [
            "src_ip", "dst_ip", "if_index", "eth_protocol", "src_port", "dst_port",
            "protocol", "direction", "icmp_type", "icmp_code",
        ],
        "formats": ["16u1", "16u1", "=u4", "=u2", "=u2", "=u2", "u1", "u1", "u1", "u1"],
        "offsets": [0, 16, 32, 36, 38, 40, 42, 43, 44, 45],
        "itemsize": 48,
    }
)

# struct flow_value (64 bytes, one cache line).
FLOW_VALUE = np.dtype(
    {
        "names": [
            "packets", "bytes", "ip_bytes", "first_seen_ns", "last_seen_ns",
            "sampling", "tcp_flags", "dscp", "src_mac", "dst_mac",
        ],
        "formats": ["=u8", "=u8", "=u8", "=u8", "=u8", "=u4", "=u2", "u1", "6u1", "6u1"],
        "offsets": [0, 8, 16, 24, 32, 40, 44, 46, 48, 54],
        "itemsize": 64,
    }
)


def _concat(first: np.dtype, second: np.dtype) -> np.dtype:
    """One flat dtype: the fields of `first`, then those of `second` after it."""
    names = list(first.names) + list(second.names)
    formats = [first.fields[n][0] for n in first.names]
    formats += [second.fields[n][0] for n in second.names]
    offsets = [first.fields[n][1] for n in first.names] + [
        first.itemsize + second.fields[n][1] for n in second.names
    ]
    return np.dtype(
        {"names": names, "formats": formats, "offsets": offsets,
         "itemsize": first.itemsize + second.itemsize}
    )


# struct flow_record (112 bytes): key then value, flattened. The ring buffer carries
# it, and a drained batch is decoded into it, so every exporter sees one layout.
FLOW_RECORD = _concat(FLOW_KEY, FLOW_VALUE)

# struct flow_slot (128 bytes): one slot of a flow table, as userspace mmaps it; key and
# value flattened like FLOW_RECORD. SLOT_KEY_OFFSET/SLOT_VALUE_OFFSET locate their bytes.
SLOT_KEY_OFFSET = 8
SLOT_VALUE_OFFSET = 64
FLOW_SLOT = np.dtype(
    {
        "names": ["state", *FLOW_KEY.names, *FLOW_VALUE.names],
        "formats": ["=u4"] + [FLOW_KEY.fields[n][0] for n in FLOW_KEY.names]
        + [FLOW_VALUE.fields[n][0] for n in FLOW_VALUE.names],
        "offsets": [0] + [SLOT_KEY_OFFSET + FLOW_KEY.fields[n][1] for n in FLOW_KEY.names]
        + [SLOT_VALUE_OFFSET + FLOW_VALUE.fields[n][1] for n in FLOW_VALUE.names],
        "itemsize": 128,
    }
)
# enum slot_state: flow_slot.state
SLOT_EMPTY = 0
SLOT_READY = 1
SLOT_BUSY = 2  # claimed by a CPU that is writing its key; never left so in an idle table

# struct agent_config (24 bytes): the whole .rodata section.
AGENT_CONFIG = np.dtype(
    {
        "names": ["sampling", "coarse_clock", "table_slots", "stores_in_order", "hash_seed"],
        "formats": ["=u4", "=u4", "=u4", "=u4", "=u8"],
        "offsets": [0, 4, 8, 12, 16],
        "itemsize": 24,
    }
)

KEY_FIELDS = FLOW_KEY.names
VALUE_FIELDS = FLOW_VALUE.names

# enum flow_direction: flow_key.direction
FLOW_DIRECTION_INGRESS = 0
FLOW_DIRECTION_EGRESS = 1

# enum agent_counter: indexes of the per-CPU `counters` map
COUNTER_RINGBUF_RECORDS = 0
COUNTER_RINGBUF_LOST = 1
COUNTER_MAX = 2

# enum flow_flag: flow_value.tcp_flags bits above the TCP header's 8
FLOW_FLAG_SYN_ACK = 0x100
FLOW_FLAG_FIN_ACK = 0x200
FLOW_FLAG_RST_ACK = 0x400

# EtherTypes of a record's eth_protocol (host order), as in linux/if_ether.h.
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
