#!/usr/bin/env python3
"""canary-router demo: watch a canary grow from 0 to 100 % under live traffic, with zero failed requests;
then the release loop, where canaryctl decides by itself.

    make demo                      # the same as: .venv/bin/python tools/demo.py local

`local` starts everything on this machine (no Docker): the two demo app versions (envoy/demo-app-v*.yaml),
the control plane (`canaryctl serve`) and Envoy with the shipped ADS bootstrap (envoy/envoy-ads.yaml). It
then simulates a few hundred users, steps the canary percentage with `canaryctl set` (each step waits until
Envoy has applied it), shows each version's share live, and prints a summary. Then the release loop
(`canaryctl rollout start`, decided from Envoy's load reports and failure access logs), with a flaky GET /search
that fails on both versions alike: a buggy v2 (503 on 5 % of its requests) is rolled back automatically, with
the reason on screen, while users see no error of it thanks to the fallback; a v2 that breaks only POST /checkout
(0.5 % of its requests) is rolled back by that error signature, new on v2, while the shared search errors stay
`known`; the fixed v2 is promoted step by step, and the live split then shows every user on v2. It stops every
process it started, on Ctrl-C too.

`ha` (`make demo-ha`) runs canaryctl as 3 replicas on a 3-member etcd cluster (Debian's etcd-server) with 2 Envoys
whose bootstraps list every replica, starts a rollout on a follower, kills the leading replica during the 25 %
step, and shows another take the lead within its lease and promote v2 while users see no error.

`drive` does the traffic and the ramp against an Envoy that is already running (e.g. `docker compose up`),
through canaryctl or, without a control plane, by publishing files into a watched ECDS directory:

    python3 tools/demo.py drive --canaryctl http://127.0.0.1:9902
    python3 tools/demo.py drive --ecds-dir .run/ecds --admin http://127.0.0.1:9901

Ports (flags, or environment variables): listener 10000 (DEMO_PORT), Envoy admin 9901 (DEMO_ADMIN_PORT),
app v1 8001 (DEMO_V1_PORT), app v2 8002 (DEMO_V2_PORT), canaryctl xDS 18000 (DEMO_XDS_PORT) and admin API
9902 (DEMO_CANARYCTL_PORT).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ecds  # noqa: E402
import lab  # noqa: E402

ECDS_SUCCESS = "extension_config_discovery.http_filter.canary-router.update_success"
RUN_DIR = os.path.join(lab.ROOT, ".run", "demo")


def plugin_config(percent: float) -> str:
    """The shipped example config (envoy/plugin-config.json) with the canary at `percent`."""
    config = json.loads(lab.shipped_plugin_config())
    config["rollouts"][0]["canaries"][0]["percent"] = percent
    return json.dumps(config, indent=2)


class Users:
    """Simulated users on keep-alive connections; each request is one user's, chosen at random, and one of
    `requests` ((weight, method, path) with `{n}` for a random number), chosen independently of the user."""

    def __init__(self, url: str, users: int, clients: int, requests: list[tuple[int, str, str]] | None = None,
                 on_answer=None):
        """`on_answer(method, path, version, status)`: called for each answer (the demo's business metrics)."""
        self.on_answer = on_answer
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        # Realistic, diverse ids (seeded, so every run has the same users).
        id_rng = random.Random(2026)
        self.user_ids = [f"{id_rng.getrandbits(64):016x}" for _ in range(users)]
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.total = Counter()        # version -> requests, whole run
        self.non_2xx = Counter()      # status (or error) -> count, whole run
        self.failed = Counter()       # (method, path without its id, status) -> count, whole run
        self.requests = requests or [(1, "GET", "/")]
        self.recent: deque[tuple[float, str]] = deque()  # (time, version) for the live window
        self.step = Counter()         # version -> requests in the current step
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, seed: int):
        rng = random.Random(seed)
        kinds = [(method, path) for _, method, path in self.requests]
        weights = [weight for weight, _, _ in self.requests]
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        while not self.stop_flag.is_set():
            user = rng.choice(self.user_ids)
            method, path = rng.choices(kinds, weights)[0]
            try:
                headers = {"x-user-id": user, **({"content-length": "0"} if method == "POST" else {})}
                conn.request(method, path.replace("{n}", str(rng.randrange(1, 100000))), headers=headers)
                response = conn.getresponse()
                response.read()
                version = response.getheader("x-served-by") or "?"
                status = response.status
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                with self.lock:
                    self.non_2xx[type(err).__name__] += 1
                continue
            if self.on_answer is not None:
                self.on_answer(method, path, version, status)
            with self.lock:
                if 200 <= status < 300:
                    self.total[version] += 1
                    self.step[version] += 1
                    self.recent.append((time.monotonic(), version))
                else:
                    self.non_2xx[status] += 1
                    self.failed[(method, path.split("?")[0].replace("/{n}", "") or "/", status)] += 1
        conn.close()

    def start(self):
        self.started_at = time.monotonic()
        for t in self.threads:
            t.start()

    def elapsed(self) -> float:
        return time.monotonic() - getattr(self, "started_at", time.monotonic())

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=15)

    def window(self, seconds: float = 1.0) -> Counter:
        """Versions served in the last `seconds`."""
        cutoff = time.monotonic() - seconds
        with self.lock:
            while self.recent and self.recent[0][0] < cutoff:
                self.recent.popleft()
            return Counter(v for _, v in self.recent)

    def new_step(self) -> Counter:
        with self.lock:
            finished, self.step = self.step, Counter()
            return finished


