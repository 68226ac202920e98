from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ei_ebpf_agent.config import (
    EXPORTS,
    ConfigError,
    Settings,
    describe,
    format_duration,
    load_settings,
    log_level_number,
    parse_duration,
)
from ei_ebpf_agent.net import Transport

GRPC = {"TARGET_HOST": "collector", "TARGET_PORT": "2055"}


def error_of(environ: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults ----------------------------------------------------------------------------

def test_empty_environment_gives_the_documented_defaults():
    s = load_settings({})
    assert s == Settings()
    assert s.export == "stdout"
    assert s.target_host is None and s.target_port is None
    assert s.grpc_message_max_flows == 10000
    assert s.interfaces == () and s.exclude_interfaces == ("lo",)
    assert s.listen_interfaces == "watch" and s.listen_poll_period == 10.0
    assert s.direction == "both" and s.tc_attach_mode == "any"
    assert s.sampling == 0 and s.cache_max_flows == 5000 and s.cache_active_timeout == 5.0
    assert s.buffers_length == 50 and s.log_level == "info" and s.agent_ip is None
    assert s.metrics_enable is False and s.metrics_server_address == "0.0.0.0"
    assert s.metrics_server_port == 9090 and s.metrics_prefix == "ebpf_agent_"


def test_empty_or_blank_values_count_as_unset():
    assert load_settings({"CACHE_MAX_FLOWS": "", "EXPORT": "  ", "LOG_LEVEL": ""}) == Settings()


def test_unknown_variables_are_ignored():
    assert load_settings({"PATH": "/bin", "CACHE_MAX_FLOW": "x"}) == Settings()


def test_surrounding_blanks_are_trimmed():
    assert load_settings({"CACHE_MAX_FLOWS": " 7 "}).cache_max_flows == 7


# --- EXPORT and target -------------------------------------------------------------------

def test_export_stdout_and_grpc_are_accepted():
    assert EXPORTS == ("stdout", "grpc", "ipfix+udp", "ipfix+tcp")
    assert load_settings({"EXPORT": "stdout"}).export == "stdout"
    s = load_settings({"EXPORT": "GRPC", **GRPC})
    assert (s.export, s.target_host, s.target_port) == ("grpc", "collector", 2055)


@pytest.mark.parametrize("export, exporter, transport", [
    ("stdout", "stdout", None), ("grpc", "grpc", Transport.TCP),
    ("ipfix+udp", "ipfix", Transport.UDP), ("ipfix+tcp", "ipfix", Transport.TCP)])
def test_export_names_its_exporter_module_and_transport(export, exporter, transport):
    s = load_settings({"EXPORT": export, **GRPC})
    assert (s.export, s.exporter, s.transport) == (export, exporter, transport)
    assert Settings(export=export).transport is transport  # hand-built Settings agree
    assert callable(importlib.import_module(f"ei_ebpf_agent.exporter.{exporter}")
                    .EXPORTER.from_settings)


def test_config_imports_no_runtime_module():
    code = ("import sys, ei_ebpf_agent.config; print(*sorted(m for m in sys.modules "
            "if m.startswith('ei_ebpf_agent')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["ei_ebpf_agent", "ei_ebpf_agent.config", "ei_ebpf_agent.net"]


def test_unknown_export_names_the_accepted_ones():
    assert error_of({"EXPORT": "kafka"}) == "invalid EXPORT='kafka': one of stdout, grpc, ipfix+udp, ipfix+tcp"


def test_target_without_export_means_grpc():
    assert load_settings(GRPC).export == "grpc"


def test_explicit_stdout_keeps_a_configured_target_unused():
    assert load_settings({"EXPORT": "stdout", **GRPC}).export == "stdout"


def test_grpc_requires_host():
    assert error_of({"EXPORT": "grpc", "TARGET_PORT": "1"}) == (
        "invalid TARGET_HOST='': required when EXPORT=grpc: a host name or an IP address"
    )


def test_grpc_requires_port():
    assert error_of({"EXPORT": "grpc", "TARGET_HOST": "h"}) == (
        "invalid TARGET_PORT='': required when EXPORT=grpc: an integer from 1 to 65535"
    )


def test_half_a_target_without_export_says_grpc_was_implied():
    assert error_of({"TARGET_HOST": "h"}) == (
        "invalid TARGET_PORT='': required when EXPORT=grpc (the default when a target is "
        "set): an integer from 1 to 65535"
    )


@pytest.mark.parametrize("host", ["collector", "flp.netobserv.svc.cluster.local", "a-b.c.",
                                  "10.1.2.3", "::1", "fd00::10"])
def test_target_host_accepts_names_and_addresses(host):
    assert load_settings({**GRPC, "TARGET_HOST": host}).target_host == host


@pytest.mark.parametrize("host", ["-bad", "a..b", "under_score", "10.0.0.300", "http://x",
                                  "x" * 64])
def test_target_host_rejects_non_hosts(host):
    assert error_of({**GRPC, "TARGET_HOST": host}) == (
        f"invalid TARGET_HOST={host!r}: a host name or an IP address"
    )


@pytest.mark.parametrize("port", ["1", "2055", "65535"])
def test_target_port_in_range(port):
    assert load_settings({**GRPC, "TARGET_PORT": port}).target_port == int(port)


@pytest.mark.parametrize("port", ["0", "65536", "-1", "80a", "1e3", "+80", "8_0"])
def test_target_port_out_of_range_or_not_an_integer(port):
    assert error_of({**GRPC, "TARGET_PORT": port}) == (
        f"invalid TARGET_PORT={port!r}: an integer from 1 to 65535"
    )


# --- aliases -----------------------------------------------------------------------------

def test_seed_era_aliases_still_work():
    s = load_settings({"FLOWS_TARGET_HOST": "old", "FLOWS_TARGET_PORT": "9999"})
    assert (s.export, s.target_host, s.target_port) == ("grpc", "old", 9999)


def test_alias_and_new_name_with_the_same_value_are_fine():
    s = load_settings({**GRPC, "FLOWS_TARGET_HOST": "collector", "FLOWS_TARGET_PORT": "2055"})
    assert (s.target_host, s.target_port) == ("collector", 2055)


def test_alias_conflicting_with_new_name_is_an_error():
    assert error_of({**GRPC, "FLOWS_TARGET_PORT": "1"}) == (
        "invalid FLOWS_TARGET_PORT='1': conflicts with TARGET_PORT='2055' (it is an alias: "
        "set one)"
    )


def test_bad_alias_value_names_the_alias():
    assert error_of({"FLOWS_TARGET_HOST": "h", "FLOWS_TARGET_PORT": "x"}) == (
        "invalid FLOWS_TARGET_PORT='x': an integer from 1 to 65535"
    )


# --- TLS ---------------------------------------------------------------------------------

@pytest.fixture
def pem(tmp_path: Path):
    def make(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(path)
    return make


def test_tls_with_ca_only(pem):
    s = load_settings({**GRPC, "TARGET_TLS_CA_CERT_PATH": pem("ca.pem")})
    assert s.target_tls_ca_cert_path == Path(pem("ca.pem"))
    assert s.target_tls_user_cert_path is None


def test_mutual_tls_with_ca_cert_and_key(pem):
    s = load_settings({**GRPC, "TARGET_TLS_CA_CERT_PATH": pem("ca.pem"),
                       "TARGET_TLS_USER_CERT_PATH": pem("user.pem"),
                       "TARGET_TLS_USER_KEY_PATH": pem("user.key")})
    assert s.target_tls_user_cert_path == Path(pem("user.pem"))
    assert s.target_tls_user_key_path == Path(pem("user.key"))


def test_tls_file_must_exist(tmp_path):
    missing = str(tmp_path / "nope.pem")
    assert error_of({**GRPC, "TARGET_TLS_CA_CERT_PATH": missing}) == (
        f"invalid TARGET_TLS_CA_CERT_PATH={missing!r}: a readable file"
    )


def test_tls_path_must_be_a_file_not_a_directory(tmp_path):
    assert error_of({**GRPC, "TARGET_TLS_CA_CERT_PATH": str(tmp_path)}) == (
        f"invalid TARGET_TLS_CA_CERT_PATH={str(tmp_path)!r}: a readable file"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_tls_file_must_be_readable(pem):
    path = pem("ca.pem")
    os.chmod(path, 0)
    assert "a readable file" in error_of({**GRPC, "TARGET_TLS_CA_CERT_PATH": path})


def test_user_cert_needs_key(pem):
    assert error_of({**GRPC, "TARGET_TLS_CA_CERT_PATH": pem("ca"),
                     "TARGET_TLS_USER_CERT_PATH": pem("c")}) == (
        "invalid TARGET_TLS_USER_KEY_PATH='': required when TARGET_TLS_USER_CERT_PATH is set "
        "(client certificate and key go together)"
    )


def test_user_key_needs_cert(pem):
    assert error_of({**GRPC, "TARGET_TLS_CA_CERT_PATH": pem("ca"),
                     "TARGET_TLS_USER_KEY_PATH": pem("k")}) == (
        "invalid TARGET_TLS_USER_CERT_PATH='': required when TARGET_TLS_USER_KEY_PATH is set "
        "(client certificate and key go together)"
    )


def test_mutual_tls_needs_the_ca(pem):
    assert error_of({**GRPC, "TARGET_TLS_USER_CERT_PATH": pem("c"),
                     "TARGET_TLS_USER_KEY_PATH": pem("k")}) == (
        "invalid TARGET_TLS_CA_CERT_PATH='': required when TARGET_TLS_USER_CERT_PATH is set "
        "(mutual TLS verifies the collector with this CA)"
    )


# --- integers ----------------------------------------------------------------------------

@pytest.mark.parametrize("variable, field, low, high", [
    ("GRPC_MESSAGE_MAX_FLOWS", "grpc_message_max_flows", 1, 2**31 - 1),
    ("SAMPLING", "sampling", 0, 2**31 - 1),
    ("CACHE_MAX_FLOWS", "cache_max_flows", 1, 10_000_000),
    ("BUFFERS_LENGTH", "buffers_length", 1, 2**31 - 1),
    ("METRICS_SERVER_PORT", "metrics_server_port", 1, 65535),
])
def test_integer_bounds(variable, field, low, high):
    assert getattr(load_settings({variable: str(low)}), field) == low
    assert getattr(load_settings({variable: str(high)}), field) == high
    for bad in (str(low - 1), str(high + 1), "1.5", "ten"):
        message = error_of({variable: bad})
        assert message.startswith(f"invalid {variable}={bad!r}: an integer from {low} to {high}")


def test_sampling_message_says_what_zero_and_one_mean():
    assert error_of({"SAMPLING": "-1"}) == (
        "invalid SAMPLING='-1': an integer from 0 to 2147483647 (0 and 1: every packet)"
    )


def test_cache_max_flows_message():
    assert error_of({"CACHE_MAX_FLOWS": "0"}) == (
        "invalid CACHE_MAX_FLOWS='0': an integer from 1 to 10000000"
    )


# --- durations ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("5s", 5.0), ("250ms", 0.25), ("1m30s", 90.0), ("1h", 3600.0), ("100us", 1e-4),
    ("100\u00b5s", 1e-4), ("1.5s", 1.5), (".5s", 0.5), ("2h45m", 9900.0), ("1500ns", 1.5e-6),
    ("1s500ms", 1.5),
])
def test_go_style_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "0", "5 s", "5S", "-5s", "+5s", "5sec", "s", "1d", ""])
def test_not_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds, text", [
    (5.0, "5s"), (0.25, "250ms"), (90.0, "1m30s"), (3600.0, "1h"), (1e-4, "100us"),
    (3723.5, "1h2m3.5s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_cache_active_timeout_accepts_durations():
    assert load_settings({"CACHE_ACTIVE_TIMEOUT": "250ms"}).cache_active_timeout == 0.25
    assert load_settings({"CACHE_ACTIVE_TIMEOUT": "10ms"}).cache_active_timeout == 0.01


@pytest.mark.parametrize("value", ["5", "9ms", "-5s", "five"])
def test_cache_active_timeout_rejects_bare_numbers_and_too_short(value):
    assert error_of({"CACHE_ACTIVE_TIMEOUT": value}) == (
        f"invalid CACHE_ACTIVE_TIMEOUT={value!r}: a duration such as 5s, 250ms or 1m30s "
        "(minimum 10ms)"
    )


def test_listen_poll_period():
    assert load_settings({"LISTEN_POLL_PERIOD": "1m"}).listen_poll_period == 60.0
    assert error_of({"LISTEN_POLL_PERIOD": "10"}) == (
        "invalid LISTEN_POLL_PERIOD='10': a duration such as 5s, 250ms or 1m30s (minimum 10ms)"
    )
    assert "LISTEN_POLL_PERIOD='0s'" in error_of({"LISTEN_POLL_PERIOD": "0s"})


# --- choices -----------------------------------------------------------------------------

@pytest.mark.parametrize("variable, field, values", [
    ("LISTEN_INTERFACES", "listen_interfaces", ("watch", "poll")),
    ("DIRECTION", "direction", ("both", "ingress", "egress")),
    ("TC_ATTACH_MODE", "tc_attach_mode", ("any", "tcx", "tc")),
])
def test_choices(variable, field, values):
    for value in values:
        assert getattr(load_settings({variable: value}), field) == value
        assert getattr(load_settings({variable: value.upper()}), field) == value
    assert error_of({variable: "nope"}) == (
        f"invalid {variable}='nope': one of {', '.join(values)}"
    )


@pytest.mark.parametrize("name, level", [
    ("trace", 5), ("debug", logging.DEBUG), ("info", logging.INFO), ("warn", logging.WARNING),
    ("warning", logging.WARNING), ("error", logging.ERROR), ("fatal", logging.CRITICAL),
    ("panic", logging.CRITICAL),
])
def test_log_levels_like_the_go_agent(name, level):
    s = load_settings({"LOG_LEVEL": name.upper()})
    assert s.log_level == name
    assert log_level_number(s.log_level) == level


def test_bad_log_level():
    assert error_of({"LOG_LEVEL": "verbose"}) == (
        "invalid LOG_LEVEL='verbose': one of trace, debug, info, warn, warning, error, fatal, "
        "panic"
    )


# --- interfaces --------------------------------------------------------------------------

def test_interface_lists_are_comma_separated_and_trimmed():
    s = load_settings({"INTERFACES": " eth0, /ens[0-9]+/ ,,", "EXCLUDE_INTERFACES": "lo,docker0"})
    assert s.interfaces == ("eth0", "/ens[0-9]+/")
    assert s.exclude_interfaces == ("lo", "docker0")


def test_only_commas_in_exclude_means_exclude_nothing():
    assert load_settings({"EXCLUDE_INTERFACES": ","}).exclude_interfaces == ()


def test_asking_for_lo_by_name_drops_the_default_exclusion():
    s = load_settings({"INTERFACES": "lo,eth0"})
    assert s.exclude_interfaces == ()
    assert load_settings({"INTERFACES": "lo", "EXCLUDE_INTERFACES": "lo"}).exclude_interfaces == (
        "lo",
    )


def test_bad_regex_names_the_entry():
    assert error_of({"EXCLUDE_INTERFACES": "lo,/veth[/"}) == (
        "invalid EXCLUDE_INTERFACES='lo,/veth[/': comma-separated interface names or /regex/ "
        "entries; '/veth[/' does not compile: unterminated character set at position 4"
    )


def test_impossible_interface_name():
    message = error_of({"INTERFACES": "eth0:1"})
    assert message.startswith("invalid INTERFACES='eth0:1': comma-separated interface names or "
                              "/regex/ entries; 'eth0:1' is not an interface name")


# --- addresses, metrics ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["10.0.0.1", "fd00::1", "::ffff:10.0.0.1"])
def test_agent_ip(value):
    assert load_settings({"AGENT_IP": value}).agent_ip == ipaddress.ip_address(value)


@pytest.mark.parametrize("value", ["10.0.0", "host.example", "10.0.0.1/24"])
def test_agent_ip_must_be_an_address(value):
    assert error_of({"AGENT_IP": value}) == (
        f"invalid AGENT_IP={value!r}: an IPv4 or IPv6 address"
    )


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
])
def test_metrics_enable_booleans(value, expected):
    assert load_settings({"METRICS_ENABLE": value}).metrics_enable is expected


