#!/usr/bin/env python3
"""How long a progressive rollout takes to roll back a canary failing 3× and 10× as often as stable, at the
demo's traffic.

    .venv/bin/python tools/rollback_time.py [--runs 5] [--stable-fail 0.5] [--ratios 3,10]

Starts the demo apps (envoy/demo-app-v*.yaml; v1 answering 503 to --stable-fail % of its requests, v2 to
ratio × that, /healthz never), `canaryctl serve`, one Envoy on the shipped envoy/envoy-ads.yaml (two workers),
and the demo's 300 users on 8 connections (tools/demo.py). Each run is
`canaryctl rollout start web --canary v2 --steps 5,25,50,100 --hold 30s --no-wait`; the clock runs from the
start's answer (saved and pushed) until canaryctl's status says rolled_back (polled every 50 ms). The first 2 s of a rollout are not
counted (its warm-up: reports may hold older traffic), so that is the floor. Prints a Markdown table for
BENCHMARKS.md, with the requests and failures counted at the rollback and what users saw.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402
import lab  # noqa: E402

RUN_DIR = os.path.join(lab.ROOT, ".run", "rollback-time")
CONFIG = {"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 0}],
                        "sticky": {"keys": [{"header": "x-user-id"}]}}]}


def start_app(version: str, fail_percent: float, workdir: str) -> lab.EnvoyProcess:
    hold = lab.PortHold()
    app = lab.EnvoyProcess(f"app-{version}-{fail_percent:g}", lab.render_app(version, hold.port, fail_percent=fail_percent),
                           workdir, workers=1, holds=[hold])
    app.port = hold.port
    app.start()
    app.wait_serving(hold.port)
    app.release_holds()
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stable-fail", type=float, default=0.5, help="stable's failing share, in %% (0.5)")
    parser.add_argument("--ratios", default="3,10")
    args = parser.parse_args()
    os.makedirs(RUN_DIR, exist_ok=True)
    processes = []
    rows = []
    try:
        # A fresh directory per run: files of an earlier run (an admin address) must not be read.
        workdir = tempfile.mkdtemp(dir=RUN_DIR)
        control = lab.Canaryctl(workdir, init_config=json.dumps(CONFIG))
        processes.append(control.start())
        stable = start_app("v1", args.stable_fail, workdir)
        processes.append(stable)
        for ratio in (float(r) for r in args.ratios.split(",")):
            canary = start_app("v2", args.stable_fail * ratio, workdir)
            processes.append(canary)
            hold = lab.PortHold()
            where = lab.FrontAddresses(listener_port=hold.port, admin_port=0,
                                       upstream_ports={"v1": stable.port, "v2": canary.port},
                                       xds_port=control.xds_port)
            envoy = lab.EnvoyProcess(f"envoy-{ratio:g}", lab.render_front("envoy-ads.yaml", where), workdir,
                                     admin_port=0, workers=2, holds=[hold],
                                     extra_args=["--service-node", f"bench-{ratio:g}", "--service-cluster", "bench"])
            processes.append(envoy.start())
            envoy.wait_ready()
            control.wait_envoys(1)
            users = demo.Users(f"http://127.0.0.1:{hold.port}", 300, 8)
            users.start()
            times, counts = [], []
            try:
                time.sleep(2)
                for _ in range(args.runs):
                    result = subprocess.run(
                        [lab.CANARYCTL, "--server", control.server, "rollout", "start", "web", "--canary", "v2",
                         "--steps", "5,25,50,100", "--hold", "30s", "--stable-cluster", "app-v1",
                         "--canary-cluster", "app-v2", "--canary-route-cluster", "app-v2-or-v1", "--no-wait"],
                        capture_output=True, text=True)
                    if result.returncode != 0:
                        raise RuntimeError(result.stdout + result.stderr)
                    started = time.monotonic()
                    while True:
                        rollout = control.api("/v1/rollouts")["rollouts"][0]
                        if rollout["phase"] != "progressing":
                            break
                        if time.monotonic() - started > 120:
                            raise RuntimeError(f"not rolled back within 120 s: {rollout}")
                        time.sleep(0.05)
                    if rollout["phase"] != "rolled_back":
                        raise RuntimeError(f"ended {rollout['phase']}: {rollout['reason']}")
                    times.append(time.monotonic() - started)
                    e = rollout["evidence"]["errors"]
                    counts.append((e["canary_errors"], e["canary_requests"], e["stable_errors"], e["stable_requests"]))
                    print(f"{ratio:g}×: rolled back in {times[-1]:.1f} s: {rollout['reason']}", file=sys.stderr,
                          flush=True)
                    time.sleep(1)
            finally:
                users.stop()
                envoy.stop()
                canary.stop()
            served = sum(users.total.values())
            failed = sum(users.non_2xx.values())
            rows.append((ratio, times, counts, served, failed))
    finally:
        for process in reversed(processes):
            process.stop()
    print(f"\nRollback time: canary at 5 % of the demo's traffic (300 users, 8 connections), stable failing "
          f"{args.stable_fail:g} %, {args.runs} runs each.\n")
    print("| canary fails | median s | max s | canary failures / requests at the rollback (median run) | "
          "requests users sent | non-2xx users saw |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for ratio, times, counts, served, failed in rows:
        middle = sorted(range(len(times)), key=lambda i: times[i])[len(times) // 2]
        c_bad, c_n, s_bad, s_n = counts[middle]
        print(f"| {ratio:g}× ({args.stable_fail * ratio:g} %) | {statistics.median(times):.1f} | {max(times):.1f} | "
              f"{c_bad}/{c_n} (stable {s_bad}/{s_n}) | {served} | {failed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
