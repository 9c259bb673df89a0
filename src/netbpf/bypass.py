"""bypass: local TCP connections skip the TCP/IP stack.

    with Bypass(cgroup="/sys/fs/cgroup/unified/myapp") as bypass:
        ...                       # sockets in that cgroup talk through sk_msg redirects
        print(bypass.stats())

CLI: python -m netbpf.bypass [run|attach|status|detach] [--cgroup DIR] [--scope S] [--ports P] ...
"""

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

from . import cgroup, features, tool
from .errors import UsageError
from .loader import open_pinned_link

DEFAULT_PIN_DIR = "/sys/fs/bpf/netbpf/bypass"
SCOPES = {"loopback": 0, "host": 1, "all": 2}
DEFAULT_QUEUE_FLOOR = 1 << 20
MAPS = ("sock_map", "sock_info", "listeners", "counters", "config_map", "host_addrs", "allowed_ports")
BPF_CGROUP_SOCK_OPS = 3


def host_addresses():
    """This host's own addresses as (family, 16-byte packed address), from `ip -j addr`."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    addrs = []
    for iface in json.loads(out):
        for entry in iface.get("addr_info", []):
            ip = ipaddress.ip_address(entry["local"].split("%")[0])
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            addrs.append((family, ip.packed.ljust(16, b"\0")))
    return addrs


def listening_sockets(cgroup_dir):
    """(family, 16-byte address, port) of the TCP listeners in cgroup_dir or below, from `ss`.
    The kernel tells the bypass of listeners made after it attached; these came before."""
    root = cgroup.cgroup2_root()
    out = subprocess.run(["ss", "-ltnH", "--cgroup"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        where = next((f[len("cgroup:"):] for f in fields if f.startswith("cgroup:")), None)
        if where is None or len(fields) < 4:
            continue
        path = root / where.lstrip("/")
        if path != Path(cgroup_dir) and Path(cgroup_dir) not in path.parents:
            continue
        host, _, port = fields[3].rpartition(":")
        host = host.strip("[]").split("%")[0]
        ip = ipaddress.ip_address("::" if host == "*" else host)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        found.append((family, ip.packed.ljust(16, b"\0"), int(port)))
    return found


def _ip_words(packed):
    """A 16-byte packed address as the four __u32 words of the C structs (memory order)."""
    return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]


def refresh_host_addrs(host_addrs):
    """Make the host_addrs map hold exactly this host's current addresses."""
    wanted = {(family, tuple(_ip_words(packed))) for family, packed in host_addresses()}
    present = {(k.family, tuple(k.ip)) for k in host_addrs}
    for family, ip in wanted - present:
        host_addrs[{"family": family, "ip": ip}] = 1
    for family, ip in present - wanted:
        del host_addrs[{"family": family, "ip": ip}]


class Bypass(tool.Attachment):
    """The bypass attached to one cgroup (default: the cgroup v2 root, the whole host)."""

    NAME = "bypass"
    MAPS = MAPS
    MARKER = (BPF_CGROUP_SOCK_OPS, "bypass_sockops")
    PIN_CHECK = "sockops"

    def __init__(self, cgroup_dir=None, scope="host", ports=(), max_sockets=65536,
                 queue_floor=DEFAULT_QUEUE_FLOOR, sk_msg_link=None):
        if scope not in SCOPES:
            raise UsageError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
        if not 2 <= max_sockets <= 1 << 24:
            raise UsageError(f"--max-sockets {max_sockets} is out of range (2-16777216)")
        super().__init__(cgroup_dir)
        self.scope, self.ports = scope, list(ports)
        self.max_sockets, self.queue_floor = max_sockets, queue_floor
        self.sk_msg_link = sk_msg_link

    def _prepare(self, obj):
        for name in ("sock_map", "sock_info"):
            obj.maps[name].max_entries = self.max_sockets

    def _configure(self, maps):
        maps["config_map"][0] = {"scope": SCOPES[self.scope], "ports_only": int(bool(self.ports)),
                                 "queue_floor": self.queue_floor}
        for port in self.ports:
            maps["allowed_ports"][port] = 1
        refresh_host_addrs(maps["host_addrs"])

    def _attach_links(self):
        progs, maps = self.obj.programs, self.obj.maps
        # sk_msg first: a socket takes the verdict program its map has when it joins
        yield "sk_msg", lambda: progs["bypass_sk_msg"].attach_sockmap(maps["sock_map"], self.sk_msg_link)
        yield "sockops", lambda: progs["bypass_sockops"].attach_cgroup(self.cgroup)
        # listeners from before the attach (the kernel reports those that come after)
        for family, packed, port in listening_sockets(self.cgroup):
            key = {"family": family, "ip": _ip_words(packed), "port": port}
            if key not in maps["listeners"]:
                maps["listeners"][key] = 1

    def refresh_host_addrs(self):
        refresh_host_addrs(self.obj.maps["host_addrs"])

    def stats(self):
        return _stats(self.obj.maps)