def bar(share: float, width: int = 24) -> str:
    filled = round(share * width)
    return "█" * filled + "·" * (width - filled)


def status_line(percent: float, counts: Counter, errors: int, rate: float) -> str:
    total = sum(counts.values()) or 1
    v1, v2 = counts["v1"] / total, counts["v2"] / total
    return (f"canary {percent:>5g}% │ v1 {bar(v1)} {v1 * 100:5.1f}% │ v2 {bar(v2)} {v2 * 100:5.1f}% │ "
            f"{rate:6.0f} req/s │ non-2xx {errors}")


def wait_applied(admin: str, before: int, deadline_s: float = 15.0) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = read_stat(admin, ECDS_SUCCESS)
        if value > before:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"Envoy did not apply the new config within {deadline_s}s (see its log)")


def read_stat(admin: str, name: str) -> int:
    with urllib.request.urlopen(f"{admin}/stats?filter=^{name}$", timeout=5) as r:
        for line in r.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    return 0


class EcdsPublisher:
    """Steps by file: a new resource renamed into the watched directory, applied when Envoy counts it."""

    def __init__(self, admin: str, ecds_dir: str, wasm_path: str):
        self.admin, self.ecds_dir, self.wasm_path = admin, ecds_dir, wasm_path

    def __call__(self, percent: float):
        before = read_stat(self.admin, ECDS_SUCCESS)
        ecds.publish(self.ecds_dir, plugin_config(percent), wasm_path=self.wasm_path)
        wait_applied(self.admin, before)


class CanaryctlPublisher:
    """Steps by `canaryctl set`, which returns once every connected Envoy has ACKed the change."""

    def __init__(self, server: str, token: str | None = None):
        self.server, self.token = server, token

    def __call__(self, percent: float):
        env = dict(os.environ)
        if self.token:
            env["CANARYCTL_TOKEN"] = self.token
        result = subprocess.run([lab.CANARYCTL, "--server", self.server, "set", "web", f"v2={percent:g}", "--timeout", "15"],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"canaryctl set failed: {result.stderr.strip()}")


def live(users: Users, hold: float, line_of) -> str:
    """Shows `line_of(the last second's versions)` for `hold` seconds: redrawn in place on a terminal, once a
    second otherwise. Returns the last line."""
    tty = sys.stdout.isatty()
    started, next_print, line = time.monotonic(), time.monotonic(), ""
    while time.monotonic() - started < hold:
        time.sleep(0.1)
        line = line_of(users.window(1.0))
        if tty:
            print("\r" + line, end="", flush=True)
        elif time.monotonic() >= next_print:
            print(line, flush=True)
            next_print += 1.0
    return line


def ramp(users: Users, publish, steps: list[float], hold: float) -> list[tuple]:
    """Publish each percentage, show the live split for `hold` seconds, and return per-step results."""
    tty = sys.stdout.isatty()
    results = []
    for percent in steps:
        started = time.monotonic()
        publish(percent)
        applied_ms = (time.monotonic() - started) * 1000
        users.new_step()
        line = live(users, hold, lambda window: status_line(percent, window, sum(users.non_2xx.values()),
                                                            sum(window.values())))
        finished = users.new_step()
        total = sum(finished.values()) or 1
        # What the spec gives these users (FNV-1a buckets): the served share converges to it.
        spec = sum(lab.expected_version("web", u, "v1", [("v2", percent)]) == "v2" for u in users.user_ids)
        summary = (f"canary {percent:>5g}% │ applied in {applied_ms:4.0f} ms │ {total:6d} requests │ "
                   f"v1 {finished['v1'] / total * 100:5.1f}% │ v2 {finished['v2'] / total * 100:5.1f}% "
                   f"(these users' buckets: {spec / len(users.user_ids) * 100:.1f}%)")
        print(("\r" + " " * len(line) + "\r") if tty else "", end="")
        print(summary, flush=True)
        results.append((percent, finished))
    return results


