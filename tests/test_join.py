# SPDX-License-Identifier: MIT
"""How and when sockets join: the mechanisms this kernel takes, the join at the first segment
(tc on lo), and connections between two network namespaces (pods on one node).

NETBPF_REFUSE (netbpf.mechanisms) makes the bypass treat mechanisms as refused: CI runs the
bypass tests once per fallback, so that each join path is tested on every kernel."""

import os
import socket
import subprocess
import time

import pytest

from netbpf import mechanisms
from netbpf.bypass import SEND, SWEEP

from bypassutil import attached, joined, rounds
from clitools import bpf_loaded, run_cli
from conftest import run_in, sync, wait_for
from netutil import PATTERN, close_all, pair, recv_exactly
from pods import Pods

REFUSED = mechanisms.forced_refusals()


def test_the_bypass_loads_on_this_kernel_and_says_how_sockets_join(bypass):
    """A bypass that does not load is a failure, never a skip: some sweep always loads, and the
    tc join wherever nothing refuses it."""
    join = bypass.mechanisms()
    assert join["sweep"] in {alt.name for alt in SWEEP.alternatives} - REFUSED
    assert set(join["refused"]) >= REFUSED & {"tc", "iter/task_file", "iter/tcp"}
    for name, why in join["refused"].items():
        assert why.startswith(("verifier: ", "load refused before the verifier ran: ", "attach: ",
                               "refused by NETBPF_REFUSE")), (name, why)
    if "tc" not in REFUSED:
        assert join["event"] == "tc" and join["tc_attach"] in ("tcx", "tc_filter"), join
    assert bypass.feature_notes()[0].startswith("sockets join ")


def kernel_has_function(name):
    with open("/proc/kallsyms") as symbols:
        return any(line.split()[2] == name for line in symbols)


def test_the_send_program_reads_its_peer_directly_where_the_kernel_can(bypass):
    """bypass_sk_msg loads its peer's fields through bpf_rdonly_cast(); a kernel without that
    kfunc refuses it and gets bypass_msg_read, which reads them by helper."""
    join = bypass.mechanisms()
    assert join["sk_msg"] in {alt.name for alt in SEND.alternatives} - REFUSED, join
    if "sk_msg/direct" not in REFUSED and kernel_has_function("bpf_rdonly_cast"):
        assert join["sk_msg"] == "sk_msg/direct", join["refused"]
    in_use = next(alt.program for alt in SEND.alternatives if alt.name == join["sk_msg"])
    assert bypass.send_program.name == in_use
    assert bypass.links["sk_msg"].info()["prog_id"] == bypass.send_program.id


def test_splice_readers_are_watched_by_fentry_where_the_kernel_permits_it(bypass):
    """An fentry program on tcp_splice_read sees splice and sendfile readers at no cost to other
    syscalls; where the kernel refuses it (or NETBPF_REFUSE does), the two syscall tracepoints
    are attached instead, and the status says which."""
    join = bypass.mechanisms()
    watch_links = {name for name in ("splice_read", "splice", "sendfile") if name in bypass.links}
    if "fentry" in join["refused"]:
        assert join["splice_watch"] == "tracepoint" and watch_links == {"splice", "sendfile"}, join
        assert "fentry" not in REFUSED or join["refused"]["fentry"] == "refused by NETBPF_REFUSE"
    else:
        assert join["splice_watch"] == "fentry" and watch_links == {"splice_read"}, join
        assert bypass.links["splice_read"].info()["type"] == "tracing"
    assert bypass.feature_notes()[0].endswith("splice readers seen by " + ("fentry on tcp_splice_read"
                                              if join["splice_watch"] == "fentry" else
                                              "the splice and sendfile syscall tracepoints"))


