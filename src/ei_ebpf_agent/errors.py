"""The one exception that stops the agent at start with a one-line message."""

from __future__ import annotations


class AgentStartError(Exception):
    """The agent cannot start; the message is one line for the user (the cause is chained)."""
