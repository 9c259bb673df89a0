# SPDX-License-Identifier: MIT
"""Isolation: a connection's bytes reach only its own peer, whatever another process builds.

Addresses, ports and network namespaces are things any local user can make: an unprivileged
user namespace (`unshare -Urn`) gives a network namespace whose lo may carry this host's own
address, and TCP pairs there may have the exact tuple of a bypassed connection. Each test here
runs such an impostor in the bypassed cgroup beside a victim connection, in both orders, and
checks that not one byte crosses, that the victim's stream arrives whole and in order, and that
the victim stays in the bypass, its bytes redirected."""

import os
import socket
import time

import pytest

from netbpf import netns

from bypassutil import attached
from conftest import run_in, sync, wait_for
from impostor import become_unprivileged_netns_owner, impostor, replay_nonce
from netutil import PATTERN, close_all, recv_exactly
from pods import Pods

STREAM_SECONDS = 3.0
MESSAGE = b"VICTIM-%08d\n"  # 16 bytes, numbered: the reader sees a gap, a repeat, a stranger
MESSAGE_SIZE = len(MESSAGE % 0)


def serve_numbered(host, namespace, port_w, result_w):
    """The victim's server end (a forked child, in `namespace` when given): takes one
    connection, answers its first message, then reads numbered messages to EOF; writes how many
    came in order, and the first bytes of anything else."""
    try:
        if namespace:
            netns.enter(namespace)
        srv = socket.socket()
        srv.bind((host, 0))
        srv.listen(8)
        os.write(port_w, srv.getsockname()[1].to_bytes(2, "big"))
        conn, _ = srv.accept()
        conn.settimeout(10)  # non-blocking, as event-driven servers are: it may join
        assert recv_exactly(conn, MESSAGE_SIZE) == MESSAGE % 0
        conn.sendall(b"ok")
        expected, stray = 1, b""
        while data := recv_exactly(conn, MESSAGE_SIZE):
            if data != MESSAGE % expected:
                stray = data + conn.recv(48)
                break
            expected += 1
        os.write(result_w, f"{expected} {stray.hex()}".encode())
        close_all(conn, srv)
    finally:
        os._exit(0)


def victim_beside_impostor(server_host, client_host, impostor_first, server_ns=None, client_ns=None):
    """In the bypassed cgroup: a victim connection client_host:E -> server_host:P (the server end
    a child process, each end in its namespace when given), non-blocking, joined (sync: the
    parent waits for it), streaming numbered messages for STREAM_SECONDS while another child,
    in a network namespace of its own, builds pairs with the exact tuple (impostor_first: one
    long-lived pair, up before the victim connects)."""
    port_r, port_w = os.pipe()
    result_r, result_w = os.pipe()
    report_r, report_w = os.pipe()
    ready_r, ready_w = os.pipe()
    server_pid = os.fork()
    if server_pid == 0:
        serve_numbered(server_host, server_ns, port_w, result_w)
    if client_ns:
        netns.enter(client_ns)
    server = (server_host, int.from_bytes(os.read(port_r, 2), "big"))
    cli = socket.socket()
    cli.bind((client_host, 0))
    client = cli.getsockname()
    deadline = time.monotonic() + STREAM_SECONDS + (5.0 if impostor_first else 2.0)

    def start_impostor(long_lived):
        pid = os.fork()
        if pid == 0:
            impostor(sorted({server_host, client_host}), server, client, deadline, report_w, ready_w, long_lived)
        assert os.read(ready_r, 1) == b"r", "the impostor could not build its pair"
        return pid

    if impostor_first:
        impostor_pid = start_impostor(long_lived=True)
        sync()  # the parent lets the agent look at the impostor's pair
    cli.connect(server)
    cli.settimeout(10)
    cli.sendall(MESSAGE % 0)
    assert recv_exactly(cli, 2) == b"ok"
    sync()  # the parent waits until the victim's pair joined
    if not impostor_first:
        impostor_pid = start_impostor(long_lived=False)
    sent, stop = 1, time.monotonic() + STREAM_SECONDS
    while time.monotonic() < stop:
        cli.sendall(MESSAGE % sent)
        sent += 1
        time.sleep(0.001)
    sync()  # the parent reads the bypass's view of the victim while it is still open
    cli.shutdown(socket.SHUT_WR)
    in_order, _, stray = os.read(result_r, 4096).decode().partition(" ")
    os.waitpid(server_pid, 0)
    _, status = os.waitpid(impostor_pid, 0)
    foreign, pairs = map(int, os.read(report_r, 64).split())
    cli.close()
    return {"sent": sent, "in_order": int(in_order), "stray": bytes.fromhex(stray), "foreign": foreign,
            "impostor_pairs": pairs, "impostor_status": status, "server": server, "client": client}


class Steps:
    """on_sync for run_in: the next step at each sync() of the child."""

    def __init__(self, *steps):
        self.steps = list(steps)

    def __call__(self):
        self.steps.pop(0)()