def summarize(users: Users, elapsed: float, expected: set | None = None) -> int:
    """`expected`: (method, path, status) failures the run provokes on purpose (shown, and not a failure of the
    demo)."""
    total = sum(users.total.values())
    errors = sum(users.non_2xx.values())
    print()
    print(f"Summary: {total + errors} requests in {elapsed:.1f} s from {len(users.user_ids)} users")
    for version in sorted(users.total):
        print(f"  {version}: {users.total[version]:7d} ({users.total[version] / max(total, 1) * 100:.1f}%)")
    if not expected:
        print(f"  non-2xx: {errors}" + (f" {dict(users.non_2xx)}" if errors else " (a canary change lost no request)"))
        return 0 if errors == 0 else 1
    provoked = sum(n for key, n in users.failed.items() if key in expected)
    unexpected = errors - provoked
    print(f"  non-2xx the apps answered on purpose: {provoked}")
    for (method, path, status), n in sorted(users.failed.items()):
        if (method, path, status) in expected:
            why = ("the flaky search both versions share (known)" if path == "/search"
                   else "the v2 that broke it, until its rollback (a 500 is not retried)")
            print(f"    {method} {path} {status}: {n} ({why})")
    others = {f"{m} {p} {status}": n for (m, p, status), n in users.failed.items() if (m, p, status) not in expected}
    others.update({str(k): n for k, n in users.non_2xx.items() if not isinstance(k, int)})
    print(f"  non-2xx: {unexpected} other" + (f" {others}" if unexpected else
                                             " (the fallback hid every 503 of the buggy v2)"))
    return 0 if unexpected == 0 else 1


def drive(url: str, publish, steps: list[float], hold: float, user_count: int, clients: int) -> int:
    """Traffic from `user_count` users; with a `publish`er, the canary ramp through `steps`."""
    users = Users(url, user_count, clients)
    started = time.monotonic()
    users.start()
    try:
        if publish:
            ramp(users, publish, steps, hold)
        else:
            print("No --canaryctl or --ecds-dir: watching only (Ctrl-C to stop).")
            while True:
                time.sleep(1)
                window = users.window(1.0)
                print(status_line(float("nan"), window, sum(users.non_2xx.values()), sum(window.values())))
    except KeyboardInterrupt:
        print("\ninterrupted")
    except RuntimeError as err:
        print(f"\nramp stopped: {err}", file=sys.stderr)
        users.non_2xx["ramp failed"] += 1
    finally:
        users.stop()
    return summarize(users, time.monotonic() - started)


def rollout_line(r: dict) -> str:
    errors = r["evidence"]["errors"]
    # The strongest evidence of the tests (errors, latency beyond stable's p50, p90, p99), against its threshold;
    # and the strongest error signature against its own.
    evidence = max([errors["e_value"]] + [c["e_value"] for c in r["latency"]["checks"]])
    signatures = r["findings"]["signatures"]
    # Each signature has its own threshold (by its order of arrival): the one nearest it.
    top = max(signatures, key=lambda s: s["e_value"] / s["threshold"], default=None)
    finding = f"top {top['e_value']:.3g} (at {top['threshold']:.0f})" if top else "none yet"
    return (f"{r['phase']:<12} │ {r['step_name']:<16} │ v2 errors {errors['canary_errors']}/{errors['canary_requests']} "
            f"vs v1 {errors['stable_errors']}/{errors['stable_requests']} │ evidence {evidence:.3g} "
            f"(rolls back at {errors['threshold']:.0f}) │ signatures {len(signatures)}, {finding}")


# The business metric the local demo's releases are also judged on: searches that found nothing, per search.
BUSINESS_METRIC = ["--metric", 'empty_searches=demo_searches_empty_total{job="app",version="{version}"}',
                   "--metric-requests", 'empty_searches=demo_searches_total{job="app",version="{version}"}']


def start_rollout(server: str, hold: float, metric: list[str] | None = None) -> None:
    """`canaryctl rollout start` of v2 through 5,25,50,100 %, each step held at least `hold` seconds, judged on
    `metric` too (--metric flags)."""
    result = subprocess.run([lab.CANARYCTL, "--server", server, "rollout", "start", "web", "--canary", "v2",
                             "--steps", "5,25,50,100", "--hold", f"{hold:g}s", "--min-canary-requests", "100",
                             "--stable-cluster", "app-v1", "--canary-cluster", "app-v2", "--canary-route-cluster", "app-v2-or-v1",
                             "--timeout", "15", *(metric or [])],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"canaryctl rollout start failed: {result.stderr.strip()}")


