#!/usr/bin/env python3
"""What the reports a progressive rollout decides on cost Envoy, counted by callgrind.

    .venv/bin/python tools/count_report_cost.py [--requests 3000] [--idle 10]

Runs the shipped envoy/envoy-ads.yaml (one worker, routes forwarding to two nginx upstreams, the filter config
from `canaryctl serve`) under `valgrind --tool=callgrind`: as shipped (load reports, the stats stream and the
failure access logs to canaryctl), as shipped with 1 % of requests failing (GET /fail, a 500 from nginx: one
failed request and one failed attempt logged each), without the access logs (with and without the 1 %), with the
stats stream removed too (`stats_sinks`, `stats_flush_interval`), and with everything removed (also
`cluster_manager.load_stats_config`). For each: instructions per request over --requests requests (the bench's
users and headers, after a warm-up), then instructions per second with no traffic over --idle seconds (the
reports themselves: an Envoy under callgrind still reports every second). Prints a Markdown table for
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import count_instructions  # noqa: E402
import lab  # noqa: E402

LOAD_STATS = """cluster_manager:
  load_stats_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: { cluster_name: canaryctl }
"""
# The stats stream, as envoy-ads.yaml has it (from its comment to the end of the sink).
STATS_STREAM_START = "# Stats to canaryctl at every flush"
STATS_STREAM_END = "    histogram_emit_mode: HISTOGRAM\n"


# The failure access logs, as envoy-ads.yaml has them: the connection manager's and the router's.
REQUEST_LOG_START = "          # Failed requests (5xx"
REQUEST_LOG_END = "          route_config:\n"
ATTEMPT_LOG_START = "              # Failed upstream attempts"
ATTEMPT_LOG_END = "                    buffer_flush_interval: 1s\n"


def without_access_logs(text: str) -> str:
    start, end = text.index(REQUEST_LOG_START), text.index(REQUEST_LOG_END)
    text = text[:start] + text[end:]
    start = text.index(ATTEMPT_LOG_START)
    end = text.index(ATTEMPT_LOG_END, start) + len(ATTEMPT_LOG_END)
    return text[:start] + text[end:]


def request_log_only(text: str) -> str:
    start = text.index(ATTEMPT_LOG_START)
    end = text.index(ATTEMPT_LOG_END, start) + len(ATTEMPT_LOG_END)
    return text[:start] + text[end:]


def attempt_log_only(text: str) -> str:
    """The router's upstream log alone. Its filter is the shipped request log's (a YAML anchor on the log being
    removed), moved to where the upstream log refers to it, four columns deeper."""
    start, end = text.index(REQUEST_LOG_START), text.index(REQUEST_LOG_END)
    request_log = text[start:end]
    anchor = "filter: &failures_only\n"
    body_start = request_log.index(anchor) + len(anchor)
    body = request_log[body_start:request_log.index("            typed_config:", body_start)]
    moved = "filter:\n" + "".join("    " + line for line in body.splitlines(keepends=True))
    return (text[:start] + text[end:]).replace("filter: *failures_only\n", moved)


def without_stats_stream(text: str) -> str:
    start, end = text.index(STATS_STREAM_START), text.index(STATS_STREAM_END) + len(STATS_STREAM_END)
    return text[:start] + text[end:]


def path_of(i: int, failing_percent: int) -> str:
    """Every (100 / failing_percent)-th request fails: deterministic, the same in every run."""
    return "/fail" if failing_percent and i % (100 // failing_percent) == 0 else "/"


def measure(name: str, text: str, workdir: str, control: lab.Canaryctl, port: int, hold: lab.PortHold,
            requests: int, idle: float, binary: str, failing_percent: int = 0) -> tuple[float, float, float]:
    out = os.path.join(workdir, f"callgrind.{name}")
    callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    envoy = lab.EnvoyProcess(name, text, workdir, admin_port=0, workers=1, holds=[hold], wrapper=callgrind,
                             envoy_bin=binary, extra_args=["--service-node", name, "--service-cluster", "bench"])
    envoy.start()
    try:
        envoy.wait_ready(deadline_s=180)
        control.wait_envoys(1, deadline_s=120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(300):
            count_instructions.send(conn, i % count_instructions.USERS + 1)
        pid = envoy.process.pid
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        started = time.monotonic()
        for i in range(requests):
            count_instructions.send(conn, i % count_instructions.USERS + 1, path_of(i, failing_percent))
        rate = requests / (time.monotonic() - started)
        per_request = count_instructions.dump(pid, out) / requests
        conn.close()
        time.sleep(idle)
        per_second = count_instructions.dump(pid, out) / idle
        return per_request, per_second, rate
    finally:
        envoy.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--split-access-logs", action="store_true",
                        help="only: the connection manager's access log alone, then the router's upstream log alone")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="canary-router-report-cost-")
    holds = {"v1": lab.PortHold(), "v2": lab.PortHold()}
    upstreams = {v: hold.port for v, hold in holds.items()}
    nginx = bench.start_nginx(workdir, upstreams)
    time.sleep(0.5)
    for hold in holds.values():
        hold.release()
    config = json.loads(lab.shipped_plugin_config())
    control = lab.Canaryctl(workdir, init_config=json.dumps(config))
    binary = count_instructions.envoy_binary()
    results = {}
    try:
        control.start()
        variants = (
            ("shipped", True, True, True, 0), ("shipped-1pc-failing", True, True, True, 1),
            ("no-access-logs", False, True, True, 0), ("no-access-logs-1pc-failing", False, True, True, 1),
            ("load-reports-only", False, False, True, 0), ("neither", False, False, False, 0))
        if args.split_access_logs:
            variants = (("no-access-logs", False, True, True, 0), ("request-log-only", "requests", True, True, 0),
                        ("attempt-log-only", "attempts", True, True, 0))
        for name, access_logs, stats_stream, load_reports, failing in variants:
            hold = lab.PortHold()
            where = lab.FrontAddresses(listener_port=hold.port, admin_port=0, upstream_ports=upstreams,
                                       xds_port=control.xds_port)
            text = lab.render_front("envoy-ads.yaml", where)
            if not access_logs:
                text = without_access_logs(text)
            elif access_logs == "requests":
                text = request_log_only(text)
            elif access_logs == "attempts":
                text = attempt_log_only(text)
            if not stats_stream:
                text = without_stats_stream(text)
            if not load_reports:
                text = lab.substitute(text, {LOAD_STATS: ""}, "envoy-ads.yaml")
            results[name] = measure(name, text, workdir, control, hold.port, hold, args.requests, args.idle, binary,
                                    failing)
            print(f"{name}: {results[name][0] / 1000:.1f}k instructions per request at {results[name][2]:.0f} "
                  f"requests/s, {results[name][1] / 1e6:.2f}M per idle second", file=sys.stderr, flush=True)
    finally:
        control.stop()
        nginx.stop()
    rate = next(iter(results.values()))[2]
    print(f"\nReports: envoy/envoy-ads.yaml under callgrind, one worker, {args.requests} requests at about "
          f"{rate:.0f} requests/s (callgrind's pace), then {args.idle:g} s idle.\n")
    print("| Envoy | instructions per request | instructions per idle second | per request, net of the idle rate |")
    print("| --- | ---: | ---: | ---: |")
    labels = {"shipped": "as shipped: load reports, stats stream, failure access logs",
              "shipped-1pc-failing": "as shipped, 1 % of requests failing",
              "no-access-logs": "access logs removed",
              "no-access-logs-1pc-failing": "access logs removed, 1 % of requests failing",
              "load-reports-only": "load reports only (stats stream and access logs removed)",
              "neither": "none (load_stats_config removed too)",
              "request-log-only": "the connection manager's access_log only (failed requests)",
              "attempt-log-only": "the router's upstream_log only (failed attempts)"}
    for name, (per_request, per_second, rate) in results.items():
        # The reports run once a second whatever the traffic: without them, what each request itself costs.
        net = per_request - per_second / rate
        print(f"| {labels[name]} | {per_request / 1000:.1f}k | {per_second / 1e6:.3f}M | {net / 1000:.1f}k |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
