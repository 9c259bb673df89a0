# SPDX-License-Identifier: MIT
"""What the bypass reports: its counters, the connections in the map and their owners, the
Prometheus metrics, and the lines `status`, `run` and `detach` print."""

import os
import sys
from pathlib import Path

from .. import metrics
from .addresses import ip_text
from .constants import kinds


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
    (redirects go in), bytes their peer redirected into them, and a process that has the socket
    open (None when no process of this host's /proc holds it)."""
    State = kinds.State
    entries = dict(maps["sock_info"].items())
    members = [info for info in entries.values() if info.state in (State.JOINED, State.LEAVING)]
    owners = socket_owners(info.inode for info in members)
    found = []
    for info in members:
        key, pid, comm = info.key, *owners.get(info.inode, (None, None))
        peer = entries.get(info.peer)
        sender = peer if peer is not None and peer.peer == info.cookie else None  # what it gets comes from there
        found.append({"local": f"{ip_text(key.family, key.local_ip)}:{key.local_port}",
                      "remote": f"{ip_text(key.family, key.remote_ip)}:{key.remote_port}",
                      "netns": key.netns, "state": State(info.state).name.lower(),
                      "reason": kinds.Reason(info.reason).name.lower(),
                      "reading": bool(sender and sender.peer_reads),
                      "redirected_bytes": sender.redirected_bytes if sender else 0,
                      "pid": pid, "comm": comm})
    return sorted(found, key=lambda c: (c["local"], c["remote"]))



def _by_reason(values):
    return {name: int(values[i]) for i, name in enumerate(kinds.reasons) if i and values[i]}


def stats(maps):
    """The counters, summed over the CPUs, and how many sockets are in the map and kept plain."""
    counters = maps["counters"].sum(0)._asdict()
    counters["plain_by_reason"] = _by_reason(counters["plain_by_reason"])
    counters["left_by_reason"] = _by_reason(counters["left_by_reason"])
    counters["map_full"] = counters["map_full"]._asdict()  # struct map_full: entries refused, by map
    counters["sockets"] = len(maps["sock_map"])
    State, waiting = kinds.State, [0] * len(kinds.reasons)
    for _, info in maps["sock_info"].items():
        if info.state in (State.WAITING, State.READY, State.LEFT) and info.reason < len(waiting):
            waiting[info.reason] += 1
    counters["plain_now"] = _by_reason(waiting)  # open sockets kept plain right now, by reason
    return counters



PASSED_REASONS = ("no_peer", "not_reading", "peer_unsafe", "unread_plain", "peer_full", "detaching", "shut_down")


def metric_families(stats):
    """The bypass's counters for netbpf.metrics (Prometheus names and types)."""
    passed = {reason: stats[f"passed_{reason}"] for reason in PASSED_REASONS}
    passed["redirect_failed"] = stats["redirect_failed"]

    def every_reason(counts):  # zeros too: a rate needs the series before its first event
        return {reason: counts.get(reason, 0) for reason in kinds.reasons[1:]}

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
        metrics.by_label(metrics.COUNTER, "netbpf_bypass_map_full_total",
                         "Entries a full map refused, by map (each costs a chance to join, never a byte)", "map",
                         stats["map_full"]),
        metrics.counter("netbpf_bypass_conflicts_total",
                        "Sockets claimed by a second peer (neither trusted: both stay on plain TCP)",
                        stats["conflicts"]),
        metrics.counter("netbpf_bypass_paired_by_handshake_total",
                        "Pairs proven by their handshake's nonce (between network namespaces)",
                        stats["paired_by_handshake"]),
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
    watch = {"fentry": "fentry on tcp_splice_read", "tracepoint": "the splice and sendfile syscall tracepoints"}
    lines = [f"sockets join {event}({join['sweep']}); {join['sk_msg']} attached with "
             f"{join['sk_msg_attach'].replace('_', ' ')}; splice readers seen by "
             f"{watch[join.get('splice_watch', 'tracepoint')]}"]  # pinned by an older netbpf: tracepoints
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
    full = ", ".join(f"{name} {n}" for name, n in info["map_full"].items() if n)
    if info["conflicts"] or full:
        print(f"  conflicts (a socket claimed by two peers, trusted by neither): {info['conflicts']}; "
              f"entries refused by full maps: {full or 'none'}")
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