def release(control: lab.Canaryctl, users: "Users", hold: float, deadline_s: float = 180,
            metric: list[str] | None = None) -> dict:
    """`canaryctl rollout start` v2, then its progress live until it is promoted or rolled back."""
    start_rollout(control.server, hold, metric)
    tty = sys.stdout.isatty()
    started, line, last_step = time.monotonic(), "", ""
    while time.monotonic() - started < deadline_s:
        time.sleep(0.2)
        rollout = {r["rollout"]: r for r in control.api("/v1/rollouts")["rollouts"]}["web"]
        window = users.window(1.0)
        line = (f"{rollout_line(rollout)} │ {sum(window.values())} req/s, v2 {window['v2']} │ "
                f"non-2xx {sum(users.non_2xx.values())}")
        if tty:
            print("\r" + line, end="", flush=True)
        elif rollout["step_name"] != last_step or rollout["phase"] in ("promoted", "rolled_back"):
            print(line, flush=True)
        last_step = rollout["step_name"]
        if rollout["phase"] in ("promoted", "rolled_back", "inconclusive"):
            if tty:
                print()
            return rollout
    raise RuntimeError(f"the rollout did not finish within {deadline_s:g} s: {line}")


# Both versions call a flaky search dependency: GET /search answers 500 to 2.5 % of its requests, on v1 and v2
# alike (users see those: a 500 is not retried). A known caveat of stable, which must not stop a release.
SHARED_FAULTS = {"GET /search": (500, 2.5)}
# The release loop's traffic: 59 % GET /, 40 % GET /search, 1 % POST /checkout.
RELEASE_REQUESTS = [(59, "GET", "/"), (40, "GET", "/search?q={n}"), (1, "POST", "/checkout/{n}")]


def redeploy(apps: dict, version: str, fail_percent: int, run_dir: str,
             endpoint_faults: dict | None = None) -> None:
    """Replace an app version's process with another build of it (same port)."""
    app, port = apps[version]
    app.stop()
    hold = lab.PortHold(port=port)  # nothing else takes the port in between
    faults = {**SHARED_FAULTS, **(endpoint_faults or {})}
    build = lab.EnvoyProcess(f"app-{version}", lab.render_app(version, port, fail_percent=fail_percent,
                                                              endpoint_faults=faults), run_dir,
                             workers=1, holds=[hold])
    apps[version] = (build.start(), port)
    build.wait_serving(port)
    build.release_holds()


NOTIFY_SECRET = b"the demo's notification secret, 0123456789"


class SearchMetrics:
    """Stands in for the apps' own business metrics (the demo's apps are Envoys answering fixed bodies, and count
    nothing of the kind): for each GET /search a version answered 200, the demo counts a search of that version,
    and marks it empty (found nothing) at the share `empty` gives that version, as a build with a broken index
    would. Served on /metrics in Prometheus's text format (demo_searches_total, demo_searches_empty_total, by
    version), for a real Prometheus to scrape."""

    def __init__(self):
        import http.server
        self.empty = {"v1": 0.02, "v2": 0.02}
        self.searches = Counter()
        self.found_nothing = Counter()
        self.lock = threading.Lock()
        self.rng = random.Random(7)
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with metrics.lock:
                    lines = [line for v in sorted(metrics.searches) for line in (
                        f'demo_searches_total{{version="{v}"}} {metrics.searches[v]}',
                        f'demo_searches_empty_total{{version="{v}"}} {metrics.found_nothing[v]}')]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on_answer(self, method: str, path: str, version: str, status: int):
        if method == "GET" and path.startswith("/search") and status == 200 and version in self.empty:
            with self.lock:
                self.searches[version] += 1
                if self.rng.random() < self.empty[version]:
                    self.found_nothing[version] += 1

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def notification_log(path: str):
    """Appends each notification's text to `path`."""
    def log(line: str):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    return log


def notified(receiver: "lab.Receiver", seen: int) -> int:
    """Prints the notifications the receiver got since the `seen` first; returns how many it has."""
    events = list(receiver.events)
    for e in events[seen:]:
        check = "signature verified" if e["verified"] else "SIGNATURE DID NOT VERIFY"
        print(f"   notified ({check}): {e['body']['event']}: {e['body']['text']}")
    return len(events)


