"""Real Envoy, real upstreams, real HTTP: the pieces every integration test uses.

- `Upstream`: an HTTP server that answers as one version and reports the headers it received.
- `Envoy`: renders a shipped `envoy/` bootstrap with test ports and paths, starts Envoy 1.40 with a unique
  --base-id, waits on /ready with a deadline, and prints Envoy's log when a test fails.
- `expected_version` (from tools/lab.py): an independent implementation of the documented split, so the
  tests check Envoy against the spec, not against the filter's code.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import ecds  # noqa: E402  (tools/ecds.py: the same publisher users run)
import lab  # noqa: E402  (tools/lab.py: renders the shipped envoy/ files, runs Envoy)
from lab import ENVOY_BIN, ENVOY_DIR, NATIVE, WASM, expected_version, fnv1a64, indent, shipped_plugin_config  # noqa: E402,F401

# --------------------------------------------------------------------------------------------------
# Upstreams.
# --------------------------------------------------------------------------------------------------

class Upstream:
    """An app version: answers 200 with {"served_by": version, "headers": {name: [values]}}. With `fail_rate`,
    that share of requests (not /healthz, which keeps the health check green) gets a 503; `fail_rules` does the
    same per request ("POST /checkout": 0.3, or (0.3, 500) for another status, by method and path prefix; the
    first match wins over `fail_rate`);
    with `delay_s`, every answer but /healthz's waits that long. `app_requests` counts the requests that are not
    health checks. A business counter of its own, per version, on GET /metrics (Prometheus's text format): every
    app request is a payment (`payments_total`), and `decline_rate` of them are declined
    (`payments_declined_total`), answered 200 all the same: only the app's own metric sees it."""

    def __init__(self, version: str):
        self.version = version
        self.requests = 0
        self.app_requests = 0
        self.fail_rate = 0.0
        self.fail_rules: dict[str, float] = {}
        self.delay_s = 0.0
        self.failed = 0
        self.decline_rate = 0.0
        self.payments = 0
        self.declined = 0
        upstream = self
        failures = random.Random(version)
        declines = random.Random("declines-" + version)
        counting = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: avoid 40 ms delayed-ACK stalls

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path == "/metrics":
                    with counting:
                        text = (f'payments_total{{version="{upstream.version}"}} {upstream.payments}\n'
                                f'payments_declined_total{{version="{upstream.version}"}} {upstream.declined}\n')
                    body = text.encode()
                    self.send_response(200)
                    self.send_header("content-type", "text/plain; version=0.0.4")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                upstream.requests += 1
                if self.path != "/healthz":
                    with counting:
                        upstream.app_requests += 1
                        rule = next((r for prefix, r in upstream.fail_rules.items()
                                     if f"{self.command} {self.path}".startswith(prefix)), upstream.fail_rate)
                        rate, status = rule if isinstance(rule, tuple) else (rule, 503)
                        fail = rate and failures.random() < rate
                        upstream.failed += 1 if fail else 0
                        if not fail:
                            upstream.payments += 1
                            upstream.declined += 1 if declines.random() < upstream.decline_rate else 0
                    if upstream.delay_s:
                        time.sleep(upstream.delay_s)
                    if fail:
                        self.send_response(status)
                        self.send_header("content-length", "0")
                        self.end_headers()
                        return
                headers: dict[str, list[str]] = {}
                for name, value in self.headers.items():
                    headers.setdefault(name.lower(), []).append(value)
                body = json.dumps({"served_by": upstream.version, "headers": headers}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------------------
# Envoy.
# --------------------------------------------------------------------------------------------------

class Envoy(lab.EnvoyProcess):
    """The front Envoy on a shipped bootstrap, with test ports and the test's plugin config."""

    def __init__(self, bootstrap: str, upstream_ports: dict[str, int], plugin_config: str | None = None,
                 workers: int = 2, xds_port: int = 18000, node_id: str | None = None, native: str = NATIVE,
                 artifact: str = "wasm", tls: dict | None = None, cluster: str = "edge", edit=None,
                 xds_replicas: list[int] | None = None):
        """`xds_replicas`: canaryctl replicas' xDS ports, in this Envoy's order of preference."""
        workdir = tempfile.mkdtemp(prefix="canary-router-test-")
        hold = lab.PortHold()  # the listener's port, held until Envoy listens on it
        self.port = hold.port
        self.ecds_dir = os.path.join(workdir, "ecds")
        os.makedirs(self.ecds_dir)
        where = lab.FrontAddresses(listener_port=self.port, admin_port=0,
                                   upstream_ports=upstream_ports, xds_port=xds_port, xds_replicas=xds_replicas)
        self.native = native if artifact == "native" else None
        text = lab.render_front(bootstrap, where, ecds_dir=self.ecds_dir, plugin_config=plugin_config, native=native,
                                native_ecds=self.native is not None, tls=tls)
        if edit is not None:
            text = edit(text)
        extra = ["--service-node", node_id, "--service-cluster", cluster] if node_id else []
        super().__init__(node_id or "envoy", text, workdir, admin_port=0, workers=workers,
                         extra_args=extra, holds=[hold])

    def publish(self, plugin_config: str) -> str:
        return ecds.publish(self.ecds_dir, plugin_config, wasm_path=WASM, native_path=self.native)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str = "/", headers: dict | list | None = None, conn=None, method: str = "GET") -> "Response":
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.putrequest(method, path, skip_host="host" in {k.lower() for k, _ in _pairs(headers)})
            for name, value in _pairs(headers):
                conn.putheader(name, value)
            if method in ("POST", "PUT"):
                conn.putheader("content-length", "0")
            conn.endheaders()
            r = conn.getresponse()
            return Response(r.status, r.getheaders(), r.read())
        finally:
            if own:
                conn.close()


def _pairs(headers) -> list[tuple[str, str]]:
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.header_pairs = headers
        self.body = body

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.header_pairs if k.lower() == name.lower()]

    @property
    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def reports_headers(self) -> bool:
        return self.header("x-served-by") == [] and "headers" in self.json

    @property
    def served_by(self) -> str:
        """The version that answered: the demo apps say it in `x-served-by`, the Python upstreams in the body."""
        named = self.header("x-served-by")
        return named[0] if named else self.json["served_by"]

    def received(self, name: str) -> list[str]:
        """The values of a request header as the upstream received it."""
        return self.json["headers"].get(name.lower(), [])


