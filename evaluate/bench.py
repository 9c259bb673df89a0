# SPDX-License-Identifier: MIT
"""The benchmark a skeptic would trust: plain TCP, bypass and AF_UNIX measured side by side.

    sudo python3 -m evaluate.bench [--quick] [--reps N] [--out DIR]

Every configuration runs the three variants interleaved (plain, bypass, unix, plain, bypass, ...)
for several repetitions in one sitting, so that the machine's drift hits all three alike. Plain
and bypass run in two child cgroups made here, the bypass attached to one of them; both are
removed at the end. Reported: medians over repetitions, their spread (min-max), and the ratios
bypass/plain and bypass/unix. The sk_msg program's cost per message comes from one more bypass run
per repetition with the kernel's run-time statistics on; the compared runs go without them.

The bypass takes only sockets that read the way its kernel path handles exactly like TCP:
non-blocking ones, as event-driven programs use (redis, nginx, asyncio). The ping-pong runs
event-driven (-e: non-blocking sockets and epoll) unless a row says "blocking": blocking sockets
stay on plain TCP, and those rows show that this costs nothing. Short connections (connect, one
request, close) stay plain too: they end before the bypass would take them. Real peers
(redis-benchmark, nginx with wrk, pgbench -S, iperf3, sockperf) run when installed, as a check
that the numbers are not an artefact of our own client.

Writes DIR/results.json, DIR/results.md and, with matplotlib, DIR/latency.png and DIR/ratio.png.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netbpf import cgroup
from netbpf.bypass import Bypass
from netbpf.errors import NetbpfError
from netbpf.loader import RunStats
from netbpf.testing import free_port

REPO = Path(__file__).resolve().parent.parent
PINGPONG = REPO / "evaluate" / "pingpong"
VARIANTS = ("plain", "bypass", "unix")
COUNTED = "bypass, sk_msg counted"  # the extra bypass run that measures the program's cost
SETTLE_MS = 200  # pause after the warm-up requests: the bypass agent takes the connection
NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx-{port}.pid;
error_log stderr error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;  # wrk keeps its connections (nginx's default closes each after 1000)
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "netbpf says hello\\n"; }}
    }}
}}
"""