def release_loop(args, control: lab.Canaryctl, apps: dict, processes: list, receiver: "lab.Receiver",
                 search: SearchMetrics) -> int:
    print("\nThe release loop: `canaryctl rollout start` moves v2 through 5,25,50,100 % by itself, comparing its")
    print("errors, latency and error signatures with v1's, from Envoy's reports (they count the attempts the fallback")
    print("hid from users) and its failure access logs. Traffic now: 59 % GET /, 40 % GET /search, 1 % POST /checkout;")
    print("GET /search fails 2.5 % of the time on both versions (a flaky dependency: a known caveat of v1).")
    print("Each release is also judged on a business metric, from a real Prometheus: searches that found nothing, per")
    print("search (2 % on v1), as `--metric empty_searches=…` (the demo counts them for its apps, which cannot).\n")
    CanaryctlPublisher(control.server)(0)
    users = Users(f"http://127.0.0.1:{args.port}", args.users, args.clients, RELEASE_REQUESTS,
                  on_answer=search.on_answer)
    users.start()
    expected_failures = {("GET", "/search", 500)}
    seen = len(receiver.events)
    try:
        for title, fail_percent, faults, empty, expected in (
                ("1. A buggy v2 (503 on 5 % of its requests; /healthz stays green):", 5, None, 0.02, "rolled_back"),
                ("2. A v2 that breaks one endpoint (POST /checkout answers 500 half the time, 0.5 % of its requests):",
                 0, {"POST /checkout": (500, 50.0)}, 0.02, "rolled_back"),
                ("3. A v2 whose searches find nothing 3 times as often (6 %; every answer a 200: Envoy sees no error):",
                 0, None, 0.06, "rolled_back"),
                ("4. v2 fixed:", 0, None, 0.02, "promoted")):
            print(title)
            search.empty["v2"] = empty
            redeploy(apps, "v2", fail_percent, RUN_DIR, faults)
            processes.append(apps["v2"][0])
            if faults:
                expected_failures |= {(e.split()[0], e.split()[1], status) for e, (status, _) in faults.items()}
            outcome = release(control, users, args.release_hold, metric=BUSINESS_METRIC)
            if outcome["phase"] != expected:
                raise RuntimeError(f"v2 ended {outcome['phase']}, not {expected}: {outcome.get('reason')}")
            # The receiver has the verdict within a moment (delivery never holds the rollout up).
            try:
                lab.eventually(lambda: any(e["body"]["event"] == expected for e in receiver.events[seen:]),
                               deadline_s=10, interval_s=0.1, what=f"the {expected} notification")
            except AssertionError as err:
                raise RuntimeError(str(err)) from err
            seen = notified(receiver, seen)
            if expected == "rolled_back":
                print(f"   rolled back: {outcome['reason']}\n")
            else:
                print(f"   promoted: {outcome['reason']}: v2 is stable now")
                after_promotion(control, users, args.hold)
            if faults:
                shown = subprocess.run([lab.CANARYCTL, "--server", control.server, "rollout", "findings", "web"],
                                       capture_output=True, text=True)
                print("\n".join("   " + line for line in shown.stdout.splitlines()[1:]) + "\n")
    except RuntimeError as err:
        print(f"\nrelease loop stopped: {err}", file=sys.stderr)
        users.non_2xx["release loop failed"] += 1
    finally:
        users.stop()
    code = summarize(users, users.elapsed(), expected_failures)
    return code


def after_promotion(control: lab.Canaryctl, users: "Users", hold: float) -> None:
    """The live split once the promoted config is applied: every user on v2, though Envoy's routes still send a
    request without a route header to v1 (the config names v1 as the default route's version, so the filter
    writes v2 for v2's users)."""
    control.wait_envoys(1)
    time.sleep(0.5)  # requests already in flight finish on the config they started with
    users.new_step()
    tty = sys.stdout.isatty()
    line = live(users, hold, lambda window: "after the promotion │ " + status_line(
        0, window, sum(users.non_2xx.values()), sum(window.values())))
    served = users.new_step()
    total = sum(served.values())
    print(("\r" + " " * len(line) + "\r") if tty else "", end="")
    print(f"   after the promotion: v2 served {served['v2']} of {total} requests "
          f"({served['v2'] / max(total, 1) * 100:.1f}%) in {hold:g} s", flush=True)
    if total == 0 or served["v2"] != total:
        raise RuntimeError(f"after the promotion v1 still served {total - served['v2']} of {total} requests")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def built(target: str, more: list[tuple[str, str]] | None = None) -> bool:
    """Whether Envoy, the .wasm, canaryctl (and `more`) are there; if not, says which target makes each."""
    for path, hint in [(lab.ENVOY_BIN, "make setup"), (lab.WASM, "make wasm"), (lab.CANARYCTL, "make canaryctl"),
                       *(more or [])]:
        if not os.path.exists(path):
            print(f"missing {path}: run `{hint}` (or `{target}`, which does it)", file=sys.stderr)
            return False
    return True