def test_where_no_sweep_loads_attach_is_one_line_exit_2_and_leaves_nothing(cg, pin_dir):
    env = dict(os.environ, NETBPF_REFUSE=",".join(alt.name for alt in SWEEP.alternatives))
    result = run_cli("bypass", "attach", "--cgroup", cg.path, "--pin-dir", pin_dir / "b", env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "takes no sweep program" in lines[0] and "iter/tcp" in lines[0], lines
    assert not bpf_loaded("bypass_") and not (pin_dir / "b").exists()
    assert not subprocess.run(["tc", "filter", "show", "dev", "lo", "ingress"], capture_output=True,
                              text=True).stdout.strip()


def echo(cli, conn, i):
    """The i-th 1 KiB of PATTERN from cli to conn and back; whether it came back intact."""
    message = PATTERN[i * 1024:(i + 1) * 1024]
    cli.sendall(message)
    conn.sendall(recv_exactly(conn, 1024))
    return recv_exactly(cli, 1024) == message


def paced_exchange(rounds, interval, check_at):
    """A non-blocking pair exchanging 1 KiB each way every `interval` seconds; sync() after
    round `check_at` (the parent looks at the map). Returns how many rounds echoed intact."""
    srv, cli, conn = pair()
    cli.settimeout(10)
    conn.settimeout(10)
    ok = 0
    for i in range(rounds):
        ok += echo(cli, conn, i)
        if i + 1 == check_at:
            sync()
        time.sleep(interval)
    close_all(srv, cli, conn)
    return ok


@pytest.mark.skipif("tc" in REFUSED, reason="the tc join is refused here (NETBPF_REFUSE): only the sweep joins")
def test_a_connection_joins_before_its_tenth_round_trip(bypass, cg):
    """1 ms between round trips: joined at the first segment after both ends qualify, long
    before an agent round (20 ms at best) would come."""
    seen = {}

    def look():
        seen["sockets"] = bypass.stats()["sockets"]

    assert run_in(cg, paced_exchange, 30, 0.001, 9, on_sync=look) == 30
    assert seen["sockets"] == 2, seen  # in the map by the 9th round trip
    stats = bypass.stats()
    assert stats["inserted_by_event"] == 2 and stats["redirected_msgs"] >= 2 * 20, stats


def trade(sock, mine, theirs, rounds):
    """Send `mine` and read back `theirs`, `rounds` times; whether every read was intact."""
    intact = True
    for _ in range(rounds):
        sock.sendall(mine)
        intact &= recv_exactly(sock, len(theirs)) == theirs
    return intact


def first_messages_both_ways_at_once(count, rounds=3):
    """`count` non-blocking pairs; a second process holds the server ends, and both processes
    start their sends at the same instant, so that the two ends' first segments (each a chance
    for the tc program to join the pair) are handled on both CPUs at once. Returns how many
    pairs traded every round intact (-1 where the server ends did not)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(512)
    pairs = []
    for _ in range(count):
        cli = socket.socket()
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
        cli.settimeout(10)
        conn.settimeout(10)
        pairs.append((cli, conn))
    go_r, go_w = os.pipe()
    server = os.fork()
    if server == 0:
        os.read(go_r, 1)
        ok = all([trade(conn, b"s" * 100, b"c" * 100, rounds) for _, conn in pairs])  # every pair, even after a failure
        os._exit(0 if ok else 1)
    os.write(go_w, b"!")
    intact = sum(trade(cli, b"c" * 100, b"s" * 100, rounds) for cli, _ in pairs)
    _, status = os.waitpid(server, 0)
    close_all(srv, *(end for ends in pairs for end in ends))
    return intact if status == 0 else -1


@pytest.mark.skipif("tc" in REFUSED, reason="the tc join is refused here (NETBPF_REFUSE): only the sweep joins")
def test_both_ends_met_at_once_join_once(bypass, cg):
    """The tc program meets a pair on both CPUs at once (segments either way), and the sweep may
    meet it too: the kernel refuses a second insert of a socket (EBUSY), so exactly one of them
    may insert each socket. None fails, and every pair joins whole."""
    count = 200
    assert run_in(cg, first_messages_both_ways_at_once, count) == count
    stats = bypass.stats()
    assert stats["insert_failed"] == 0, stats
    assert stats["sockets_inserted"] == 2 * count and stats["redirected_msgs"] > 0, stats


def an_end_away_from_every_file_table(messages=20):
    """A pair that has joined (first sync); its client end then travels in an SCM_RIGHTS message,
    in no process's file table, while the agent does its rounds (second sync), and comes back.
    Returns how many of `messages` echoes after its return came back intact."""
    srv, cli, conn = pair()
    cli.settimeout(10)
    conn.settimeout(10)
    cli.sendall(b"hello")
    conn.sendall(recv_exactly(conn, 5))
    recv_exactly(cli, 5)
    sync()
    away, home = socket.socketpair(socket.AF_UNIX)
    socket.send_fds(away, [b"fd"], [cli.fileno()])
    cli.close()
    sync()
    _, fds, _, _ = socket.recv_fds(home, 2, 1)
    cli = socket.socket(fileno=fds[0])
    ok = sum(echo(cli, conn, i) for i in range(messages))
    sync()
    close_all(srv, cli, conn, away, home)
    return ok


def test_a_joined_socket_away_from_every_file_table_stays_joined(bypass, cg):
    """A joined socket that the sweep cannot find for a while (iter/task_file walks file tables;
    this one is in flight in an SCM_RIGHTS message) keeps its entry while it is in the sockhash:
    a new entry would insert it again, which the kernel refuses (EBUSY), and the pair would
    leave the bypass with one end stranded in the map."""
    seen = {}
    steps = [joined(bypass), rounds(bypass, 3), lambda: seen.update(bypass.stats())]
    assert run_in(cg, an_end_away_from_every_file_table, 20, on_sync=lambda: steps.pop(0)()) == 20
    assert seen["insert_failed"] == 0 and seen["sockets"] == 2, seen
    assert seen["redirected_msgs"] >= 2 * 20, seen


def ports_of_an_open_pair():
    """A pair that stays open over sync(); returns the ports of both ends."""
    srv, cli, conn = pair()
    ports = (cli.getsockname()[1], conn.getsockname()[1])
    sync()
    close_all(srv, cli, conn)
    return ports


def test_the_tc_program_knows_the_cgroups_ports_and_forgets_closed_ones(bypass, cg):
    """The tc program runs on every loopback segment of the namespace, and leaves at once a
    segment to a port that no connection of the cgroup has: sockops counts each connection's
    local port in when it establishes and out when it closes. This process is outside the
    cgroup: its pair counts nothing."""
    counts = bypass.obj.maps["cgroup_ports"]
    srv, cli, conn = pair()
    outside = (cli.getsockname()[1], conn.getsockname()[1])
    seen = {}

    def look():
        seen.update({port: count for port, count in counts.items() if count})

    inside = run_in(cg, ports_of_an_open_pair, on_sync=look)
    close_all(srv, cli, conn)
    assert seen == {inside[0]: 1, inside[1]: 1}, (seen, inside, outside)
    assert wait_for(lambda: [counts[port] for port in inside] == [0, 0], 5), [counts[port] for port in inside]


# --- two network namespaces joined by a veth pair: pods on one node ---

def across_namespaces(pods, total):
    """The server in the first namespace, the client in the second (a process each, both in the
    test's cgroup); the client streams `total` bytes and the server echoes a digest-sized reply.
    Returns (bytes the server got intact, reply)."""
    import hashlib

    ready_r, ready_w = os.pipe()
    server = os.fork()
    if server == 0:
        status = 1
        try:
            pods.enter(0)
            srv = socket.socket()
            srv.bind((pods.addresses[0], 0))
            srv.listen()
            os.write(ready_w, srv.getsockname()[1].to_bytes(2, "big"))
            conn, _ = srv.accept()
            conn.settimeout(30)
            digest, got = hashlib.sha256(), 0
            while got < total:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            conn.sendall(digest.digest())
            recv_exactly(conn, 1)
            close_all(conn, srv)
            status = 0
        finally:
            os._exit(status)
    pods.enter(1)
    port = int.from_bytes(os.read(ready_r, 2), "big")
    cli = socket.create_connection((pods.addresses[0], port), timeout=30)
    cli.sendall(b"\0" * 1024)
    payload = (PATTERN * (total // len(PATTERN) + 1))[:total - 1024]
    sync()  # the parent waits until the sweep joined both ends (they qualify once the server reads)
    cli.sendall(payload)
    reply = recv_exactly(cli, 32)
    cli.sendall(b"\1")
    cli.close()
    _, status = os.waitpid(server, 0)
    assert status == 0
    return reply == hashlib.sha256(b"\0" * 1024 + payload).digest()


def test_a_connection_between_two_network_namespaces_is_redirected_intact(cg):
    """The DaemonSet's case: pods on one node talk over a veth pair, each in its own network
    namespace. Only the sweep sees them (tc on the host's lo does not), in every namespace the
    cgroup's processes live in."""
    total = 64 << 20
    with Pods() as pods, attached(cg, scope="all", allow_blocking_readers=False) as bypass:
        assert run_in(cg, across_namespaces, pods, total, on_sync=joined(bypass)) is True
        stats = bypass.stats()
    assert stats["sockets_inserted"] == 2 and stats["inserted_by_event"] == 0
    assert stats["paired_by_handshake"] == 1 and stats["conflicts"] == 0, stats  # the nonce proved the pair
    # a writer faster than its reader fills the reader's queue limit, and then takes TCP until
    # the reader has caught up (the order of the bytes): at least that limit went the short way
    assert stats["redirected_bytes"] >= 1 << 20, repr(stats)
