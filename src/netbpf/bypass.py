# SPDX-License-Identifier: MIT
"""bypass: local TCP connections skip the TCP/IP stack, and no program can tell.

    with Bypass(cgroup="/sys/fs/cgroup/unified/myapp") as bypass:
        ...                       # sockets in that cgroup talk through sk_msg redirects
        print(bypass.stats())
    # leaving the block stops every redirect, waits until each socket's redirected data is
    # read, takes the sockets out of the map, and unloads

A socket joins the map only once netbpf has seen that its owner reads it the way the kernel's
sockmap path handles exactly like TCP (non-blocking, not spliced; bpf/bypass.h, enum sock_state).
Joining is done by an iterator program that an agent runs every few milliseconds: a thread of
the process that attached (`with Bypass(...)`, the `run` command), or for `attach`, a background
process that outlives the command.

CLI: python -m netbpf.bypass [run|attach|status|detach] [--cgroup DIR] [--scope S] [--ports P] ...
"""

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import cgroup, features, metrics, tool
from .errors import UsageError
from .loader import open_pinned_link
from .types import AttachType

DEFAULT_PIN_DIR = "/sys/fs/bpf/netbpf/bypass"
SCOPES = {"loopback": 0, "host": 1, "all": 2}
DEFAULT_QUEUE_FLOOR = 1 << 20
MAPS = ("sock_map", "sock_info", "listeners", "spliced_services", "counters", ".rodata", "control",
        "host_addrs", "allowed_ports")
JOIN_INTERVAL = 0.02       # seconds between rounds of the join iterator, at least
SLOW_INTERVAL = 1.0        # between rounds while nothing new happens but sockets wait or are joined
AGENT_CPU_SHARE = 0.05     # and at most this share of one CPU: a round visits every TCP socket
DRAIN_TIMEOUT = 10.0       # how long detach waits for readers to take their redirected data

# enum sock_state and enum plain_reason of bpf/bypass.h
STATES = {1: "waiting", 2: "ready", 3: "joined", 4: "leaving", 5: "left"}
READY, JOINED, LEAVING = 2, 3, 4
REASONS = ("none", "no_file", "blocking", "not_read", "spliced", "rcvlowat", "peer_outside", "detach",
           "insert_failed", "peer_waiting")
# reasons a new connection often leaves behind within moments (a server sets O_NONBLOCK right
# after accept(), a client reads its first reply): the agent looks again soon
TRANSIENT = {"no_file", "not_read", "peer_waiting", "blocking", "rcvlowat"}


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


def _ip_words(packed):
    """A 16-byte packed address as the four __u32 words of the C structs (memory order)."""
    return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]


def _ip_text(family, words):
    packed = b"".join(int(w).to_bytes(4, sys.byteorder) for w in words)
    return str(ipaddress.ip_address(packed[:4] if family == socket.AF_INET else packed))


def refresh_host_addrs(host_addrs):
    """Make the host_addrs map hold exactly this host's current addresses."""
    wanted = {(family, tuple(_ip_words(packed))) for family, packed in host_addresses()}
    present = {(k.family, tuple(k.ip)) for k in host_addrs}
    for family, ip in wanted - present:
        host_addrs[{"family": family, "ip": ip}] = 1
    for family, ip in present - wanted:
        del host_addrs[{"family": family, "ip": ip}]


def join_pass(join_link, maps):
    """One round of the agent: the join iterator over the processes' open files, then forget
    the sockets it did not see: they are closed. A pair joins as the iterator meets its second
    end (the first one waits READY), so when a round leaves sockets READY the iterator runs once
    more. Returns a Round: what run_paced() needs to decide when the next one is due."""
    control = maps["control"]
    this_round = control[0].round + 1
    control[0] = control[0]._replace(round=this_round)
    for _ in range(2):
        join_link.run_iter()
        result, ready = Round(), 0
        for key, info in maps["sock_info"].items():
            if info.seen_round < this_round:
                maps["sock_info"].pop(key, None)
                continue
            result.found += info.first_round == this_round
            result.survivors += info.first_round == this_round - 1
            if STATES.get(info.state) == "left":
                continue
            result.tracked += 1
            ready += info.state == READY
            moving = info.state in (READY, LEAVING) or REASONS[info.reason] in TRANSIENT
            result.waiting += moving and info.first_round < this_round
        if not ready:
            break
    for port, seen in maps["listeners"].items():
        if seen < this_round:  # the iterator stamps the listeners it finds open
            maps["listeners"].pop(port, None)
    return result


