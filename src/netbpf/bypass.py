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
import contextlib
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

from . import cgroup, features, mechanisms, metrics, netns, tool
from .errors import LibbpfError, NetbpfError, UsageError
from .loader import open_pinned_link
from .mechanisms import Alternative, Choice
from .types import AttachType

DEFAULT_PIN_DIR = "/sys/fs/bpf/netbpf/bypass"
SCOPES = {"loopback": 0, "host": 1, "all": 2}
DEFAULT_QUEUE_FLOOR = 1 << 20
MAPS = ("sock_map", "sock_info", "listeners", "spliced_services", "netns_seen", "event_netns", "counters",
        ".rodata", "control", "host_addrs", "allowed_ports")
JOIN_INTERVAL = 0.02       # seconds between rounds of the sweep, at least
SLOW_INTERVAL = 1.0        # between rounds while nothing new happens but sockets wait or are joined
AGENT_CPU_SHARE = 0.05     # and at most this share of one CPU: a round visits every TCP socket
DRAIN_TIMEOUT = 10.0       # how long detach waits for readers to take their redirected data

# enum sock_state and enum plain_reason of bpf/bypass.h
STATES = {1: "waiting", 2: "ready", 3: "joined", 4: "leaving", 5: "left"}
READY, JOINED, LEAVING = 2, 3, 4
REASONS = ("none", "no_file", "blocking", "spliced", "rcvlowat", "peer_outside", "detach", "insert_failed",
           "peer_waiting")
# reasons a new connection often leaves behind within moments (a server sets O_NONBLOCK right
# after accept(), its peer follows): the agent looks again soon
TRANSIENT = {"no_file", "peer_waiting", "blocking", "rcvlowat"}

# How sockets join, each chosen by what the kernel's verifier accepts (netbpf.mechanisms):
# the tc program on lo joins loopback pairs at their first segment after both qualify (none:
# the sweep alone joins, every JOIN_INTERVAL); the sweep joins what tc does not see and takes
# sockets out again.
EVENT_JOIN = Choice("event join", (Alternative("tc", "bypass_join_tc"),), required=False)
SWEEP = Choice("sweep", (Alternative("iter/task_file", "bypass_sweep_files"),
                         Alternative("iter/tcp", "bypass_sweep_tcp")))
CHOICES = (EVENT_JOIN, SWEEP)
MECHANISMS_PIN = "mechanisms"  # a symlink beside the pins whose target is the JSON of mechanisms()


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


class Sweep:
    """The walk of one agent round: the sweep iterator run once (iter/task_file sees every
    process's files, whatever their network namespace), or once in each network namespace the
    cgroup's connections live in (iter/tcp sees only the namespace its iterator is made in:
    the agent's thread enters each one through a process of the cgroup that lives there)."""

    def __init__(self, link, mechanism, cgroup_dir, netns_seen):
        self.link, self.per_netns, self.cgroup_dir = link, mechanism == "iter/tcp", cgroup_dir
        self.netns_seen = netns_seen  # the map sockops notes the connections' namespaces in
        self.own = netns.inode_of()
        self.processes = {}  # network namespace -> a process of the cgroup in it
        if self.per_netns:  # connections older than the bypass: where the cgroup's processes are now
            for pid in cgroup.pids_below(cgroup_dir):
                inode = netns.inode_of(pid)
                if inode is not None and inode not in self.processes:
                    self.processes[inode] = pid
                    netns_seen[inode] = 0

    def run(self):
        """One walk; returns the namespaces it walked (None: all of them)."""
        self.link.run_iter()
        if not self.per_netns:
            return None
        return {self.own} | {inode for inode in self.netns_seen if inode != self.own and self._walk_in(inode)}

    def _walk_in(self, inode):
        pid = self.processes.get(inode)
        if pid is None or netns.inode_of(pid) != inode:
            pid = netns.find_process(inode, cgroup.pids_below(self.cgroup_dir))
        if pid is None:
            self.processes.pop(inode, None)
            self.netns_seen.pop(inode, None)  # no process of the cgroup lives there any more
            return False
        self.processes[inode] = pid
        try:
            with netns.entered(pid):
                self.link.run_iter()
        except OSError:  # the process ended meanwhile: another one next round
            self.processes.pop(inode, None)
            return False
        return True


