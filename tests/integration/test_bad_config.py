"""A bad variable stops the agent before anything is attached: exit status 2 and exactly one
stderr line naming the variable and its value."""

from __future__ import annotations

import pytest
from harness.agent import run_agent_to_exit
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

GRPC = {"EXPORT": "grpc", "TARGET_HOST": "127.0.0.1", "TARGET_PORT": "9999"}

# (variable, bad value, other variables needed for the bad value to be judged)
CASES = [
    ("CACHE_ACTIVE_TIMEOUT", "5", {}),
    ("SAMPLING", "-1", {}),
    ("CACHE_MAX_FLOWS", "0", {}),
    ("TARGET_PORT", "70000", {"EXPORT": "grpc", "TARGET_HOST": "127.0.0.1"}),
    ("FLOWS_TARGET_PORT", "abc", {"EXPORT": "grpc", "TARGET_HOST": "127.0.0.1"}),
    ("EXPORT", "kafkaa", {}),
    ("DIRECTION", "up", {}),
    ("TC_ATTACH_MODE", "xdp", {}),
    ("LISTEN_INTERFACES", "sometimes", {}),
    ("LISTEN_POLL_PERIOD", "abc", {}),
    ("INTERFACES", "/[/", {}),
    ("EXCLUDE_INTERFACES", "/(/", {}),
    ("BUFFERS_LENGTH", "0", {}),
    ("GRPC_MESSAGE_MAX_FLOWS", "x", GRPC),
    ("AGENT_IP", "1.2.3", {}),
    ("LOG_LEVEL", "loud", {}),
    ("METRICS_ENABLE", "maybe", {}),
    ("METRICS_SERVER_PORT", "0", {"METRICS_ENABLE": "true"}),
    ("TARGET_TLS_CA_CERT_PATH", "/nonexistent", GRPC),
]


@pytest.mark.parametrize(("variable", "value", "others"), CASES, ids=[c[0] for c in CASES])
def test_bad_value_exits_2_with_one_line_and_attaches_nothing(topo, variable, value, others):
    result = run_agent_to_exit(topo, {**others, variable: value}, timeout=60)

    assert result.returncode == 2, result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert variable in line and value in line, line
    att = topo.attachments()
    assert att["tcx_ingress"] == att["tcx_egress"] == 0, att
    assert att["tc_ingress"] == att["tc_egress"] == [], att
    assert not any("clsact" in q for q in att["qdiscs"]), att
    assert topo.attached()["tc"] == [], topo.attached()