def local(args) -> int:
    if not built("make demo"):
        return 2
    if not args.no_release_loop and shutil.which(lab.PROMETHEUS) is None:
        print(f"missing {lab.PROMETHEUS}: run `make demo`, which installs Debian's prometheus (the release loop "
              f"judges each release on a business metric read from it), or pass --no-release-loop", file=sys.stderr)
        return 2
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    ecds_dir = os.path.join(RUN_DIR, "ecds")
    os.makedirs(ecds_dir)
    processes: list[lab.EnvoyProcess] = []
    stops = []

    def stop_all(*_):
        for process in reversed(processes):
            process.stop()
        for stop in stops:
            stop()

    # SIGTERM (e.g. `kill`) stops the children too, like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        apps = {}
        for version, port in (("v1", args.v1_port), ("v2", args.v2_port)):
            app = lab.EnvoyProcess(f"app-{version}", lab.render_app(version, port, endpoint_faults=SHARED_FAULTS),
                                   RUN_DIR, workers=1)
            processes.append(app.start())
            apps[version] = (app, port)
        for app, port in apps.values():
            app.wait_serving(port)
        # A webhook receiver stands for the team's chat: canaryctl posts every change of a rollout to it, signed.
        secret_path = os.path.join(RUN_DIR, "notify-secret")
        with open(secret_path, "wb") as f:
            f.write(NOTIFY_SECRET)
        receiver = lab.Receiver(secret=NOTIFY_SECRET, log=notification_log(os.path.join(RUN_DIR, "notifications.log")))
        stops.append(receiver.close)
        # Port 0 (canaryctl's ports, Envoy's admin): a free port, learned once the process runs.
        # A real Prometheus scrapes Envoy and the business metric: its port is chosen now, for canaryctl.
        prometheus_port = lab.free_port()
        control = lab.Canaryctl(RUN_DIR, init_config=plugin_config(args.steps[0]), xds_port=args.xds_port,
                                admin_port=args.canaryctl_port,
                                extra_args=["--notify", receiver.url + "/hooks/releases",
                                            "--notify-secret-file", secret_path,
                                            "--prometheus-url", f"http://127.0.0.1:{prometheus_port}"])
        processes.append(control.start())
        where = lab.FrontAddresses(listener_port=args.port, admin_port=args.admin_port,
                                   upstream_ports={"v1": args.v1_port, "v2": args.v2_port}, xds_port=control.xds_port)
        text = lab.render_front("envoy-ads.yaml", where)
        envoy = lab.EnvoyProcess("envoy", text, RUN_DIR, admin_port=args.admin_port, workers=2,
                                 extra_args=["--service-node", "demo-envoy", "--service-cluster", "demo"])
        processes.append(envoy.start())
        envoy.wait_ready()
        control.wait_envoys(1)
        print(f"Envoy on http://127.0.0.1:{args.port} (admin http://127.0.0.1:{envoy.admin_port}), "
              f"app v1 on :{args.v1_port}, app v2 on :{args.v2_port}, canaryctl on {control.server}; "
              f"logs in {RUN_DIR}")
        print(f"the rollout page: {control.server}/ (open it in a browser: the fleet, each rollout's steps, charts, "
              f"tests, findings and history, live; no token in this demo)")
        print(f"notifications: every change of a rollout is posted (signed) to the receiver on {receiver.url}, "
              f"logged in {os.path.join(RUN_DIR, 'notifications.log')}")
        print(f"{args.users} users on {args.clients} connections; canary steps {args.steps} by `canaryctl set`, "
              f"{args.hold:g} s each\n")
        code = drive(f"http://127.0.0.1:{args.port}", CanaryctlPublisher(control.server), args.steps, args.hold,
                     args.users, args.clients)
        if code != 0 or args.no_release_loop:
            return code
        search = SearchMetrics()
        stops.append(search.close)
        prometheus_dir = os.path.join(RUN_DIR, "prometheus")
        os.makedirs(prometheus_dir)
        prometheus = lab.Prometheus(prometheus_dir, [f"127.0.0.1:{envoy.admin_port}"], port=prometheus_port,
                                    apps=[f"127.0.0.1:{search.port}"])
        processes.append(prometheus.start())
        lab.eventually(lambda: prometheus.scraped(2), deadline_s=30, interval_s=0.2,
                       what="Prometheus scraping Envoy and the search metrics")
        print(f"Prometheus on {prometheus.url} scrapes Envoy and the business metric (searches that found nothing)")
        return release_loop(args, control, apps, processes, receiver, search)
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    except RuntimeError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    finally:
        stop_all()
        print("stopped every process the demo started")