def join_pass(sweep, maps):
    """One round of the agent: the sweep, then forget the sockets it did not see where it
    looked: they are closed. A pair joins as the sweep meets its second end (the first one waits
    READY), so when a round leaves such sockets READY the sweep runs once more. Returns a Round:
    what run_paced() needs to decide when the next one is due."""
    control = maps["control"]
    this_round = control[0].round + 1
    control[0] = control[0]._replace(round=this_round)
    for _ in range(2):
        walked = sweep.run()
        tracked_netns = set(maps["netns_seen"]) | (walked or set())
        event = set(maps["event_netns"])
        result, ready = Round(), 0
        for key, info in maps["sock_info"].items():
            looked = walked is None or info.netns in walked or info.netns not in tracked_netns
            if info.seen_round < this_round and looked:
                maps["sock_info"].pop(key, None)
                continue
            if STATES.get(info.state) == "left":
                continue
            result.tracked += 1
            if info.netns in event:
                continue  # the tc program joins these at their next segment
            result.found += info.first_round == this_round
            result.survivors += info.first_round == this_round - 1
            ready += info.state == READY
            moving = info.state in (READY, LEAVING) or REASONS[info.reason] in TRANSIENT
            result.waiting += moving and info.first_round < this_round
        if not ready:
            break
    for port, seen in maps["listeners"].items():
        if seen < this_round:  # the sweep stamps the listeners it finds open
            maps["listeners"].pop(port, None)
    return result


class Round:
    """What a round of the agent saw: sockets tracked (not LEFT), and of those the sweep joins
    (not the tc program): waiting (found by an earlier round and may move soon: an accept(), a
    flag, their peer, or leaving), found (new this round), survivors (found by the round before
    and still open); and how many sockets had joined so far (inserted)."""

    def __init__(self):
        self.tracked = self.waiting = self.found = self.survivors = self.inserted = 0


def heartbeat(control, every_ns=10**9):
    """Say that the agent runs (the programs stop without it: AGENT_LOST_NS in bypass.h), at
    most once a second."""
    now = time.monotonic_ns()
    if now - control[0].agent_seen_ns >= every_ns:
        control[0] = control[0]._replace(agent_seen_ns=now)


def agent_step(sweep, maps, count_only=False):
    """What run_paced() needs: the connections established so far (where the sweep joins, and
    everywhere) and, unless count_only, join_pass()'s Round."""
    heartbeat(maps["control"])
    counters = maps["counters"].sum(0)
    established = (counters.established_for_sweep, counters.established)
    if count_only:
        return established
    this = join_pass(sweep, maps)
    this.inserted = maps["counters"].sum(0).sockets_inserted
    return established, this


def drain(sweep, maps, timeout):
    """Stop every redirect at once, then take each socket out of the map as soon as its reader
    has read what was redirected to it (leaving the map earlier would drop that data).
    Returns the connections still in the map when the timeout ran out."""
    control = maps["control"]
    control[0] = control[0]._replace(detaching=1)
    deadline = time.monotonic() + timeout
    while True:
        join_pass(sweep, maps)
        if len(maps["sock_map"]) == 0:
            return []
        if time.monotonic() >= deadline:
            return connections(maps)
        time.sleep(JOIN_INTERVAL)


def socket_owners(inodes):
    """{socket inode: (pid, comm)} of a process that has each socket open, from /proc (as `ss -p`
    finds them); sockets no process holds are left out."""
    wanted, owners = {f"socket:[{inode}]": inode for inode in inodes if inode}, {}
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            found = [wanted[link] for link in links & wanted.keys() if wanted[link] not in owners]
            if found:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                owners.update((inode, (int(pid), comm)) for inode in found)
        except OSError:  # gone meanwhile, or a file descriptor closed under us
            continue
    return owners


def connections(maps):
    """The sockets in the map: tuple, network namespace, state, whether their owner reads them
    (redirects go in), bytes redirected into them, and a process that has the socket open (None
    when no process of this host's /proc holds it)."""
    members = [(key, info) for key, info in maps["sock_info"].items() if info.state in (JOINED, LEAVING)]
    owners = socket_owners(info.inode for _, info in members)
    found = []
    for key, info in members:
        pid, comm = owners.get(info.inode, (None, None))
        found.append({"local": f"{_ip_text(key.family, key.local_ip)}:{key.local_port}",
                      "remote": f"{_ip_text(key.family, key.remote_ip)}:{key.remote_port}",
                      "netns": info.netns, "state": STATES[info.state],
                      "reason": REASONS[info.reason] if info.reason < len(REASONS) else str(info.reason),
                      "reading": bool(info.reader), "redirected_bytes": info.redirected_bytes,
                      "pid": pid, "comm": comm})
    return sorted(found, key=lambda c: (c["local"], c["remote"]))


