# SPDX-License-Identifier: MIT
"""The bypass as the tests use it: attached to the test's cgroup with an agent thread that runs
the join iterator, and conditions a test waits for (with a deadline) before it goes on."""

import contextlib

from netbpf.bypass import Bypass

from conftest import wait_for


@contextlib.contextmanager
def attached(cgroup, **options):
    """Bypass attached to `cgroup` (its agent thread joins sockets, as in `python -m
    netbpf.bypass`); drained, detached and unloaded afterwards."""
    options.setdefault("drain_timeout", 5.0)
    with Bypass(str(cgroup.path), **options) as bypass:
        yield bypass


def joined(bypass, sockets=2, timeout=20.0):
    """An on_sync for run_in: wait until `sockets` sockets are in the map."""

    def wait():
        assert wait_for(lambda: bypass.stats()["sockets"] >= sockets, timeout), \
            f"the bypass did not take {sockets} sockets within {timeout} s: {bypass.stats()}"

    return wait


def kept_plain(bypass, timeout=20.0, **reasons):
    """An on_sync for run_in: wait until the agent has judged open sockets and keeps them plain,
    at least reasons[reason] of them for each reason (names of netbpf.bypass.kinds.reasons)."""

    def wait():
        def judged():
            now = bypass.stats()["plain_now"]
            return all(now.get(reason, 0) >= count for reason, count in reasons.items())

        assert wait_for(judged, timeout), f"not kept plain as {reasons} within {timeout} s: {bypass.stats()}"

    return wait


def rounds(bypass, count=2, timeout=10.0):
    """An on_sync for run_in: wait until the agent has done `count` more rounds, so that it has
    looked at every socket the child holds now."""

    def wait():
        start = bypass.obj.maps["control"][0].round
        assert wait_for(lambda: bypass.obj.maps["control"][0].round >= start + count, timeout), \
            "the agent did no rounds"

    return wait
