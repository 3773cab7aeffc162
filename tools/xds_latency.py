#!/usr/bin/env python3
"""How long from a canaryctl change to every Envoy applying it, for fleets of 1 and 10 Envoys.

    .venv/bin/python tools/xds_latency.py [--fleets 1,10] [--changes 30] [--mtls]

Starts `canaryctl serve` and N Envoys on the shipped envoy/envoy-ads.yaml (one worker each), then makes
`--changes` percentage changes and measures, for each:
- apply: from the admin API's answer to the write (saved, pushed) until every Envoy has ACKed the version
  (canaryctl's /v1/status polled every 2 ms), i.e. the push and Envoy's apply;
- cli:   the wall time of `canaryctl set …` itself (process start, write, its own 10 ms polling, exit).
With --mtls, canaryctl requires mTLS and the Envoys run envoy/envoy-ads-tls.yaml (certificates made by
tools/certs.py in the work directory). Prints a Markdown table (median, p90, max) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import certs  # noqa: E402
import lab  # noqa: E402

CONFIG = {"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 0}],
                        "sticky": {"keys": [{"header": "x-user-id"}]}}]}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def all_applied(control: lab.Canaryctl, version: int, count: int) -> bool:
    envoys = control.status()["envoys"]
    return sum(1 for e in envoys if e["link"] == "connected" and (e["acked_version"] or 0) >= version) >= count


def measure(fleet: int, changes: int, mtls: bool = False) -> dict[str, list[float]]:
    workdir = tempfile.mkdtemp(prefix=f"xds-latency-{fleet}-")
    server_tls, envoy_tls, bootstrap = None, None, "envoy-ads.yaml"
    if mtls:
        pki = os.path.join(workdir, "pki")
        certs.make_ca(pki)
        cert, key = certs.issue_server(pki)
        server_tls = {"cert": cert, "key": key, "client_ca": os.path.join(pki, "ca.pem")}
        cert, key = certs.issue_envoy(pki, "bench")
        envoy_tls = {"cert": cert, "key": key, "ca": os.path.join(pki, "ca.pem")}
        bootstrap = "envoy-ads-tls.yaml"
    control = lab.Canaryctl(workdir, init_config=json.dumps(CONFIG), tls=server_tls)
    envoys: list[lab.EnvoyProcess] = []
    try:
        control.start()
        for i in range(fleet):
            where = lab.FrontAddresses(listener_port=lab.free_port(), admin_port=lab.free_port(),
                                       upstream_ports={"v1": lab.free_port(), "v2": lab.free_port()},
                                       xds_port=control.xds_port)
            envoy = lab.EnvoyProcess(f"envoy-{i}", lab.render_front(bootstrap, where, tls=envoy_tls), workdir,
                                     admin_port=where.admin_port, workers=1,
                                     extra_args=["--service-node", f"front-{i}", "--service-cluster", "bench"])
            envoys.append(envoy.start())
        for envoy in envoys:
            envoy.wait_ready(60)
        control.wait_envoys(fleet, deadline_s=60)
        apply_ms, cli_ms = [], []
        for n in range(changes):
            percent = 10 + (n % 2) * 10
            if n % 2 == 0:
                answer = post(f"{control.server}/v1/set", {"rollout": "web", "percents": {"v2": percent}})
                answered = time.monotonic()
                while not all_applied(control, answer["version"], fleet):
                    time.sleep(0.002)
                apply_ms.append((time.monotonic() - answered) * 1000)
            else:
                started = time.monotonic()
                result = control.run("set", "web", f"v2={percent}")
                cli_ms.append((time.monotonic() - started) * 1000)
                if result.returncode != 0 or f"applied by {fleet}/{fleet}" not in result.stdout:
                    raise RuntimeError(result.stdout + result.stderr)
        return {"apply": apply_ms, "cli": cli_ms}
    finally:
        for envoy in envoys:
            envoy.stop()
        control.stop()


def row(fleet: int, what: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return (f"| {fleet} | {what} | {len(samples)} | {statistics.median(samples):.1f} | {p90:.1f} | "
            f"{max(samples):.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleets", default="1,10", help="fleet sizes (default 1,10)")
    parser.add_argument("--changes", type=int, default=30, help="changes per fleet, half via the API, half the CLI")
    parser.add_argument("--mtls", action="store_true", help="canaryctl with mTLS, Envoys on envoy-ads-tls.yaml")
    args = parser.parse_args()
    print("| Envoys | measured | changes | median ms | p90 ms | max ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for fleet in (int(f) for f in args.fleets.split(",")):
        result = measure(fleet, args.changes, args.mtls)
        print(row(fleet, "write answered → all ACKed", result["apply"]), flush=True)
        print(row(fleet, "`canaryctl set` wall time", result["cli"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