class Traffic:
    """Concurrent keep-alive clients that record every outcome until stopped."""

    def __init__(self, envoy, clients=6, requests: list[tuple[str, str]] | None = None):
        """`requests`: (method, path) pairs each client picks from at random, independently of the user (default:
        GET /). Cycling through them would tie each user to one request, and so each version to its users' mix."""
        self.envoy = envoy
        self.requests = requests or [("GET", "/")]
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.statuses = Counter()
        self.outcomes = Counter()  # (method, path, status)
        self.served = Counter()
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def _run(self, client: int):
        conn = self.envoy.connection()
        pick = random.Random(client)
        i = 0
        while not self.stop_flag.is_set():
            user = f"c{client}-u{i % 500}"
            i += 1
            try:
                method, path = pick.choice(self.requests)
                r = self.envoy.get(path, {"x-user-id": user}, conn=conn, method=method)
            except Exception as err:  # a dropped connection is a failure the test must see
                with self.lock:
                    self.errors.append(f"{user}: {err!r}")
                conn.close()
                conn = self.envoy.connection()
                continue
            with self.lock:
                self.statuses[r.status] += 1
                self.outcomes[(method, path, r.status)] += 1
                if r.status == 200:
                    self.served[r.served_by] += 1
                    # Python upstreams report the route header they got: it must name the version serving.
                    if r.reports_headers and r.received("x-version") != [r.served_by]:
                        self.mismatches.append(f"{user}: served by {r.served_by}, header {r.received('x-version')}")
        conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=30)

    def total(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def snapshot(self) -> tuple[Counter, Counter]:
        with self.lock:
            return Counter(self.statuses), Counter(self.served)


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes (for requests http.client refuses to build) on a connection the request closes; return
    the status code (0: none) and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, body


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> int:
    """Send raw bytes; return the status code (0: none)."""
    return raw_exchange(port, request, timeout)[0]


# --------------------------------------------------------------------------------------------------
# A network between an Envoy and canaryctl that a test can partition.
# --------------------------------------------------------------------------------------------------

class Relay:
    """A TCP relay from a local port to `target_port`: an Envoy pointed at it reaches canaryctl through it.
    `partition()` stops carrying bytes both ways while every connection stays open (a network that drops
    packets, not one that resets: canaryctl still sees the streams as open, and Envoy does not reconnect);
    `heal()` carries on, with what was held back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket):
        try:
            while True:
                self.flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self.flowing.wait()  # bytes read just before a partition are held back too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def partition(self):
        self.flowing.clear()

    def heal(self):
        self.flowing.set()

    def close(self):
        self.closed = True
        self.flowing.set()
        self.listener.close()