class Bypass(tool.Attachment):
    """The bypass attached to one cgroup (default: the cgroup v2 root, the whole host)."""

    NAME = "bypass"
    MAPS = MAPS
    MARKER = (AttachType.CGROUP_SOCK_OPS, "bypass_sockops")
    PIN_CHECK = "sweep"

    def __init__(self, cgroup_dir=None, scope="host", ports=(), max_sockets=65536,
                 queue_floor=DEFAULT_QUEUE_FLOOR, allow_blocking_readers=None, drain_timeout=DRAIN_TIMEOUT,
                 sk_msg_link=None, tc_link=None):
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
        # the kinds of attachment (None: the kernel's best); NETBPF_REFUSE can refuse the links
        forced = mechanisms.forced_refusals()
        self.sk_msg_link = False if "sockmap_link" in forced else sk_msg_link
        self.tc_link = False if "tcx" in forced else tc_link
        self.chosen, self.refused = {}, {}
        self.pinned = False
        self.still_draining = []  # what close() could not drain in time
        self._sweep = self._agent = self._agent_stop = None
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

    def _load_object(self):
        obj, self.chosen, self.refused = mechanisms.load(self._new_object, CHOICES, self.NAME)
        return obj

    def _configure(self, maps):
        maps["control"][0] = {"detaching": 0, "agent_pid": 0}
        for port in self.ports:
            maps["allowed_ports"][port] = 1
        refresh_host_addrs(maps["host_addrs"])

    def settings(self):
        return {"cgroup": str(self.cgroup), "scope": self.scope, "ports": sorted(self.ports),
                "max_sockets": self.max_sockets, "queue_floor": self.queue_floor,
                "allow_blocking_readers": self.allow_blocking_readers}

    def mechanisms(self):
        """How sockets join and how the programs are attached: what `status` reports as "join"."""
        tc = self.links.get("tc")
        return {"event": "tc" if tc else None, "tc_attach": tc.info()["type"] if tc else None,
                "sweep": self.chosen[SWEEP.job].name, "refused": dict(self.refused),
                "sk_msg_attach": self.links["sk_msg"].kind}

    def feature_notes(self):
        return join_lines(self.mechanisms())

    def _attach_links(self):
        progs, maps = self.obj.programs, self.obj.maps
        # splice readers are marked before the first socket can join
        yield "splice", lambda: progs["bypass_splice"].attach_tracepoint()
        yield "sendfile", lambda: progs["bypass_sendfile"].attach_tracepoint()
        yield "sk_msg", lambda: progs["bypass_sk_msg"].attach_sockmap(maps["sock_map"], self.sk_msg_link)
        yield "sweep", lambda: progs[self.chosen[SWEEP.job].program].attach_iter()
        if self.chosen[EVENT_JOIN.job]:
            yield "tc", self._attach_tc
        yield "sockops", lambda: progs["bypass_sockops"].attach_cgroup(self.cgroup)

    def _attach_tc(self):
        """The tc program on lo's ingress in this thread's network namespace; None (and noted as
        refused) when the kernel takes neither a tcx link nor a tc filter."""
        try:
            link = self.obj.programs[EVENT_JOIN.alternatives[0].program].attach_tc(socket.if_nametoindex("lo"),
                                                                                 self.tc_link)
        except LibbpfError as exc:
            self.refused["tc"] = f"attach: {exc}"
            self.chosen[EVENT_JOIN.job] = None
            return None
        self.obj.maps["event_netns"][netns.inode_of()] = 1
        return link

    def attach(self):
        super().attach()
        self._sweep = Sweep(self.links["sweep"], self.chosen[SWEEP.job].name, self.cgroup, self.obj.maps["netns_seen"])
        self._agent_stop = threading.Event()
        self._agent = threading.Thread(target=self._run_agent, name="netbpf-bypass-agent", daemon=True)
        self._agent.start()
        return self

    def _run_agent(self):
        run_paced(self.tick, self._agent_stop)

    def pin(self, pin_dir):
        super().pin(pin_dir)
        os.symlink(json.dumps(self.mechanisms(), sort_keys=True), Path(pin_dir) / MECHANISMS_PIN)
        self.pinned = True

    def tick(self, count_only=False):
        """One round of joining and leaving (the agent's work; see agent_step)."""
        if "sweep" not in self.links:  # closed
            return (0, 0) if count_only else ((0, 0), Round())
        with self._round_lock:
            return agent_step(self._sweep, self.obj.maps, count_only)

    def close(self):
        """Unless pinned: stop redirecting, let readers take what was redirected to them (up to
        drain_timeout), take every socket out of the map, detach and unload. Connections still
        holding unread redirected data at the timeout stay in the map, redirecting nothing, until
        they are closed; they are listed in still_draining."""
        if self._agent is not None:
            self._agent_stop.set()
            self._agent.join()
            self._agent = None
        if self.obj is not None and not self.pinned and self._sweep is not None:
            for name in ("sockops", "tc"):  # sockops first: the mark of an attached bypass
                link = self.links.pop(name, None)
                if link is not None:
                    link.close()
            self.still_draining = drain(self._sweep, self.obj.maps, self.drain_timeout)
        self._sweep = None
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
            for name in ("sockops", "tc"):
                if os.path.lexists(pin_dir / name):
                    open_pinned_link(pin_dir / name).detach()
            with pinned_sweep(pin_dir, maps) as sweep:
                remaining = drain(sweep, maps, timeout)
        if remaining and not force:
            return remaining
        super().detach_pinned(pin_dir)
        return remaining


