# SPDX-License-Identifier: MIT
"""What the two command-line tools share: argument parsing, input checks, pin directories,
the live loop, and the rule that bad input is one line on stderr and exit status 2."""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import cgroup, metrics, mounts
from .errors import NetbpfError, ObjectFileError, UsageError
from .loader import Map, open_pinned_link


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the CLI prints them) instead of usage + message."""

    def error(self, message):
        raise UsageError(message)


def common_arguments(parser, default_pin_dir):
    parser.add_argument("--cgroup", metavar="DIR",
                        help="cgroup v2 directory to attach to, absolute or relative to the cgroup v2 "
                             "mount (default: the root, i.e. the whole host)")
    parser.add_argument("--pin-dir", metavar="DIR", default=default_pin_dir,
                        help=f"bpffs directory for the pins of `attach` (default {default_pin_dir})")
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    parser.add_argument("--metrics-text", action="store_true",
                        help="status: print the Prometheus metrics once, in the exposition format")
    parser.add_argument("--metrics", metavar="ADDR:PORT",
                        help="run, serve: serve Prometheus metrics on ADDR:PORT (127.0.0.1:9464, :9464)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="run: seconds between status lines (default 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show libbpf's messages")


def parse_port(text, what="port"):
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{what} {port} is out of range (1-65535)")
    return port


def parse_ports(items):
    """'80', '8000-8010', '80,443' (any mix, repeatable) -> a sorted list of ports."""
    ports = set()
    for item in items or ():
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                raise UsageError(f"empty port in {item!r}")
            if "-" in part:
                low, _, high = part.partition("-")
                low, high = parse_port(low), parse_port(high)
                if low > high:
                    raise UsageError(f"port range {part} runs backwards")
                ports.update(range(low, high + 1))
            else:
                ports.add(parse_port(part))
    return sorted(ports)


CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def effective_capabilities():
    """The names of CAPABILITIES this process has in its effective set."""
    with open("/proc/self/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}


def require_root():
    """Loading, attaching and pinning need root with its capabilities (a container's root may
    lack some): a missing privilege is bad input, named as such."""
    if os.geteuid() != 0:
        raise UsageError("must run as root (loading BPF programs needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, "
                         "CAP_SYS_ADMIN)")
    missing = sorted(set(CAPABILITIES) - effective_capabilities())
    if missing:
        raise UsageError(f"runs as root but without {', '.join(missing)}: loading and attaching BPF programs "
                         "needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN")


def check_pin_dir(path):
    """The pin directory must be on bpffs (mounted on demand at /sys/fs/bpf)."""
    path = Path(path)
    if str(path).startswith(mounts.BPFFS):
        mounts.ensure_bpffs()
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not mounts.is_bpffs(parent):
        raise UsageError(f"pin directory {path} is not on a bpffs mount")
    return path


def link_cgroup(path):
    """The cgroup a pinned cgroup link is attached to (from the kernel's link info)."""
    with open_pinned_link(path) as link:
        return cgroup.path_of_id(link.info()["cgroup_id"])


def pin_name(map_name):
    """The pin file of a map: its name, a section's without the dot ('.rodata' -> 'rodata')."""
    return map_name.lstrip(".")


def unpin_all(pin_dir, link_names, map_names):
    """Detach the pinned links (even if another holder keeps them alive), remove every pin, and
    the pin directory with the parents that are left empty below the bpffs mount."""
    pin_dir = Path(pin_dir)
    for name in link_names:
        if (pin_dir / name).is_symlink():  # a note beside the pins (bypass: "mechanisms")
            (pin_dir / name).unlink()
        elif (pin_dir / name).exists():
            open_pinned_link(pin_dir / name).detach()
    for name in map(pin_name, map_names):
        if (pin_dir / name).exists():
            (pin_dir / name).unlink()
    for directory in (pin_dir, *pin_dir.parents):
        if str(directory) == mounts.BPFFS or not mounts.is_bpffs(directory):
            break
        try:
            directory.rmdir()
        except OSError:  # not empty: someone else's pins live there
            break


def open_pinned_maps(pin_dir, obj, names):
    """The pinned maps of a tool, decoded with the BTF of its (unloaded) object file."""
    return {name: Map.open_pinned(Path(pin_dir) / pin_name(name), like=obj.maps[name]) for name in names}


class Stop(Exception):
    pass


def run_until_signalled(step, interval):
    """Call step() every `interval` seconds until SIGINT or SIGTERM."""

    def stop(signum, frame):
        raise Stop()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            step()
            time.sleep(interval)
    except Stop:
        pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def print_json(data):
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def main(prog, run):
    """Run a tool's CLI: bad input (UsageError, unbuilt objects) -> one line + exit 2;
    other netbpf errors (the kernel refused something) -> one line + exit 1."""
    try:
        return run() or 0
    except (UsageError, ObjectFileError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except NetbpfError as exc:
        first, *rest = str(exc).splitlines()
        print(f"{prog}: {first}", file=sys.stderr)
        for line in rest:
            logging.getLogger(prog).info("%s", line)
        return 1


def setup_logging(verbose):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not verbose:
        logging.getLogger("netbpf.libbpf").setLevel(logging.ERROR)


def prog_names_on(cgroup_path, attach_type):
    """Names of the programs attached to a cgroup for one attach type."""
    from .libbpf import ffi, lib

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


class Attachment:
    """A tool's BPF object attached to one cgroup, pinned on request. A subclass names

        NAME       the tool, and its object file NAME.bpf.o
        MAPS       the maps pinned beside the links, which status reads back
        MARKER     (attach type, program name): seeing it on a cgroup means "already attached"
                   (or the subclass's own _already_attached())
        PIN_CHECK  a pin that exists exactly when the tool is attached with pins

    and fills in _prepare(obj) before load (or all of _load_object()), _configure(maps) after load,
    and _attach_links(),
    which yields (pin name, function that attaches and returns the Link, or None for an
    optional one the kernel refused) in attach order."""

    NAME = MAPS = MARKER = PIN_CHECK = None

    def __init__(self, cgroup_dir=None):
        self.cgroup = cgroup.resolve(cgroup_dir)
        self.obj = None
        self.links = {}

    def _prepare(self, obj):
        pass

    def _configure(self, maps):
        pass

    def _attach_links(self):
        raise NotImplementedError

    def _new_object(self):
        """The tool's object, opened and _prepare()d, not loaded."""
        from . import object_path
        from .loader import Object

        obj = Object(object_path(self.NAME))
        try:
            self._prepare(obj)
        except BaseException:
            obj.close()
            raise
        return obj

    def _load_object(self):
        """The tool's object, prepared and loaded (a subclass may choose among its programs here)."""
        obj = self._new_object()
        try:
            obj.load()
        except BaseException:
            obj.close()
            raise
        return obj

    def settings(self):
        """What defines this attachment, under the keys `status` reports them: `serve` takes
        over pins that hold the same."""
        return {"cgroup": str(self.cgroup)}

    def feature_notes(self):
        """One line for each kernel feature the attachment had to do without."""
        return []

    def _already_attached(self):
        """Whether this tool is attached to self.cgroup already (its MARKER program is there)."""
        attach_type, program = self.MARKER
        return program in prog_names_on(self.cgroup, attach_type)

    def attach(self):
        if self._already_attached():
            raise UsageError(f"{self.NAME} is already attached to {self.cgroup} (detach it first)")
        try:
            self.obj = self._load_object()
            self._configure(self.obj.maps)
            for name, attach in self._attach_links():
                link = attach()
                if link is not None:  # an optional attachment the kernel refused
                    self.links[name] = link
        except BaseException:
            self.close()
            raise
        return self

    def pin(self, pin_dir):
        """Make the attachment outlive this process: links and maps pinned under pin_dir."""
        pin_dir = Path(pin_dir)
        if pin_dir.exists() and any(pin_dir.iterdir()):
            raise UsageError(f"{self.NAME} is already attached with pins in {pin_dir} (detach it first)")
        pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.MAPS:
                self.obj.maps[name].pin(pin_dir / pin_name(name))
            for name, link in self.links.items():
                link.pin(pin_dir / name)
        except BaseException:
            unpin_all(pin_dir, self.links, self.MAPS)
            raise

    def close(self):
        """Detach everything this process attached and was not pinned, and unload."""
        for name in reversed(list(self.links)):
            self.links.pop(name).close()
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self):
        return self.attach() if self.obj is None else self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    @contextlib.contextmanager
    def pinned_maps(cls, pin_dir):
        """The pinned maps, decoded with the BTF of the tool's object file, closed afterwards."""
        from . import object_path
        from .loader import Object

        with Object(object_path(cls.NAME)) as obj:
            maps = open_pinned_maps(pin_dir, obj, cls.MAPS)
        try:
            yield maps
        finally:
            close_all(maps.values())

    @classmethod
    def pins_match_object(cls, pin_dir):
        """Whether the pinned maps have the key and value sizes of this netbpf's object file (an
        older or newer netbpf may have pinned other layouts)."""
        from . import object_path
        from .loader import Object

        with Object(object_path(cls.NAME)) as obj:
            for name in cls.MAPS:
                try:
                    pinned = Map.open_pinned(Path(pin_dir) / pin_name(name))
                except NetbpfError:
                    return False
                with pinned:
                    ours = obj.maps[name]
                    if (pinned.key_codec.size, pinned.value_codec.size) != (ours.key_codec.size, ours.value_codec.size):
                        return False
        return True

    @classmethod
    def is_pinned(cls, pin_dir):
        return (Path(pin_dir) / cls.PIN_CHECK).exists()

    @classmethod
    def detach_pinned(cls, pin_dir):
        """Remove every link and map `attach` pinned in pin_dir. False when nothing was there."""
        pin_dir = Path(pin_dir)
        if not pin_dir.exists() or not any(pin_dir.iterdir()):
            return False
        maps = {pin_name(name) for name in cls.MAPS}
        unpin_all(pin_dir, [p.name for p in pin_dir.iterdir() if p.name not in maps], cls.MAPS)
        return True


def close_all(items):
    for item in items:
        item.close()


@dataclasses.dataclass
class Commands:
    """What a tool gives run_command(): its Attachment subclass; make(args) -> an unattached
    instance; status(pin_dir) -> dict; show_status(dict) prints it for people; live_line(tool,
    stats, previous stats, seconds between) -> one line; metric_families(stats) for
    netbpf.metrics; pinned_stats(pinned maps) -> the stats metric_families reads (what `serve`
    scrapes: cheaper than status); detach(pin_dir, args) -> connections left draining (pins kept when any);
    after_attach(tool, pin_dir) once `attach` has pinned; after_close(tool) once `run` has
    detached; serve_loop(pin_dir, stop) what `serve` does while attached (default: wait)."""

    cls: type
    make: object
    status: object
    show_status: object
    live_line: object
    metric_families: object
    detach: object
    after_attach: object = None
    after_close: object = None
    serve_loop: object = None
    pinned_stats: object = None


def run_command(args, commands):
    """The verbs both tools share: status, detach, attach, run, serve."""
    cls = commands.cls
    prog = cls.NAME
    address = metrics.parse_address(args.metrics) if args.metrics else None
    require_root()
    pin_dir = check_pin_dir(args.pin_dir)
    if args.command == "status":
        info = commands.status(pin_dir)
        if args.metrics_text:
            if not info["attached"]:
                raise UsageError(f"{prog} is not attached (no pins in {pin_dir})")
            print(metrics.text(metrics.registry(lambda: (info["cgroup"], info), commands.metric_families)), end="")
        elif args.json:
            print_json(info)
        elif not info["attached"]:
            print(f"{prog}: not attached (no pins in {pin_dir})")
        else:
            commands.show_status(info)
        return 0
    if args.command == "detach":
        if not pin_dir.exists() or not any(pin_dir.iterdir()):
            raise UsageError(f"{prog} is not attached (no pins in {pin_dir})")
        if commands.detach(pin_dir, args):
            return 1
        print(f"{prog}: detached (removed {pin_dir})")
        return 0
    if args.command == "serve":
        return serve(args, commands, pin_dir, address)

    tool = commands.make(args)
    if args.command == "attach":
        if pin_dir.exists() and any(pin_dir.iterdir()):
            raise UsageError(f"{prog} is already attached with pins in {pin_dir} (detach it first)")
        with tool.attach():  # closing after pin() leaves the pinned attachment in place
            tool.pin(pin_dir)
            notes = tool.feature_notes()
        if commands.after_attach:
            commands.after_attach(tool, pin_dir)
        print(f"{prog}: attached to {tool.cgroup} (pins in {pin_dir})")
        for note in notes:
            print(f"{prog}: {note}")
        return 0

    # the metrics port first: when it is taken, nothing has been attached
    with serving_metrics(address, lambda: (str(tool.cgroup), tool.stats()), commands), tool.attach():
        print(f"{prog}: attached to {tool.cgroup}; Ctrl-C to detach", flush=True)
        for note in tool.feature_notes():
            print(f"{prog}: {note}", flush=True)
        state = {"previous": None, "when": time.monotonic()}

        def step():
            now, stats = time.monotonic(), tool.stats()
            end = "\r" if sys.stdout.isatty() else "\n"
            print(commands.live_line(tool, stats, state["previous"], now - state["when"]), end=end, flush=True)
            state["previous"], state["when"] = stats, now

        run_until_signalled(step, args.interval)
        print(f"\n{prog}: detaching", flush=True)
    if commands.after_close:
        commands.after_close(tool)
    print(f"{prog}: detached", flush=True)
    return 0


def serving_metrics(address, read, commands):
    """A context: metrics served on address while it lasts (nothing when address is None)."""
    if address is None:
        return contextlib.nullcontext()
    return metrics.Server(metrics.registry(read, commands.metric_families), address)


def serve(args, commands, pin_dir, address):
    """The service form: attach with pins (see take_over_or_attach), serve metrics, be what the
    tool runs while attached (commands.serve_loop), and on SIGTERM or SIGINT detach. One line per
    change of state, none per message."""
    prog = commands.cls.NAME

    def say(text):
        print(f"{prog}: {text}", flush=True)

    pinned = {}  # the pinned maps while attached: a scrape reads them, no more

    def read():
        if "maps" not in pinned:
            raise NetbpfError(f"{prog} is not attached yet")
        return pinned["cgroup"], commands.pinned_stats(pinned["maps"])

    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serving_metrics(address, read, commands):  # the port first: when it is taken, nothing is attached
            take_over_or_attach(commands, pin_dir, args, say)
            with commands.cls.pinned_maps(pin_dir) as maps:
                pinned.update(maps=maps, cgroup=commands.status(pin_dir)["cgroup"])
                if address:
                    say(f"metrics on http://{metrics.format_address(address)}/metrics")
                (commands.serve_loop or (lambda pin_dir, stop: stop.wait()))(pin_dir, stop)
                pinned.clear()
            say("detaching")
            if commands.detach(pin_dir, args):
                return 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    say("detached")
    return 0


def take_over_or_attach(commands, pin_dir, args, say):
    """Pins a previous instance left (it was killed, or stopped without detaching) are taken
    over when they hold the same settings and layout, and replaced when not; without pins,
    attach and pin."""
    cls, wanted = commands.cls, commands.make(args)
    if cls.is_pinned(pin_dir):
        pinned = commands.status(pin_dir)
        settings = wanted.settings()
        if cls.pins_match_object(pin_dir) and settings == {key: pinned.get(key) for key in settings}:
            say(f"taking over the attachment pinned in {pin_dir} (same settings)")
            return
        say(f"replacing the attachment pinned in {pin_dir} (other settings or another netbpf version)")
        if commands.detach(pin_dir, args):
            raise NetbpfError(f"the old attachment in {pin_dir} still drains: not replaced")
    with wanted.attach():  # closing after pin() leaves the pinned attachment in place
        wanted.pin(pin_dir)
        for note in wanted.feature_notes():
            say(note)
    say(f"attached to {wanted.cgroup} (pins in {pin_dir})")
