"""Environment variables -> one frozen Settings object, validated once at start.

Every variable is documented in docs/config.md. A bad value raises ConfigError, which
the CLI prints as one line and turns into exit status 2 before anything is attached.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

from ei_ebpf_agent.net import IPAddress, Transport, compile_entry, host_port


class ExportKind(NamedTuple):
    """What one EXPORT value means."""

    exporter: str  # the module of ei_ebpf_agent.exporter that implements it
    transport: Transport | None  # None: no collector (stdout)


class ConfigError(ValueError):
    """One bad variable: names it, its value and what is accepted."""

    def __init__(self, variable: str, value: str, accepted: str) -> None:
        self.variable, self.value, self.accepted = variable, value, accepted
        super().__init__(f"invalid {variable}={value!r}: {accepted}")


@dataclass(frozen=True)
class Settings:
    export: str = "stdout"  # one of EXPORTS (also the metrics' `exporter` label)
    target_host: str | None = None
    target_port: int | None = None
    target_tls_ca_cert_path: Path | None = None
    target_tls_user_cert_path: Path | None = None
    target_tls_user_key_path: Path | None = None
    grpc_message_max_flows: int = 10000
    interfaces: tuple[str, ...] = ()  # empty: every interface; "/re/" entries are regexes
    exclude_interfaces: tuple[str, ...] = ("lo",)
    listen_interfaces: str = "watch"  # watch | poll
    listen_poll_period: float = 10.0  # seconds
    direction: str = "both"  # both | ingress | egress
    tc_attach_mode: str = "any"  # any | tcx | tc
    sampling: int = 0  # 0 or 1: every packet
    cache_max_flows: int = 5000
    cache_active_timeout: float = 5.0  # seconds
    buffers_length: int = 50
    log_level: str = "info"
    agent_ip: IPAddress | None = None  # None: detected at start
    metrics_enable: bool = False
    metrics_server_address: str = "0.0.0.0"
    metrics_server_port: int = 9090
    metrics_prefix: str = "ebpf_agent_"
    metrics_tls_cert_path: Path | None = None
    metrics_tls_key_path: Path | None = None
    ipfix_observation_domain_id: int = 1
    ipfix_max_message_size: int = 0  # 0: 1400 on UDP, 65535 on TCP
    ipfix_template_refresh_interval: float = 60.0  # seconds; 0 disables (UDP only)
    ipfix_template_refresh_messages: int = 1000  # 0 disables (UDP only)
    pin: bool = True
    bpf_fs_path: Path = Path("/sys/fs/bpf/ei-ebpf-agent")
    # What EXPORT means (EXPORT_KINDS), set from `export`: the exporter module, the transport.
    exporter: str = field(init=False)
    transport: Transport | None = field(init=False)

    def __post_init__(self) -> None:
        kind = EXPORT_KINDS[self.export]
        object.__setattr__(self, "exporter", kind.exporter)
        object.__setattr__(self, "transport", kind.transport)


# Accepted values. A new export format is one row here and one module in exporter/.
EXPORT_KINDS: dict[str, ExportKind] = {
    "stdout": ExportKind("stdout", None),
    "grpc": ExportKind("grpc", Transport.TCP),
    "ipfix+udp": ExportKind("ipfix", Transport.UDP),
    "ipfix+tcp": ExportKind("ipfix", Transport.TCP),
}
EXPORTS: tuple[str, ...] = tuple(EXPORT_KINDS)
EXPORTS_NEEDING_TARGET: tuple[str, ...] = tuple(
    name for name, kind in EXPORT_KINDS.items() if kind.transport is not None)
LISTEN_MODES: tuple[str, ...] = ("watch", "poll")
DIRECTIONS: tuple[str, ...] = ("both", "ingress", "egress")
TC_ATTACH_MODES: tuple[str, ...] = ("any", "tcx", "tc")

TRACE = 5  # Python logging has no TRACE; below DEBUG like logrus' trace
LOG_LEVELS: dict[str, int] = {
    "trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}

# Deprecated seed-era names -> current names.
ALIASES: dict[str, str] = {"FLOWS_TARGET_HOST": "TARGET_HOST", "FLOWS_TARGET_PORT": "TARGET_PORT"}

MAX_SAMPLING = 2**31 - 1  # agent_config.sampling is a __u32; keep it a positive int32
MAX_CACHE_FLOWS = 10_000_000  # 2 tables x 2 slots x 128 B per flow: 10 M is already 5 GB
MAX_INT = 2**31 - 1
# Smallest IPFIX message that holds every template (exporter/ipfix_encode.MIN_MESSAGE_SIZE;
# a unit test keeps them equal, config does not import the encoder).
IPFIX_MIN_MESSAGE_SIZE = 228
# The eviction swap waits an RCU grace period (~7-16 ms), so a shorter period cannot be kept.
MIN_ACTIVE_TIMEOUT = 0.010
MIN_POLL_PERIOD = 0.010  # a smaller period would only spin
DURATION_HELP = "a duration such as 5s, 250ms or 1m30s"

_T = TypeVar("_T")

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_DURATION_RE = re.compile(f"(?:{_DURATION_PART})+")
_DURATION_PART_RE = re.compile(r"([0-9]*\.?[0-9]*)([a-z\u00b5\u03bc]+)")
_INT_RE = re.compile(r"[0-9]+")
_HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_METRICS_PREFIX_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_duration(text: str) -> float:
    """Go-style duration ("5s", "250ms", "1m30s", "1.5h", "100us") -> seconds.

    A bare number, a sign or an unknown unit raises ValueError.
    """
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(
        float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART_RE.findall(text)
    )


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest Go-style spelling ("5s", "250ms", "1m30s"), for logs."""
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}us"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{int(hours)}h" if hours else "") + (f"{int(minutes)}m" if minutes else "")
    return text + (f"{secs:g}s" if secs or not text else "")


