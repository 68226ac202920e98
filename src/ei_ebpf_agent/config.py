"""Environment variables -> one frozen Settings object, validated once at start.

Every variable is documented in docs/config.md. A bad value raises ConfigError, which
the CLI prints as one line and turns into exit status 2 before anything is attached.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class ConfigError(ValueError):
    """One bad variable: names it, its value and what is accepted."""

    def __init__(self, variable: str, value: str, accepted: str) -> None:
        self.variable, self.value, self.accepted = variable, value, accepted
        super().__init__(f"invalid {variable}={value!r}: {accepted}")


@dataclass(frozen=True)
class Settings:
    export: str = "stdout"  # stdout | grpc
    target_host: Optional[str] = None
    target_port: Optional[int] = None
    target_tls_ca_cert_path: Optional[Path] = None
    target_tls_user_cert_path: Optional[Path] = None
    target_tls_user_key_path: Optional[Path] = None
    grpc_message_max_flows: int = 10000
    interfaces: Tuple[str, ...] = ()  # empty: every interface; "/re/" entries are regexes
    exclude_interfaces: Tuple[str, ...] = ("lo",)
    listen_interfaces: str = "watch"  # watch | poll
    listen_poll_period: float = 10.0  # seconds
    direction: str = "both"  # both | ingress | egress
    tc_attach_mode: str = "any"  # any | tcx | tc
    sampling: int = 0  # 0 or 1: every packet
    cache_max_flows: int = 5000
    cache_active_timeout: float = 5.0  # seconds
    buffers_length: int = 50
    log_level: str = "info"
    agent_ip: Optional[IPAddress] = None  # None: detected at start
    metrics_enable: bool = False
    metrics_server_address: str = "0.0.0.0"
    metrics_server_port: int = 9090
    metrics_prefix: str = "ebpf_agent_"


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and validate every variable; raise ConfigError on the first bad one."""
    raise NotImplementedError
