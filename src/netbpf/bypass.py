"""bypass: local TCP connections skip the TCP/IP stack.

    with Bypass(cgroup="/sys/fs/cgroup/unified/myapp") as bypass:
        ...                       # sockets in that cgroup talk through sk_msg redirects
        print(bypass.stats())

CLI: python -m netbpf.bypass [run|attach|status|detach] [--cgroup DIR] [--scope S] [--ports P] ...
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import cgroup, object_path, tool
from .errors import UsageError
from .libbpf import ffi, lib
from .loader import Link, Map, Object, open_pinned_link

DEFAULT_PIN_DIR = "/sys/fs/bpf/netbpf/bypass"
SCOPES = {"loopback": 0, "host": 1, "all": 2}
DEFAULT_QUEUE_FLOOR = 1 << 20
LINKS = ("sk_msg", "sockops")  # attach in this order: a socket gets the sk_msg program of its map
MAPS = ("sock_map", "sock_info", "listeners", "counters", "config_map", "host_addrs", "allowed_ports")
BPF_CGROUP_SOCK_OPS = 3


def host_addresses():
    """This host's own addresses as (family, 16-byte packed address), from `ip -j addr`."""
    import ipaddress
    import socket

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
    import ipaddress
    import socket

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


def _host_addr_key(family, packed):
    return {"family": family, "ip": [int.from_bytes(packed[i:i + 4], "little") for i in range(0, 16, 4)]}


def _sum_counters(counters_map):
    totals = counters_map.sum(0)
    return totals._asdict()


def _prog_names_on(cgroup_path, attach_type):
    """Names of the programs attached to a cgroup for one attach type."""
    ids = ffi.new("uint32_t[64]")
    count = ffi.new("uint32_t *", 64)
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if lib.bpf_prog_query(fd, attach_type, 0, ffi.NULL, ids, count) < 0:
            return []
    finally:
        os.close(fd)
    names = []
    for prog_id in ids[0:count[0]]:
        prog_fd = lib.bpf_prog_get_fd_by_id(prog_id)
        if prog_fd >= 0:
            info = ffi.new("struct bpf_prog_info *")
            size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
            lib.bpf_obj_get_info_by_fd(prog_fd, info, size)
            names.append(ffi.string(info.name).decode())
            os.close(prog_fd)
    return names


class Bypass:
    """The bypass attached to one cgroup (default: the cgroup v2 root, the whole host)."""

    def __init__(self, cgroup_dir=None, scope="host", ports=(), max_sockets=65536,
                 queue_floor=DEFAULT_QUEUE_FLOOR, sk_msg_link=None):
        if scope not in SCOPES:
            raise UsageError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
        if not 2 <= max_sockets <= 1 << 24:
            raise UsageError(f"--max-sockets {max_sockets} is out of range (2-16777216)")
        self.cgroup = cgroup.resolve(cgroup_dir)
        self.scope, self.ports = scope, list(ports)
        self.max_sockets, self.queue_floor = max_sockets, queue_floor
        self.sk_msg_link = sk_msg_link
        self.obj = None
        self.links = {}

    # --- attach / detach in this process ---

    def attach(self):
        if "bypass_sockops" in _prog_names_on(self.cgroup, BPF_CGROUP_SOCK_OPS):
            raise UsageError(f"bypass is already attached to {self.cgroup} (detach it first)")
        self.obj = Object(object_path("bypass"))
        try:
            for name in ("sock_map", "sock_info"):
                self.obj.maps[name].max_entries = self.max_sockets
            self.obj.load()
            maps = self.obj.maps
            maps["config_map"][0] = {"scope": SCOPES[self.scope], "ports_only": int(bool(self.ports)),
                                     "queue_floor": self.queue_floor}
            for port in self.ports:
                maps["allowed_ports"][port] = 1
            self.refresh_host_addrs()
            progs = self.obj.programs
            self.links["sk_msg"] = progs["bypass_sk_msg"].attach_sockmap(maps["sock_map"], self.sk_msg_link)
            self.links["sockops"] = progs["bypass_sockops"].attach_cgroup(self.cgroup)
            for family, packed, port in listening_sockets(self.cgroup):  # after attach: none missed
                key = dict(_host_addr_key(family, packed), port=port)
                if key not in maps["listeners"]:
                    maps["listeners"][key] = 1
        except BaseException:
            self.close()
            raise
        return self

    def refresh_host_addrs(self):
        refresh_host_addrs(self.obj.maps["host_addrs"])

    def stats(self):
        return _stats(self.obj.maps)

    def pin(self, pin_dir=DEFAULT_PIN_DIR):
        """Make the attachment outlive this process: links and maps pinned under pin_dir."""
        pin_dir = Path(pin_dir)
        if (pin_dir / "sockops").exists():
            raise UsageError(f"bypass is already attached with pins in {pin_dir} (detach it first)")
        pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in MAPS:
                self.obj.maps[name].pin(pin_dir / name)
            for name in LINKS:
                self.links[name].pin(pin_dir / name)
        except BaseException:
            tool.unpin_all(pin_dir, LINKS, MAPS)
            raise

    def close(self):
        """Detach: no new sockets join, the map is freed and every socket goes back to plain TCP."""
        for name in reversed(LINKS):
            link = self.links.pop(name, None)
            if link is not None:
                link.close()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self):
        return self.attach() if self.obj is None else self

    def __exit__(self, *exc):
        self.close()