def attack(cg, scope, impostor_first, server_host, client_host, victim_netns, server_ns=None, client_ns=None):
    """Run victim_beside_impostor in cg with a bypass of `scope` attached; check that nothing
    crossed, the victim's stream arrived whole and in order, and the victim (its sockets in the
    namespaces `victim_netns`) was still joined at the end, its stream redirected."""
    seen = {}
    with attached(cg, scope=scope, allow_blocking_readers=False) as bypass:
        def victim():
            seen["victim"] = [conn for conn in bypass.connections() if conn["netns"] in victim_netns]
            seen["stats"] = bypass.stats()
            return seen["victim"]

        def agent_rounds():
            start = bypass.obj.maps["control"][0].round
            assert wait_for(lambda: bypass.obj.maps["control"][0].round >= start + 3, 10)

        def victim_joined():
            assert wait_for(lambda: len(victim()) == 2, 10), bypass.stats()

        steps = ([agent_rounds] if impostor_first else []) + [victim_joined, victim]
        result = run_in(cg, victim_beside_impostor, server_host, client_host, impostor_first, server_ns, client_ns,
                        on_sync=Steps(*steps))
    assert result["impostor_status"] == 0 and result["impostor_pairs"] >= 1, result
    assert result["foreign"] == 0, result
    assert result["in_order"] == result["sent"] and not result["stray"], result
    told = {key: seen["stats"][key] for key in ("left_by_reason", "plain_by_reason", "insert_failed", "conflicts",
                                                 "sockets_inserted", "passed_no_peer", "redirected_msgs")}
    assert sorted(conn["state"] for conn in seen["victim"]) == ["joined", "joined"], (seen["victim"], told)
    into_server = sum(conn["redirected_bytes"] for conn in seen["victim"]
                      if conn["local"] == f"{server_host}:{result['server'][1]}")
    assert into_server >= MESSAGE_SIZE * result["sent"] // 2, seen
    return seen["stats"]


@pytest.mark.parametrize("impostor_first", [False, True], ids=["victim-first", "impostor-first"])
@pytest.mark.parametrize("scope", ["loopback", "host", "all"])
def test_an_impostor_with_the_victims_tuple_in_its_own_namespace_gets_nothing(cg, scope, impostor_first, host_ipv4):
    """The victim on this host's own address (127.0.0.1 under --scope loopback), both ends in
    the host's namespace; the impostor puts that address on its own lo."""
    host = "127.0.0.1" if scope == "loopback" else host_ipv4
    attack(cg, scope, impostor_first, host, host, {netns.inode_of()})


@pytest.mark.parametrize("impostor_first", [False, True], ids=["victim-first", "impostor-first"])
def test_an_impostor_of_a_connection_between_pods_gets_nothing(cg, impostor_first):
    """The victim between two namespaces on a veth pair (pods; the DaemonSet's --scope all),
    proven by its handshake's nonce; the impostor puts both pods' addresses on its own lo."""
    with Pods() as pods:
        stats = attack(cg, "all", impostor_first, pods.addresses[0], pods.addresses[1],
                       {pods.inode(0), pods.inode(1)}, pods.path(0), pods.path(1))
    assert stats["paired_by_handshake"] >= 1, stats


def pods_pair_then_a_replay(bypass, pods):
    """Between the pods: a client connects to a server that has not accepted yet (so the pair
    cannot join), a process of the cgroup replays the connection's nonce into a listener of its
    own namespace (sync: the parent looks at the counters), then the server accepts and the two
    trade 200 KiB; whether every byte came back intact."""
    port_r, port_w = os.pipe()
    go_r, go_w = os.pipe()
    server = os.fork()
    if server == 0:
        status = 1
        try:
            pods.enter(0)
            srv = socket.socket()
            srv.bind((pods.addresses[0], 0))
            srv.listen(8)
            os.write(port_w, srv.getsockname()[1].to_bytes(2, "big"))
            os.read(go_r, 1)
            conn, _ = srv.accept()
            conn.settimeout(10)
            while data := conn.recv(65536):
                conn.sendall(data)
            close_all(conn, srv)
            status = 0
        finally:
            os._exit(status)
    try:
        pods.enter(1)
        address = (pods.addresses[0], int.from_bytes(os.read(port_r, 2), "big"))
        cli = socket.create_connection(address, timeout=10)
        handshakes = bypass.obj.maps["handshakes"]
        assert wait_for(lambda: any(h.claims == 1 for h in handshakes.values()), 10), "no nonce was claimed"
        nonce = next(key for key, h in handshakes.items() if h.claims == 1)
        replayer = os.fork()
        if replayer == 0:
            status = 1
            try:
                become_unprivileged_netns_owner([address[0]])
                replay_nonce(address, cli.getsockname(), nonce).close()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(replayer, 0)
        assert status == 0, "the replay did not complete its handshake"
        sync()
        os.write(go_w, b"g")
        intact = all(echoed(cli, PATTERN[i * 1024:(i + 1) * 1024]) for i in range(200))
        sync()
        cli.close()
    except BaseException:
        os.kill(server, 9)  # it waits for a go that will not come, holding run_in's pipe
        raise
    finally:
        os.waitpid(server, 0)
    return intact


def echoed(sock, message):
    sock.sendall(message)
    return recv_exactly(sock, len(message)) == message


def test_a_replayed_nonce_proves_nothing_and_is_counted(cg):
    """A process of the cgroup that has read a connection's segments (as CAP_NET_RAW in one of
    its namespaces allows) replays the active end's nonce into a listener of its own namespace:
    the nonce now has two claimants, so neither they nor the active end join (a conflict,
    counted and shown), and the connection goes on, plain, every byte intact."""
    seen = {}
    with Pods() as pods, attached(cg, scope="all", allow_blocking_readers=False) as bypass:
        def counted():
            assert wait_for(lambda: bypass.stats()["conflicts"] >= 1, 5), bypass.stats()

        def look():
            seen.update(bypass.stats())

        assert run_in(cg, pods_pair_then_a_replay, bypass, pods, on_sync=Steps(counted, look)) is True
    assert seen["conflicts"] >= 1 and seen["paired_by_handshake"] == 0, seen
    assert seen["sockets_inserted"] == 0 and seen["redirected_msgs"] == 0, seen
    assert seen["plain_by_reason"].get("conflict", 0) >= 1 or seen["plain_now"].get("conflict", 0) >= 1, seen
