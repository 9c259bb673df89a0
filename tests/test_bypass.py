# SPDX-License-Identifier: MIT
"""The bypass in the running kernel: which sockets join and when, ordering, memory, churn, and
leaving the map without losing a byte. Every test runs its sockets in a child cgroup with the
bypass attached there, compares bytes exactly, and reads the counters to prove what happened.
How programs see their sockets (same results as plain TCP) is tests/test_transparency.py."""

import hashlib
import os
import resource
import select
import socket
import subprocess
import threading
import time

import pytest

from netbpf import features
from netbpf.bypass import JOIN_INTERVAL, Bypass

from bypassutil import attached, joined, kept_plain, rounds
from conftest import run_in, sync, wait_for
from netutil import (PATTERN, close_all, digest_of_stream, joinable_pair, pair, receive_digest, recv_all,
                     recv_exactly, send_stream)


def echo_once(family=socket.AF_INET, host="127.0.0.1", payload=b"hello bypass"):
    """Send payload, echo it back reversed, on a pair the bypass may take."""
    srv, cli, conn = joinable_pair(family, host)
    cli.sendall(payload)
    got = recv_exactly(conn, len(payload))
    conn.sendall(got[::-1])
    back = recv_exactly(cli, len(payload))
    close_all(cli, conn, srv)
    return got, back


# --- who joins ---

@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                                          (socket.AF_INET6, "::ffff:127.0.0.1")],
                         ids=["ipv4", "ipv6", "v4-mapped"])
def test_echo_is_redirected(bypass, cg, family, host):
    payload = PATTERN[:5000]
    got, back = run_in(cg, echo_once, family, host, payload, on_sync=joined(bypass))
    assert got == payload and back == payload[::-1]
    stats = bypass.stats()
    assert stats["sockets_inserted"] == 2
    assert stats["redirected_msgs"] >= 2 and stats["redirected_bytes"] >= 2 * len(payload)
    # joined on the client's first byte (tc) or after the exchange (sweep): the server's reply
    # to a client that had not read yet took TCP, nothing else
    assert stats["passed_msgs"] == stats["passed_not_reading"] <= 1


def test_v4_mapped_client_to_plain_ipv4_server(bypass, cg):
    def exchange():
        srv, cli, conn = joinable_pair(socket.AF_INET6, "::ffff:127.0.0.1", server_host="::")
        cli.sendall(b"m" * 3000)
        got = recv_exactly(conn, 3000)
        close_all(cli, conn, srv)
        return got

    assert run_in(cg, exchange, on_sync=joined(bypass)) == b"m" * 3000
    assert bypass.stats()["redirected_bytes"] >= 3000


