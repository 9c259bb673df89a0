# SPDX-License-Identifier: MIT
"""Bypass: the bypass as a library, attached to one cgroup (the sk_msg redirect, the join
programs, the agent thread), and the status of one attached with pins."""

import json
import os
import socket
import threading

from .. import cgroup, features, mechanisms, netns
from ..attachment import Attachment
from ..errors import LibbpfError, UsageError
from ..types import AttachType
from .addresses import refresh_host_addrs
from .agent import agent_running, pinned_mechanisms, pinned_sweep, stop_agent
from .constants import (CHOICES, DEFAULT_PIN_DIR, DEFAULT_QUEUE_FLOOR, DRAIN_TIMEOUT, EVENT_JOIN, MAPS,
                        MECHANISMS_PIN, NAME, SCOPES, SEND, SOCKET_MAPS, SPLICE_TRACEPOINTS, SPLICE_WATCH,
                        SWEEP)
from .join import Round, Sweep, agent_step, drain, run_paced
from .report import connections, join_lines, stats


class Bypass(Attachment):
    """The bypass attached to one cgroup (default: the cgroup v2 root, the whole host)."""

    NAME = NAME
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
        for name in SOCKET_MAPS:
            obj.maps[name].max_entries = self.max_sockets
        settings = obj.rodata
        # the handshake nonces' key: nobody without it can forge a nonce (bpf/bypass.bpf.c)
        settings.nonce_key = [int.from_bytes(os.urandom(8), "little") for _ in range(2)]
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
                "sk_msg": self.chosen[SEND.job].name, "sk_msg_attach": self.links["sk_msg"].kind,
                "splice_watch": "fentry" if "splice_read" in self.links else "tracepoint"}

    @property
    def send_program(self):
        """The loaded sk_msg program the verifier took (SEND)."""
        return self.obj.programs[self.chosen[SEND.job].program]

    def feature_notes(self):
        return join_lines(self.mechanisms())

    def _attach_links(self):
        progs, maps = self.obj.programs, self.obj.maps
        # splice readers are marked before the first socket can join
        if self.chosen[SPLICE_WATCH.job]:
            yield "splice_read", self._attach_fentry
        if not self.chosen[SPLICE_WATCH.job]:  # none chosen, or its attach just failed
            for name, program in SPLICE_TRACEPOINTS.items():
                yield name, progs[program].attach_tracepoint
        yield "sk_msg", lambda: self.send_program.attach_sockmap(maps["sock_map"], self.sk_msg_link)
        yield "sweep", lambda: progs[self.chosen[SWEEP.job].program].attach_iter()
        if self.chosen[EVENT_JOIN.job]:
            yield "tc", self._attach_tc
        yield "sockops", lambda: progs["bypass_sockops"].attach_cgroup(self.cgroup)

    def _attach_fentry(self):
        """The fentry program on tcp_splice_read; None (noted as refused, and the tracepoints
        attached instead) when the kernel loads it but cannot attach it."""
        try:
            return self.obj.programs[SPLICE_WATCH.alternatives[0].program].attach_trace()
        except LibbpfError as exc:
            self.refused[SPLICE_WATCH.alternatives[0].name] = f"attach: {exc}"
            self.chosen[SPLICE_WATCH.job] = None
            return None

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
        self.pins(pin_dir).write_note(MECHANISMS_PIN, json.dumps(self.mechanisms(), sort_keys=True))
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
        return stats(self.obj.maps)

    def connections(self):
        return connections(self.obj.maps)

    @classmethod
    def pinned_settings(cls, pins, maps):
        config = maps[".rodata"][0]
        return {"cgroup": cgroup.path_of_id(config.cgroup_id), "scope": {v: k for k, v in SCOPES.items()}[config.scope],
                "ports": sorted(port for port, listed in maps["allowed_ports"].items() if listed),
                "max_sockets": maps["sock_map"].max_entries, "queue_floor": config.queue_floor,
                "allow_blocking_readers": bool(config.allow_blocking)}

    @classmethod
    def detach_pinned(cls, pin_dir, timeout=DRAIN_TIMEOUT, force=False):
        """Stop the agent, stop every redirect, drain, and remove every link and pin `attach` made.
        Returns the connections that still held unread redirected data at the timeout: then
        the pins stay (run detach again to finish) unless force, which removes them anyway
        (those connections keep the map, redirecting nothing, until they close)."""
        pins = cls.pins(pin_dir)
        if not pins.attached():  # what is left of one: nothing to drain
            pins.remove()
            return []
        with pins.maps() as maps:
            stop_agent(maps["control"])
            pins.detach("sockops", "tc")  # sockops first: the mark of an attached bypass
            with pinned_sweep(pins, maps) as sweep:
                remaining = drain(sweep, maps, timeout)
        if remaining and not force:
            return remaining
        pins.remove()
        return remaining


def status(pin_dir=DEFAULT_PIN_DIR):
    """What a pinned bypass is doing (reads the pins; refreshes the host addresses)."""
    pins = Bypass.pins(pin_dir)
    if not pins.attached():
        return {"attached": False, "cgroup": None, "pin_dir": str(pins.path), "sockets": 0,
                "redirected_msgs": 0, "redirected_bytes": 0, "passed_msgs": 0}
    with pins.maps() as maps:
        refresh_host_addrs(maps["host_addrs"])
        control, join = maps["control"][0], pinned_mechanisms(pins)
        return {"join": join, "attached": True, "detaching": bool(control.detaching), "pin_dir": str(pins.path),
                **Bypass.pinned_settings(pins, maps),
                "agent": {"pid": control.agent_pid or None, "running": agent_running(control.agent_pid)},
                "sk_msg_attach": join["sk_msg_attach"], "kernel": features.summary(),
                "spliced_services": sorted(maps["spliced_services"]),
                "connections": connections(maps), **stats(maps)}