class Bench:
    def __init__(self, reps, quick):
        self.reps, self.quick = reps, quick
        self.plain = cgroup.Cgroup.create(f"netbpf-bench-plain-{os.getpid()}")
        self.bypassed = cgroup.Cgroup.create(f"netbpf-bench-bypass-{os.getpid()}")
        self.bypass = None
        try:
            self.bypass = Bypass(str(self.bypassed.path)).attach()
        except BaseException:
            if self.bypass:
                self.bypass.close()
            self.plain.remove()
            self.bypassed.remove()
            raise
        self.sk_msg = self.bypass.send_program
        self.workdir = Path(tempfile.mkdtemp(prefix="netbpf-bench-"))
        self.done = 0
        self.total = 0

    def close(self):
        self.bypass.close()
        self.plain.remove()
        self.bypassed.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def group(self, variant):
        return self.bypassed if variant == "bypass" else self.plain

    def progress(self, what):
        self.done += 1
        print(f"\r[{self.done}/{self.total}] {what:<60}", end="", file=sys.stderr, flush=True)

    def pingpong(self, variant, *args):
        transport = "unix" if variant == "unix" else "tcp"
        proc = self.group(variant).popen([str(PINGPONG), "-t", transport, *map(str, args)],
                                         stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"pingpong {variant} {args} failed")
        return json.loads(out)

    def interleaved(self, label, run):
        """run(variant) -> dict of metrics; returns {variant: [result per repetition]}, and under
        COUNTED {"sk_msg_ns": what the sk_msg program cost per message it ran on} per repetition.
        That cost comes from one more bypass run each repetition, with the kernel's run-time
        statistics on for it alone: they add two clock reads to every program run, which the
        compared runs must not carry."""
        results = {v: [] for v in VARIANTS + (COUNTED,)}
        for rep in range(self.reps):
            for variant in VARIANTS:
                self.progress(f"{label} {variant} rep {rep + 1}")
                results[variant].append(run(variant))
            self.progress(f"{label} bypass rep {rep + 1}, sk_msg counted")
            with RunStats():
                before = self.sk_msg.run_stats
                run("bypass")
                ns, runs = (now - then for now, then in zip(self.sk_msg.run_stats, before))
            results[COUNTED].append({"sk_msg_ns": ns / runs} if runs else {})
        return results

    # --- experiments ---

    def latency(self, size, placement, connections=1, io="event"):
        n = max(2000, (20000 if self.quick else 100000) // max(1, size // 1024 + 1))
        event = ["-e"] if io == "event" else []
        return self.interleaved(f"rtt {size}B {placement} x{connections} {io}", lambda v: self.pingpong(
            v, "-m", "rtt", "-s", size, "-n", n, "-p", placement, "-c", connections, "-j", SETTLE_MS, *event))

    def stream(self, size, placement):
        seconds = 1 if self.quick else 2
        return self.interleaved(f"stream {size}B {placement}", lambda v: self.pingpong(
            v, "-m", "stream", "-s", size, "-d", seconds, "-p", placement, "-e"))

    def short(self, placement):
        n = 2000 if self.quick else 5000

        def run(variant):
            return {} if variant == "unix" else self.pingpong(
                variant, "-m", "short", "-s", 64, "-n", n, "-p", placement, "-e")

        return self.interleaved(f"short connections {placement}", run)

    def lived(self, lifetime):
        """Connections one after another, each living `lifetime` seconds with a 1 KiB request
        every millisecond: how many of their messages the bypass carried (a connection's first
        messages go the TCP way until it joins)."""
        n = max(5, int((2 if self.quick else 5) / lifetime))

        def run(variant):
            if variant == "unix":
                return {}
            before = self.bypass.stats()["redirected_msgs"]
            result = self.pingpong(variant, "-m", "lived", "-s", 1024, "-n", n, "-d", lifetime, "-i", 1000, "-e")
            if variant == "bypass":
                redirected = self.bypass.stats()["redirected_msgs"] - before
                result["redirected_share"] = redirected / (2 * result["requests"])
            return result

        return self.interleaved(f"connections living {lifetime * 1000:.0f} ms", run)

    def nginx(self):
        """nginx serving a small response to wrk with 50 connections (keep-alive)."""
        if not (shutil.which("nginx") and shutil.which("wrk")):
            return None
        seconds = "2" if self.quick else "4"

        def server(port):
            conf = self.workdir / f"nginx-{port}.conf"
            conf.write_text(NGINX_CONF.format(port=port, dir=self.workdir))
            return ["nginx", "-c", str(conf), "-p", str(self.workdir)]

        def parse(out):
            return {"requests_per_s": next(float(line.split()[1]) for line in out.splitlines()
                                           if line.startswith("Requests/sec:"))}

        return self.peer("nginx + wrk", server, lambda port: ["wrk", "-t", "1", "-c", "50", "-d", seconds,
                                                            f"http://127.0.0.1:{port}/"], parse)

    def redis(self):
        if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
            return None
        servers = {}
        unix_path = self.workdir / "redis.sock"  # the plain server's too: AF_UNIX, what the bypass aims at
        for variant in ("plain", "bypass"):
            port = free_port()
            unix = ["--unixsocket", str(unix_path), "--unixsocketperm", "700"] if variant == "plain" else []
            servers[variant] = (port, self.group(variant).popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 *unix], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for_port(port)

        def run(variant):
            where = ["-s", str(unix_path)] if variant == "unix" else ["-p", str(servers[variant][0])]
            proc = self.group(variant).popen(
                ["redis-benchmark", *where, "-n", "20000" if self.quick else "100000", "-c", "50",
                 "-t", "set,get", "--csv"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            out, _ = proc.communicate(timeout=600)
            return {row.split(",")[0].strip('"'): float(row.split(",")[1].strip('"'))
                    for row in out.splitlines() if row.startswith(('"SET"', '"GET"'))}

        try:
            return self.interleaved("redis-benchmark", run)
        finally:
            for _, proc in servers.values():
                proc.terminate()
                proc.wait()


    def pgbench(self):
        """PostgreSQL's pgbench, select-only (-S), 8 clients over TCP: one cluster per variant, its
        postmaster, and so every backend, in that variant's cgroup, as the client is. AF_UNIX: the
        plain cluster through its Unix socket."""
        postgres = shutil.which("postgres") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))), None)
        if not (postgres and shutil.which("pgbench") and shutil.which("runuser")):
            return None
        bindir = Path(postgres).resolve().parent
        as_postgres = ["runuser", "-u", "postgres", "--"]
        home = Path(tempfile.mkdtemp(prefix="netbpf-bench-pg-"))
        shutil.chown(home, "postgres")
        clusters = {}

        def run(variant):
            host, port = (str(home), clusters["plain"]) if variant == "unix" else ("127.0.0.1", clusters[variant])
            proc = self.group(variant).popen(
                as_postgres + ["pgbench", "-S", "-n", "-c", "8", "-j", "2", "-T", "2" if self.quick else "5",
                               "-h", host, "-p", str(port), "postgres"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            out, _ = proc.communicate(timeout=120)
            return {"tps": next(float(line.split()[2]) for line in out.splitlines() if line.startswith("tps = "))}

        try:
            for variant in ("plain", "bypass"):
                data, port = home / variant, free_port()
                subprocess.run(as_postgres + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                              "--no-sync"], check=True, stdout=subprocess.DEVNULL, timeout=120)
                self.group(variant).popen(as_postgres + [postgres, "-D", str(data), "-p", str(port), "-k", str(home),
                                                         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                clusters[variant] = port
                wait_for_port(port)
                subprocess.run(as_postgres + ["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(port),
                                              "postgres"], check=True, capture_output=True, timeout=120)
            return self.interleaved("pgbench -S", run)
        finally:
            for variant in clusters:
                subprocess.run(as_postgres + [str(bindir / "pg_ctl"), "stop", "-D", str(home / variant), "-m", "fast"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
            shutil.rmtree(home, ignore_errors=True)

    def peer(self, label, server_argv, client_argv, parse):
        """A real server/client pair, plain vs bypass, interleaved (AF_UNIX has no equivalent).
        server_argv/client_argv take the port; parse(client stdout) -> {metric: value}."""
        def run(variant):
            if variant == "unix":
                return {}
            port = free_port()
            group = self.group(variant)
            server = group.popen(server_argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for_port(port)
                client = group.popen(client_argv(port), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
                return parse(client.communicate(timeout=120)[0])
            finally:
                server.terminate()
                server.wait()

        return self.interleaved(label, run)

    def iperf3(self):
        if not shutil.which("iperf3"):
            return None
        seconds = "1" if self.quick else "3"
        return self.peer("iperf3", lambda port: ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                         lambda port: ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", seconds, "-J"],
                         lambda out: {"gbit_per_s": json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9})

    def sockperf(self):
        if not shutil.which("sockperf"):
            return None
        seconds = "1" if self.quick else "3"

        def parse(out):
            p50 = next(float(line.split("=")[-1]) for line in out.splitlines() if "percentile 50.000" in line)
            return {"half_rtt_p50_us": p50}

        return self.peer("sockperf ping-pong 1 KiB",
                         lambda port: ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(port)],
                         lambda port: ["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port),
                                       "-t", seconds, "-m", "1024"], parse)


def wait_for_port(port, timeout=10):
    """Wait until something listens on the port, without connecting (iperf3 -1 would take a
    probe connection for its one client)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def summarize(results, metric):
    """{variant: {median, min, max}} of one metric over the repetitions."""
    out = {}
    for variant, runs in results.items():
        values = [r[metric] for r in runs if metric in r]
        if values:
            out[variant] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def measured(results, metric, **keys):
    """A table entry: the summary of one metric, its ratios, and the sk_msg program's cost per
    message in the bypass runs (ns; None where it ran on no message)."""
    summary = summarize(results, metric)
    return dict(keys, metric=metric, summary=summary, ratios=ratios(summary),
                sk_msg_ns=summarize(results, "sk_msg_ns").get(COUNTED))


def ratios(summary):
    med = {v: s["median"] for v, s in summary.items()}
    out = {}
    if "bypass" in med and "plain" in med:
        out["bypass/plain"] = med["bypass"] / med["plain"]
    if "bypass" in med and "unix" in med:
        out["bypass/unix"] = med["bypass"] / med["unix"]
    return out


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


GROUPS = ("latency", "blocking", "concurrency", "stream", "short", "lived", "redis", "peers")
LIFETIMES = (0.05, 0.4)


def run_all(args):
    wanted = set(args.only.split(",")) if args.only else set(GROUPS)
    bench = Bench(args.reps, args.quick)
    sizes = [64, 1024, 16384, 65536] if not args.quick else [64, 1024, 65536]
    placements = ["same", "cross"]
    concurrency = [1, 8, 64] if not args.quick else [1, 8]
    bench.total = args.reps * (len(VARIANTS) + 1) * (len(sizes) * len(placements) + 2 + len(concurrency) - 1 + 2 + 2
                                   + len(LIFETIMES) + 6)
    report = {"machine": machine(), "reps": args.reps, "join": bench.bypass.mechanisms(), "latency": [],
              "concurrency": [], "stream": [], "short": [], "lived": []}
    try:
        runs = [(size, placement, "event") for placement in placements for size in sizes
                if "latency" in wanted]
        runs += [(1024, placement, "blocking") for placement in placements if "blocking" in wanted]
        for size, placement, io in runs:
            res = bench.latency(size, placement, io=io)
            for metric in ("p50_us", "p99_us", "mean_us"):
                report["latency"].append(measured(res, metric, size=size, placement=placement, io=io))
        for conns in concurrency[1:] if "concurrency" in wanted else ():
            res = bench.latency(1024, "any", conns)
            for metric in ("requests_per_s", "p50_us", "p99_us"):
                report["concurrency"].append(measured(res, metric, connections=conns))
        for placement in placements if "stream" in wanted else ():
            report["stream"].append(measured(bench.stream(65536, placement), "mbytes_per_s", size=65536,
                                             placement=placement))
        for placement in ("same", "any") if "short" in wanted else ():
            report["short"].append(measured(bench.short(placement), "requests_per_s", size=64, placement=placement))
        for lifetime in LIFETIMES if "lived" in wanted else ():
            res = bench.lived(lifetime)
            report["lived"].append(measured(res, "requests_per_s", lifetime_s=lifetime,
                                            redirected_share=summarize(res, "redirected_share").get("bypass")))
        redis = bench.redis() if "redis" in wanted else None
        if redis:
            report["redis"] = [measured(redis, t, test=t) for t in ("SET", "GET")]
        report["peers"] = []
        peers = (("nginx + wrk req/s", "requests_per_s", bench.nginx),
                 ("pgbench -S tps", "tps", bench.pgbench),
                 ("iperf3 Gbit/s", "gbit_per_s", bench.iperf3),
                 ("sockperf half-RTT p50 (µs)", "half_rtt_p50_us", bench.sockperf))
        for name, metric, run in peers if "peers" in wanted else ():
            results = run()
            if results:
                report["peers"].append(measured(results, metric, test=name))
        report["bypass_counters"] = bench.bypass.stats()
    finally:
        bench.close()
        print(file=sys.stderr)
    return report


def markdown(report):
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, kernel {m['kernel']}, {m['date']}; "
             f"medians of {report['reps']} interleaved repetitions (min-max in brackets).", "",
             "| test | size | placement | plain | bypass | AF_UNIX | bypass/plain | bypass/unix | sk_msg ns/msg |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(s, digits=1):
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]" if s else "-"

    def ratio(r, name):
        return f"{r[name]:.2f}" if name in r else "-"

    def row(test, size, placement, entry):
        s, r = entry["summary"], entry["ratios"]
        lines.append(f"| {test} | {size} | {placement} | {cell(s.get('plain'))} | {cell(s.get('bypass'))} | "
                     f"{cell(s.get('unix'))} | {ratio(r, 'bypass/plain')} | {ratio(r, 'bypass/unix')} | "
                     f"{cell(entry.get('sk_msg_ns'), 0)} |")

    for e in report["latency"]:
        if e["metric"] in ("p50_us", "p99_us"):
            io = "" if e.get("io", "event") == "event" else ", blocking"
            row(f"RTT {e['metric'][:-3]} (µs){io}", e["size"], e["placement"], e)
    for e in report["concurrency"]:
        if e["metric"] == "requests_per_s":
            row(f"requests/s, {e['connections']} connections", 1024, "any", e)
    for e in report["stream"]:
        row("stream MB/s", e["size"], e["placement"], e)
    for e in report.get("short", []):
        row("short connections/s", e["size"], e["placement"], e)
    for e in report.get("lived", []):
        row(f"requests/s, connections living {e['lifetime_s'] * 1000:.0f} ms", 1024, "any", e)
    for e in report.get("redis", []):
        row(f"redis-benchmark {e['test']} req/s", "-", "any", e)
    for e in report.get("peers", []):
        row(e["test"], "-", "any", e)
    shares = [e for e in report.get("lived", []) if e["redirected_share"]]
    if shares:
        lines += ["", "| connections living | messages the bypass carried |", "|---|---|"]
        lines += [f"| {e['lifetime_s'] * 1000:.0f} ms, a 1 KiB request every ms | "
                  f"{100 * e['redirected_share']['median']:.1f} % [{100 * e['redirected_share']['min']:.1f}-"
                  f"{100 * e['redirected_share']['max']:.1f}] |" for e in shares]
    join = report.get("join")
    if join:
        lines += ["", f"Joining: {'tc on lo (' + join['tc_attach'] + ') and ' if join['event'] else ''}"
                      f"the {join['sweep']} sweep; {join['sk_msg']} sends"
                  + "".join(f"; {name} not in use ({why})" for name, why in sorted(join["refused"].items())) + "."]
    return "\n".join(lines) + "\n"


def plots(report, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, placement in zip(axes, ("same", "cross")):
        for variant, marker, color in (("plain", "o", "C0"), ("bypass", "s", "C2"), ("unix", "^", "C4")):
            for metric, line in (("p50_us", "-"), ("p99_us", ":")):
                pts = [(e["size"], e["summary"][variant]["median"]) for e in report["latency"]
                       if e["placement"] == placement and e["metric"] == metric and variant in e["summary"]
                       and e.get("io", "event") == "event"]
                if pts:
                    ax.plot(*zip(*pts), marker + line, color=color, label=f"{variant} {metric[:-3]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("round trip (µs)")
        ax.set_title(f"event-driven, client and server on {'one CPU' if placement == 'same' else 'different CPUs'}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for placement in ("same", "cross"):
        pts = [(e["size"], e["ratios"]["bypass/plain"]) for e in report["latency"]
               if e["placement"] == placement and e["metric"] == "p50_us" and "bypass/plain" in e["ratios"]
               and e.get("io", "event") == "event"]
        ax.plot(*zip(*pts), "o-", label=f"{placement} CPU")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("median RTT, bypass / plain TCP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ratio.png", dpi=100)
    shares = [e for e in report.get("lived", []) if e["redirected_share"]]
    streams = [e for e in report.get("stream", []) if "bypass/plain" in e["ratios"]]
    if shares or streams:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        labels = [f"{e['lifetime_s'] * 1000:.0f} ms" for e in shares]
        left.bar(labels, [100 * e["redirected_share"]["median"] for e in shares], color="C2")
        left.set_ylim(0, 100)
        left.set_ylabel("messages redirected (%)")
        left.set_title("short-lived connections (1 KiB every ms)")
        for offset, name, color in ((-0.2, "bypass/plain", "C2"), (0.2, "bypass/unix", "C4")):
            right.bar([i + offset for i in range(len(streams))], [e["ratios"].get(name, 0) for e in streams],
                      width=0.4, color=color, label=name)
        right.set_xticks(range(len(streams)), [e["placement"] + " CPU" for e in streams])
        right.axhline(1.0, color="grey", linewidth=0.8)
        right.set_ylabel("throughput ratio")
        right.set_title("one-way stream, 64 KiB writes")
        right.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "join.png", dpi=100)
    return True


def main():
    parser = argparse.ArgumentParser(prog="python -m evaluate.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and requests")
    parser.add_argument("--out", default=str(REPO / "evaluate" / "results"), help="output directory")
    parser.add_argument("--only", metavar="GROUPS", help=f"comma-separated subset of {','.join(GROUPS)}")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(GROUPS) if args.only else set()
    if unknown:
        print(f"evaluate.bench: no group {sorted(unknown)[0]!r} (groups: {', '.join(GROUPS)})", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("evaluate.bench: must run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    if not PINGPONG.exists():
        print("evaluate.bench: evaluate/pingpong is not built: run make", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run_all(args)
    except NetbpfError as exc:  # the bypass does not load here: say so, before any table
        print(f"evaluate.bench: {exc}", file=sys.stderr)
        return 2
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "results.md").write_text(table)
    print(table)
    if plots(report, out):
        print(f"plots: {out / 'latency.png'}, {out / 'ratio.png'}, {out / 'join.png'}")
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
