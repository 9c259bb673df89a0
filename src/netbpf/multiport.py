# SPDX-License-Identifier: MIT
"""multiport: many processes bind "port 3000"; each gets a free real port, and nobody can tell.

    with Multiport(cgroup="/sys/fs/cgroup/unified/app", ports=[3000]) as mp:
        ...                       # binds to 3000 in that cgroup get free ports, names say 3000
        print(mp.mappings())

CLI: python -m netbpf.multiport [run|attach|status|detach] --port P [--port P-Q] ...
     python -m netbpf.multiport exec --port P -- CMD [ARGS]
"""

import os
import signal
import socket
import sys

from . import cgroup, command, features, metrics
from .attachment import Attachment
from .errors import UsageError
from .privileges import require_root
from .types import AttachType

DEFAULT_PIN_DIR = "/sys/fs/bpf/netbpf/multiport"
MAPS = ("virtual_ports", "mappings", "real_ports", ".rodata", "counters")
# attach order: everything that reads the remap is in place before binds are remapped
CGROUP_PROGRAMS = ("mp_sock_release", "mp_post_bind4", "mp_post_bind6", "mp_getsockname4", "mp_getsockname6",
                   "mp_getpeername4", "mp_getpeername6", "mp_connect4", "mp_connect6", "mp_sendmsg4",
                   "mp_sendmsg6", "mp_recvmsg4", "mp_recvmsg6", "mp_bind4", "mp_bind6")
TRACEPOINT_PROGRAMS = ("mp_tp_enter_getsockname", "mp_tp_exit_getsockname")
CGROUP_GETSOCKNAME = ("mp_getsockname4", "mp_getsockname6")
MODES = ("cgroup", "tracepoint")
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


class Multiport(Attachment):
    """Port remapping for the processes of one cgroup (default: the cgroup v2 root)."""

    NAME = "multiport"
    MAPS = MAPS
    MARKER = (AttachType.CGROUP_INET4_BIND, "mp_bind4")
    PIN_CHECK = "mp_bind4"

    def __init__(self, cgroup_dir=None, ports=(), allow_privileged=False, mode="cgroup"):
        if not ports:
            raise UsageError("give the virtual ports to remap with --port P (repeatable; ranges P-Q)")
        if mode not in MODES:
            raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        privileged = [p for p in ports if p < 1024]
        if privileged and not allow_privileged:
            raise UsageError(f"port {privileged[0]} is below 1024: remapping it lets any process in the cgroup "
                             "appear to own it; pass --allow-privileged if that is intended")
        super().__init__(cgroup_dir)
        self.ports, self.allow_privileged, self.mode = sorted(ports), allow_privileged, mode

    def _programs(self):
        if self.mode == "tracepoint":
            return [p for p in CGROUP_PROGRAMS if p not in CGROUP_GETSOCKNAME] + list(TRACEPOINT_PROGRAMS)
        return list(CGROUP_PROGRAMS)

    def _prepare(self, obj):
        wanted = set(self._programs())
        for name, prog in obj.programs.items():
            prog.set_autoload(name in wanted)
        obj.rodata.allow_privileged = int(self.allow_privileged)

    def _load_object(self):
        """Name what the kernel lacks in one line instead of a verifier log."""
        if self.mode == "tracepoint" and not features.probe_write_user():
            raise UsageError("--mode tracepoint needs bpf_probe_write_user, which this kernel refuses "
                             f"(kernel lockdown: {features.lockdown()}); use the default --mode cgroup")
        if self.mode == "cgroup" and not features.cgroup_hook("getsockname4"):
            raise UsageError("this kernel has no cgroup getsockname hooks (Linux 5.8+); "
                             "try --mode tracepoint")
        if not features.cgroup_hook("sock_release"):
            raise UsageError("this kernel has no cgroup sock_release hook (Linux 5.9+) to forget closed sockets")
        return super()._load_object()

    def _configure(self, maps):
        for port in self.ports:
            maps["virtual_ports"][port] = 1
        if self.mode == "tracepoint":
            fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self.obj.maps["target_cgroup"][0] = fd
            finally:
                os.close(fd)

    def settings(self):
        return {"cgroup": str(self.cgroup), "ports": self.ports, "allow_privileged": self.allow_privileged,
                "mode": self.mode}

    @classmethod
    def pinned_settings(cls, pins, maps):
        with pins.link(cls.PIN_CHECK) as bind_link:
            group = cgroup.path_of_id(bind_link.info()["cgroup_id"])
        return {"cgroup": group, "ports": sorted(p for p, listed in maps["virtual_ports"].items() if listed),
                "allow_privileged": bool(maps[".rodata"][0].allow_privileged),
                "mode": "tracepoint" if pins.has(TRACEPOINT_PROGRAMS[0]) else "cgroup"}

    def _attach_links(self):
        for name in self._programs():
            prog = self.obj.programs[name]
            if name in TRACEPOINT_PROGRAMS:
                yield name, prog.attach_tracepoint
            else:
                yield name, (lambda prog=prog: prog.attach_cgroup(self.cgroup))

    def stats(self):
        return _stats(self.obj.maps)

    def mappings(self):
        return _mappings(self.obj.maps["mappings"])


