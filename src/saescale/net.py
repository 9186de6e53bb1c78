"""Loopback networking: a free TCP port for a local server or a process-group rendezvous."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it; a short race remains, as always)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