def refresh_host_addrs(host_addrs):
    """Make the host_addrs map hold exactly this host's current addresses."""
    wanted = {(f, tuple(_host_addr_key(f, a)["ip"])) for f, a in host_addresses()}
    present = {(k.family, tuple(k.ip)) for k in host_addrs}
    for family, ip in wanted - present:
        host_addrs[{"family": family, "ip": ip}] = 1
    for family, ip in present - wanted:
        del host_addrs[{"family": family, "ip": ip}]


def _stats(maps):
    counters = _sum_counters(maps["counters"])
    counters["sockets"] = len(maps["sock_map"])
    return counters


def status(pin_dir=DEFAULT_PIN_DIR):
    """What a pinned bypass is doing (reads the pins; refreshes the host addresses)."""
    pin_dir = Path(pin_dir)
    if not (pin_dir / "sockops").exists():
        return {"attached": False, "cgroup": None, "pin_dir": str(pin_dir), "sockets": 0,
                "redirected_msgs": 0, "redirected_bytes": 0, "passed_msgs": 0}
    with Object(object_path("bypass")) as obj:
        maps = tool.open_pinned_maps(pin_dir, obj, MAPS)
    try:
        refresh_host_addrs(maps["host_addrs"])
        config = maps["config_map"][0]
        ports = sorted(port for port, listed in maps["allowed_ports"].items() if listed)
        sk_msg = open_pinned_link(pin_dir / "sk_msg")
        mechanism = sk_msg.kind
        sk_msg.close()
        return {"attached": True, "cgroup": tool.link_cgroup(pin_dir / "sockops"), "pin_dir": str(pin_dir),
                "scope": {v: k for k, v in SCOPES.items()}[config.scope], "ports": ports,
                "queue_floor": config.queue_floor, "sk_msg_attach": mechanism, **_stats(maps)}
    finally:
        tool.close_all(maps.values())


def detach(pin_dir=DEFAULT_PIN_DIR):
    """Remove everything `attach` created. Returns False when nothing was attached there."""
    pin_dir = Path(pin_dir)
    if not pin_dir.exists():
        return False
    tool.unpin_all(pin_dir, LINKS, MAPS)
    return True


def format_line(stats, previous, elapsed):
    def rate(name):
        return (stats[name] - previous[name]) / elapsed if previous and elapsed else 0.0

    return (f"sockets {stats['sockets']:6d}  redirected {rate('redirected_msgs'):9.0f} msg/s "
            f"{rate('redirected_bytes') / 1e6:9.2f} MB/s  passed {rate('passed_msgs'):8.0f} msg/s  "
            f"(total {stats['redirected_msgs']} redirected, {stats['passed_msgs']} passed)")


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
    tool.require_root()
    if args.command == "status":
        pin_dir = tool.check_pin_dir(args.pin_dir)
        info = status(pin_dir)
        if args.json:
            tool.print_json(info)
        elif not info["attached"]:
            print(f"bypass: not attached (no pins in {pin_dir})")
        else:
            print(f"bypass: attached to {info['cgroup']} (pins in {pin_dir}, scope {info['scope']}, "
                  f"sk_msg via {info['sk_msg_attach']})")
            print(format_line(info, None, 0))
        return 0
    if args.command == "detach":
        pin_dir = tool.check_pin_dir(args.pin_dir)
        if not detach(pin_dir):
            raise UsageError(f"bypass is not attached (no pins in {pin_dir})")
        print(f"bypass: detached (removed {pin_dir})")
        return 0

    bypass = Bypass(args.cgroup, args.scope, ports, args.max_sockets, args.queue_floor)
    if args.command == "attach":
        pin_dir = tool.check_pin_dir(args.pin_dir)
        if (pin_dir / "sockops").exists():
            raise UsageError(f"bypass is already attached with pins in {pin_dir} (detach it first)")
        with bypass.attach():
            bypass.pin(pin_dir)
        print(f"bypass: attached to {bypass.cgroup} (pins in {pin_dir})")
        return 0

    with bypass.attach():
        print(f"bypass: attached to {bypass.cgroup}; Ctrl-C to detach", flush=True)
        state = {"previous": None, "when": time.monotonic(), "ticks": 0}

        def step():
            now, stats = time.monotonic(), bypass.stats()
            if state["ticks"] % 10 == 0:
                bypass.refresh_host_addrs()
            state["ticks"] += 1
            line = format_line(stats, state["previous"], now - state["when"])
            end = "\r" if sys.stdout.isatty() else "\n"
            print(line, end=end, flush=True)
            state["previous"], state["when"] = stats, now

        tool.run_until_signalled(step, args.interval)
    print("\nbypass: detached", flush=True)
    return 0


def main():
    sys.exit(tool.main("netbpf.bypass", cli))


if __name__ == "__main__":
    main()
