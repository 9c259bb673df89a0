# SPDX-License-Identifier: MIT
"""The bypass's fixed names and numbers: defaults, the agent's pace, the pinned maps, the join
mechanisms to choose from, and bypass.h's enums (named by the object's BTF)."""

import functools

from .. import object_file
from ..mechanisms import Alternative, Choice

NAME = "bypass"
DEFAULT_PIN_DIR = "/sys/fs/bpf/netbpf/bypass"
SCOPES = {"loopback": 0, "host": 1, "all": 2}
DEFAULT_QUEUE_FLOOR = 1 << 20
MAPS = ("sock_map", "sock_info", "sock_tuples", "handshakes", "listeners", "spliced_services", "netns_seen",
        "event_netns", "counters", ".rodata", "control", "host_addrs", "allowed_ports")
SOCKET_MAPS = ("sock_map", "sock_info", "sock_tuples", "handshakes")  # one entry per socket: --max-sockets
JOIN_INTERVAL = 0.02       # seconds between rounds of the sweep, at least
SLOW_INTERVAL = 1.0        # between rounds while nothing new happens but sockets wait or are joined
AGENT_CPU_SHARE = 0.05     # and at most this share of one CPU: a round visits every TCP socket
DRAIN_TIMEOUT = 10.0       # how long detach waits for readers to take their redirected data

# How sockets join, each chosen by what the kernel's verifier accepts (netbpf.mechanisms):
# the tc program on lo joins loopback pairs at their first segment after both qualify (none:
# the sweep alone joins, every JOIN_INTERVAL); the sweep joins what tc does not see and takes
# sockets out again.
EVENT_JOIN = Choice("event join", (Alternative("tc", "bypass_join_tc"),), required=False)
SWEEP = Choice("sweep", (Alternative("iter/task_file", "bypass_sweep_files"),
                         Alternative("iter/tcp", "bypass_sweep_tcp")))
# The send program: it reads its peer's socket directly (bpf_rdonly_cast, 6.2+) or by helper.
SEND = Choice("send", (Alternative("sk_msg/direct", "bypass_sk_msg"),
                       Alternative("sk_msg/probe-read", "bypass_msg_read")))
# How splice and sendfile readers are seen: an fentry program on tcp_splice_read, which costs
# nothing but on those reads; where the kernel takes none, the two syscalls' tracepoints (always
# loaded), which slow down every syscall on the host while attached.
SPLICE_WATCH = Choice("splice watch", (Alternative("fentry", "bypass_splice_read"),), required=False)
SPLICE_TRACEPOINTS = {"splice": "bypass_splice", "sendfile": "bypass_sendfile"}  # link name: program
CHOICES = (EVENT_JOIN, SWEEP, SEND, SPLICE_WATCH)
MECHANISMS_PIN = "mechanisms"  # a symlink beside the pins whose target is the JSON of mechanisms()


class _FromBTF:
    """enum sock_state and enum plain_reason of bpf/bypass.h as IntEnums (State.JOINED,
    Reason.BLOCKING), read from the built object's BTF when first used: importing netbpf.bypass
    needs no built object."""

    @functools.cached_property
    def State(self):
        return object_file(NAME).btf.enum("sock_state", "STATE_")

    @functools.cached_property
    def Reason(self):
        return object_file(NAME).btf.enum("plain_reason", "REASON_")

    @functools.cached_property
    def reasons(self):
        """The reasons' names in value order ("none", "no_file", ...), as status prints them."""
        return tuple(reason.name.lower() for reason in sorted(self.Reason) if reason.name != "MAX")

    @functools.cached_property
    def transient(self):
        """Reasons a new connection often leaves behind within moments (a server sets O_NONBLOCK
        right after accept(), its peer follows): the agent looks again soon."""
        Reason = self.Reason
        return frozenset({Reason.NO_FILE, Reason.PEER_WAITING, Reason.BLOCKING, Reason.RCVLOWAT})


kinds = _FromBTF()