def log_level_number(name: str) -> int:
    """LOG_LEVEL name (as stored in Settings) -> Python logging level number."""
    return LOG_LEVELS[name]


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Parse and validate every variable; raise ConfigError on the first bad one.

    An empty (or blank) variable counts as unset. Unknown variables are ignored.
    """
    env = _Env(environ)
    target_host = env.get("TARGET_HOST", _host, "a host name or an IP address")
    target_port = env.get("TARGET_PORT", _int_in(1, 65535), "an integer from 1 to 65535")
    export = env.get("EXPORT", _choice(EXPORTS), _one_of(EXPORTS))
    implied = ""
    if export is None:
        # Seed-era behaviour: a configured target means "send there".
        export = "grpc" if target_host is not None or target_port is not None else "stdout"
        implied = " (the default when a target is set)" if export == "grpc" else ""
    if export in EXPORTS_NEEDING_TARGET:
        if target_host is None:
            raise ConfigError("TARGET_HOST", "", f"required when EXPORT={export}{implied}: "
                              "a host name or an IP address")
        if target_port is None:
            raise ConfigError("TARGET_PORT", "", f"required when EXPORT={export}{implied}: "
                              "an integer from 1 to 65535")

    tls_ca = env.get("TARGET_TLS_CA_CERT_PATH", _readable_file, "a readable file")
    tls_cert = env.get("TARGET_TLS_USER_CERT_PATH", _readable_file, "a readable file")
    tls_key = env.get("TARGET_TLS_USER_KEY_PATH", _readable_file, "a readable file")
    if tls_cert is not None and tls_key is None:
        raise ConfigError("TARGET_TLS_USER_KEY_PATH", "",
                          "required when TARGET_TLS_USER_CERT_PATH is set (client certificate "
                          "and key go together)")
    if tls_key is not None and tls_cert is None:
        raise ConfigError("TARGET_TLS_USER_CERT_PATH", "",
                          "required when TARGET_TLS_USER_KEY_PATH is set (client certificate "
                          "and key go together)")
    if tls_cert is not None and tls_ca is None:
        raise ConfigError("TARGET_TLS_CA_CERT_PATH", "",
                          "required when TARGET_TLS_USER_CERT_PATH is set (mutual TLS verifies "
                          "the collector with this CA)")

    metrics_cert = env.get("METRICS_TLS_CERT_PATH", _readable_file, "a readable file")
    metrics_key = env.get("METRICS_TLS_KEY_PATH", _readable_file, "a readable file")
    if (metrics_cert is None) != (metrics_key is None):
        missing, present = (("METRICS_TLS_KEY_PATH", "METRICS_TLS_CERT_PATH")
                            if metrics_key is None else
                            ("METRICS_TLS_CERT_PATH", "METRICS_TLS_KEY_PATH"))
        raise ConfigError(missing, "", f"required when {present} is set (the metrics server "
                          "needs both certificate and key for HTTPS)")

    interfaces = env.get("INTERFACES", _interface_list, _INTERFACES_HELP) or ()
    exclude = env.get("EXCLUDE_INTERFACES", _interface_list, _INTERFACES_HELP)
    if exclude is None:
        # Default "lo", unless the user asked for lo by name: that wish is explicit.
        exclude = () if "lo" in interfaces else Settings.exclude_interfaces

    def duration_min(minimum: float) -> Callable[[str], float | None]:
        def parse(text: str) -> float | None:
            seconds = parse_duration(text)
            return seconds if seconds >= minimum else None
        return parse

    values = {
        "export": export,
        "target_host": target_host,
        "target_port": target_port,
        "target_tls_ca_cert_path": tls_ca,
        "target_tls_user_cert_path": tls_cert,
        "target_tls_user_key_path": tls_key,
        "grpc_message_max_flows": env.get("GRPC_MESSAGE_MAX_FLOWS", _int_in(1, MAX_INT),
                                       f"an integer from 1 to {MAX_INT}"),
        "interfaces": interfaces,
        "exclude_interfaces": exclude,
        "listen_interfaces": env.get("LISTEN_INTERFACES", _choice(LISTEN_MODES),
                                  _one_of(LISTEN_MODES)),
        "listen_poll_period": env.get("LISTEN_POLL_PERIOD", duration_min(MIN_POLL_PERIOD),
                                   f"{DURATION_HELP} (minimum 10ms)"),
        "direction": env.get("DIRECTION", _choice(DIRECTIONS), _one_of(DIRECTIONS)),
        "tc_attach_mode": env.get("TC_ATTACH_MODE", _choice(TC_ATTACH_MODES),
                               _one_of(TC_ATTACH_MODES)),
        "sampling": env.get("SAMPLING", _int_in(0, MAX_SAMPLING),
                         f"an integer from 0 to {MAX_SAMPLING} (0 and 1: every packet)"),
        "cache_max_flows": env.get("CACHE_MAX_FLOWS", _int_in(1, MAX_CACHE_FLOWS),
                                f"an integer from 1 to {MAX_CACHE_FLOWS}"),
        "cache_active_timeout": env.get("CACHE_ACTIVE_TIMEOUT", duration_min(MIN_ACTIVE_TIMEOUT),
                                     f"{DURATION_HELP} (minimum 10ms)"),
        "buffers_length": env.get("BUFFERS_LENGTH", _int_in(1, MAX_INT),
                               f"an integer from 1 to {MAX_INT}"),
        "log_level": env.get("LOG_LEVEL", _choice(tuple(LOG_LEVELS)), _one_of(tuple(LOG_LEVELS))),
        "agent_ip": env.get("AGENT_IP", _ip, "an IPv4 or IPv6 address"),
        "metrics_enable": env.get("METRICS_ENABLE", lambda v: _BOOLS.get(v.lower()),
                               "true or false (also 1/0, yes/no)"),
        "pin": env.get("PIN", lambda v: _BOOLS.get(v.lower()), "true or false (also 1/0, yes/no)"),
        "bpf_fs_path": env.get("BPF_FS_PATH", lambda v: Path(v) if v.startswith("/") else None,
                               "an absolute path on a bpf filesystem"),
        "metrics_server_address": env.get("METRICS_SERVER_ADDRESS", _host,
                                       "an IP address or a host name"),
        "metrics_server_port": env.get("METRICS_SERVER_PORT", _int_in(1, 65535),
                                    "an integer from 1 to 65535"),
        "metrics_prefix": env.get(
            "METRICS_PREFIX", lambda v: v if _METRICS_PREFIX_RE.fullmatch(v) else None,
            "a Prometheus metric name prefix matching [a-zA-Z_:][a-zA-Z0-9_:]*"),
        "metrics_tls_cert_path": metrics_cert,
        "metrics_tls_key_path": metrics_key,
        "ipfix_observation_domain_id": env.get(
            "IPFIX_OBSERVATION_DOMAIN_ID", _int_in(0, 2**32 - 1),
            "an integer from 0 to 4294967295"),
        "ipfix_max_message_size": env.get(
            "IPFIX_MAX_MESSAGE_SIZE", _ipfix_message_size,
            f"0 (automatic) or an integer from {IPFIX_MIN_MESSAGE_SIZE} to 65535"),
        "ipfix_template_refresh_interval": env.get(
            "IPFIX_TEMPLATE_REFRESH_INTERVAL", parse_duration,
            f"{DURATION_HELP} (0s disables)"),
        "ipfix_template_refresh_messages": env.get(
            "IPFIX_TEMPLATE_REFRESH_MESSAGES", _int_in(0, MAX_INT),
            f"an integer from 0 to {MAX_INT} (0 disables)"),
    }
    # Unset variables keep the dataclass default.
    return Settings(**{k: v for k, v in values.items() if v is not None})



def describe(settings: Settings) -> str:
    """One log line with the effective configuration (paths are shown, never their content)."""
    s = settings
    parts = [f"export={s.export}"]
    if s.export in EXPORTS_NEEDING_TARGET:
        parts.append(f"target={host_port(s.target_host or '', s.target_port or 0)}")
        tls = "mutual" if s.target_tls_user_cert_path else ("on" if s.target_tls_ca_cert_path
                                                          else "off")
        parts.append(f"tls={tls}")
        if s.exporter == "grpc":
            parts.append(f"grpc_message_max_flows={s.grpc_message_max_flows}")
        else:
            parts.append(f"ipfix_domain={s.ipfix_observation_domain_id}"
                         f" ipfix_max_message_size={s.ipfix_max_message_size or 'auto'}")
    parts += [
        f"interfaces={','.join(s.interfaces) or '*'}",
        f"exclude_interfaces={','.join(s.exclude_interfaces) or '-'}",
        f"listen_interfaces={s.listen_interfaces}"
        + (f"/{format_duration(s.listen_poll_period)}" if s.listen_interfaces == "poll" else ""),
        f"direction={s.direction}",
        f"tc_attach_mode={s.tc_attach_mode}",
        f"sampling={s.sampling}",
        f"cache_max_flows={s.cache_max_flows}",
        f"cache_active_timeout={format_duration(s.cache_active_timeout)}",
        f"buffers_length={s.buffers_length}",
        f"log_level={s.log_level}",
        f"agent_ip={s.agent_ip or 'auto'}",
    ]
    if s.metrics_enable:
        scheme = "https" if s.metrics_tls_cert_path else "http"
        address = host_port(s.metrics_server_address, s.metrics_server_port)
        parts.append(f"metrics={scheme}://{address}/{s.metrics_prefix}")
    else:
        parts.append("metrics=off")
    return "config: " + " ".join(parts)


# --- helpers ----------------------------------------------------------------------------

_INTERFACES_HELP = "comma-separated interface names or /regex/ entries"


class _Invalid(ValueError):
    """A parse failure whose message adds detail to the accepted-values text."""


class _Env:
    """Reads variables: blank = unset, resolves aliases, wraps parse failures."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> tuple[str, str] | None:
        """(variable actually used, stripped value), or None when unset."""
        value = (self._environ.get(name) or "").strip()
        for old, new in ALIASES.items():
            if new != name:
                continue
            old_value = (self._environ.get(old) or "").strip()
            if old_value and value and old_value != value:
                raise ConfigError(old, old_value,
                                  f"conflicts with {name}={value!r} (it is an alias: set one)")
            if old_value and not value:
                return old, old_value
        return (name, value) if value else None

    def get(self, name: str, parse: Callable[[str], _T | None], accepted: str) -> _T | None:
        """Parsed value; None when unset. `parse` returns None or raises ValueError if bad."""
        found = self.raw(name)
        if found is None:
            return None
        variable, value = found
        try:
            result = parse(value)
        except _Invalid as error:
            raise ConfigError(variable, value, f"{accepted}; {error}") from None
        except ValueError:
            raise ConfigError(variable, value, accepted) from None
        if result is None:
            raise ConfigError(variable, value, accepted)
        return result


