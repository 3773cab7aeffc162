#!/usr/bin/env python3
"""The per-request cost of canary-router in Envoy, side by side with the alternatives, in one run.

    make bench                       # = .venv/bin/python tools/bench.py (after building the artifacts)
    .venv/bin/python tools/bench.py --rounds 7 --seconds 5

One Envoy (one worker, pinned to CPU 1) has one listener per variant; nginx (the upstreams) and wrk (the
load) share CPU 0. Each round runs every variant once, in a new random order; the rounds are spread over
several Envoy starts (--envoys), each laying the listeners out in a new order, because where a filter's VM
lands moves its cost for a whole start. The table shows medians:
- (a) client → nginx directly (no Envoy)
- (b) Envoy with the same routes and no filter: the limit
- (c) Envoy's native weighted_clusters with a hash policy on the user header: no code
- (d) a Lua filter doing the same decision (group rule + FNV-1a sticky split)
- (e) a stock-SDK proxy-wasm filter that only sets one header: the floor of any proxy-wasm filter
- (f) canary-router with the shipped config (a rule, header + cookie sticky keys, an assigned cookie)
- (g) the native build (Envoy dynamic module) with the same config
More builds of ours are added with --extra / --probe (a path ending in .so is a native module build; see
tools/bench_probes.py for the cost-breakdown builds), and --copies N puts each filter N times in its chain
to magnify what a filter costs by itself over the noise.

Before measuring, every variant that decides must route a sample of users exactly as the spec says.
Per variant: requests/s and p50/p99 latency at saturation (32 keep-alive connections) and at 1
connection; Envoy CPU µs per request (all its threads' run time from /proc/<pid>/task/*/schedstat, over the
requests served at 32 connections: the steadiest figure);
ratios against (b). Then RSS per variant (an Envoy with that listener alone) and artifact sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ecds  # noqa: E402
import lab  # noqa: E402

NOOP_WASM = os.path.join(lab.ROOT, "bench", "noop-filter", "target", "wasm32-wasip1", "release", "noop_filter.wasm")
LUA = os.path.join(lab.ROOT, "bench", "canary.lua")
USERS = 1000


def wasm_filter(name: str, wasm: str, config: str) -> str:
    """The .wasm filter as tools/ecds.py builds it for ECDS (JSON is YAML), under its own name and VM."""
    return f'''
          - name: {name}
            typed_config: {json.dumps(ecds.wasm_filter(config, wasm, name))}'''


def native_filter(name: str, module: str, config: str) -> str:
    """The native build as tools/ecds.py builds it for ECDS, as module `name`."""
    return f'''
          - name: {name}
            typed_config: {json.dumps(ecds.native_filter(config, module, name))}'''


def lua_filter(name: str = "envoy.filters.http.lua") -> str:
    with open(LUA) as f:
        code = f.read()
    return f'''
          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code: {{ inline_string: {json.dumps(code)} }}'''


# As in the shipped bootstraps, the default route (v1) names its version itself, so the filter need not write
# the header for users it keeps on v1 ("default_route_version": "v1" in the shipped plugin config).
HEADER_ROUTES = '''
              routes:
              - match: { prefix: "/", headers: [{ name: x-version, string_match: { exact: v2 } }] }
                route: { cluster: v2 }
              - match: { prefix: "/" }
                route: { cluster: v1 }
                request_headers_to_add:
                - header: { key: x-version, value: v1 }
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD'''

# One route that takes the cluster from the route header: a filter that sets the header then needs only the
# route's cluster re-picked (refreshRouteCluster), not a new route match. Probes only: a request without the
# header would find no cluster.
CLUSTER_HEADER_ROUTES = '''
              routes:
              - match: { prefix: "/" }
                route: { cluster_header: x-version }'''

WEIGHTED_ROUTES = '''
              routes:
              - match: { prefix: "/" }
                route:
                  hash_policy: [{ header: { header_name: x-user-id } }]
                  weighted_clusters:
                    clusters: [{ name: v1, weight: 90 }, { name: v2, weight: 10 }]'''


def variants() -> dict[str, dict]:
    """name -> {label, filter (copy number -> YAML of one filter, None: no filter), routes (YAML), decides
    (checked against the spec)}. Each copy of a wasm filter gets its own name and VM."""
    config = lab.shipped_plugin_config()
    return {
        "b": {"label": "Envoy, no filter", "filter": None, "routes": HEADER_ROUTES, "decides": False},
        "c": {"label": "native weighted_clusters", "filter": None, "routes": WEIGHTED_ROUTES, "decides": False},
        "d": {"label": "Lua, same decision", "filter": lambda k: lua_filter(f"lua-{k}"),
              "routes": HEADER_ROUTES, "decides": True},
        "e": {"label": "stock-SDK wasm, sets 1 header", "filter": lambda k: wasm_filter(f"noop-{k}", NOOP_WASM, "{}"),
              "routes": HEADER_ROUTES, "decides": False},
        "f": {"label": "canary-router wasm",
              "filter": lambda k: wasm_filter(f"canary-router-{k}", lab.WASM, config),
              "routes": HEADER_ROUTES, "decides": True},
        "g": {"label": "canary-router native module",
              "filter": lambda k: native_filter("canary_router_native", lab.NATIVE, config),
              "routes": HEADER_ROUTES, "decides": True},
    }


def build_variants(into: dict[str, dict], extra=(), probe=(), cluster_header_probe=(), with_config=()) -> dict[str, str]:
    """Builds of ours as more variants, added to `into` (`--extra NAME=PATH`: checked against the spec;
    `--probe`: a cost-breakdown build, not checked; `--cluster-header-probe`: a probe on routes that take the
    cluster from x-version; `--with-config NAME=CONFIG.json`: today's .wasm with another plugin config, not
    checked). A .so path is a native module build, else a .wasm. Returns name -> artifact path."""
    shipped = lab.shipped_plugin_config()
    # (name, artifact, label, plugin config, checked against the spec, routes)
    extras = []
    for options, decides, routes in ((extra, True, HEADER_ROUTES), (probe, False, HEADER_ROUTES),
                                     (cluster_header_probe, False, CLUSTER_HEADER_ROUTES)):
        for option in options:
            name, path = option.split("=", 1)
            extras.append((name, path, f"canary-router build {os.path.basename(path)}", shipped, decides, routes))
    for option in with_config:
        name, path = option.split("=", 1)
        with open(path) as f:
            extras.append((name, lab.WASM, f"canary-router wasm with {os.path.basename(path)}", f.read(), False,
                           HEADER_ROUTES))
    paths = {}
    for name, path, label, config, decides, routes in extras:
        paths[name] = path
        make = native_filter if path.endswith(".so") else wasm_filter
        into[name] = {"label": label,
                      "filter": lambda k, make=make, name=name, path=os.path.abspath(path), config=config:
                          make(f"canary-router-{name}-{k}", path, config),
                      "routes": routes, "decides": decides}
    return paths


def listener(name: str, port: int, variant: dict, copies: int = 1) -> str:
    """A listener for one variant, its filter `copies` times in a row (see --copies)."""
    filters = "".join(variant["filter"](k) for k in range(copies)) if variant["filter"] else ""
    return f'''
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]{variant["routes"]}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}'''


def bootstrap(admin_port: int, listeners: dict[str, int], upstreams: dict[str, int], chosen: dict[str, dict],
              copies: int = 1) -> str:
    parts = [f'''admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:''']
    for name, port in listeners.items():
        parts.append(listener(name, port, chosen[name], copies))
    parts.append("\n  clusters:")
    for version, port in upstreams.items():
        parts.append(f'''
  - name: {version}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {version}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}''')
    return "".join(parts) + "\n"


@contextlib.contextmanager
def running_envoy(name: str, workdir: str, listeners: dict[str, int], upstreams: dict[str, int],
                  chosen: dict[str, dict], workers: int = 1, cpus: str | None = None, copies: int = 1):
    """An Envoy with one listener per variant (bootstrap), ready; stopped when the block ends."""
    admin_port = lab.free_port()
    envoy = lab.EnvoyProcess(name, bootstrap(admin_port, listeners, upstreams, chosen, copies), workdir,
                             admin_port=admin_port, workers=workers, cpus=cpus)
    envoy.start()
    try:
        envoy.wait_ready(60)
        yield envoy
    finally:
        envoy.stop()


def start_nginx(workdir: str, upstreams: dict[str, int], pin: list[str] | None = None) -> lab.ManagedProcess:
    """nginx answering as each version on its port (`pin`: a command it runs under, e.g. taskset)."""
    os.makedirs(os.path.join(workdir, "tmp"), exist_ok=True)
    with open(os.path.join(workdir, "nginx.conf"), "w") as f:
        f.write(nginx_conf(workdir, upstreams))
    nginx = lab.ManagedProcess("nginx", os.path.join(workdir, "nginx.log"))
    nginx._spawn([*(pin or []), "nginx", "-c", os.path.join(workdir, "nginx.conf"), "-p", workdir])
    return nginx


def nginx_conf(workdir: str, upstreams: dict[str, int]) -> str:
    servers = "".join(f'''
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location / {{ add_header x-served-by {version}; return 200 "{version}\\n"; }}
        location /fail {{ return 500; }}
    }}''' for version, port in upstreams.items())
    return f'''worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;{servers}
}}
'''


WRK_SCRIPT = f'''-- {USERS} users, each with a user id header and a session cookie; requests cycle through them.
local requests = {{}}
for i = 1, {USERS} do
  local user = "user-" .. i
  requests[i] = wrk.format("GET", "/", {{["Host"] = "bench.local", ["x-user-id"] = user,
                                       ["cookie"] = "theme=dark; session=" .. user}})
end
local n = 0
request = function()
  n = n % {USERS} + 1
  return requests[n]
end
'''


def cpu_ns(pid: int) -> int:
    """CPU time of all of the process's threads, in ns (schedstat: finer than utime+stime's 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just exited
    return total


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def parse_wrk(out: str) -> dict:
    def latency(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "requests": requests,
            "p50_ms": latency("50"), "p99_ms": latency("99"), "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def run_wrk(port: int, connections: int, seconds: float, script: str) -> dict:
    out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
                          "-s", script, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def check_routing(port: int, variant: str):
    """Deciding variants must route a sample of users exactly as the spec says (10 % to v2, by FNV-1a)."""
    for i in range(1, 201):
        user = f"user-{i}"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"x-user-id": user})
        with urllib.request.urlopen(request, timeout=5) as r:
            served = r.read().decode().strip()
        want = lab.expected_version("web", user, "v1", [("v2", 10)])
        if served != want:
            raise RuntimeError(f"variant {variant} routes {user} to {served}, the spec says {want}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="many short rounds: slow drifts of a shared machine cancel out")
    parser.add_argument("--seconds", type=float, default=2, help="per run at 32 connections")
    parser.add_argument("--seconds-1conn", type=float, default=1, help="per run at 1 connection (0: skip)")
    parser.add_argument("--variants", default="a,b,c,d,e,f,g")
    parser.add_argument("--copies", type=int, default=1,
                        help="each filter N times in its chain; 'added' is then per copy. Magnifies a filter's own "
                             "cost over the noise (the route re-match, once per request, is then shared)")
    parser.add_argument("--envoys", type=int, default=10,
                        help="spread the rounds over this many Envoy starts, each with its listeners in a new order")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-workers", metavar="N,N,...",
                        help="only measure RSS at startup (no load), for each variant with each worker count")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                        help="another build of canary-router as a variant (same config): a .wasm, or a native .so")
    parser.add_argument("--cluster-header-probe", action="append", default=[], metavar="NAME=PATH",
                        help="a probe build on a listener whose route takes the cluster from x-version")
    parser.add_argument("--probe", action="append", default=[], metavar="NAME=PATH",
                        help="like --extra, for cost-breakdown builds that do not decide (no routing check)")
    parser.add_argument("--with-config", action="append", default=[], metavar="NAME=CONFIG.json",
                        help="today's .wasm with another plugin config, as a variant that is not checked")
    args = parser.parse_args()
    args.envoys = max(1, min(args.envoys, args.rounds))  # no start without a round
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: `make bench` installs wrk and nginx-light", file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix="canary-router-bench-")
    os.makedirs(os.path.join(workdir, "tmp"))
    script = os.path.join(workdir, "users.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    all_variants = variants()
    extra_wasm = build_variants(all_variants, args.extra, args.probe, args.cluster_header_probe, args.with_config)
    chosen = [v for v in args.variants.split(",")] + list(extra_wasm)
    envoy_variants = {v: all_variants[v] for v in chosen if v != "a"}
    upstreams = {"v1": lab.free_port(), "v2": lab.free_port()}
    if args.rss_workers:
        return rss_by_workers(workdir, envoy_variants, upstreams, [int(n) for n in args.rss_workers.split(",")],
                              all_variants)
    nginx = start_nginx(workdir, upstreams, pin=["taskset", "-c", "0"])
    ports = {v: lab.free_port() for v in envoy_variants}
    results: dict[str, dict[int, list[dict]]] = {v: {32: [], 1: []} for v in chosen}
    print(f"{args.rounds} rounds of {','.join(chosen)} over {args.envoys} Envoy start(s) "
          f"({args.seconds:g} s at 32 connections, {args.seconds_1conn:g} s at 1)", file=sys.stderr)
    done = 0
    for start in range(args.envoys):
        # Each start lays the listeners (and their VMs) out in a new order: where a filter's code and memory
        # land moves its cost by µs, the same in every round of one start.
        layout = random.Random(1000 + start).sample(list(envoy_variants), len(envoy_variants))
        rounds = args.rounds * (start + 1) // args.envoys - done
        with running_envoy(f"envoy-{start}", workdir, {v: ports[v] for v in layout}, upstreams, envoy_variants,
                           cpus="1", copies=args.copies) as envoy:
            for v, spec in envoy_variants.items():
                if spec["decides"]:
                    check_routing(ports[v], v)
            for v in chosen:  # warm-up
                run_wrk(upstreams["v1"] if v == "a" else ports[v], 32, 1, script)
            for r in range(done, done + rounds):
                # A new order each round, so that no variant always runs right after the same one.
                order = random.Random(r).sample(chosen, len(chosen))
                for connections, seconds in ((32, args.seconds), (1, args.seconds_1conn)):
                    if seconds <= 0:
                        continue
                    for v in order:
                        port = upstreams["v1"] if v == "a" else ports[v]
                        before = cpu_ns(envoy.process.pid)
                        result = run_wrk(port, connections, seconds, script)
                        used_ns = cpu_ns(envoy.process.pid) - before
                        result["cpu_us"] = used_ns / 1e3 / max(result["requests"], 1) if v != "a" else None
                        results[v][connections].append(result)
                        if result["non2xx"] or result["socket_errors"]:
                            raise RuntimeError(f"variant {v}: {result['non2xx']} non-2xx, "
                                               f"socket errors {result['socket_errors']}")
                print(f"round {r + 1}/{args.rounds} done (Envoy start {start + 1})", file=sys.stderr)
        done += rounds
    rss = {} if args.skip_rss else measure_rss(workdir, envoy_variants, upstreams, script)
    nginx.stop()
    print_table(chosen, all_variants, results, rss, args, extra_wasm)
    return 0


def measure_rss(workdir: str, envoy_variants: dict, upstreams: dict, script: str) -> dict[str, int]:
    """RSS of an Envoy (one worker) with one variant's listener alone, after 2 s of load."""
    rss = {}
    for v, spec in envoy_variants.items():
        port = lab.free_port()
        with running_envoy(f"rss-{v}", workdir, {v: port}, upstreams, {v: spec}, cpus="1") as envoy:
            run_wrk(port, 32, 2, script)
            rss[v] = rss_kb(envoy.process.pid)
    return rss


def rss_by_workers(workdir: str, envoy_variants: dict, upstreams: dict, workers: list[int], all_variants) -> int:
    """RSS right after /ready of an Envoy with one variant's listener alone, per worker count: separates what
    a filter costs once per module from what each worker's VM adds."""
    rss = {}
    for n in workers:
        for v, spec in envoy_variants.items():
            with running_envoy(f"rss-{v}-{n}", workdir, {v: lab.free_port()}, upstreams, {v: spec},
                               workers=n) as envoy:
                rss[v, n] = rss_kb(envoy.process.pid) / 1024
    print("\nRSS MB right after startup, no load; added vs (b) with the same number of workers.\n")
    print("| variant | " + " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in workers) + " |")
    print("| --- |" + " ---: |" * len(workers))
    for v in envoy_variants:
        cells = [f"{rss[v, n]:.1f} ({rss[v, n] - rss.get(('b', n), rss[v, n]):+.1f})" for n in workers]
        print(f"| ({v}) {all_variants[v]['label']} | " + " | ".join(cells) + " |")
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(chosen, all_variants, results, rss, args, extra_wasm=None):
    def m(v, c, key):
        return median([r[key] for r in results[v][c] if r[key] is not None])

    base_rps = m("b", 32, "rps") if "b" in chosen else float("nan")

    def added(v):
        """Median and spread over rounds of (CPU of v − CPU of b) in the same round: slow drifts of the
        machine cancel out of each difference."""
        diffs = sorted((r["cpu_us"] - b["cpu_us"]) / args.copies for r, b in zip(results[v][32], results["b"][32]))
        q = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else [diffs[0]] * 3
        return median(diffs), q[0], q[2]
    labels = {"a": "direct to nginx (no Envoy)"} | {k: v["label"] for k, v in all_variants.items()}
    print(f"\nMedians of {args.rounds} rounds over {args.envoys} Envoy start(s) (a new variant order each round, a "
          f"new listener layout each start); \"added\" is the median of the "
          f"per-round differences to (b); 32 connections for {args.seconds:g} s, "
          f"1 connection for {args.seconds_1conn:g} s; Envoy: 1 worker on CPU 1."
          + (f" Each filter is {args.copies} times in its chain: \"added\" is per copy, the rest per request."
             if args.copies > 1 else "") + "\n")
    print("| variant | req/s (32 conns) | vs (b) | p50 ms | p99 ms | req/s (1 conn) | p50 ms | p99 ms "
          "| Envoy CPU µs/req | added vs (b), paired | middle half of rounds | RSS MB | added |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in chosen:
        cpu = m(v, 32, "cpu_us") if v != "a" else None
        paired = added(v) if cpu is not None and "b" in chosen else None
        rss_mb = rss.get(v, 0) / 1024
        base_rss = rss.get("b", 0) / 1024
        one_conn = (f"{m(v, 1, 'rps'):,.0f} | {m(v, 1, 'p50_ms'):.3f} | {m(v, 1, 'p99_ms'):.3f}"
                    if results[v][1] else "– | – | –")
        print(f"| ({v}) {labels[v]} | {m(v, 32, 'rps'):,.0f} | {m(v, 32, 'rps') / base_rps:.2f}× | "
              f"{m(v, 32, 'p50_ms'):.2f} | {m(v, 32, 'p99_ms'):.2f} | {one_conn} | "
              + (f"{cpu:.1f} | {paired[0]:+.1f} | {paired[1]:+.1f} … {paired[2]:+.1f} | "
                 if paired is not None else "– | – | – | ")
              + (f"{rss_mb:.1f} | {rss_mb - base_rss:+.1f} |" if v in rss else "– | – |"))
    print("\n| artifact | bytes |")
    print("| --- | ---: |")
    artifacts = [("canary_router.wasm (f)", lab.WASM), ("libcanary_router_native.so (g)", lab.NATIVE),
                 ("noop_filter.wasm (e)", NOOP_WASM), ("canary.lua (d)", LUA)]
    artifacts += [(f"{os.path.basename(p)} ({n})", p) for n, p in (extra_wasm or {}).items()]
    for name, path in artifacts:
        print(f"| {name} | {os.path.getsize(path):,} |")


if __name__ == "__main__":
    sys.exit(main())