def test_a_writer_that_never_reads_joins_and_its_bytes_are_redirected(bypass, cg):
    """Writers join as writers: the client only sends and never reads, and its stream is
    redirected; nothing is redirected into it (its owner might read with splice) while the
    counters and `connections()` say it has not read."""
    total = 4 << 20

    def one_way():
        srv, cli, conn = pair()
        cli.settimeout(10)
        conn.settimeout(10)
        cli.sendall(b"x" * 1000)  # the first segment: both ends qualify, both join
        got = recv_exactly(conn, 1000)
        sync()
        sender = threading.Thread(target=lambda: cli.sendall(PATTERN * (total // len(PATTERN))))
        sender.start()
        got += recv_exactly(conn, total)
        sender.join()
        conn.sendall(b"never read")
        sync()
        close_all(srv, cli, conn)
        return got == b"x" * 1000 + PATTERN * (total // len(PATTERN))

    seen = {}

    def check_reading():
        ends = {conn["local"]: conn for conn in bypass.connections()}
        seen.update(reading=sorted(conn["reading"] for conn in ends.values()), owners={c["pid"] for c in ends.values()})

    steps = [joined(bypass), check_reading]
    assert run_in(cg, one_way, on_sync=lambda: steps.pop(0)()) is True
    stats = bypass.stats()
    assert stats["sockets_inserted"] == 2 and stats["redirected_bytes"] >= total // 2, repr(stats)
    assert stats["passed_not_reading"] >= 1  # the server's one message: the client never read
    assert seen["reading"] == [False, True] and len(seen["owners"]) == 1 and None not in seen["owners"]


def test_peer_outside_the_cgroup_uses_plain_tcp(bypass, cg):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    result = {}

    def serve():
        conn, _ = srv.accept()
        result["got"] = recv_exactly(conn, 10000)
        conn.sendall(b"reply from outside")
        result["rest"] = recv_all(conn)
        conn.close()

    server = threading.Thread(target=serve)
    server.start()

    def client():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as cli:
            cli.sendall(b"x" * 10000)
            reply = recv_exactly(cli, 18)
            sync()  # the client has read and is non-blocking: only its peer keeps it out
            cli.sendall(b"more")
            cli.shutdown(socket.SHUT_WR)
            return reply + recv_all(cli)

    assert run_in(cg, client, on_sync=kept_plain(bypass, peer_outside=1)) == b"reply from outside"
    server.join()
    srv.close()
    assert result == {"got": b"x" * 10000, "rest": b"more"}
    stats = bypass.stats()
    assert stats["candidates"] == 1 and stats["sockets_inserted"] == 0 and stats["redirected_msgs"] == 0
    assert stats["plain_by_reason"].get("peer_outside") == 1


def test_server_in_the_cgroup_with_a_client_outside_stays_plain(bypass, cg):
    r, w = os.pipe()

    def serve():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        os.write(w, srv.getsockname()[1].to_bytes(2, "big"))
        conn, _ = srv.accept()
        conn.settimeout(10)
        request = recv_exactly(conn, 3000)
        sync()  # read and non-blocking: only its peer keeps it out
        conn.sendall(request[::-1])
        conn.sendall(recv_all(conn)[::-1])
        close_all(conn, srv)

    server = threading.Thread(target=run_in, args=(cg, serve), kwargs={"on_sync": kept_plain(bypass, peer_outside=1)})
    server.start()
    port = int.from_bytes(os.read(r, 2), "big")
    with socket.create_connection(("127.0.0.1", port)) as cli:
        cli.sendall(b"abc" * 1000)
        assert recv_exactly(cli, 3000) == b"cba" * 1000
        cli.sendall(b"def" * 1000)
        cli.shutdown(socket.SHUT_WR)
        assert recv_all(cli) == b"fed" * 1000
    server.join()
    stats = bypass.stats()
    assert stats["candidates"] == 1 and stats["sockets_inserted"] == 0


def full_duplex_blocking_reader(port, rounds):
    """Each round: one thread blocks in recv() while another sends 4 MiB on the same socket; the
    peer reads it, answers and closes. The first connection waits in sync() before it sends, so
    that the agent meets it open however fast the rounds go. Returns how many blocking recv()
    calls failed with EAGAIN."""
    eagain = 0
    for n in range(rounds):
        conn = socket.create_connection(("127.0.0.1", port))
        if n == 0:
            sync()
        sender = threading.Thread(target=conn.sendall, args=(PATTERN * 4,))
        sender.start()
        try:
            while conn.recv(100):
                pass
        except BlockingIOError:
            eagain += 1
        sender.join()
        conn.close()
    return eagain


def slow_peer(srv, rounds):
    for _ in range(rounds):
        conn, _ = srv.accept()
        conn.settimeout(30)  # an event-driven peer: it would join
        recv_exactly(conn, 4 << 20)
        conn.sendall(b"done")
        conn.close()


@pytest.mark.slow
def test_a_blocking_reader_whose_socket_sends_meanwhile_never_sees_eagain(cg):
    """Both ends in the cgroup; the client reads blocking while its other thread sends 4 MiB.
    Before netbpf kept blocking readers plain, the ACKs of its own TCP-path sends woke it with
    nothing queued and tcp_bpf returned EAGAIN (about 30 of 100 rounds with a 256 KiB queue limit)."""

    def both_in_cgroup():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(128)
        peer = threading.Thread(target=slow_peer, args=(srv, 100))
        peer.start()
        eagain = full_duplex_blocking_reader(srv.getsockname()[1], 100)
        peer.join()
        srv.close()
        return eagain

    with attached(cg, queue_floor=256 << 10) as bypass:
        assert run_in(cg, both_in_cgroup, on_sync=kept_plain(bypass, blocking=1)) == 0
        stats = bypass.stats()
        assert stats["sockets_inserted"] == 0 and stats["plain_by_reason"].get("blocking", 0) >= 1


def test_connections_from_before_the_attach_join_too(cg):
    """The agent finds the sockets of the cgroup wherever they come from: a connection made
    before the attach joins as a new one does."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def early_and_late():
        early = joinable_pair()  # no bypass yet: sync() returns at once
        os.write(ready_w, b"x")
        os.read(go_r, 1)  # the bypass is attached now
        sync()  # until both pairs joined
        late = joinable_pair()
        for _, a, b in (early, late):
            a.sendall(b"after attach")
            assert recv_exactly(b, 12) == b"after attach"
        close_all(*early, *late)

    steps = [lambda: None]  # the early pair's sync()
    t = threading.Thread(target=run_in, args=(cg, early_and_late), kwargs={"on_sync": lambda: steps.pop(0)()})
    t.start()
    os.read(ready_r, 1)
    with attached(cg) as bypass:
        steps += [joined(bypass, 2), joined(bypass, 4)]
        os.write(go_w, b"x")
        t.join()
        stats = bypass.stats()
        assert stats["candidates"] == 4 and stats["sockets_inserted"] == 4
        assert stats["redirected_msgs"] == 2


def test_scope_loopback_ignores_a_host_address_and_host_scope_takes_it(cg, host_ipv4):
    for scope, expect in (("loopback", 0), ("host", 2)):
        with attached(cg, scope=scope) as bypass:
            wait = joined(bypass) if expect else None
            got, back = run_in(cg, echo_once, socket.AF_INET, host_ipv4, on_sync=wait)
            assert got == b"hello bypass"
            assert bypass.stats()["sockets_inserted"] == expect, scope
            assert bypass.stats()["candidates"] == expect, scope


def test_ports_allowlist_limits_which_connections_join(cg):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        allowed = probe.getsockname()[1]

    def two_connections():
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", allowed))
        srv.listen()
        a = socket.create_connection(("127.0.0.1", allowed))
        a_conn, _ = srv.accept()
        srv2, b, b_conn = pair()
        sync()  # the agent looks at both connections
        close_all(a, a_conn, srv, srv2, b, b_conn)

    with attached(cg, ports=[allowed]) as bypass:
        run_in(cg, two_connections, on_sync=rounds(bypass))
        assert bypass.stats()["candidates"] == 2  # both ends of the connection on `allowed`


def test_attaching_twice_to_one_cgroup_is_refused(bypass, cg):
    from netbpf.errors import UsageError

    with pytest.raises(UsageError, match="already attached"):
        Bypass(str(cg.path)).attach()


@pytest.mark.parametrize("value", [-1, 1 << 31])
def test_queue_floor_out_of_range_is_refused(cg, value):
    from netbpf.errors import UsageError

    with pytest.raises(UsageError, match="queue-floor"):
        Bypass(str(cg.path), queue_floor=value)


# --- ordering at join and under fallback ---

@pytest.mark.slow
def test_tcp_data_unread_at_join_is_never_overtaken(bypass, cg):
    """The server end joins while data that went the TCP way is still unread; sends after the
    join must wait on the TCP path until it is read, because the receiver drains redirected data
    first."""

    def many():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1024)
        bad = 0
        for i in range(200):
            cli = socket.create_connection(srv.getsockname())
            conn, _ = srv.accept()
            first, second, third = ([b"%d:%d;" % (i, part) for part in range(k, k + 20)] for k in (0, 20, 40))
            for piece in first:  # before either end can join
                cli.sendall(piece)
            conn.sendall(b"!")
            recv_exactly(cli, 1)
            head = recv_exactly(conn, 7)  # read a little of the TCP-path data, leave the rest
            cli.settimeout(10)
            conn.settimeout(10)
            sync()  # both ends have read and are non-blocking: they join now
            for piece in second:  # TCP-path data is unread: these must not overtake it
                cli.sendall(piece)
            middle = recv_exactly(conn, len(b"".join(first + second)) - 7)
            for piece in third:  # everything read: the bypass may take over
                cli.sendall(piece)
            cli.shutdown(socket.SHUT_WR)
            if head + middle + recv_all(conn) != b"".join(first + second + third):
                bad += 1
            close_all(cli, conn)
        srv.close()
        return bad

    state = {"joined": 0}

    def both_joined():
        state["joined"] += 2
        assert wait_for(lambda: bypass.stats()["sockets_inserted"] >= state["joined"])

    assert run_in(cg, many, on_sync=both_joined) == 0
    stats = bypass.stats()
    assert stats["sockets_inserted"] == 400
    assert stats["passed_unread_plain"] > 0  # sends held back while TCP-path data was unread
    assert stats["redirected_msgs"] > 0  # and the bypass took over once it was read


@pytest.mark.slow
def test_one_gib_through_many_connections_with_a_slow_reader(bypass, cg):
    connections, per_connection = 16, 64 << 20

    def bulk():
        pairs = [joinable_pair() for _ in range(connections)]
        results = [None] * connections

        def one(i):
            srv, cli, conn = pairs[i]
            sender = threading.Thread(target=send_stream, args=(cli, per_connection, i))
            sender.start()
            results[i] = receive_digest(conn, i, slow=(i % 2 == 0))
            sender.join()
            close_all(srv, cli, conn)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    state = {"pairs": 0}

    def pair_joined():
        state["pairs"] += 1
        joined(bypass, 2 * state["pairs"])()

    results = run_in(cg, bulk, on_sync=pair_joined)
    for i, (total, digest) in enumerate(results):
        assert total == per_connection, i
        assert digest == digest_of_stream(per_connection, i), i
    stats = bypass.stats()
    assert stats["redirected_bytes"] > connections * per_connection // 10
    assert stats["passed_peer_full"] > 0  # the slow readers pushed senders onto TCP and back


# --- many connections, churn ---

@pytest.mark.slow
def test_500_concurrent_connections(bypass, cg):
    def concurrent():
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        pairs = [joinable_pair() for _ in range(500)]
        ok = 0
        for i, (_, cli, conn) in enumerate(pairs):
            cli.sendall(b"%06d" % i * 100)
        for i, (_, cli, conn) in enumerate(pairs):
            ok += recv_exactly(conn, 600) == b"%06d" % i * 100
        for trio in pairs:
            close_all(*trio)
        return ok

    state = {"pairs": 0}

    def pair_joined():
        state["pairs"] += 1
        if state["pairs"] == 500:
            joined(bypass, 1000, timeout=20)()

    assert run_in(cg, concurrent, on_sync=pair_joined) == 500
    stats = bypass.stats()
    assert stats["sockets_inserted"] == 1000 and stats["redirected_msgs"] == 500


def test_sockets_in_the_map_while_open_and_gone_after_close(bypass, cg):
    def hold():
        socks = [joinable_pair() for _ in range(10)]
        sync()  # the parent looks at the map
        for trio in socks:
            close_all(*trio)

    seen = []

    def look():
        joined(bypass, min(20, 2 * len(seen) + 2))()
        seen.append((bypass.stats()["sockets"], len(bypass.obj.maps["sock_info"])))

    run_in(cg, hold, on_sync=look)
    assert seen[-1] == (20, 20)
    assert wait_for(lambda: bypass.stats()["sockets"] == 0 and len(bypass.obj.maps["sock_info"]) == 0)


@pytest.mark.slow
def test_10000_short_connections_stay_plain_and_leave_the_maps_empty(bypass, cg):
    """connect, one request and reply, close: over before the agent looks, so nothing joins and
    a short connection costs nothing at all."""

    def churn():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(128)
        for _ in range(10000):
            cli = socket.create_connection(srv.getsockname())
            conn, _ = srv.accept()
            cli.sendall(b"ping")
            conn.recv(4)
            conn.sendall(b"pong")
            cli.recv(4)
            cli.close()
            conn.close()
        srv.close()

    run_in(cg, churn)
    assert wait_for(lambda: bypass.stats()["sockets"] == 0 and len(bypass.obj.maps["sock_info"]) == 0)
    stats = bypass.stats()
    assert stats["sockets_inserted"] == 0 and stats["candidates"] < 2000  # the agent saw a few at most


# --- memory: the redirect path has no backpressure of its own ---

# TCP's memory count in /proc/net/sockstat lags the truth by up to 1 MiB per CPU: each CPU batches
# its charges (SK_MEMORY_PCPU_RESERVE, sk_memory_allocated_add(), since 5.19). A growth is two
# readings, and the test compares two growths.
SOCKSTAT_SLACK = 4 * (os.cpu_count() or 1) << 20


def sockstat_tcp_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    raise AssertionError("no TCP line in /proc/net/sockstat")


def flood_never_reading_peer(seconds=2.0):
    """Send non-blocking into a peer that never reads; return (bytes the sender got queued,
    growth of TCP memory in /proc/net/sockstat, the receiver's SO_RCVBUF plus the sender's
    SO_SNDBUF, read back intact)."""
    srv, cli, conn = joinable_pair()
    buffers = conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), cli.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    cli.setblocking(False)
    before, sent, expected = sockstat_tcp_pages(), 0, hashlib.sha256()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sent < 512 << 20:
        try:
            n = cli.send(PATTERN[:65536])
        except BlockingIOError:
            if not select.select([], [cli], [], 0.5)[1]:
                break  # full, and it stays full: the peer never reads
            continue
        expected.update(PATTERN[:n])
        sent += n
    grown = (sockstat_tcp_pages() - before) * 4096
    # read it all back: nothing lost, nothing reordered
    h, got = hashlib.sha256(), 0
    while got < sent:
        chunk = conn.recv(1 << 20)
        h.update(chunk)
        got += len(chunk)
    close_all(srv, cli, conn)
    return sent, grown, buffers, h.hexdigest() == expected.hexdigest()


def test_a_reader_that_never_reads_cannot_eat_host_memory(bypass, cg):
    """DESIGN: a bare sk_msg redirect queued 300 MiB in 0.8 s into a peer that never read.
    With the bypass a sender may queue what plain TCP lets it queue plus the peer's queue limit:
    what TCP itself lets a writer have on its way (its send buffer and the receive buffer),
    which does not grow while the peer does not read."""
    plain_sent, plain_grown, _, plain_intact = flood_never_reading_peer()  # this process: no bypass
    sent, grown, (rcvbuf, sndbuf), intact = run_in(cg, flood_never_reading_peer, on_sync=joined(bypass))
    queue_limit = max(rcvbuf, bypass.queue_floor) + sndbuf
    print(f"\nnever-reading peer: plain TCP queued {plain_sent} B (sockstat +{plain_grown} B); "
          f"bypass queued {sent} B (sockstat +{grown} B); queue limit {queue_limit} B")
    assert plain_intact and intact
    assert sent <= plain_sent + queue_limit + (1 << 20), (sent, plain_sent)
    assert grown <= plain_grown + queue_limit + SOCKSTAT_SLACK, (grown, plain_grown)
    stats = bypass.stats()
    assert stats["passed_peer_full"] > 0 and stats["redirected_bytes"] > 0


# --- leaving the map: stop redirecting, let the reader drain, then remove ---

def netbpf_objects():
    """Names of the BPF programs and maps in the kernel that belong to the bypass."""
    names = set()
    for kind in ("prog", "map"):
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True).stdout
        import json

        names |= {entry.get("name", "") for entry in json.loads(out or "[]")}
    ours = {"bypass_sk_msg", "bypass_msg_read", "bypass_join", "bypass_splice", "bypass_splice_r", "bypass_sendfile",
            "sock_map", "sock_info",
            "listeners", "spliced_service", "bypass.rodata", "control", "allowed_ports", "host_addrs"}
    return names & ours


def unread_redirected_then_read(size=256 << 10):
    """A pair joins, the client sends `size` bytes that are redirected to a server end that has
    not read them, then sync() lets the parent act (detach, ...); only then the server reads.
    Returns (whether it read every byte, what a later exchange carried)."""
    srv, cli, conn = joinable_pair()
    cli.sendall(PATTERN[:size])
    sync()
    got = recv_exactly(conn, size)
    cli.sendall(b"after")
    after = recv_exactly(conn, 5)
    close_all(srv, cli, conn)
    return got == PATTERN[:size], after


def test_detach_with_unread_redirected_data_loses_nothing_and_leaves_nothing(cg):
    """Leaving the map while redirected data waits drops it (256 KiB seen lost on 6.18). detach
    stops redirecting at once, waits until the reader has taken its data, then removes the
    socket; once the last one is out, nothing of the bypass is left in the kernel."""
    closer = {}
    with attached(cg) as bypass:
        def detach_while_unread():
            closer["thread"] = threading.Thread(target=bypass.close)
            closer["thread"].start()
            assert wait_for(lambda: bypass.obj is None or bypass.obj.maps["control"][0].detaching)

        steps = [joined(bypass), detach_while_unread]
        ok, after = run_in(cg, unread_redirected_then_read, on_sync=lambda: steps.pop(0)())
        closer["thread"].join()
        assert ok and after == b"after"
        assert bypass.obj is None and bypass.still_draining == []
    assert wait_for(lambda: netbpf_objects() == set())


def test_a_joined_socket_that_turns_blocking_leaves_after_its_queue_is_read(bypass, cg):
    def run():
        srv, cli, conn = joinable_pair()
        cli.sendall(PATTERN[:100000])  # redirected, unread
        conn.setblocking(True)  # from now on tcp_bpf would show it EAGAIN on a signal
        sync()  # the parent sees it leaving but not out: its queue is unread
        got = recv_exactly(conn, 100000)
        sync()  # now it can leave
        cli.sendall(b"plain again")
        got += recv_exactly(conn, 11)
        close_all(srv, cli, conn)
        return got

    seen = []

    def leaving_but_in():
        assert wait_for(lambda: any(c["state"] == "leaving" for c in bypass.connections()))
        seen.append(bypass.stats()["sockets"])

    def left():
        assert wait_for(lambda: bypass.stats()["sockets_left"] == 1)
        seen.append(bypass.stats()["sockets"])

    steps = [joined(bypass), leaving_but_in, left]
    look = lambda: steps.pop(0)()  # noqa: E731

    assert run_in(cg, run, on_sync=look) == PATTERN[:100000] + b"plain again"
    assert seen == [2, 1]
    stats = bypass.stats()
    assert stats["left_by_reason"] == {"blocking": 1}
    assert stats["passed_no_peer"] >= 1  # "plain again" took TCP: its receiver is out


@pytest.mark.slow
def test_detach_while_connections_carry_data_loses_nothing(cg):
    r, w = os.pipe()
    total = 256 << 20
    box = {}

    def transfer():
        pairs = [joinable_pair() for _ in range(4)]
        results = []

        def one(i):
            srv, cli, conn = pairs[i]
            sender = threading.Thread(target=send_stream, args=(cli, total // 4, 100 + i))
            sender.start()
            results.append((i, receive_digest(conn, 100 + i, slow=True)))
            sender.join()
            close_all(srv, cli, conn)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        os.write(w, b"x")  # the parent detaches once data flows through the bypass
        for t in threads:
            t.join()
        return results

    with attached(cg) as bypass:
        box["count"] = 0

        def pair_joined():
            box["count"] += 1
            joined(bypass, 2 * box["count"])()

        t = threading.Thread(target=lambda: box.update(results=run_in(cg, transfer, on_sync=pair_joined)))
        t.start()
        os.read(r, 1)
        assert wait_for(lambda: bypass.stats()["redirected_bytes"] >= 16 << 20, 60)
        redirected_before = bypass.stats()["redirected_bytes"]
    t.join()
    assert redirected_before > 0 and bypass.still_draining == []
    for i, (count, digest) in box["results"]:
        assert count == total // 4 and digest == digest_of_stream(total // 4, 100 + i)
    assert wait_for(lambda: netbpf_objects() == set())


# --- both ends or neither, and the agent's bookkeeping ---

class SockmapOfThree(Bypass):
    """A bypass whose sockhash takes three sockets: the fourth insert fails."""

    def _prepare(self, obj):
        super()._prepare(obj)
        obj.maps["sock_map"].max_entries = 3


def test_when_one_end_cannot_join_its_peer_leaves_the_map_too(cg):
    """Two pairs, room for three sockets: one pair joins, one end of the other joins and its
    peer's insert fails. That lone end leaves again (no half-bypassed connection), and both
    connections carry every byte."""
    with SockmapOfThree(str(cg.path), drain_timeout=5.0) as bypass:
        syncs = []

        def settled():
            syncs.append(1)
            if len(syncs) < 2:
                return  # the first pair is ready; the second one is set up next

            def done():
                stats = bypass.stats()
                return (stats["insert_failed"] == 1 and stats["left_by_reason"] == {"insert_failed": 1}
                        and stats["sockets"] == 2)

            assert wait_for(done, 20), bypass.stats()

        def two_pairs():
            pairs = [joinable_pair() for _ in range(2)]
            got = []
            for srv, cli, conn in pairs:
                cli.sendall(PATTERN[:100000])
                got.append(recv_exactly(conn, 100000) == PATTERN[:100000])
                conn.sendall(b"back")
                got.append(recv_exactly(cli, 4) == b"back")
                close_all(cli, conn, srv)
            return got

        assert run_in(cg, two_pairs, on_sync=settled) == [True] * 4
        assert bypass.stats()["sockets_inserted"] == 3


def test_a_closed_listener_leaves_the_listeners_map(bypass, cg):
    """sockops notes a listener when it starts listening; the agent's next round forgets it
    once it is closed."""

    def listen_then_close():
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        sync()
        srv.close()

    seen = {}

    def listed():
        assert wait_for(lambda: len(bypass.obj.maps["listeners"]) == 1, 10)
        bypass.tick()
        seen["ports"] = set(bypass.obj.maps["listeners"])

    run_in(cg, listen_then_close, on_sync=listed)
    assert len(seen["ports"]) == 1  # still listening at that round
    bypass.tick()
    assert len(bypass.obj.maps["listeners"]) == 0


def test_blocking_readers_join_by_default_only_where_the_kernel_reads_them_as_tcp(cg):
    """The default follows the probe (kernel/patches make it true); the flag overrides it."""
    with attached(cg) as default:
        assert default.obj.rodata.allow_blocking == int(features.blocking_reads_like_tcp())
    with attached(cg, allow_blocking_readers=True) as allowed:
        assert allowed.obj.rodata.allow_blocking == 1


def exchange_both_ways():
    srv, cli, conn = joinable_pair()
    cli.sendall(PATTERN[:4096])
    got = recv_exactly(conn, 4096)
    conn.sendall(got)
    back = recv_exactly(cli, 4096)
    close_all(srv, cli, conn)
    return back == PATTERN[:4096]


def test_without_its_agent_for_a_minute_the_bypass_joins_and_redirects_nothing(cg):
    """Programs can outlive a killed agent (pins; a netlink tc filter on kernels before 6.6):
    they then stop, rather than run with no one to take out sockets that turn blocking."""
    with attached(cg) as bypass:
        bypass._agent_stop.set()  # the agent thread ends, as a killed agent would
        bypass._agent.join()
        control = bypass.obj.maps["control"]

        def agent_seen(seconds_ago):
            control[0] = control[0]._replace(agent_seen_ns=time.monotonic_ns() - seconds_ago * 10**9)

        def joined_by_a_live_agent():
            agent_seen(0)
            # the agent thread is gone: the test runs the sweep's rounds (the join where tc is refused)
            assert wait_for(lambda: bypass.tick() and bypass.stats()["sockets"] == 2, 20), bypass.stats()

        def joined_then_agent_lost():
            joined_by_a_live_agent()
            agent_seen(61)

        agent_seen(61)
        assert run_in(cg, exchange_both_ways) is True
        stats = bypass.stats()
        assert stats["sockets"] == 0 and stats["redirected_msgs"] == 0 and stats["inserted_by_event"] == 0, stats
        assert run_in(cg, exchange_both_ways, on_sync=joined_then_agent_lost) is True
        stats = bypass.stats()
        assert stats["redirected_msgs"] == 0 and stats["passed_detaching"] >= 2, stats  # in the map, yet plain
        assert run_in(cg, exchange_both_ways, on_sync=joined_by_a_live_agent) is True
        assert bypass.stats()["redirected_msgs"] >= 2


def test_an_idle_agent_still_says_it_runs(cg):
    """With nothing to join the agent runs no sweep rounds, only cheap counts: those must keep
    the programs going, or the first connection after a quiet minute would not join."""
    with attached(cg) as bypass:
        control = bypass.obj.maps["control"]
        assert wait_for(lambda: control[0].round >= 1)  # the first round, after attach, is done
        time.sleep(2 * JOIN_INTERVAL)  # and the agent idles: no connection, nothing tracked
        stale = time.monotonic_ns() - 61 * 10**9
        control[0] = control[0]._replace(agent_seen_ns=stale)
        assert wait_for(lambda: control[0].agent_seen_ns > stale + 60 * 10**9, timeout=10)
        assert run_in(cg, exchange_both_ways, on_sync=joined(bypass)) is True
        assert bypass.stats()["redirected_msgs"] >= 1
