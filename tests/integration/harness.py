"""Real Envoy, real upstreams, real HTTP: the pieces every integration test uses.

- `Upstream`: an HTTP server that answers as one version and reports the headers it received.
- `Envoy`: renders a shipped `envoy/` bootstrap with test ports and paths, starts Envoy 1.40 with a unique
  --base-id, waits on /ready with a deadline, and prints Envoy's log when a test fails.
- `expected_version`: an independent implementation of the documented split (FNV-1a 64 over
  salt ":" key, modulo 10 000), so the tests check Envoy against the spec, not against the filter's code.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENVOY_DIR = os.path.join(ROOT, "envoy")
# CANARY_ROUTER_WASM: run the suite against another build of the filter.
WASM = os.environ.get("CANARY_ROUTER_WASM") or os.path.join(ROOT, "target", "wasm32-wasip1", "release", "canary_router.wasm")
ENVOY_BIN = os.environ.get("ENVOY_BIN") or os.path.join(ROOT, ".venv", "bin", "envoy")

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ecds  # noqa: E402  (tools/ecds.py: the same publisher users run)

# Defaults written in the shipped bootstraps; tests substitute each (and check it was there).
SHIPPED_ADMIN_PORT = "port_value: 9901"
SHIPPED_LISTENER = "address: 0.0.0.0, port_value: 10000"
SHIPPED_UPSTREAM_PORTS = {"v1": "port_value: 8001", "v2": "port_value: 8002"}
SHIPPED_WASM = f"filename: {ecds.DEFAULT_WASM}"
SHIPPED_ECDS_PATH = "path: envoy/ecds/canary-router.json"
SHIPPED_ECDS_DIR = "watched_directory: { path: envoy/ecds }"
INLINE_CONFIG_INDENT = " " * 20
READY_DEADLINE_S = 30.0


def shipped_plugin_config() -> str:
    with open(os.path.join(ENVOY_DIR, "plugin-config.json")) as f:
        return f.read()


# --------------------------------------------------------------------------------------------------
# The documented split, reimplemented.
# --------------------------------------------------------------------------------------------------

def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def expected_version(salt: str, key: str | bytes, stable: str, canaries: list[tuple[str, float]]) -> str:
    """The version the contract says a user key gets: canaries own consecutive bucket ranges from 0."""
    key_bytes = key.encode() if isinstance(key, str) else key
    bucket = fnv1a64(salt.encode() + b":" + key_bytes) % 10_000
    end = 0
    for version, percent in canaries:
        end += round(percent * 100)
        if bucket < end:
            return version
    return stable


# --------------------------------------------------------------------------------------------------
# Upstreams.
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """An app version: answers 200 with {"served_by": version, "headers": {name: [values]}}."""

    def __init__(self, version: str):
        self.version = version
        self.requests = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: avoid 40 ms delayed-ACK stalls

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                upstream.requests += 1
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

_base_ids = itertools.count((os.getpid() % 500) * 20 + 1000)


def substitute(text: str, replacements: dict[str, str], source: str) -> str:
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"{source} no longer contains {old!r}: update the test harness with it")
        text = text.replace(old, new)
    return text


class Envoy:
    """One Envoy process on a bootstrap from envoy/, with test ports, paths and plugin config."""

    def __init__(self, bootstrap: str, upstreams: dict[str, Upstream], plugin_config: str | None = None,
                 workers: int = 2):
        self.workdir = tempfile.mkdtemp(prefix="canary-router-test-")
        self.admin_port = free_port()
        self.port = free_port()
        self.base_id = next(_base_ids)
        self.ecds_dir = os.path.join(self.workdir, "ecds")
        os.makedirs(self.ecds_dir)
        source = os.path.join(ENVOY_DIR, bootstrap)
        with open(source) as f:
            text = f.read()
        replacements = {
            SHIPPED_ADMIN_PORT: f"port_value: {self.admin_port}",
            SHIPPED_LISTENER: f"address: 127.0.0.1, port_value: {self.port}",
        }
        for version, shipped in SHIPPED_UPSTREAM_PORTS.items():
            replacements[shipped] = f"port_value: {upstreams[version].port}"
        if "config_discovery" in text:
            replacements[SHIPPED_ECDS_PATH] = f"path: {self.ecds_dir}/{ecds.RESOURCE_FILE}"
            replacements[SHIPPED_ECDS_DIR] = f"watched_directory: {{ path: {self.ecds_dir} }}"
            if plugin_config is None:
                # The shipped resource file itself, with only the .wasm path made absolute.
                with open(os.path.join(ENVOY_DIR, "ecds", ecds.RESOURCE_FILE)) as f:
                    shipped = substitute(f.read(), {ecds.DEFAULT_WASM: WASM}, "envoy/ecds/" + ecds.RESOURCE_FILE)
                with open(os.path.join(self.ecds_dir, ecds.RESOURCE_FILE), "w") as f:
                    f.write(shipped)
            else:
                self.publish(plugin_config)
        else:
            replacements[SHIPPED_WASM] = f"filename: {WASM}"
            if plugin_config is not None:
                replacements[indent(shipped_plugin_config())] = indent(plugin_config)
        self.config_path = os.path.join(self.workdir, bootstrap)
        with open(self.config_path, "w") as f:
            f.write(substitute(text, replacements, source))
        self.log_path = os.path.join(self.workdir, "envoy.log")
        self.process: subprocess.Popen | None = None
        self.workers = workers

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, expect_ready: bool = True) -> "Envoy":
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [ENVOY_BIN, "-c", self.config_path, "--base-id", str(self.base_id),
             "--concurrency", str(self.workers), "-l", "info", "--drain-time-s", "1"],
            stdout=self.log_file, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        if expect_ready:
            self.wait_ready()
        return self

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S):
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Envoy exited with {self.process.returncode} before ready\n{self.log()}")
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"Envoy not ready within {deadline_s}s\n{self.log()}")

    def wait_exit(self, timeout_s: float = READY_DEADLINE_S) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "----- Envoy log -----\n" + f.read() + "----- end of Envoy log -----"
        except OSError:
            return "(no Envoy log)"

    # -- admin and stats ---------------------------------------------------------------------------

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.admin("/stats?usedonly").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def wait_stat(self, name: str, at_least: int, deadline_s: float = 15.0) -> int:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            value = self.stat(name)
            if value >= at_least:
                return value
            time.sleep(0.05)
        raise AssertionError(f"{name} did not reach {at_least} within {deadline_s}s: {self.stat(name)}\n{self.log()}")

    # -- ECDS --------------------------------------------------------------------------------------

    def publish(self, plugin_config: str) -> str:
        return ecds.publish(self.ecds_dir, plugin_config, wasm_path=WASM)

    # -- traffic -----------------------------------------------------------------------------------

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str = "/", headers: dict | list | None = None, conn=None) -> "Response":
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.putrequest("GET", path, skip_host="host" in {k.lower() for k, _ in _pairs(headers)})
            for name, value in _pairs(headers):
                conn.putheader(name, value)
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


def indent(text: str) -> str:
    if not text.endswith("\n"):
        text += "\n"
    return "".join(INLINE_CONFIG_INDENT + line if line.strip() else line for line in text.splitlines(True))


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
    def served_by(self) -> str:
        return self.json["served_by"]

    def received(self, name: str) -> list[str]:
        """The values of a request header as the upstream received it."""
        return self.json["headers"].get(name.lower(), [])


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> int:
    """Send raw bytes (for requests http.client refuses to build); return the status code (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    parts = data.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