def _stats(maps):
    counters = maps["counters"].sum(0)._asdict()
    counters["sockets"] = len(maps["sock_map"])
    return counters


def status(pin_dir=DEFAULT_PIN_DIR):
    """What a pinned bypass is doing (reads the pins; refreshes the host addresses)."""
    pin_dir = Path(pin_dir)
    if not Bypass.is_pinned(pin_dir):
        return {"attached": False, "cgroup": None, "pin_dir": str(pin_dir), "sockets": 0,
                "redirected_msgs": 0, "redirected_bytes": 0, "passed_msgs": 0}
    with Bypass.pinned_maps(pin_dir) as maps:
        refresh_host_addrs(maps["host_addrs"])
        config = maps["config_map"][0]
        sk_msg = open_pinned_link(pin_dir / "sk_msg")
        mechanism = sk_msg.kind
        sk_msg.close()
        return {"attached": True, "cgroup": tool.link_cgroup(pin_dir / "sockops"), "pin_dir": str(pin_dir),
                "scope": {v: k for k, v in SCOPES.items()}[config.scope],
                "ports": sorted(port for port, listed in maps["allowed_ports"].items() if listed),
                "queue_floor": config.queue_floor, "sk_msg_attach": mechanism, "kernel": features.summary(),
                "listeners": len(maps["listeners"]), **_stats(maps)}


def format_line(stats, previous, elapsed):
    def rate(name):
        return (stats[name] - previous[name]) / elapsed if previous and elapsed else 0.0

    return (f"sockets {stats['sockets']:6d}  redirected {rate('redirected_msgs'):9.0f} msg/s "
            f"{rate('redirected_bytes') / 1e6:9.2f} MB/s  passed {rate('passed_msgs'):8.0f} msg/s  "
            f"(total {stats['redirected_msgs']} redirected, {stats['passed_msgs']} passed)")


def show_status(info):
    print(f"bypass: attached to {info['cgroup']} (pins in {info['pin_dir']}, scope {info['scope']}, "
          f"sk_msg via {info['sk_msg_attach']})")
    print(f"  sockets in the map {info['sockets']}, listeners known {info['listeners']}")
    print(f"  redirected {info['redirected_msgs']} messages ({info['redirected_bytes']} bytes); "
          f"passed {info['passed_msgs']} ({info['passed_no_peer']} no peer, "
          f"{info['passed_unread_plain']} unread TCP data, {info['passed_peer_full']} peer full)")


def live_line(bypass, stats, previous, elapsed):
    bypass.refresh_host_addrs()
    return format_line(stats, previous, elapsed)


def build_parser():
    parser = tool.Parser(prog="python -m netbpf.bypass",
                         description="Local TCP connections skip the TCP/IP stack (sockops + sk_msg).")
    parser.add_argument("command", nargs="?", default="run", choices=("run", "attach", "status", "detach"),
                        help="run (default): attach, show live counters until Ctrl-C, detach; "
                             "attach: attach and pin; status: show a pinned bypass; detach: remove it")
    tool.common_arguments(parser, DEFAULT_PIN_DIR)
    parser.add_argument("--scope", choices=tuple(SCOPES), default="host",
                        help="which peers count as local: loopback, host (loopback and this host's "
                             "addresses, default) or all")
    parser.add_argument("--ports", action="append", metavar="LIST",
                        help="only connections with an end on these ports (80,443,8000-8010; repeatable)")
    parser.add_argument("--max-sockets", type=int, default=65536, metavar="N",
                        help="capacity of the socket map (default 65536)")
    parser.add_argument("--queue-floor", type=int, default=DEFAULT_QUEUE_FLOOR, metavar="BYTES",
                        help="bytes a receiver may have queued before sends fall back to TCP, at least "
                             "(the receiver's SO_RCVBUF when larger; default 1048576)")
    return parser


def cli(argv=None):
    args = build_parser().parse_args(argv)
    tool.setup_logging(args.verbose)
    ports = tool.parse_ports(args.ports)

    def make(args):
        return Bypass(args.cgroup, args.scope, ports, args.max_sockets, args.queue_floor)

    return tool.run_command(args, Bypass, make, status, show_status, live_line)


def main():
    sys.exit(tool.main("netbpf.bypass", cli))


if __name__ == "__main__":
    main()
