# SPDX-License-Identifier: MIT
"""Whether this process may load and attach BPF programs: root with the capabilities it needs.
A missing privilege is bad input, named as such (never reported as a missing kernel feature)."""

import os

from .errors import UsageError
from .types import Capability


def _names(caps):
    return [f"CAP_{cap.name}" for cap in sorted(caps, key=lambda cap: cap.name)]


NEEDED = _names(Capability)


def effective_capabilities():
    """The Capability members this process has in its effective set."""
    with open("/proc/self/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    return {cap for cap in Capability if mask >> cap & 1}


def require_root():
    """Raise UsageError unless this process is root with every Capability (a container's root
    may lack some)."""
    if os.geteuid() != 0:
        raise UsageError(f"must run as root (loading BPF programs needs {', '.join(NEEDED)})")
    missing = set(Capability) - effective_capabilities()
    if missing:
        raise UsageError(f"runs as root but without {', '.join(_names(missing))}: loading and attaching BPF "
                         f"programs needs {', '.join(NEEDED[:-1])} and {NEEDED[-1]}")