def _one_of(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(choices)


def _choice(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda value: value.lower() if value.lower() in choices else None


def _int_in(low: int, high: int) -> Callable[[str], int | None]:
    def parse(value: str) -> int | None:
        if not _INT_RE.fullmatch(value):
            return None
        number = int(value)
        return number if low <= number <= high else None
    return parse


def _ipfix_message_size(value: str) -> int | None:
    size = _int_in(0, 65535)(value)
    return size if size == 0 or (size or 0) >= IPFIX_MIN_MESSAGE_SIZE else None


def _ip(value: str) -> IPAddress | None:
    return ipaddress.ip_address(value)


def _host(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_HOSTNAME_LABEL_RE.fullmatch(label) for label in labels):
        return None
    # An all-numeric dotted name ("10.0.0.300") is a mistyped address, not a host name.
    if labels[-1].isdigit():
        return None
    return value


def _readable_file(value: str) -> Path | None:
    path = Path(value)
    return path if path.is_file() and os.access(path, os.R_OK) else None


def _interface_list(value: str) -> tuple[str, ...]:
    entries = tuple(entry.strip() for entry in value.split(",") if entry.strip())
    for entry in entries:
        try:
            compile_entry(entry)
        except ValueError as error:
            raise _Invalid(str(error)) from None
    return entries
