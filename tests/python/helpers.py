"""Small helpers for the Python tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
