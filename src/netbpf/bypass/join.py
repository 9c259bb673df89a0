# SPDX-License-Identifier: MIT
"""Joining and leaving, as the agent drives them: the sweep's rounds and their pace, the
heartbeat the programs wait for, the host's addresses, and the drain before detach."""

import time

from .. import cgroup, netns
from .constants import AGENT_CPU_SHARE, JOIN_INTERVAL, SLOW_INTERVAL, kinds
from .report import connections


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
    looked: they are closed (sockops forgets the connections it saw established as they close;
    these are older ones). One still in the sockhash is not (the kernel takes a socket out as it
    closes): its file is in no process's table for now (in flight in an SCM_RIGHTS message, or
    held by io_uring alone), and a new entry would insert it again, which the kernel refuses.
    A pair joins as the sweep meets its second end (the first one waits READY), so when a round
    leaves such sockets READY the sweep runs once more. Returns a Round: what run_paced() needs
    to decide when the next one is due."""
    control, State = maps["control"], kinds.State
    this_round = control[0].round + 1
    control[0] = control[0]._replace(round=this_round)
    for _ in range(2):
        walked = sweep.run()
        tracked_netns = set(maps["netns_seen"]) | (walked or set())
        event = set(maps["event_netns"])
        result, ready = Round(), 0
        for cookie, info in maps["sock_info"].items():
            netns = info.key.netns
            looked = walked is None or netns in walked or netns not in tracked_netns
            # each looked up: a walk of the sockhash may miss a key while others come and go
            if info.seen_round < this_round and looked and cookie not in maps["sock_map"]:
                forget(maps, cookie, info)
                continue
            if info.state == State.LEFT:
                continue
            result.tracked += 1
            if netns in event:
                continue  # the tc program joins these at their next segment
            result.found += info.first_round == this_round
            result.survivors += info.first_round == this_round - 1
            ready += info.state == State.READY
            moving = info.state in (State.READY, State.LEAVING) or info.reason in kinds.transient
            result.waiting += moving and info.first_round < this_round
        if not ready:
            break
    for port, seen in maps["listeners"].items():
        if seen < this_round:  # the sweep stamps the listeners it finds open
            maps["listeners"].pop(port, None)
    return result


def forget(maps, cookie, info):
    """Drop a closed socket's entry, its tuple's place in the index and the nonce it sent (what
    sockops does as a connection it saw established closes)."""
    maps["sock_info"].pop(cookie, None)
    if maps["sock_tuples"].get(info.key) == cookie:
        maps["sock_tuples"].pop(info.key, None)
    handshake = maps["handshakes"].get(info.handshake) if info.handshake else None
    if handshake is not None and handshake.active == cookie:
        maps["handshakes"].pop(info.handshake, None)


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

