# SPDX-License-Identifier: MIT
"""What any local user can build against a bypassed connection: a network namespace of its own
(an unprivileged user namespace, as `unshare -Urn` makes one) with the victim's addresses on its
lo, and TCP pairs there with the victim's exact tuple. Used by tests/test_isolation.py."""

import ctypes
import os
import socket
import subprocess
import time

from netutil import close_all

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NOBODY = 65534
PR_SET_DUMPABLE = 4
MARK = b"IMPOSTOR"  # what an impostor end sends: anything else it receives came from elsewhere


def become_unprivileged_netns_owner(addresses):
    """This process (a forked child) drops root for nobody, makes a user and a network namespace
    of its own, and puts `addresses` on that namespace's lo: what `unshare -Urn` gives any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    libc.prctl(PR_SET_DUMPABLE, 1)  # a process that dropped root may not write its own /proc files otherwise
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNET) as nobody")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {NOBODY} 1"), ("gid_map", f"0 {NOBODY} 1")):
        with open(f"/proc/self/{name}", "w") as out:
            out.write(text)
    for address in addresses:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, capture_output=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)


def impostor_pair(server, client, timeout=2.0):
    """A connected pair with exactly this tuple: `server` (address, port) listening, a client
    bound to `client` (address, port); both ends non-blocking, each has read once (so that they
    qualify for the bypass). Returns (listener, client end, server end)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(server)
    srv.listen(8)
    cli = socket.socket()
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    cli.bind(client)
    cli.connect(server)
    conn, _ = srv.accept()
    for end in (cli, conn):
        end.settimeout(timeout)
    cli.sendall(MARK)
    conn.sendall(MARK)
    return srv, cli, conn


def foreign_bytes(sock, expected_own):
    """Read what has arrived; how many bytes are not the impostor's own marks."""
    foreign = 0
    sock.settimeout(0.0)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            foreign += len(data.replace(MARK, b""))
    except (BlockingIOError, socket.timeout):
        pass
    except OSError:
        pass
    sock.settimeout(2.0)
    return foreign


def impostor(addresses, server, client, until, report_fd, ready_fd=None, long_lived=False):
    """The attacker's process: in its own namespace, pairs with the tuple (client -> server),
    again and again until `until` (time.monotonic()), or one pair kept until then
    (long_lived). Each end sends MARK now and then and reads everything that arrives; writes
    how many foreign bytes it received to report_fd, and one byte to ready_fd once its first
    pair is up."""
    foreign = pairs = 0
    try:
        become_unprivileged_netns_owner(addresses)
        while time.monotonic() < until:
            try:
                srv, cli, conn = impostor_pair(server, client)
            except OSError:
                time.sleep(0.01)  # the port still in TIME_WAIT from the last round: try again
                continue
            pairs += 1
            if ready_fd is not None:
                os.write(ready_fd, b"r")
                ready_fd = None
            stop = until if long_lived else min(until, time.monotonic() + 0.2)
            while time.monotonic() < stop:
                for end in (cli, conn):
                    try:
                        end.send(MARK)
                    except OSError:
                        pass
                    foreign += foreign_bytes(end, MARK)
                time.sleep(0.002)
            for end in (cli, conn):
                foreign += foreign_bytes(end, MARK)
            cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST: the port is free again
            close_all(cli, conn, srv)
    finally:
        if ready_fd is not None:
            os.write(ready_fd, b"x")  # no pair came up: the victim must not wait for one
        os.write(report_fd, f"{foreign} {pairs}\n".encode())
        os._exit(0)
