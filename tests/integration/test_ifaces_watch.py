"""InterfaceWatcher in a network namespace made by the test: links come and go, events arrive.

The watcher runs in a child process started with `ip netns exec`, which prints every
callback as a JSON line; the test creates and deletes links in that namespace (veth pairs, and
bridges where one link at a time is simpler: this kernel has no dummy module).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import ei_ebpf_agent

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
]

# Runs inside the namespace. argv[1]: JSON {mode, period, include, exclude, raise_on}.
CHILD = r"""
import json, logging, sys, time
from ei_ebpf_agent.ifaces import InterfaceFilter, InterfaceWatcher

args = json.loads(sys.argv[1])
logging.basicConfig(stream=sys.stderr, level=logging.DEBUG,
                    format="LOG %(levelname)s %(name)s: %(message)s")

def emit(**event):
    print(json.dumps(event), flush=True)

def callback(kind):
    def call(index, name):
        emit(event=kind, index=index, name=name)
        if name == args.get("raise_on"):
            raise RuntimeError("callback failure requested by the test")
    return call

watcher = InterfaceWatcher(args["mode"], args["period"],
                           InterfaceFilter(args["include"], args["exclude"]),
                           callback("added"), callback("removed"))
watcher.start()
emit(event="ready")
sys.stdin.readline()  # the test closes stdin to stop us
start = time.monotonic()
watcher.stop()
emit(event="stopped", seconds=time.monotonic() - start)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def add_link(ns: str, name: str) -> None:
    """One new link (a bridge: a single device, available on every kernel we test)."""
    ip("-n", ns, "link", "add", name, "type", "bridge")


class NetnsWatcher:
    """A watcher child process in namespace `ns`, with a queue of its events."""

    def __init__(self, ns: str, mode: str, period: float = 10.0, include=(), exclude=(),
                 raise_on: str = "") -> None:
        self.ns = ns
        args = {"mode": mode, "period": period, "include": list(include),
                "exclude": list(exclude), "raise_on": raise_on}
        env = dict(os.environ, PYTHONPATH=str(Path(ei_ebpf_agent.__file__).parents[1]))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env,
        )
        self.events: queue.Queue = queue.Queue()
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()
        self.at_start = []
        while True:
            event = self.next(timeout=10.0)
            if event["event"] == "ready":
                break
            self.at_start.append(event)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next(self, timeout: float) -> dict:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watcher event within {timeout}s") from None

    def expect(self, count: int, within: float) -> list:
        """The next `count` events, all of which must arrive within `within` seconds."""
        deadline = time.monotonic() + within
        return [self.next(max(0.0, deadline - time.monotonic())) for _ in range(count)]

    def assert_quiet(self, seconds: float) -> None:
        try:
            event = self.events.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected watcher event: {event}")

    def stop(self) -> float:
        """Stop the child; return how long watcher.stop() took."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        event = self.next(timeout=10.0)
        assert event["event"] == "stopped", event
        self.proc.wait(timeout=10)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        assert self.proc.returncode == 0, self.stderr
        return event["seconds"]


def links(events: list) -> list:
    return [(e["event"], e["name"]) for e in events]


@pytest.fixture
def netns():
    name = f"ei-ifaces-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture(params=["watch", "poll"])
def mode(request):
    return request.param


def start(netns: str, mode: str, **kwargs) -> NetnsWatcher:
    return NetnsWatcher(netns, mode, period=0.2, **kwargs)


def test_links_present_at_start_are_reported_by_start(netns, mode):
    add_link(netns, "d0")
    watcher = start(netns, mode)
    assert sorted(links(watcher.at_start)) == [("added", "d0"), ("added", "lo")]
    watcher.stop()


def test_new_link_reported_within_1s_and_removal_once_without_error(netns, mode):
    watcher = start(netns, mode, exclude=["lo"])
    assert watcher.at_start == []

    ip("-n", netns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    added = watcher.expect(2, within=1.0)
    assert sorted(links(added)) == [("added", "v0"), ("added", "v1")]
    ip("-n", netns, "link", "set", "v0", "up")  # state changes are not additions
    ip("-n", netns, "link", "set", "v1", "up")
    watcher.assert_quiet(0.5)

    ip("-n", netns, "link", "del", "v0")  # takes its peer with it
    removed = watcher.expect(2, within=1.0)
    assert sorted((e["index"], e["name"]) for e in removed) == sorted(
        (e["index"], e["name"]) for e in added
    )
    assert all(e["event"] == "removed" for e in removed)
    watcher.assert_quiet(0.5)

    watcher.stop()
    assert "LOG ERROR" not in watcher.stderr and "LOG WARNING" not in watcher.stderr
    assert "Traceback" not in watcher.stderr


def test_rename_is_reported_as_removed_then_added(netns, mode):
    watcher = start(netns, mode, exclude=["lo"])
    add_link(netns, "d0")
    (added,) = watcher.expect(1, within=1.0)

    ip("-n", netns, "link", "set", "d0", "name", "d1")
    events = watcher.expect(2, within=1.0)
    assert events == [
        {"event": "removed", "index": added["index"], "name": "d0"},
        {"event": "added", "index": added["index"], "name": "d1"},
    ]
    watcher.stop()


def test_include_and_exclude_with_regexes(netns, mode):
    watcher = start(netns, mode, include=["/d[0-9]+/", "v0"], exclude=["/d9.*/"])
    assert watcher.at_start == []  # lo is not included
    for name in ("d1", "d90", "dx", "v0", "v01", "xd1"):
        add_link(netns, name)
    events = watcher.expect(2, within=1.0)
    assert sorted(links(events)) == [("added", "d1"), ("added", "v0")]
    watcher.assert_quiet(0.5)
    watcher.stop()


def test_burst_of_links_all_reported(netns, mode):
    watcher = start(netns, mode, exclude=["lo"])
    names = [f"b{i}" for i in range(40)]
    batch = "".join(f"link add {name} type bridge\n" for name in names)
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True, check=True)
    events = watcher.expect(len(names), within=2.0)
    assert sorted(links(events)) == sorted(("added", name) for name in names)

    batch = "".join(f"link del {name}\n" for name in names)
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True, check=True)
    events = watcher.expect(len(names), within=2.0)
    assert sorted(links(events)) == sorted(("removed", name) for name in names)
    watcher.assert_quiet(0.3)
    watcher.stop()


def test_failing_callback_is_logged_and_watching_continues(netns, mode):
    watcher = start(netns, mode, exclude=["lo"], raise_on="d0")
    add_link(netns, "d0")
    add_link(netns, "d1")
    events = watcher.expect(2, within=1.0)
    assert sorted(links(events)) == [("added", "d0"), ("added", "d1")]
    watcher.assert_quiet(0.5)  # d0 is not retried over and over

    watcher.stop()
    assert "LOG ERROR ei_ebpf_agent.ifaces: interface watcher: on_added(" in watcher.stderr
    assert "callback failure requested by the test" in watcher.stderr


def test_stop_is_prompt_with_a_long_poll_period(netns):
    watcher = NetnsWatcher(netns, "poll", period=30.0)
    # stop() does not wait out the poll period (a behaviour, not a speed: 15 s of slack)
    assert watcher.stop() < 15.0
