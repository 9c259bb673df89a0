# SPDX-License-Identifier: MIT
"""A server for the multiport tests: binds PROTO HOST PORT [v6only], prints one JSON line with its pid and
getsockname() port, then serves until its stdin closes. A TCP client gets a line with the server's
pid and the accepted socket's getsockname() port, then an echo; a UDP datagram is echoed back."""

import json
import os
import socket
import sys
import threading


def main(proto, host, port, *options):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if "v6only" in options:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, int(port)))
    print(json.dumps({"pid": os.getpid(), "port": sock.getsockname()[1]}), flush=True)
    threading.Thread(target=serve_tcp if proto == "tcp" else serve_udp, args=(sock,), daemon=True).start()
    sys.stdin.read()


def serve_tcp(sock):
    sock.listen(128)
    while True:
        conn, _ = sock.accept()
        conn.sendall(json.dumps({"pid": os.getpid(), "accepted_port": conn.getsockname()[1]}).encode() + b"\n")
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def serve_udp(sock):
    while True:
        data, addr = sock.recvfrom(65536)
        sock.sendto(data, addr)


if __name__ == "__main__":
    main(*sys.argv[1:])