def ha(args) -> int:
    """Three canaryctl replicas on a 3-member etcd cluster, two Envoys, a rollout, and its leader killed."""
    if not built("make demo-ha", [(shutil.which(lab.ETCD) or lab.ETCD, "make install-etcd")]):
        return 2
    run_dir = os.path.join(lab.ROOT, ".run", "demo-ha")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    processes: list = []
    signal.signal(signal.SIGTERM, _interrupt)
    users: list[Users] = []
    try:
        apps = {}
        for version in ("v1", "v2"):
            port = lab.free_port()
            app = lab.EnvoyProcess(f"app-{version}", lab.render_app(version, port), run_dir, workers=1)
            processes.append(app.start())
            apps[version] = (app, port)
        for app, port in apps.values():
            app.wait_serving(port)
        os.makedirs(os.path.join(run_dir, "etcd"))
        etcd = lab.EtcdCluster(os.path.join(run_dir, "etcd"), size=3)
        processes.extend(etcd.members)
        etcd.start()
        replicas = {}
        for name in ("a", "b", "c"):
            os.makedirs(os.path.join(run_dir, f"canaryctl-{name}"))
            replica = lab.Canaryctl(os.path.join(run_dir, f"canaryctl-{name}"), init_config=plugin_config(0),
                                    store=etcd.url, replica=name)
            processes.append(replica.start())
            replicas[name] = replica
        order = list(replicas.values())
        fronts = []
        for i, port in enumerate(args.ports[:2]):
            # Each Envoy lists every replica, its own first (priority 0), the others after it.
            mine = order[i:] + order[:i]
            where = lab.FrontAddresses(listener_port=port, admin_port=lab.free_port(),
                                       upstream_ports={v: p for v, (_, p) in apps.items()},
                                       xds_port=mine[0].xds_port, xds_replicas=[r.xds_port for r in mine])
            envoy = lab.EnvoyProcess(f"front-{i + 1}", lab.render_front("envoy-ads.yaml", where), run_dir,
                                     admin_port=where.admin_port, workers=1,
                                     extra_args=["--service-node", f"front-{i + 1}", "--service-cluster", "demo"])
            processes.append(envoy.start())
            fronts.append((envoy, port))
        for envoy, _ in fronts:
            envoy.wait_ready()
        order[0].wait_envoys(2)
        leader = ha_leader(replicas)
        print(f"etcd: 3 members ({etcd.url}); canaryctl replicas a, b, c on it ({', '.join(r.server for r in order)});")
        print(f"Envoys front-1 on :{args.ports[0]} (on replica a, then b, c) and front-2 on :{args.ports[1]} (on b, "
              f"then c, a); logs in {run_dir}")
        print(f"replica {leader} leads: it alone judges rollouts; every replica serves xDS, the reports and the API\n")
        for _, port in fronts:
            users.append(Users(f"http://127.0.0.1:{port}", args.users, args.clients))
            users[-1].start()
        writer = next(name for name in replicas if name != leader)
        print(f"`canaryctl rollout start` on replica {writer} (a follower: a write works on any replica):")
        start_rollout(replicas[writer].server, args.release_hold)
        killed_at, moved, outcome, last = None, None, None, ""
        started = time.monotonic()
        while time.monotonic() - started < 180:
            time.sleep(0.2)
            alive = [r for r in replicas.values() if r.alive()]
            rollout = {r["rollout"]: r for r in alive[0].api("/v1/rollouts")["rollouts"]}["web"]
            if killed_at is None and "(25%)" in rollout["step_name"]:
                killed_at = time.monotonic()
                replicas[leader].kill()
                print(f"   killed replica {leader}, the leader, at {rollout['step_name']} (SIGKILL; its lease is 4 s)")
                continue
            if killed_at is not None and moved is None:
                now_leading = ha_leader(replicas, wait=False)
                if now_leading:
                    moved = time.monotonic() - killed_at
                    print(f"   replica {now_leading} leads {moved:.1f} s later and goes on with the rollout's "
                          f"evidence; {', '.join(ha_where(replicas))}")
            line = f"{rollout_line(rollout)} │ non-2xx {sum(sum(u.non_2xx.values()) for u in users)}"
            if rollout["step_name"] != last or rollout["phase"] != "progressing":
                print("   " + line, flush=True)
            last = rollout["step_name"]
            if rollout["phase"] in ("promoted", "rolled_back", "inconclusive"):
                outcome = rollout
                break
        if outcome is None:
            raise RuntimeError("the rollout did not finish within 180 s")
        if outcome["phase"] != "promoted":
            raise RuntimeError(f"v2 ended {outcome['phase']}, not promoted: {outcome.get('reason')}")
        print(f"\npromoted: {outcome['reason']}")
        if moved is None:
            raise RuntimeError("no replica took the lead after the leader was killed")
        code = 0
        for (_, port), u in zip(fronts, users):
            u.stop()
            bad = sum(u.non_2xx.values())
            print(f"front on :{port}: {sum(u.total.values())} requests, non-2xx: {bad}")
            code |= 1 if bad else 0
        print(f"the lead moved {moved:.1f} s after the leader was killed; "
              f"{'no user saw an error' if code == 0 else 'users saw errors'}")
        return code
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    except RuntimeError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    finally:
        for u in users:
            u.stop()
        for process in reversed(processes):
            process.stop()
        print("stopped every process the demo started")