def _mappings(mappings_map):
    out = []
    for _, m in sorted(mappings_map.items(), key=lambda kv: (kv[1].virtual_port, kv[1].real_port)):
        out.append({"virtual_port": m.virtual_port, "real_port": m.real_port,
                    "protocol": PROTOCOLS.get(m.protocol, str(m.protocol)),
                    "family": FAMILIES.get(m.family, str(m.family)), "pid": m.pid, "comm": m.comm,
                    "cgroup": cgroup.path_of_id(m.cgroup_id)})
    return out


def _stats(maps):
    counters = maps["counters"].sum(0)._asdict()
    counters["mappings"] = _mappings(maps["mappings"])
    return counters


def status(pin_dir=DEFAULT_PIN_DIR):
    """What a pinned multiport is doing."""
    pins = Multiport.pins(pin_dir)
    if not pins.attached():
        return {"attached": False, "cgroup": None, "pin_dir": str(pins.path), "ports": [], "mappings": []}
    with pins.maps() as maps:
        settings = Multiport.pinned_settings(pins, maps)
        return {"attached": True, "pin_dir": str(pins.path), **settings,
                "getsockname_via": {"cgroup": "cgroup getsockname4/6 hooks",
                                    "tracepoint": "syscall tracepoints + bpf_probe_write_user"}[settings["mode"]],
                "kernel": features.summary(), **_stats(maps)}


def metric_families(stats):
    """multiport's counters for netbpf.metrics (Prometheus names and types)."""
    live = {protocol: 0 for protocol in PROTOCOLS.values()}
    for mapping in stats["mappings"]:
        live[mapping["protocol"]] = live.get(mapping["protocol"], 0) + 1
    refusals = {"privileged_port": stats["binds_privileged_refused"], "no_listener": stats["connects_no_listener"]}
    return [
        metrics.by_label(metrics.GAUGE, "netbpf_multiport_mappings",
                         "Sockets bound to a virtual port now, each on its own real port", "protocol", live),
        metrics.counter("netbpf_multiport_binds_remapped_total", "Binds to a virtual port given a free real port",
                        stats["binds_remapped"]),
        metrics.counter("netbpf_multiport_names_rewritten_total",
                        "getsockname/getpeername/recvmsg results that show the virtual port", stats["names_rewritten"]),
        metrics.counter("netbpf_multiport_connects_redirected_total",
                        "Connects to a virtual port sent to one of its listeners", stats["connects_redirected"]),
        metrics.counter("netbpf_multiport_datagrams_redirected_total",
                        "Datagrams to a virtual port sent to one of its listeners", stats["datagrams_redirected"]),
        metrics.by_label(metrics.COUNTER, "netbpf_multiport_refusals_total",
                         "Binds left alone (a port below 1024 without --allow-privileged) and connects with "
                         "no listener to send them to", "reason", refusals),
        metrics.counter("netbpf_multiport_sockets_released_total", "Remapped sockets closed", stats["released"]),
        metrics.counter("netbpf_multiport_mappings_full_total",
                        "Remapped sockets a full mappings or real_ports map could not record (their names "
                        "show the real port; clients do not find them)", stats["mappings_full"]),
    ]


def format_table(mappings):
    lines = [f"{'virtual':>7} {'real':>6} {'proto':5} {'family':6} {'pid':>7}  comm"]
    for m in mappings:
        lines.append(f"{m['virtual_port']:7d} {m['real_port']:6d} {m['protocol']:5} {m['family']:6} "
                     f"{m['pid']:7d}  {m['comm']}")
    return "\n".join(lines)