def test_metrics_enable_bad_value():
    assert error_of({"METRICS_ENABLE": "on"}) == (
        "invalid METRICS_ENABLE='on': true or false (also 1/0, yes/no)"
    )


@pytest.mark.parametrize("value", ["127.0.0.1", "::", "localhost", "metrics.local"])
def test_metrics_server_address(value):
    assert load_settings({"METRICS_SERVER_ADDRESS": value}).metrics_server_address == value


def test_metrics_server_address_bad():
    assert error_of({"METRICS_SERVER_ADDRESS": "0.0.0.0:9090"}) == (
        "invalid METRICS_SERVER_ADDRESS='0.0.0.0:9090': an IP address or a host name"
    )


@pytest.mark.parametrize("value", ["ebpf_agent_", "netobserv:", "_x", "A1"])
def test_metrics_prefix(value):
    assert load_settings({"METRICS_PREFIX": value}).metrics_prefix == value


@pytest.mark.parametrize("value", ["1abc", "ebpf-agent_", "a b"])
def test_metrics_prefix_bad(value):
    assert error_of({"METRICS_PREFIX": value}) == (
        f"invalid METRICS_PREFIX={value!r}: a Prometheus metric name prefix matching "
        "[a-zA-Z_:][a-zA-Z0-9_:]*"
    )