class Round:
    """What a round of the agent saw: sockets tracked (not LEFT), waiting (found by an earlier
    round and may move soon: a first read, an accept(), their peer, or leaving), found (new
    this round), survivors (found by the round before and still open), and how many sockets
    had joined so far (inserted)."""

    def __init__(self):
        self.tracked = self.waiting = self.found = self.survivors = self.inserted = 0


def agent_step(join_link, maps, count_only=False):
    """What run_paced() needs: the connections established so far and, unless count_only,
    join_pass()'s Round."""
    counters = maps["counters"]
    established = counters.sum(0).established
    if count_only:
        return established
    this = join_pass(join_link, maps)
    this.inserted = counters.sum(0).sockets_inserted
    return established, this


def drain(join_link, maps, timeout):
    """Stop every redirect at once, then take each socket out of the map as soon as its reader
    has read what was redirected to it (leaving the map earlier would drop that data).
    Returns the connections still in the map when the timeout ran out."""
    control = maps["control"]
    control[0] = control[0]._replace(detaching=1)
    deadline = time.monotonic() + timeout
    while True:
        join_pass(join_link, maps)
        if len(maps["sock_map"]) == 0:
            return []
        if time.monotonic() >= deadline:
            return connections(maps)
        time.sleep(JOIN_INTERVAL)


def connections(maps):
    """The sockets in the map: tuple, state, bytes redirected into them, and a process that
    has the socket open (as the join iterator last found it)."""
    found = []
    for key, info in maps["sock_info"].items():
        if info.state not in (JOINED, LEAVING):
            continue
        found.append({"local": f"{_ip_text(key.family, key.local_ip)}:{key.local_port}",
                      "remote": f"{_ip_text(key.family, key.remote_ip)}:{key.remote_port}",
                      "state": STATES[info.state],
                      "reason": REASONS[info.reason] if info.reason < len(REASONS) else str(info.reason),
                      "redirected_bytes": info.redirected_bytes, "pid": info.pid or None, "comm": info.comm})
    return sorted(found, key=lambda c: (c["local"], c["remote"]))


