# SPDX-License-Identifier: MIT
"""Socket patterns the bypass tests run inside their cgroup."""

import hashlib
import random
import socket
import threading

PATTERN = random.Random(1234).randbytes(1 << 20)  # 1 MiB of fixed pseudo-random bytes


def pair(family=socket.AF_INET, host="127.0.0.1", server_host=None):
    """(listener, client, accepted server end), all connected."""
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((server_host or host, 0))
    srv.listen(512)
    cli = socket.socket(family, socket.SOCK_STREAM)
    cli.connect((host, srv.getsockname()[1]))
    conn, _ = srv.accept()
    return srv, cli, conn


def close_all(*socks):
    for s in socks:
        s.close()


def recv_exactly(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_all(sock):
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def stream_bytes(total, seed):
    """Yield the deterministic stream of `total` bytes for `seed` in random-sized pieces."""
    rng = random.Random(seed)
    offset = seed * 7919 % len(PATTERN)
    sent = 0
    while sent < total:
        n = min(rng.choice((1, 7, 100, 1000, 4096, 65536, 200000)), total - sent)
        end = offset + n
        piece = PATTERN[offset:end] if end <= len(PATTERN) else PATTERN[offset:] + PATTERN[:end - len(PATTERN)]
        offset = end % len(PATTERN)
        sent += n
        yield piece


def digest_of_stream(total, seed):
    h = hashlib.sha256()
    for piece in stream_bytes(total, seed):
        h.update(piece)
    return h.hexdigest()


def send_stream(sock, total, seed):
    for piece in stream_bytes(total, seed):
        sock.sendall(piece)
    sock.shutdown(socket.SHUT_WR)


def receive_digest(sock, seed, slow=False):
    """Read to EOF with random read sizes (and pauses when slow); return (bytes, sha256)."""
    rng = random.Random(seed + 1)
    h, total = hashlib.sha256(), 0
    while True:
        chunk = sock.recv(rng.choice((1, 13, 512, 4096, 65536, 1 << 20)))
        if not chunk:
            return total, h.hexdigest()
        h.update(chunk)
        total += len(chunk)
        if slow and rng.random() < 0.002:
            threading.Event().wait(0.005)


def joinable_pair(family=socket.AF_INET, host="127.0.0.1", server_host=None, timeout=30.0, blocking=False):
    """A connected pair the bypass takes: both ends are non-blocking (a Python socket timeout
    sets O_NONBLOCK and waits in poll, as event-driven programs do), and each has read once: the
    reply is the first segment after both qualify, where the tc program joins them. Then
    sync(): the parent may wait until the bypass joined them. blocking=True: the same pair with
    both ends left blocking (which the bypass keeps plain by default)."""
    from conftest import sync

    srv, cli, conn = pair(family, host, server_host)
    if not blocking:
        cli.settimeout(timeout)
        conn.settimeout(timeout)
    cli.sendall(b"\1")
    recv_exactly(conn, 1)
    conn.sendall(b"\2")
    recv_exactly(cli, 1)
    sync()
    return srv, cli, conn
