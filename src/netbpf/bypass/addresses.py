# SPDX-License-Identifier: MIT
"""Addresses as the bypass's maps hold them: this host's own (scope "host"), and the four
__u32 words of the C structs."""

import ipaddress
import json
import socket
import sys

from .. import system


def host_addresses():
    """This host's own addresses as (family, 16-byte packed address), from `ip -j addr`."""
    out = system.run("ip", "-j", "addr", "show", capture_output=True, text=True, check=True).stdout
    addrs = []
    for iface in json.loads(out):
        for entry in iface.get("addr_info", []):
            ip = ipaddress.ip_address(entry["local"].split("%")[0])
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            addrs.append((family, ip.packed.ljust(16, b"\0")))
    return addrs


def ip_words(packed):
    """A 16-byte packed address as the four __u32 words of the C structs (memory order)."""
    return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]


def ip_text(family, words):
    packed = b"".join(int(w).to_bytes(4, sys.byteorder) for w in words)
    return str(ipaddress.ip_address(packed[:4] if family == socket.AF_INET else packed))


def refresh_host_addrs(host_addrs):
    """Make the host_addrs map hold exactly this host's current addresses."""
    wanted = {(family, tuple(ip_words(packed))) for family, packed in host_addresses()}
    present = {(k.family, tuple(k.ip)) for k in host_addrs}
    for family, ip in wanted - present:
        host_addrs[{"family": family, "ip": ip}] = 1
    for family, ip in present - wanted:
        del host_addrs[{"family": family, "ip": ip}]