class Bypass(tool.Attachment):
    """The bypass attached to one cgroup (default: the cgroup v2 root, the whole host)."""

    NAME = "bypass"
    MAPS = MAPS
    MARKER = (AttachType.CGROUP_SOCK_OPS, "bypass_sockops")
    PIN_CHECK = "join"

    def __init__(self, cgroup_dir=None, scope="host", ports=(), max_sockets=65536,
                 queue_floor=DEFAULT_QUEUE_FLOOR, allow_blocking_readers=None, drain_timeout=DRAIN_TIMEOUT,
                 sk_msg_link=None):
        if scope not in SCOPES:
            raise UsageError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
        if not 2 <= max_sockets <= 1 << 24:
            raise UsageError(f"--max-sockets {max_sockets} is out of range (2-16777216)")
        if not 0 <= queue_floor < 1 << 31:
            raise UsageError(f"--queue-floor {queue_floor} is out of range (0-2147483647 bytes)")
        if drain_timeout < 0:
            raise UsageError(f"--timeout {drain_timeout} is negative")
        super().__init__(cgroup_dir)
        self.scope, self.ports = scope, list(ports)
        self.max_sockets, self.queue_floor = max_sockets, queue_floor
        # by default blocking readers join where the kernel reads them as TCP does (kernel/patches)
        if allow_blocking_readers is None:
            allow_blocking_readers = features.blocking_reads_like_tcp()
        self.allow_blocking_readers = bool(allow_blocking_readers)
        self.drain_timeout = drain_timeout
        self.sk_msg_link = sk_msg_link
        self.pinned = False
        self.still_draining = []  # what close() could not drain in time
        self._agent = self._agent_stop = None
        self._round_lock = threading.Lock()  # one round at a time: tick() may also be called directly

    def _prepare(self, obj):
        for name in ("sock_map", "sock_info"):
            obj.maps[name].max_entries = self.max_sockets
        settings = obj.rodata
        settings.cgroup_id = cgroup.cgroup_id(self.cgroup)
        settings.scope = SCOPES[self.scope]
        settings.ports_only = int(bool(self.ports))
        settings.queue_floor = self.queue_floor
        settings.allow_blocking = int(self.allow_blocking_readers)

    def _configure(self, maps):
        maps["control"][0] = {"detaching": 0, "agent_pid": 0}
        for port in self.ports:
            maps["allowed_ports"][port] = 1
        refresh_host_addrs(maps["host_addrs"])

    def settings(self):
        return {"cgroup": str(self.cgroup), "scope": self.scope, "ports": sorted(self.ports),
                "max_sockets": self.max_sockets, "queue_floor": self.queue_floor,
                "allow_blocking_readers": self.allow_blocking_readers}

    def feature_notes(self):
        if self.links["sk_msg"].kind == "prog_attach":
            return ["this kernel has no sockmap links (6.10+): sk_msg attaches with bpf_prog_attach"]
        return []

    def _attach_links(self):
        progs, maps = self.obj.programs, self.obj.maps
        # splice readers are marked before the first socket can join
        yield "splice", lambda: progs["bypass_splice"].attach_tracepoint()
        yield "sendfile", lambda: progs["bypass_sendfile"].attach_tracepoint()
        yield "sk_msg", lambda: progs["bypass_sk_msg"].attach_sockmap(maps["sock_map"], self.sk_msg_link)
        yield "join", lambda: progs["bypass_join"].attach_iter()
        yield "sockops", lambda: progs["bypass_sockops"].attach_cgroup(self.cgroup)

    def attach(self):
        super().attach()
        self._agent_stop = threading.Event()
        self._agent = threading.Thread(target=self._run_agent, name="netbpf-bypass-agent", daemon=True)
        self._agent.start()
        return self

    def _run_agent(self):
        run_paced(self.tick, self._agent_stop)

    def pin(self, pin_dir):
        super().pin(pin_dir)
        self.pinned = True

    def tick(self, count_only=False):
        """One round of joining and leaving (the agent's work; see agent_step)."""
        join_link = self.links.get("join")
        if join_link is None:  # closed
            return 0 if count_only else (0, Round())
        with self._round_lock:
            return agent_step(join_link, self.obj.maps, count_only)

    def close(self):
        """Unless pinned: stop redirecting, let readers take what was redirected to them (up to
        drain_timeout), take every socket out of the map, detach and unload. Connections still
        holding unread redirected data at the timeout stay in the map, redirecting nothing, until
        they are closed; they are listed in still_draining."""
        if self._agent is not None:
            self._agent_stop.set()
            self._agent.join()
            self._agent = None
        if self.obj is not None and not self.pinned and "join" in self.links:
            sockops = self.links.pop("sockops", None)
            if sockops is not None:
                sockops.close()  # the mark of an attached bypass: another may attach now
            self.still_draining = drain(self.links["join"], self.obj.maps, self.drain_timeout)
        super().close()

    def refresh_host_addrs(self):
        refresh_host_addrs(self.obj.maps["host_addrs"])

    def stats(self):
        return _stats(self.obj.maps)

    def connections(self):
        return connections(self.obj.maps)

    @classmethod
    def detach_pinned(cls, pin_dir, timeout=DRAIN_TIMEOUT, force=False):
        """Stop the agent, stop every redirect, drain, and remove every link and pin `attach` made.
        Returns the connections that still held unread redirected data at the timeout: then
        the pins stay (run detach again to finish) unless force, which removes them anyway
        (those connections keep the map, redirecting nothing, until they close)."""
        pin_dir = Path(pin_dir)
        if not cls.is_pinned(pin_dir):
            return super().detach_pinned(pin_dir) and []
        with cls.pinned_maps(pin_dir) as maps:
            stop_agent(maps["control"])
            if (pin_dir / "sockops").exists():
                open_pinned_link(pin_dir / "sockops").detach()
            with open_pinned_link(pin_dir / "join") as join_link:
                remaining = drain(join_link, maps, timeout)
        if remaining and not force:
            return remaining
        super().detach_pinned(pin_dir)
        return remaining