# --- describe ----------------------------------------------------------------------------

def test_describe_defaults_is_one_line():
    assert describe(load_settings({})) == (
        "config: export=stdout interfaces=* exclude_interfaces=lo listen_interfaces=watch "
        "direction=both tc_attach_mode=any sampling=0 cache_max_flows=5000 "
        "cache_active_timeout=5s buffers_length=50 log_level=info agent_ip=auto metrics=off"
    )


def test_describe_grpc_with_mutual_tls_shows_mode_not_files(pem):
    s = load_settings({"TARGET_HOST": "fd00::5", "TARGET_PORT": "2055",
                       "TARGET_TLS_CA_CERT_PATH": pem("ca.pem"),
                       "TARGET_TLS_USER_CERT_PATH": pem("user.pem"),
                       "TARGET_TLS_USER_KEY_PATH": pem("user.key"),
                       "LISTEN_INTERFACES": "poll", "LISTEN_POLL_PERIOD": "1m30s",
                       "METRICS_ENABLE": "true", "INTERFACES": "/eth.*/"})
    line = describe(s)
    assert "\n" not in line
    assert "export=grpc target=[fd00::5]:2055 tls=mutual grpc_message_max_flows=10000" in line
    assert "interfaces=/eth.*/ exclude_interfaces=lo listen_interfaces=poll/1m30s" in line
    assert "metrics=http://0.0.0.0:9090/ebpf_agent_" in line
    assert "user.key" not in line and "pem" not in line


