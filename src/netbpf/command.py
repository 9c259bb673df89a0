# SPDX-License-Identifier: MIT
"""The command line both tools share: argument parsing, the verbs (status, detach, attach, run,
serve), the live loop, and the rule that bad input is one line on stderr and exit status 2. A
tool's command line is a Command subclass; run_command() calls its methods."""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time

from . import metrics
from .errors import NetbpfError, ObjectFileError, UsageError
from .pins import check_pin_dir
from .privileges import require_root


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
    other netbpf errors (the kernel refused something) -> one line + exit 1; a reader of stdout
    that went away (`| head`) -> exit 1 without a traceback."""
    try:
        status = run() or 0
        sys.stdout.flush()  # a small output still sits in the buffer: its broken pipe shows here
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush finds no pipe
        return 1
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


class Command:
    """A tool's command line. A subclass names TOOL (its Attachment subclass) and gives:

        make()                    an unattached TOOL from the arguments (self.args)
        status(pins)              the dict `status` prints (pins: a PinDir)
        show_status(info)         that dict, printed for people
        live_line(tool, stats, previous stats, seconds between)   one line of `run`
        metric_families(stats)    for netbpf.metrics
        pinned_stats(maps)        what a scrape of `serve` reads (cheaper than status)

    and may change what happens around the verbs: detach(pins) (True: pins kept because
    connections still drain), after_attach(tool, pins) once `attach` has pinned,
    after_close(tool) once `run` has detached, serve_loop(pins, stop) what `serve` does while
    attached (by default: wait for stop)."""

    TOOL = None

    def __init__(self, args, ports=()):
        self.args, self.ports, self.prog = args, ports, self.TOOL.NAME  # ports: parsed from args

    def make(self):
        raise NotImplementedError

    def status(self, pins):
        raise NotImplementedError

    def show_status(self, info):
        raise NotImplementedError

    def live_line(self, tool, stats, previous, elapsed):
        raise NotImplementedError

    def metric_families(self, stats):
        raise NotImplementedError

    def pinned_stats(self, maps):
        raise NotImplementedError

    def detach(self, pins):
        pins.remove()
        return False

    def after_attach(self, tool, pins):
        pass

    def after_close(self, tool):
        pass

    def serve_loop(self, pins, stop):
        stop.wait()


def run_command(command):
    """The verbs both tools share: status, detach, attach, run, serve."""
    args, prog = command.args, command.prog
    address = metrics.parse_address(args.metrics) if args.metrics else None
    require_root()
    pins = command.TOOL.pins(check_pin_dir(args.pin_dir))
    if args.command == "status":
        info = command.status(pins)
        if args.metrics_text:
            if not info["attached"]:
                raise UsageError(f"{prog} is not attached (no pins in {pins.path})")
            print(metrics.text(metrics.registry(lambda: (info["cgroup"], info), command.metric_families)), end="")
        elif args.json:
            print_json(info)
        elif not info["attached"]:
            print(f"{prog}: not attached (no pins in {pins.path})")
        else:
            command.show_status(info)
        return 0
    if args.command == "detach":
        if not pins.occupied():
            raise UsageError(f"{prog} is not attached (no pins in {pins.path})")
        if command.detach(pins):
            return 1
        print(f"{prog}: detached (removed {pins.path})")
        return 0
    if args.command == "serve":
        return serve(command, pins, address)

    tool = command.make()
    if args.command == "attach":
        if pins.occupied():
            raise UsageError(f"{prog} is already attached with pins in {pins.path} (detach it first)")
        with tool.attach():  # closing after pin() leaves the pinned attachment in place
            tool.pin(pins.path)
            notes = tool.feature_notes()
        command.after_attach(tool, pins)
        print(f"{prog}: attached to {tool.cgroup} (pins in {pins.path})")
        for note in notes:
            print(f"{prog}: {note}")
        return 0

    # the metrics port first: when it is taken, nothing has been attached
    with serving_metrics(address, lambda: (str(tool.cgroup), tool.stats()), command), tool.attach():
        print(f"{prog}: attached to {tool.cgroup}; Ctrl-C to detach", flush=True)
        for note in tool.feature_notes():
            print(f"{prog}: {note}", flush=True)
        state = {"previous": None, "when": time.monotonic()}

        def step():
            now, stats = time.monotonic(), tool.stats()
            end = "\r" if sys.stdout.isatty() else "\n"
            print(command.live_line(tool, stats, state["previous"], now - state["when"]), end=end, flush=True)
            state["previous"], state["when"] = stats, now

        run_until_signalled(step, args.interval)
        print(f"\n{prog}: detaching", flush=True)
    command.after_close(tool)
    print(f"{prog}: detached", flush=True)
    return 0


def serving_metrics(address, read, command):
    """A context: metrics served on address while it lasts (nothing when address is None)."""
    if address is None:
        return contextlib.nullcontext()
    return metrics.Server(metrics.registry(read, command.metric_families), address)


def serve(command, pins, address):
    """The service form: attach with pins (see take_over_or_attach), serve metrics, be what the
    tool runs while attached (command.serve_loop), and on SIGTERM or SIGINT detach. One line per
    change of state, none per message."""

    def say(text):
        print(f"{command.prog}: {text}", flush=True)

    pinned = {}  # the pinned maps while attached: a scrape reads them, no more

    def read():
        if "maps" not in pinned:
            raise NetbpfError(f"{command.prog} is not attached yet")
        return pinned["cgroup"], command.pinned_stats(pinned["maps"])

    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serving_metrics(address, read, command):  # the port first: when it is taken, nothing is attached
            take_over_or_attach(command, pins, say)
            with pins.maps() as maps:
                pinned.update(maps=maps, cgroup=command.TOOL.pinned_settings(pins, maps)["cgroup"])
                if address:
                    say(f"metrics on http://{metrics.format_address(address)}/metrics")
                command.serve_loop(pins, stop)
                pinned.clear()
            say("detaching")
            if command.detach(pins):
                return 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    say("detached")
    return 0


def take_over_or_attach(command, pins, say):
    """Pins a previous instance left (it was killed, or stopped without detaching) are taken
    over when they hold the same settings and layout, and replaced when not; without pins,
    attach and pin."""
    wanted = command.make()
    if pins.attached():
        settings = wanted.settings()
        if pins.match_object():
            with pins.maps() as maps:
                pinned = command.TOOL.pinned_settings(pins, maps)
            if settings == {key: pinned.get(key) for key in settings}:
                say(f"taking over the attachment pinned in {pins.path} (same settings)")
                return
        say(f"replacing the attachment pinned in {pins.path} (other settings or another netbpf version)")
        if command.detach(pins):
            raise NetbpfError(f"the old attachment in {pins.path} still drains: not replaced")
    with wanted.attach():  # closing after pin() leaves the pinned attachment in place
        wanted.pin(pins.path)
        for note in wanted.feature_notes():
            say(note)
    say(f"attached to {wanted.cgroup} (pins in {pins.path})")
