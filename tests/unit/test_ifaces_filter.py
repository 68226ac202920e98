from __future__ import annotations

import pytest

from ei_ebpf_agent.ifaces import InterfaceFilter, InterfaceWatcher
from ei_ebpf_agent.net import compile_entry


def test_empty_include_matches_every_interface():
    assert InterfaceFilter().matches("eth0")
    assert InterfaceFilter().matches("lo")


def test_exact_names_match_only_themselves():
    f = InterfaceFilter(include=["eth0", "ens3"])
    assert f.matches("eth0") and f.matches("ens3")
    assert not f.matches("eth01") and not f.matches("eth") and not f.matches("ETH0")


def test_regex_must_match_the_whole_name():
    f = InterfaceFilter(include=["/eth[0-9]/"])
    assert f.matches("eth0")
    assert not f.matches("eth10")  # re.fullmatch, not re.search
    assert not f.matches("veth0")


def test_regex_alternation_is_anchored_as_a_whole():
    f = InterfaceFilter(include=["/eth0|ens.*/"])
    assert f.matches("eth0") and f.matches("ens3")
    assert not f.matches("eth0x")


def test_exclude_wins_over_include():
    f = InterfaceFilter(include=["/veth.*/"], exclude=["veth-skip", "/veth9.*/"])
    assert f.matches("veth1")
    assert not f.matches("veth-skip")
    assert not f.matches("veth91")


def test_exclude_alone_filters_from_everything():
    f = InterfaceFilter(exclude=["lo", "/cali.*/"])
    assert f.matches("eth0")
    assert not f.matches("lo") and not f.matches("cali12345")


def test_slash_inside_name_is_not_a_regex():
    # Only /.../ is a regex; "/x" alone is an invalid name ('/' cannot be in a link name).
    with pytest.raises(ValueError, match="is not an interface name"):
        compile_entry("/x")


@pytest.mark.parametrize("entry", ["eth0:1", "a b", "a" * 16, ".", ".."])
def test_impossible_interface_names_are_rejected(entry):
    with pytest.raises(ValueError, match="is not an interface name"):
        InterfaceFilter(include=[entry])


def test_fifteen_characters_is_the_longest_name():
    assert InterfaceFilter(include=["a" * 15]).matches("a" * 15)


def test_bad_regex_is_rejected_with_the_entry_named():
    with pytest.raises(ValueError, match=r"'/\(/' does not compile"):
        InterfaceFilter(exclude=["/(/"])


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "inotify", "poll_period": 1.0}, "watch or poll"),
    ({"mode": "poll", "poll_period": 0.0}, "> 0"),
])
def test_watcher_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InterfaceWatcher(filter=InterfaceFilter(), on_added=print, on_removed=print, **kwargs)