def start_agent(pin_dir):
    """The background process that runs the join iterator of a pinned bypass."""
    return subprocess.Popen([sys.executable, "-m", "netbpf.bypass", "agent", "--pin-dir", str(pin_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def agent_running(pid):
    """Whether pid is a live netbpf bypass agent: `agent`, or `serve` (not some other process
    that got the number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    bypass = b"netbpf.bypass" in cmdline or b"bypass" in cmdline
    return bool(pid) and bypass and (b"agent" in cmdline or b"serve" in cmdline)


def stop_agent(control, timeout=5.0):
    pid = control[0].agent_pid
    if pid and agent_running(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while agent_running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    control[0] = control[0]._replace(agent_pid=0)


def run_paced(step, stop):
    """The agent's loop, until the threading.Event stop is set. step() runs a round and returns
    (connections established so far, its Round); with count_only=True it returns only the
    first, cheaply. A round walks every process's open files, so the agent runs one:
      - soon after connections were established, soon again after a round found new sockets,
        and every JOIN_INTERVAL while sockets it found earlier may still move, for a second
        after the last new connection;
      - less and less often, up to SLOW_INTERVAL, while new connections are gone before a round
        or by the next one (connect, one request, close): a stream of short connections costs
        the host next to nothing, and a long-lived one among them is found all the same;
      - every SLOW_INTERVAL while other sockets are tracked (a blocking one may turn
        non-blocking; a joined one blocking);
    and never more than AGENT_CPU_SHARE of one CPU."""
    seen_established, busy_until, rest, last_round, backoff = None, 0.0, 0.0, 0.0, JOIN_INTERVAL
    established, last = step()
    while not stop.wait(max(rest, JOIN_INTERVAL)):
        now = time.monotonic()
        new_connections = established != seen_established
        if new_connections:
            busy_until = now + 1.0
        seen_established = established
        since = now - last_round
        due = (((new_connections or last.found) and since >= backoff) or (last.waiting and now < busy_until)
               or (last.tracked and since >= SLOW_INTERVAL))
        if not due:
            established, rest = step(count_only=True), 0.0
            continue
        spent = time.thread_time()
        established, this = step()
        last_round = time.monotonic()
        rest = (time.thread_time() - spent) / AGENT_CPU_SHARE  # CPU time: a loaded host slows the walk
        if this.survivors or this.waiting or this.inserted > last.inserted:
            backoff = JOIN_INTERVAL
        elif (last.found and not this.survivors) or (new_connections and not this.found):
            backoff = min(2 * backoff, SLOW_INTERVAL)  # they were gone by the time it looked
        last = this


def run_agent(pin_dir, stop=None):
    """The agent of a pinned bypass: run the join iterator until `stop` (a threading.Event; by
    default set by SIGTERM or SIGINT) is set or the pins are gone."""
    pin_dir = Path(pin_dir)
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    with Bypass.pinned_maps(pin_dir) as maps, open_pinned_link(pin_dir / "join") as join_link:
        control = maps["control"]
        control[0] = control[0]._replace(agent_pid=os.getpid())

        def step(count_only=False):
            if not (pin_dir / "join").exists() or control[0].detaching:
                stop.set()
            return agent_step(join_link, maps, count_only)

        try:
            run_paced(step, stop)
        finally:
            if (pin_dir / "join").exists():
                control[0] = control[0]._replace(agent_pid=0)
    return 0


def serve_agent(pin_dir, stop):
    """What `serve` does while attached: be the agent, after stopping one that `attach` started
    (a second agent would only repeat the work); another `serve` on the same pins is an error."""
    with Bypass.pinned_maps(pin_dir) as maps:
        pid = maps["control"][0].agent_pid
        if pid and pid != os.getpid() and agent_running(pid):
            if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                raise UsageError(f"another netbpf bypass serve (pid {pid}) runs the pins in {pin_dir}")
            stop_agent(maps["control"])
    run_agent(pin_dir, stop)


def _by_reason(values):
    return {name: int(values[i]) for i, name in enumerate(REASONS) if i and values[i]}


def _stats(maps):
    counters = maps["counters"].sum(0)._asdict()
    counters["plain_by_reason"] = _by_reason(counters["plain_by_reason"])
    counters["left_by_reason"] = _by_reason(counters["left_by_reason"])
    counters["sockets"] = len(maps["sock_map"])
    waiting = [0] * len(REASONS)
    for _, info in maps["sock_info"].items():
        if STATES.get(info.state) in ("waiting", "ready", "left") and info.reason < len(REASONS):
            waiting[info.reason] += 1
    counters["plain_now"] = _by_reason(waiting)  # open sockets kept plain right now, by reason
    return counters


def status(pin_dir=DEFAULT_PIN_DIR):
    """What a pinned bypass is doing (reads the pins; refreshes the host addresses)."""
    pin_dir = Path(pin_dir)
    if not (pin_dir / "join").exists():
        return {"attached": False, "cgroup": None, "pin_dir": str(pin_dir), "sockets": 0,
                "redirected_msgs": 0, "redirected_bytes": 0, "passed_msgs": 0}
    with Bypass.pinned_maps(pin_dir) as maps:
        refresh_host_addrs(maps["host_addrs"])
        config, control = maps[".rodata"][0], maps["control"][0]
        sk_msg = open_pinned_link(pin_dir / "sk_msg")
        mechanism = sk_msg.kind
        sk_msg.close()
        return {"attached": True, "detaching": bool(control.detaching),
                "cgroup": cgroup.path_of_id(config.cgroup_id), "pin_dir": str(pin_dir),
                "scope": {v: k for k, v in SCOPES.items()}[config.scope],
                "ports": sorted(port for port, listed in maps["allowed_ports"].items() if listed),
                "queue_floor": config.queue_floor, "allow_blocking_readers": bool(config.allow_blocking),
                "max_sockets": maps["sock_map"].max_entries,
                "agent": {"pid": control.agent_pid or None, "running": agent_running(control.agent_pid)},
                "sk_msg_attach": mechanism, "kernel": features.summary(),
                "spliced_services": sorted(maps["spliced_services"]),
                "connections": connections(maps), **_stats(maps)}


PASSED_REASONS = ("no_peer", "peer_unsafe", "unread_plain", "peer_full", "detaching", "shut_down")


def metric_families(stats):
    """The bypass's counters for netbpf.metrics (Prometheus names and types)."""
    passed = {reason: stats[f"passed_{reason}"] for reason in PASSED_REASONS}
    passed["redirect_failed"] = stats["redirect_failed"]

    def every_reason(counts):  # zeros too: a rate needs the series before its first event
        return {reason: counts.get(reason, 0) for reason in REASONS[1:]}

    return [
        metrics.gauge("netbpf_bypass_sockets", "Sockets in the sockhash now (their sends are redirected)",
                      stats["sockets"]),
        metrics.by_label(metrics.GAUGE, "netbpf_bypass_sockets_plain",
                         "Open sockets of the cgroup kept on plain TCP now, by reason", "reason",
                         every_reason(stats["plain_now"])),
        metrics.counter("netbpf_bypass_connections_established_total",
                        "TCP connections of the cgroup established", stats["established"]),
        metrics.counter("netbpf_bypass_sockets_joined_total", "Sockets that joined the sockhash",
                        stats["sockets_inserted"]),
        metrics.by_label(metrics.COUNTER, "netbpf_bypass_sockets_left_total",
                         "Sockets that left the sockhash after their redirected data was read, by reason",
                         "reason", every_reason(stats["left_by_reason"])),
        metrics.by_label(metrics.COUNTER, "netbpf_bypass_sockets_kept_plain_total",
                         "Sockets kept on plain TCP, each counted once per reason", "reason",
                         every_reason(stats["plain_by_reason"])),
        metrics.counter("netbpf_bypass_insert_failures_total", "Sockets the sockhash refused",
                        stats["insert_failed"]),
        metrics.counter("netbpf_bypass_spliced_sockets_total", "Sockets read with splice or sendfile (kept plain)",
                        stats["spliced"]),
        metrics.counter("netbpf_bypass_redirected_messages_total", "Messages redirected into the peer socket",
                        stats["redirected_msgs"]),
        metrics.counter("netbpf_bypass_redirected_bytes_total", "Bytes redirected into the peer socket",
                        stats["redirected_bytes"]),
        metrics.by_label(metrics.COUNTER, "netbpf_bypass_passed_messages_total",
                         "Messages of joined sockets that took the TCP path, by reason", "reason", passed),
        metrics.counter("netbpf_bypass_passed_bytes_total", "Bytes of joined sockets that took the TCP path",
                        stats["passed_bytes"]),
    ]


def _reasons_text(counts):
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items()) or "none"


def format_line(stats, previous, elapsed, blocking_allowed=False):
    def rate(name):
        return (stats[name] - previous[name]) / elapsed if previous and elapsed else 0.0

    return (f"sockets {stats['sockets']:6d}  redirected {rate('redirected_msgs'):9.0f} msg/s "
            f"{rate('redirected_bytes') / 1e6:9.2f} MB/s  passed {rate('passed_msgs'):8.0f} msg/s  "
            f"(total {stats['redirected_msgs']} redirected, {stats['passed_msgs']} passed; "
            f"plain now: {_reasons_text(stats['plain_now'])})"
            + ("  [blocking readers allowed]" if blocking_allowed else ""))


def show_status(info):
    state = "detaching (draining)" if info["detaching"] else "attached"
    print(f"bypass: {state} to {info['cgroup']} (pins in {info['pin_dir']}, scope {info['scope']}, "
          f"sk_msg via {info['sk_msg_attach']})")
    agent = info["agent"]
    print(f"  agent pid {agent['pid']}: {'running' if agent['running'] else 'NOT RUNNING: nothing joins'}")
    if info["allow_blocking_readers"] and info["kernel"]["blocking_reads_like_tcp"]:
        print("  blocking readers join: this kernel reads sockets in a sockmap as TCP does (probed)")
    elif info["allow_blocking_readers"]:
        print("  blocking readers allowed (--allow-blocking-readers): they may see EAGAIN and short "
              "MSG_WAITALL reads")
    print(f"  sockets in the map {info['sockets']}; kept plain now: {_reasons_text(info['plain_now'])}")
    print(f"  ever kept plain (sockets, by reason): {_reasons_text(info['plain_by_reason'])}; "
          f"left the map: {_reasons_text(info['left_by_reason'])}")
    print(f"  redirected {info['redirected_msgs']} messages ({info['redirected_bytes']} bytes); "
          f"passed {info['passed_msgs']} ({info['passed_no_peer']} no peer, "
          f"{info['passed_peer_unsafe']} peer unsafe, {info['passed_unread_plain']} unread TCP data, "
          f"{info['passed_peer_full']} peer full, {info['passed_shut_down']} after shutdown)")
    for conn in info["connections"]:
        owner = f"{conn['comm']}[{conn['pid']}]" if conn["pid"] else "?"
        print(f"  {conn['local']:>22} -> {conn['remote']:<22} {conn['state']:8} "
              f"{conn['redirected_bytes']:>12} B in  {owner}")


def live_line(bypass, stats, previous, elapsed):
    bypass.refresh_host_addrs()
    return format_line(stats, previous, elapsed, bypass.allow_blocking_readers)


def show_draining(prog, remaining, pinned):
    print(f"{prog}: {len(remaining)} connections still hold redirected data their programs have not read:",
          file=sys.stderr)
    for conn in remaining:
        owner = f"{conn['comm']}[{conn['pid']}]" if conn["pid"] else "owner unknown"
        print(f"  {conn['local']} -> {conn['remote']} ({owner})", file=sys.stderr)
    if pinned:
        print(f"{prog}: pins kept: run detach again once they read it, or detach --force (they then keep "
              "netbpf's map, redirecting nothing, until they close)", file=sys.stderr)
    else:
        print(f"{prog}: they keep netbpf's map, redirecting nothing, until they close", file=sys.stderr)


def build_parser(prog="python -m netbpf.bypass"):
    parser = tool.Parser(prog=prog,
                         description="Local TCP connections skip the TCP/IP stack (sockops + sk_msg).")
    parser.add_argument("command", nargs="?", default="run",
                        choices=("run", "attach", "status", "detach", "serve", "agent"),
                        help="run (default): attach, join sockets and show live counters until Ctrl-C, "
                             "then detach; attach: attach, pin, and start a background agent; status: "
                             "show a pinned bypass; detach: drain and remove it; serve: the service form "
                             "(attach with pins or take over a previous instance's, be the agent, detach "
                             "on SIGTERM); agent: internal")
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
    parser.add_argument("--allow-blocking-readers", action=argparse.BooleanOptionalAction, default=None,
                        help="also bypass sockets read with blocking calls. Default: only where the kernel "
                             "reads them as TCP does (a probe; kernel/patches); elsewhere allowing them "
                             "accepts the kernel's deviations: a blocking recv() fails with EAGAIN after a "
                             "signal, stop/continue or a wake-up without data, and MSG_WAITALL returns short")
    parser.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, metavar="S",
                        help=f"detach: seconds to wait for readers to take redirected data (default {DRAIN_TIMEOUT:g})")
    parser.add_argument("--force", action="store_true",
                        help="detach: remove the pins even if connections still hold redirected data")
    return parser


def cli(argv=None, prog="python -m netbpf.bypass"):
    args = build_parser(prog).parse_args(argv)
    tool.setup_logging(args.verbose)
    ports = tool.parse_ports(args.ports)
    prog = "bypass"

    if args.timeout < 0:
        raise UsageError(f"--timeout {args.timeout} is negative")
    if args.command == "agent":
        tool.require_root()
        return run_agent(tool.check_pin_dir(args.pin_dir))

    def make(args):
        return Bypass(args.cgroup, args.scope, ports, args.max_sockets, args.queue_floor,
                      args.allow_blocking_readers, args.timeout)

    def detach(pin_dir, args):
        remaining = Bypass.detach_pinned(pin_dir, args.timeout, args.force)
        if remaining:
            show_draining(prog, remaining, pinned=not args.force)
        return remaining and not args.force

    def after_attach(bypass, pin_dir):
        start_agent(pin_dir)

    def after_close(bypass):
        if bypass.still_draining:
            show_draining(prog, bypass.still_draining, pinned=False)

    return tool.run_command(args, tool.Commands(Bypass, make, status, show_status, live_line, metric_families,
                                                detach, after_attach, after_close, serve_agent,
                                                pinned_stats=_stats))


def run_cli(argv, prog="python -m netbpf.bypass"):
    """The command line: its exit status (bad input: one line on stderr and 2)."""
    return tool.main("netbpf.bypass", lambda: cli(argv, prog))


def main():
    sys.exit(run_cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