def show_status(info):
    print(f"multiport: attached to {info['cgroup']} (pins in {info['pin_dir']}, mode {info['mode']}), "
          f"virtual ports {compact_ports(info['ports'])}")
    print(format_table(info["mappings"]))
    if info["mappings_full"]:
        print(f"  {info['mappings_full']} remapped sockets not recorded: the mappings or real_ports map is full")


def live_line(multiport, stats, previous, elapsed):
    return f"{len(stats['mappings'])} mappings, {stats['binds_remapped']} binds remapped, " \
           f"{stats['connects_redirected']} connects redirected\n" + format_table(stats["mappings"]) + "\n"


def compact_ports(ports):
    """[80, 81, 82, 90] -> '80-82,90'"""
    runs, start = [], None
    for i, port in enumerate(ports):
        if start is None:
            start = port
        if i + 1 == len(ports) or ports[i + 1] != port + 1:
            runs.append(str(start) if start == port else f"{start}-{port}")
            start = None
    return ",".join(runs)


def exec_in_own_cgroup(args, ports, command):
    """Run COMMAND in a fresh child cgroup with multiport attached there; its exit status is ours."""
    parent = cgroup.resolve(args.cgroup)
    group = cgroup.Cgroup.create(f"netbpf-multiport-{os.getpid()}", parent)
    try:
        with Multiport(str(group.path), ports, args.allow_privileged, args.mode):
            try:
                proc = group.popen(command)
            except OSError as exc:
                raise UsageError(f"cannot run {command[0]}: {exc.strerror}") from None
            forward = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
                       for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
            try:
                code = proc.wait()
            finally:
                for sig, handler in forward.items():
                    signal.signal(sig, handler)
    finally:
        group.remove()
    return code if code >= 0 else 128 - code


class MultiportCommand(command.Command):
    TOOL = Multiport

    def make(self):
        return Multiport(self.args.cgroup, self.ports, self.args.allow_privileged, self.args.mode)

    def status(self, pins):
        return status(pins.path)

    show_status = staticmethod(show_status)
    live_line = staticmethod(live_line)
    metric_families = staticmethod(metric_families)
    pinned_stats = staticmethod(_stats)


def build_parser(prog="python -m netbpf.multiport"):
    parser = command.Parser(prog=prog,
                         description="Many processes bind the same port; each gets a free real port and "
                                     "getsockname()/getpeername() show the port it asked for.")
    parser.add_argument("command", nargs="?", default="run",
                        choices=("run", "attach", "status", "detach", "serve", "exec"),
                        help="run (default): attach, show the mappings until Ctrl-C, detach; attach: attach "
                             "and pin; status; detach; serve: the service form (attach with pins or take "
                             "over a previous instance's, detach on SIGTERM); exec --port P -- CMD: run CMD "
                             "in its own cgroup")
    command.common_arguments(parser, DEFAULT_PIN_DIR)
    parser.add_argument("--port", action="append", metavar="P",
                        help="a virtual port to remap (repeatable; a range P-Q; 80,443)")
    parser.add_argument("--allow-privileged", action="store_true",
                        help="allow virtual ports below 1024")
    parser.add_argument("--mode", choices=MODES, default="cgroup",
                        help="cgroup (default): cgroup hooks; tracepoint: the original design, "
                             "getsockname() rewritten in user memory (needs a kernel without lockdown)")
    return parser


def cli(argv=None, prog="python -m netbpf.multiport"):
    argv = list(sys.argv[1:] if argv is None else argv)
    to_run = []
    if "--" in argv:
        at = argv.index("--")
        argv, to_run = argv[:at], argv[at + 1:]
    args = build_parser(prog).parse_args(argv)
    command.setup_logging(args.verbose)
    ports = command.parse_ports(args.port)
    if args.command == "exec":
        if not to_run:
            raise UsageError("exec needs a command: exec --port P -- CMD [ARGS]")
        require_root()
        return exec_in_own_cgroup(args, ports, to_run)
    if to_run:
        raise UsageError(f"only exec takes a command after --, not {args.command}")
    return command.run_command(MultiportCommand(args, ports))


def run_cli(argv, prog="python -m netbpf.multiport"):
    """The command line: its exit status (bad input: one line on stderr and 2)."""
    return command.main("netbpf.multiport", lambda: cli(argv, prog))


def main():
    sys.exit(run_cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
