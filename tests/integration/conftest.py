"""Fixtures for the end-to-end tests: a fresh topology and collector per test, and an agent
factory that never lets an agent outlive its test."""

from __future__ import annotations

import time

import pytest
from harness.agent import AgentProcess
from harness.collectors import GrpcCollector, StdoutCollector
from harness.netns import Topology


@pytest.fixture
def topo():
    with Topology() as topology:
        yield topology


@pytest.fixture
def grpc_collector(topo):
    collector = GrpcCollector(topo.a)
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture(params=["grpc", "stdout"])
def any_collector(request, topo):
    """Each transport in turn; the same traffic and assertions apply to all of them."""
    collector = GrpcCollector(topo.a) if request.param == "grpc" else StdoutCollector()
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture
def start_agent(topo):
    """start_agent(env, collector=None, **kw) -> a started AgentProcess in namespace A."""
    agents = []

    def start(env=None, collector=None, **kw) -> AgentProcess:
        agent = AgentProcess(topo, env or {}, collector, **kw)
        agents.append(agent)
        return agent.start()

    yield start
    for agent in agents:
        agent.__exit__(None, None, None)


@pytest.fixture
def wall_clock():
    """The test's wall-clock window: .start at setup, .end set with .stop()."""

    class Window:
        start = time.time_ns()
        end = None

        def stop(self) -> int:
            self.end = time.time_ns()
            return self.end

    return Window()
