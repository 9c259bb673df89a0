# SPDX-License-Identifier: MIT
"""What any local user can build against a bypassed connection: a network namespace of its own
(an unprivileged user namespace, as `unshare -Urn` makes one) with the victim's addresses on its
lo, and TCP pairs there with the victim's exact tuple. Used by tests/test_isolation.py."""

import ctypes
import os
import socket
import struct
import subprocess
import sys
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


# --- a replayed handshake nonce: what a process that read a connection's segments could do ---

def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _segment(src, dst, sport, dport, seq, ack, flags, options=b""):
    """An IPv4 packet holding one TCP segment, checksums filled in."""
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, 65535, 0, 0) + options
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + tcp


SYN, ACK = 0x02, 0x10


def replay_nonce(server, client, nonce):
    """In a network namespace of its own (become_unprivileged_netns_owner first), complete a
    handshake to a listener on `server` from the spoofed `client` address and port, whose last
    segment carries `nonce` in the bypass's option, as a copy of the victim's own segment would:
    its client address is routed out of one end of a veth pair (no socket there to answer the
    listener), the listener's SYN-ACK read at the other end. Returns the connection accepted
    there."""
    for command in (["link", "add", "nbd0", "type", "veth", "peer", "name", "nbd1"],
                    ["link", "set", "nbd0", "arp", "off", "up"], ["link", "set", "nbd1", "up"],
                    ["route", "add", f"{client[0]}/32", "dev", "nbd0"]):
        subprocess.run(["ip", *command], check=True, capture_output=True)
    listener = socket.socket()
    listener.bind(server)
    listener.listen(8)
    tap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    tap.bind(("nbd1", 0x0800))  # what leaves through nbd0 comes in at its peer
    tap.settimeout(5)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    seq = 1000
    raw.sendto(_segment(client[0], server[0], client[1], server[1], seq, 0, SYN), (server[0], 0))
    while True:
        packet = tap.recv(2048)
        header = (packet[0] & 0xF) * 4
        sport, dport, their_seq, _, _, flags = struct.unpack("!HHIIBB", packet[header:header + 14])
        if sport == server[1] and dport == client[1] and flags & (SYN | ACK) == SYN | ACK:
            break
    option = bytes([254, 12, ord("N"), ord("B")]) + nonce.to_bytes(8, sys.byteorder)
    raw.sendto(_segment(client[0], server[0], client[1], server[1], seq + 1, their_seq + 1, ACK, option),
               (server[0], 0))
    listener.settimeout(5)
    conn, _ = listener.accept()
    close_all(tap, raw, listener)
    return conn
