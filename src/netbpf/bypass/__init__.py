# SPDX-License-Identifier: MIT
"""bypass: local TCP connections skip the TCP/IP stack, and no program can tell.

    with Bypass(cgroup="/sys/fs/cgroup/unified/myapp") as bypass:
        ...                       # sockets in that cgroup talk through sk_msg redirects
        print(bypass.stats())
    # leaving the block stops every redirect, waits until each socket's redirected data is
    # read, takes the sockets out of the map, and unloads

A socket joins the map only once netbpf has seen that its owner reads it the way the kernel's
sockmap path handles exactly like TCP (non-blocking, not spliced; bpf/bypass.h, enum sock_state).
A tc program on lo joins loopback pairs at their first segment; a sweep (an iterator program)
that an agent runs joins the rest and takes sockets out again. The agent is a thread of the
process that attached (`with Bypass(...)`, the `run` command), or for `attach`, a background
process that outlives the command.

The modules, in the order they build on each other: constants (names, numbers, enums from BTF),
addresses, report (counters, connections, metrics, printed lines), join (the sweep's rounds,
their pace, the drain), agent (the agent process), attachment (Bypass, status), cli.

CLI: python -m netbpf.bypass [run|attach|status|detach] [--cgroup DIR] [--scope S] [--ports P] ...
"""

from .addresses import host_addresses
from .agent import agent_running
from .attachment import Bypass, status
from .cli import build_parser, main, run_cli
from .constants import DEFAULT_PIN_DIR, JOIN_INTERVAL, SEND, SWEEP, kinds

__all__ = ["Bypass", "status", "host_addresses", "agent_running", "build_parser", "run_cli", "main",
           "DEFAULT_PIN_DIR", "JOIN_INTERVAL", "SEND", "SWEEP", "kinds"]
