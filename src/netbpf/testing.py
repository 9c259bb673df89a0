# SPDX-License-Identifier: MIT
"""Helpers for what tests and measures netbpf (tests/, evaluate/): not used by the tools."""

import socket


def free_port(udp_too=False):
    """A TCP port of 127.0.0.1 that nothing listens on now; udp_too: one free for UDP on every
    address as well (a virtual port that multiport remaps for both)."""
    while True:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("0.0.0.0", port))
                return port
            except OSError:
                pass
