"""What the two command-line tools share: argument parsing, input checks, pin directories,
the live loop, and the rule that bad input is one line on stderr and exit status 2."""

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import cgroup
from .errors import NetbpfError, ObjectFileError, UsageError
from .loader import Link, Map, open_pinned_link


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


def require_root():
    if os.geteuid() != 0:
        raise UsageError("must run as root (loading BPF programs needs CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")


def check_pin_dir(path):
    """The pin directory must be on bpffs (mounted on demand at /sys/fs/bpf)."""
    path = Path(path)
    if str(path).startswith(cgroup.BPFFS):
        cgroup.ensure_bpffs()
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not cgroup.is_bpffs(parent):
        raise UsageError(f"pin directory {path} is not on a bpffs mount")
    return path


def cgroup_path_of_id(cgroup_id):
    """The cgroup directory whose inode is cgroup_id, or None."""
    root = cgroup.cgroup2_root()
    if os.stat(root).st_ino == cgroup_id:
        return str(root)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            try:
                if os.stat(full).st_ino == cgroup_id:
                    return full
            except FileNotFoundError:
                pass
    return None


def link_cgroup(path):
    """The cgroup a pinned cgroup link is attached to (from the kernel's link info)."""
    link = open_pinned_link(path)
    try:
        from .libbpf import ffi, lib

        info = ffi.new("struct bpf_link_info *")
        size = ffi.new("uint32_t *", ffi.sizeof(info[0]))
        if lib.bpf_obj_get_info_by_fd(link.fd, info, size) < 0:
            return None
        return cgroup_path_of_id(info.data[0])
    finally:
        link.close()


def unpin_all(pin_dir, link_names, map_names):
    """Detach the pinned links (even if another holder keeps them alive) and remove every pin."""
    pin_dir = Path(pin_dir)
    for name in link_names:
        if (pin_dir / name).exists():
            open_pinned_link(pin_dir / name).detach()
    for name in map_names:
        if (pin_dir / name).exists():
            (pin_dir / name).unlink()
    try:
        pin_dir.rmdir()
    except OSError:
        pass


def open_pinned_maps(pin_dir, obj, names):
    """The pinned maps of a tool, decoded with the BTF of its (unloaded) object file."""
    return {name: Map.open_pinned(Path(pin_dir) / name, like=obj.maps[name]) for name in names}


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


def is_attached(pin_dir, link_name):
    return (Path(pin_dir) / link_name).exists()


def close_all(items):
    for item in items:
        item.close()


__all__ = ["Parser", "common_arguments", "parse_port", "parse_ports", "require_root", "check_pin_dir",
           "link_cgroup", "unpin_all", "open_pinned_maps", "run_until_signalled", "print_json", "main",
           "setup_logging", "is_attached", "close_all", "Link"]