def test_ipfix_minimum_message_size_matches_the_encoder():
    from ei_ebpf_agent.config import IPFIX_MIN_MESSAGE_SIZE
    from ei_ebpf_agent.exporter.ipfix_encode import MIN_MESSAGE_SIZE

    assert IPFIX_MIN_MESSAGE_SIZE == MIN_MESSAGE_SIZE


@pytest.mark.parametrize("variable, value", [
    ("IPFIX_OBSERVATION_DOMAIN_ID", "-1"),
    ("IPFIX_OBSERVATION_DOMAIN_ID", "4294967296"),
    ("IPFIX_MAX_MESSAGE_SIZE", "100"),
    ("IPFIX_MAX_MESSAGE_SIZE", "65536"),
    ("IPFIX_TEMPLATE_REFRESH_INTERVAL", "60"),
    ("IPFIX_TEMPLATE_REFRESH_MESSAGES", "many"),
    ("METRICS_TLS_CERT_PATH", "/nonexistent/cert.pem"),
])
def test_bad_ipfix_and_metrics_tls_values_name_the_variable(variable, value):
    env = {"EXPORT": "ipfix+udp", "TARGET_HOST": "127.0.0.1", "TARGET_PORT": "4739",
           variable: value}
    with pytest.raises(ConfigError) as raised:
        load_settings(env)
    assert raised.value.variable == variable
    assert "\n" not in str(raised.value)


def test_ipfix_settings_parse():
    settings = load_settings({
        "EXPORT": "ipfix+tcp", "TARGET_HOST": "127.0.0.1", "TARGET_PORT": "4739",
        "IPFIX_OBSERVATION_DOMAIN_ID": "7", "IPFIX_MAX_MESSAGE_SIZE": "9000",
        "IPFIX_TEMPLATE_REFRESH_INTERVAL": "30s", "IPFIX_TEMPLATE_REFRESH_MESSAGES": "0",
    })
    assert (settings.export, settings.ipfix_observation_domain_id,
            settings.ipfix_max_message_size, settings.ipfix_template_refresh_interval,
            settings.ipfix_template_refresh_messages) == ("ipfix+tcp", 7, 9000, 30.0, 0)


def test_metrics_tls_needs_cert_and_key(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError) as raised:
        load_settings({"METRICS_TLS_CERT_PATH": str(cert)})
    assert raised.value.variable == "METRICS_TLS_KEY_PATH"