def ha_leader(replicas: dict, wait: bool = True) -> str | None:
    """The name of the one live replica that says it leads (waiting up to 15 s for one, when `wait`)."""
    deadline = time.monotonic() + (15 if wait else 0)
    while True:
        leading = [name for name, r in replicas.items()
                   if r.alive() and r.status().get("store", {}).get("role") == "leader"]
        if len(leading) == 1:
            return leading[0]
        if time.monotonic() >= deadline:
            if wait:
                raise RuntimeError("no replica leads after 15 s")
            return None
        time.sleep(0.05)


def ha_where(replicas: dict) -> list[str]:
    """Each Envoy and the replica it is connected to now, from a live replica's merged fleet view."""
    alive = next(r for r in replicas.values() if r.alive())
    return [f"{e['node_id']} on replica {e.get('replica') or '?'}" for e in alive.status()["envoys"]
            if e["link"] == "connected"]


def main(argv: list[str]) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--steps", type=lambda s: [float(x) for x in s.split(",")], default=[0, 5, 25, 50, 100],
                        help="canary percentages, in order (default 0,5,25,50,100)")
    common.add_argument("--hold", type=float, default=float(env("DEMO_HOLD", "4")), help="seconds per step (4)")
    common.add_argument("--users", type=int, default=300, help="simulated users (300)")
    common.add_argument("--clients", type=int, default=8, help="concurrent connections (8)")
    p_local = sub.add_parser("local", parents=[common], help="start apps and Envoy here, then ramp (default)")
    p_local.add_argument("--port", type=int, default=int(env("DEMO_PORT", "10000")))
    p_local.add_argument("--admin-port", type=int, default=int(env("DEMO_ADMIN_PORT", "9901")))
    p_local.add_argument("--v1-port", type=int, default=int(env("DEMO_V1_PORT", "8001")))
    p_local.add_argument("--v2-port", type=int, default=int(env("DEMO_V2_PORT", "8002")))
    p_local.add_argument("--xds-port", type=int, default=int(env("DEMO_XDS_PORT", "18000")))
    p_local.add_argument("--canaryctl-port", type=int, default=int(env("DEMO_CANARYCTL_PORT", "9902")))
    p_local.add_argument("--release-hold", type=float, default=3.0,
                         help="seconds each rollout step holds at least in the release loop (3)")
    p_local.add_argument("--no-release-loop", action="store_true", help="stop after the ramp")
    p_ha = sub.add_parser("ha", parents=[common], help="3 etcd members, 3 canaryctl replicas, 2 Envoys, a rollout "
                                                       "whose leader is killed")
    p_ha.add_argument("--ports", type=lambda v: [int(p) for p in v.split(",")], default=[10000, 10001],
                      help="front-1's and front-2's listeners (10000,10001)")
    p_ha.add_argument("--release-hold", type=float, default=4.0, help="seconds each rollout step holds at least (4)")
    p_drive = sub.add_parser("drive", parents=[common], help="traffic and ramp against a running Envoy")
    p_drive.add_argument("--url", default="http://127.0.0.1:10000")
    p_drive.add_argument("--canaryctl", metavar="URL", help="ramp with `canaryctl set` against this admin API")
    p_drive.add_argument("--token", default=env("CANARYCTL_TOKEN"), help="canaryctl token (CANARYCTL_TOKEN)")
    p_drive.add_argument("--ecds-dir", help="or ramp by publishing into this watched ECDS directory")
    p_drive.add_argument("--admin", default="http://127.0.0.1:9901", help="Envoy admin (with --ecds-dir)")
    p_drive.add_argument("--wasm-path", default=ecds.DEFAULT_WASM,
                         help=f"the .wasm path as that Envoy sees it ({ecds.DEFAULT_WASM})")
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["local", *argv]
    args = parser.parse_args(argv)
    if args.command == "drive":
        publish = None
        if args.canaryctl:
            publish = CanaryctlPublisher(args.canaryctl, args.token)
        elif args.ecds_dir:
            publish = EcdsPublisher(args.admin.rstrip("/"), args.ecds_dir, args.wasm_path)
        return drive(args.url, publish, args.steps, args.hold, args.users, args.clients)
    if args.command == "ha":
        return ha(args)
    return local(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
