#!/usr/bin/env python3
"""How many Envoys one canaryctl (or three on etcd) holds: a simulated fleet against real canaryctl processes.

    .venv/bin/python tools/bench_fleet.py [--fleets 1000,10000] [--streams ads,all] [--replicas 1,3]
                                          [--changes 5] [--smoke] [--profile DIR]

First a real Envoy 1.40 (the shipped envoy/envoy-ads.yaml) connects to `fleet_sim capture`, which saves what it
sends: its node, a load report, a stats flush. Then, per row, `fleet_sim swarm` runs that many Envoys, each on
its own connection sending what the real one sent under its own node id (`ads`: the ADS stream; `all`: with the
load reports at the pace canaryctl asks, as Envoy does, and a stats flush every second), against one `canaryctl serve` on a state file, or three replicas
on a 3-member etcd cluster (the Envoys spread over them). canaryctl runs on core 0, the swarm and etcd on core 1.
Once every Envoy is connected and has the config, --changes percentage changes are made through the admin API;
for each: from the write's start until the median and the last Envoy received it, and the wall time of
`canaryctl set` (which waits for every Envoy's ACK). Then canaryctl's RSS and its CPU share over 10 s. Prints a
Markdown table for BENCHMARKS.md. --smoke: 200 Envoys, all streams, one replica and three, one change (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402

ROOT = lab.ROOT
FLEET_SIM = os.path.join(ROOT, "target", "release", "examples", "fleet_sim")
CONFIG = json.dumps({"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 0}],
                                   "sticky": {"keys": [{"header": "x-user-id"}]}}]})


def capture(workdir: str) -> str:
    """What a real Envoy on the shipped bootstrap sends canaryctl, saved by `fleet_sim capture`."""
    out = os.path.join(workdir, "capture")
    port = lab.free_port()
    sim = subprocess.Popen([FLEET_SIM, "capture", f"127.0.0.1:{port}", out], stderr=subprocess.DEVNULL)
    where = lab.FrontAddresses(listener_port=lab.free_port(), admin_port=lab.free_port(),
                               upstream_ports={"v1": lab.free_port(), "v2": lab.free_port()}, xds_port=port)
    envoy = lab.EnvoyProcess("capture-envoy", lab.render_front("envoy-ads.yaml", where), workdir, workers=1,
                             extra_args=["--service-node", "real-1", "--service-cluster", "edge"])
    envoy.start()
    try:
        sim.wait(timeout=60)
    finally:
        envoy.stop()
        if sim.poll() is None:
            sim.kill()
    return out


def metric(server: lab.Canaryctl, name: str) -> float:
    with urllib.request.urlopen(f"{server.server}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Swarm:
    """`fleet_sim swarm` and the versions it reports every Envoy received."""

    def __init__(self, xds: list[int], envoys: int, captured: str, streams: str, log: str):
        self.versions: dict[int, dict] = {}
        self.process = subprocess.Popen(
            ["taskset", "-c", "1", FLEET_SIM, "swarm", ",".join(f"127.0.0.1:{p}" for p in xds), str(envoys),
             captured, streams], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            try:
                seen = json.loads(line)
                self.versions[seen["version"]] = seen
            except (ValueError, KeyError):
                pass

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def row(workdir: str, captured: str, envoys: int, streams: str, replicas: int, changes: int,
        profile: str | None = None) -> dict:
    run = tempfile.mkdtemp(prefix=f"fleet-{envoys}-{streams}-{replicas}-", dir=workdir)
    started = []
    cluster = None
    try:
        if replicas == 1:
            servers = [lab.Canaryctl(run, init_config=CONFIG)]
        else:
            cluster = lab.EtcdCluster(run)
            cluster.start()
            started += cluster.members
            for member in cluster.members:
                subprocess.run(["taskset", "-a", "-pc", "1", str(member.process.pid)], capture_output=True)
            servers = [lab.Canaryctl(os.path.join(run), init_config=CONFIG, store=cluster.url, replica=f"r{i}")
                       for i in range(replicas)]
        for server in servers:
            server.extra_args += ["--fleet-window", "1h"]
            server.start()
            started.append(server)
            subprocess.run(["taskset", "-a", "-pc", "0", str(server.process.pid)], capture_output=True)
        swarm = Swarm([s.xds_port for s in servers], envoys, captured, streams, os.path.join(run, "swarm.log"))
        try:
            deadline = time.monotonic() + 600
            connected = 0
            while time.monotonic() < deadline:
                connected = sum(metric(s, "canaryctl_envoys_connected") for s in servers)
                if connected >= envoys and 1 in swarm.versions:
                    break
                if swarm.process.poll() is not None:
                    # Killed (-9: out of memory, as at 10,000 Envoys reporting from one core) or failed.
                    return {"envoys": envoys, "streams": streams, "replicas": replicas,
                            "note": f"the swarm exited ({swarm.process.returncode}) with {int(connected):,} "
                                    f"of {envoys:,} connected"}
                time.sleep(1)
            else:
                return {"envoys": envoys, "streams": streams, "replicas": replicas,
                        "note": f"{int(connected):,} of {envoys:,} connected after 600 s"}
            time.sleep(5)
            p50, last, cli = [], [], []
            for i in range(changes):
                server = servers[i % len(servers)]
                version = server.status()["desired"]["version"] + 1
                begun = time.time()
                if i == 0:
                    t = time.monotonic()
                    done = server.run("set", "web", f"v2={i + 1}", "--timeout", "120", timeout=180)
                    cli.append((time.monotonic() - t) * 1000)
                    if done.returncode != 0:
                        cli[-1] = float("nan")
                else:
                    server.api("/v1/set", {"rollout": "web", "percents": {"v2": i + 1}})
                wait = time.monotonic() + 180
                while version not in swarm.versions and time.monotonic() < wait:
                    time.sleep(0.01)
                seen = swarm.versions.get(version)
                if seen:
                    p50.append(seen["p50_unix_ms"] - begun * 1000)
                    last.append(seen["last_unix_ms"] - begun * 1000)
                time.sleep(2)
            time.sleep(5)
            pids = [s.process.pid for s in servers]
            before = [cpu_seconds(p) for p in pids]
            received = [sum(metric(s, m) for s in servers)
                        for m in ("canaryctl_load_reports_total", "canaryctl_stats_flushes_total")]
            if profile:
                # The first replica's samples over the same 10 s, for `perf report -i`.
                out = os.path.join(profile, f"perf-{envoys}-{streams}-{replicas}.data")
                subprocess.run(["perf", "record", "--call-graph", "dwarf,16384", "-F", "250", "-o", out, "-p", str(pids[0]), "--", "sleep", "10"],
                               capture_output=True)
            else:
                time.sleep(10)
            cpu = max((cpu_seconds(p) - b) / 10 for p, b in zip(pids, before))
            # What canaryctl read over the same 10 s, against Envoy's pace (one of each per Envoy a second):
            # below it, the swarm or canaryctl did not keep up, and the row says so.
            after = [sum(metric(s, m) for s in servers)
                     for m in ("canaryctl_load_reports_total", "canaryctl_stats_flushes_total")]
            rate = [(a - b) / 10 for a, b in zip(after, received)]
            # The load reports' pace each replica asked for (serve --load-report-interval auto: longer beyond
            # 2,000 load streams on a replica); the Envoys are spread evenly over the replicas.
            every = [max(1, metric(s, "canaryctl_load_report_interval_seconds")) for s in servers]
            due = [sum(envoys / len(servers) / e for e in every), envoys]
            notes = []
            if streams == "all" and max(every) > 1:
                notes.append("load reports every " + "/".join(f"{e:.0f}" for e in every) + " s")
            if streams == "all" and any(r < 0.9 * d for r, d in zip(rate, due)):
                notes.append(f"read {rate[0]:,.0f} load reports a second of {due[0]:,.0f} due and "
                             f"{rate[1]:,.0f} flushes of {due[1]:,.0f}")
            note = "; ".join(notes)
            return {"envoys": envoys, "streams": streams, "replicas": replicas,
                    "p50_ms": statistics.median(p50) if p50 else None, "max_ms": max(last) if last else None,
                    "cli_ms": cli[0] if cli else None, "rss_mb": max(rss_mb(p) for p in pids),
                    "cpu": cpu, "note": note}
        finally:
            swarm.stop()
    finally:
        for process in reversed(started):
            process.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleets", default="1000,10000")
    parser.add_argument("--streams", default="ads,all")
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--profile", metavar="DIR", help="perf record canaryctl (the first replica) over the CPU window")
    args = parser.parse_args()
    if args.smoke:
        args.fleets, args.streams, args.replicas, args.changes = "200", "all", "1,3", 2
    workdir = tempfile.mkdtemp(prefix="bench-fleet-")
    captured = capture(workdir)
    sizes = {name: os.path.getsize(os.path.join(captured, name)) for name in ("node.pb", "lrs.pb", "metrics.pb")}
    print(f"captured from Envoy 1.40 (envoy-ads.yaml): node {sizes['node.pb']} B, load report {sizes['lrs.pb']} B, "
          f"stats flush {sizes['metrics.pb']} B\n")
    print("| Envoys | streams | replicas | change → every Envoy (p50 / max) | `set` wall | RSS (max of replicas) "
          "| CPU (max of replicas) | note |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    failed = False
    for envoys in (int(n) for n in args.fleets.split(",")):
        for streams in args.streams.split(","):
            for replicas in (int(r) for r in args.replicas.split(",")):
                r = row(workdir, captured, envoys, streams, replicas, args.changes, args.profile)
                ms = lambda v: "—" if v is None or v != v else f"{v:,.0f} ms"  # noqa: E731
                print(f"| {envoys:,} | {'ADS' if streams == 'ads' else 'ADS + LRS + stats'} | {replicas} "
                      f"| {ms(r.get('p50_ms'))} / {ms(r.get('max_ms'))} | {ms(r.get('cli_ms'))} "
                      f"| {r.get('rss_mb', 0):,.0f} MB | {r.get('cpu', 0):.2f} | {r['note']} |", flush=True)
                failed |= r.get("max_ms") is None
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
