"""Network names and addresses as config and the runtime stages both spell them.

Imports nothing of the agent, so config can use it without pulling in runtime code.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from re import Pattern
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IFNAMSIZ = 16  # kernel limit including the terminating NUL: names have at most 15 characters


class Transport(enum.Enum):
    """How an exporter reaches its collector."""

    UDP = "udp"
    TCP = "tcp"


def host_port(host: str, port: int) -> str:
    """The endpoint as gRPC and logs spell it: "host:port", "[fd00::1]:2055"."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def compile_entry(entry: str) -> str | Pattern[str]:
    """One filter entry: "/regex/" -> compiled regex, anything else -> an exact interface name.

    Raises ValueError naming the entry when the regex does not compile or the name could not
    be an interface name (so a typo is caught at start, not ignored forever).
    """
    if len(entry) >= 2 and entry.startswith("/") and entry.endswith("/"):
        try:
            return re.compile(entry[1:-1])
        except re.error as error:
            raise ValueError(f"{entry!r} does not compile: {error}") from None
    if (
        not entry
        or len(entry) >= IFNAMSIZ
        or entry in (".", "..")
        or any(c in "/:" or c.isspace() for c in entry)
    ):
        raise ValueError(
            f"{entry!r} is not an interface name (1-15 characters without '/', ':' or "
            "whitespace; write a regex as /regex/)"
        )
    return entry