def pinned_mechanisms(pin_dir):
    """What Bypass.mechanisms() said when the bypass in pin_dir was attached."""
    return json.loads(os.readlink(Path(pin_dir) / MECHANISMS_PIN))


@contextlib.contextmanager
def pinned_sweep(pin_dir, maps):
    """The Sweep of a pinned bypass (its link closed afterwards)."""
    config = maps[".rodata"][0]
    with open_pinned_link(Path(pin_dir) / "sweep") as link:
        yield Sweep(link, pinned_mechanisms(pin_dir)["sweep"], cgroup.path_of_id(config.cgroup_id),
                    maps["netns_seen"])


def start_agent(pin_dir, timeout=60.0):
    """The background process that runs the sweep of a pinned bypass, once it has said in the
    control map that it runs (so that a `status` right after `attach` sees it)."""
    agent = subprocess.Popen([sys.executable, "-m", "netbpf.bypass", "agent", "--pin-dir", str(pin_dir)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    with Bypass.pinned_maps(pin_dir) as maps:
        while maps["control"][0].agent_pid != agent.pid and time.monotonic() < deadline:
            if agent.poll() is not None:
                raise NetbpfError(f"the agent exited at its start (status {agent.returncode}); "
                                  f"run `python -m netbpf.bypass agent --pin-dir {pin_dir}` to see why")
            time.sleep(0.01)
    return agent


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
    first, cheaply: a pair (where the sweep joins, everywhere). A round walks every TCP socket,
    so the agent runs one:
      - soon after connections were established where the sweep joins them, soon again after a
        round found new sockets, and every JOIN_INTERVAL while sockets it found earlier may
        still move, for a second after the last new connection;
      - less and less often, up to SLOW_INTERVAL, while new connections are gone before a round
        or by the next one (connect, one request, close): a stream of short connections costs
        the host next to nothing, and a long-lived one among them is found all the same;
      - every SLOW_INTERVAL while other sockets are tracked (a blocking one may turn
        non-blocking; a joined one blocking), or connections were established where the tc
        program joins (the sweep only keeps their books);
    and never more than AGENT_CPU_SHARE of one CPU."""
    seen, busy_until, rest, last_round, backoff, unswept = None, 0.0, 0.0, 0.0, JOIN_INTERVAL, False
    established, last = step()
    while not stop.wait(max(rest, JOIN_INTERVAL)):
        now = time.monotonic()
        new_connections = seen is None or established[0] != seen[0]
        unswept = unswept or seen is None or established[1] != seen[1]
        if new_connections:
            busy_until = now + 1.0
        seen = established
        since = now - last_round
        due = (((new_connections or last.found) and since >= backoff) or (last.waiting and now < busy_until)
               or ((last.tracked or unswept) and since >= SLOW_INTERVAL))
        if not due:
            established, rest = step(count_only=True), 0.0
            continue
        spent = time.thread_time()
        established, this = step()
        last_round, unswept = time.monotonic(), False
        rest = (time.thread_time() - spent) / AGENT_CPU_SHARE  # CPU time: a loaded host slows the walk
        if this.survivors or this.waiting or this.inserted > last.inserted:
            backoff = JOIN_INTERVAL
        elif (last.found and not this.survivors) or (new_connections and not this.found):
            backoff = min(2 * backoff, SLOW_INTERVAL)  # they were gone by the time it looked
        last = this


def run_agent(pin_dir, stop=None):
    """The agent of a pinned bypass: run the sweep until `stop` (a threading.Event; by default
    set by SIGTERM or SIGINT) is set or the pins are gone."""
    pin_dir = Path(pin_dir)
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    with Bypass.pinned_maps(pin_dir) as maps, pinned_sweep(pin_dir, maps) as sweep:
        control = maps["control"]
        control[0] = control[0]._replace(agent_pid=os.getpid())

        def step(count_only=False):
            if not Bypass.is_pinned(pin_dir) or control[0].detaching:
                stop.set()
            return agent_step(sweep, maps, count_only)

        try:
            run_paced(step, stop)
        finally:
            if Bypass.is_pinned(pin_dir):
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
    if not Bypass.is_pinned(pin_dir):
        return {"attached": False, "cgroup": None, "pin_dir": str(pin_dir), "sockets": 0,
                "redirected_msgs": 0, "redirected_bytes": 0, "passed_msgs": 0}
    with Bypass.pinned_maps(pin_dir) as maps:
        refresh_host_addrs(maps["host_addrs"])
        config, control = maps[".rodata"][0], maps["control"][0]
        join = pinned_mechanisms(pin_dir)
        return {"join": join, "attached": True, "detaching": bool(control.detaching),
                "cgroup": cgroup.path_of_id(config.cgroup_id), "pin_dir": str(pin_dir),
                "scope": {v: k for k, v in SCOPES.items()}[config.scope],
                "ports": sorted(port for port, listed in maps["allowed_ports"].items() if listed),
                "queue_floor": config.queue_floor, "allow_blocking_readers": bool(config.allow_blocking),
                "max_sockets": maps["sock_map"].max_entries,
                "agent": {"pid": control.agent_pid or None, "running": agent_running(control.agent_pid)},
                "sk_msg_attach": join["sk_msg_attach"], "kernel": features.summary(),
                "spliced_services": sorted(maps["spliced_services"]),
                "connections": connections(maps), **_stats(maps)}


PASSED_REASONS = ("no_peer", "not_reading", "peer_unsafe", "unread_plain", "peer_full", "detaching", "shut_down")


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


def join_lines(join):
    """What Bypass.mechanisms() says, for people: how sockets join, then one line for each
    mechanism not in use and why."""
    event = (f"at their first segment (tc on lo: {join['tc_attach'].replace('_', ' ')}) and by the sweep "
             if join["event"] else "by the sweep alone (every 20 ms while sockets may join) ")
    lines = [f"sockets join {event}({join['sweep']}); sk_msg attached with "
             f"{join['sk_msg_attach'].replace('_', ' ')}"]
    return lines + [f"not in use: {name}: {why}" for name, why in sorted(join["refused"].items())]


def show_status(info):
    state = "detaching (draining)" if info["detaching"] else "attached"
    print(f"bypass: {state} to {info['cgroup']} (pins in {info['pin_dir']}, scope {info['scope']})")
    for line in join_lines(info["join"]):
        print(f"  {line}")
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
          f"{info['passed_not_reading']} peer not reading yet, "
          f"{info['passed_peer_unsafe']} peer unsafe, {info['passed_unread_plain']} unread TCP data, "
          f"{info['passed_peer_full']} peer full, {info['passed_shut_down']} after shutdown)")
    for conn in info["connections"]:
        owner = f"{conn['comm']}[{conn['pid']}]" if conn["pid"] else "owner unknown"
        state = conn["state"] if conn["reading"] else f"{conn['state']}, not read yet"
        print(f"  {conn['local']:>22} -> {conn['remote']:<22} {state:20} "
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
