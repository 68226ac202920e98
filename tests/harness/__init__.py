"""Reusable exact-count integration harness: same traffic, same assertions, any transport.

    netns.Topology        namespaces A (agent's host) and B joined by a veth pair; add_link()
    traffic.*             generators returning truth.Expectation (exact per-key counts)
    truth.Sniffer         AF_PACKET ground truth on the peer end (TCP), drop-checked
    collectors.*          Collector interface: GrpcCollector, StdoutCollector (+ IPFIX ones)
    agent.AgentProcess    the agent as a process in namespace A, env-configured
    assertions.*          assert_exact / wait_exact / check_fields
"""
