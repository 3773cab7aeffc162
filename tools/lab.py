"""Run the shipped envoy/ files as they are, with only ports, addresses and paths substituted.

The tests, the local demo and the compose check all render bootstraps here, so none of them can drift from
what users run. Every substitution names the exact text it replaces and fails loudly when that text is gone.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

import ecds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY_DIR = os.path.join(ROOT, "envoy")
ENVOY_BIN = os.environ.get("ENVOY_BIN") or os.path.join(ROOT, ".venv", "bin", "envoy")
# CANARY_ROUTER_WASM: run against another build of the filter.
WASM = os.environ.get("CANARY_ROUTER_WASM") or os.path.join(ROOT, ecds.DEFAULT_WASM)
# The native build (`make native`); CANARY_ROUTER_NATIVE: another build of it.
DEFAULT_NATIVE = "target/native/libcanary_router_native.so"
NATIVE = os.environ.get("CANARY_ROUTER_NATIVE") or os.path.join(ROOT, DEFAULT_NATIVE)

# Text in the shipped front bootstraps (envoy-inline.yaml, envoy-ecds.yaml) that renders replace.
SHIPPED_ADMIN = "address: 127.0.0.1, port_value: 9901"
SHIPPED_LISTENER = "address: 0.0.0.0, port_value: 10000"
SHIPPED_UPSTREAMS = {
    "v1": "address: 127.0.0.1, port_value: 8001",
    "v2": "address: 127.0.0.1, port_value: 8002",
}
SHIPPED_WASM = f"filename: {ecds.DEFAULT_WASM}"
SHIPPED_NATIVE = f"filename: {DEFAULT_NATIVE}"
SHIPPED_XDS = "address: 127.0.0.1, port_value: 18000"
SHIPPED_ECDS_PATH = "path: envoy/ecds/canary-router.json"
SHIPPED_ECDS_DIR = "watched_directory: { path: envoy/ecds }"
# The mTLS files of envoy/envoy-ads-tls.yaml, as `make certs` writes them.
CERTS_DIR = os.path.join(ROOT, ".run", "certs")
SHIPPED_TLS = {"cert": "filename: .run/certs/envoy.pem", "key": "filename: .run/certs/envoy.key",
               "ca": "filename: .run/certs/ca.pem"}
# Text in the shipped demo apps (demo-app-v1.yaml, demo-app-v2.yaml).
SHIPPED_APP_LISTENER = {"v1": "address: 0.0.0.0, port_value: 8001", "v2": "address: 0.0.0.0, port_value: 8002"}
INLINE_CONFIG_INDENT = " " * 20


# --------------------------------------------------------------------------------------------------
# The documented split, reimplemented in Python from the README (not from the Rust code), so tests and
# the demo check Envoy against the spec.
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


def read_shipped(name: str) -> str:
    with open(os.path.join(ENVOY_DIR, name)) as f:
        return f.read()


def shipped_plugin_config() -> str:
    return read_shipped("plugin-config.json")


def substitute(text: str, replacements: dict[str, str], source: str) -> str:
    for old, new in replacements.items():
        if old not in text:
            raise ValueError(f"{source} no longer contains {old!r}: update tools/lab.py with it")
        text = text.replace(old, new)
    return text


def indent(text: str) -> str:
    """The plugin config as embedded in envoy-inline.yaml's `value: |` block."""
    if not text.endswith("\n"):
        text += "\n"
    return "".join(INLINE_CONFIG_INDENT + line if line.strip() else line for line in text.splitlines(True))


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class PortHold:
    """A port held for an Envoy listener we start next, so that nothing can take it between our choice and
    Envoy's bind: a socket bound (not listening) with SO_REUSEADDR and SO_REUSEPORT. Other binds fail and
    outgoing connections skip it, while Envoy's listeners, which set SO_REUSEPORT, bind it beside us.
    Release it once the Envoy listens (EnvoyProcess does, given `holds`). For servers that do not set
    SO_REUSEPORT (Envoy's admin, canaryctl), bind port 0 and ask them instead."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        """`port`: a port an Envoy of ours listens on now, held again before it restarts on it."""
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]

    def release(self):
        self.sock.close()


def free_port() -> int:
    """A port that was free a moment ago, for tools that run servers on fixed ports (the demo, benchmarks).
    Tests use PortHold or port 0 instead: this one can be taken before the server binds it. Taken below the
    kernel's ephemeral range, where outgoing connections do not take ports."""
    low, high = 10000, max(10001, min(_ephemeral_low(), 32768))
    for _ in range(1000):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


@dataclass
class FrontAddresses:
    """Where a rendered front Envoy listens and where it finds the two app versions."""
    listener_port: int
    admin_port: int
    upstream_ports: dict[str, int]
    listener_address: str = "127.0.0.1"
    upstream_host: str = "127.0.0.1"
    xds_port: int = 18000  # canaryctl serve, for envoy-ads.yaml
    # canaryctl replicas' xDS ports, in the Envoy's order of preference (envoy-ads.yaml's priorities).
    xds_replicas: list[int] | None = None


def render_front(bootstrap: str, where: FrontAddresses, wasm: str = WASM, ecds_dir: str | None = None,
                 plugin_config: str | None = None, native: str = NATIVE, native_ecds: bool = False,
                 tls: dict[str, str] | None = None) -> str:
    """A shipped front bootstrap with test/demo addresses. For the ECDS bootstrap, `ecds_dir` receives the
    first resource: `plugin_config` if given, else the shipped envoy/ecds/canary-router.json. The ADS
    bootstrap gets its config from canaryctl on `where.xds_port`. With `native_ecds`, the ECDS bootstrap serves
    the native module instead of the .wasm (its type_urls and resources say DynamicModuleFilter). The mTLS
    bootstrap reads `tls` {"cert", "key", "ca"} (default: what `make certs` wrote)."""
    text = read_shipped(bootstrap)
    replacements = {
        SHIPPED_ADMIN: f"address: 127.0.0.1, port_value: {where.admin_port}",
        SHIPPED_LISTENER: f"address: {where.listener_address}, port_value: {where.listener_port}",
    }
    for version, shipped in SHIPPED_UPSTREAMS.items():
        replacements[shipped] = f"address: {where.upstream_host}, port_value: {where.upstream_ports[version]}"
    if "ads: {}" in text:
        replacements[SHIPPED_XDS] = f"address: 127.0.0.1, port_value: {where.xds_port}"
        if where.xds_replicas:
            # One priority per replica, as envoy-ads.yaml's comment says to list them.
            first = (f"      - priority: 0\n        lb_endpoints:\n"
                     f"        - endpoint: {{ address: {{ socket_address: {{ {SHIPPED_XDS} }} }} }}")
            replacements.pop(SHIPPED_XDS)
            replacements[first] = "\n".join(
                f"      - priority: {i}\n        lb_endpoints:\n"
                f"        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
                for i, port in enumerate(where.xds_replicas))
        if "envoy.transport_sockets.tls" in text:
            files = tls or {"cert": os.path.join(CERTS_DIR, "envoy.pem"), "key": os.path.join(CERTS_DIR, "envoy.key"),
                            "ca": os.path.join(CERTS_DIR, "ca.pem")}
            for part, shipped in SHIPPED_TLS.items():
                replacements[shipped] = f"filename: {files[part]}"
        # The fail-safe default_config: the .wasm (envoy-ads.yaml) or the native module (envoy-ads-native.yaml).
        if "dynamic_modules" in text:
            replacements[SHIPPED_NATIVE] = f"filename: {native}"
        else:
            replacements[SHIPPED_WASM] = f"filename: {wasm}"
    elif "config_discovery" in text:
        if ecds_dir is None:
            raise ValueError(f"{bootstrap} reads its filter config by ECDS: give ecds_dir")
        replacements[SHIPPED_ECDS_PATH] = f"path: {ecds_dir}/{ecds.RESOURCE_FILE}"
        replacements[SHIPPED_ECDS_DIR] = f"watched_directory: {{ path: {ecds_dir} }}"
        if native_ecds:
            replacements[f"type_urls: [{ecds.WASM_TYPE}]"] = f"type_urls: [{ecds.NATIVE_TYPE}]"
            ecds.publish(ecds_dir, plugin_config or shipped_plugin_config(), native_path=native)
        elif plugin_config is None:
            resource = substitute(read_shipped(f"ecds/{ecds.RESOURCE_FILE}"), {ecds.DEFAULT_WASM: wasm},
                                  f"envoy/ecds/{ecds.RESOURCE_FILE}")
            with open(os.path.join(ecds_dir, ecds.RESOURCE_FILE), "w") as f:
                f.write(resource)
        else:
            ecds.publish(ecds_dir, plugin_config, wasm_path=wasm)
    else:
        if "dynamic_modules" in text:  # envoy-native.yaml: the .so instead of the .wasm
            replacements[SHIPPED_NATIVE] = f"filename: {native}"
        else:
            replacements[SHIPPED_WASM] = f"filename: {wasm}"
        if plugin_config is not None:
            replacements[indent(shipped_plugin_config())] = indent(plugin_config)
    return substitute(text, replacements, bootstrap)


# The demo apps' fault filter, as shipped: faults only on request (x-envoy-fault-abort-request).
SHIPPED_APP_ABORT = "              abort:\n                header_abort: {}\n                percentage: { numerator: 100 }\n"


# The demo apps' catch-all route, as shipped: routes for endpoint faults go before it.
SHIPPED_APP_CATCH_ALL = "              - match: { prefix: / }\n"


def render_app(version: str, port: int, address: str = "127.0.0.1", fail_percent: float = 0,
               endpoint_faults: dict[str, tuple[int, float]] | None = None) -> str:
    """A shipped demo app on `port`. `fail_percent`: a buggy build, answering 503 to that share of requests
    (never to /healthz, so health checks stay green and only a comparison of error rates can tell).
    `endpoint_faults`: {"POST /checkout": (500, 50.0), "GET /search": (500, 2.0)}: that status to that share of
    one endpoint's requests (method and path prefix), and nothing else."""
    name = f"demo-app-{version}.yaml"
    replacements = {SHIPPED_APP_LISTENER[version]: f"address: {address}, port_value: {port}"}
    if fail_percent:
        replacements[SHIPPED_APP_ABORT] = (
            "              abort:\n                http_status: 503\n"
            f"                percentage: {{ numerator: {round(fail_percent * 100)}, denominator: TEN_THOUSAND }}\n")
    if endpoint_faults:
        routes = ""
        for endpoint, (status, percent) in endpoint_faults.items():
            method, path = endpoint.split(" ", 1)
            routes += (
                f"              - match: {{ prefix: {path}, headers: [{{ name: \":method\", string_match: {{ exact: {method} }} }}] }}\n"
                f"                direct_response: {{ status: 200, body: {{ inline_string: \"{{\\\"version\\\":\\\"{version}\\\"}}\\n\" }} }}\n"
                f"                response_headers_to_add:\n"
                f"                - header: {{ key: x-served-by, value: {version} }}\n"
                f"                typed_per_filter_config:\n"
                f"                  envoy.filters.http.fault:\n"
                f"                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n"
                f"                    abort: {{ http_status: {status}, percentage: {{ numerator: {round(percent * 100)}, denominator: TEN_THOUSAND }} }}\n")
        replacements[SHIPPED_APP_CATCH_ALL] = routes + SHIPPED_APP_CATCH_ALL
    return substitute(read_shipped(name), replacements, name)


_base_ids = itertools.count((os.getpid() % 400) * 25 + 1000)


def next_base_id() -> int:
    """A --base-id no other Envoy of this process uses (shared-memory names must not collide)."""
    return next(_base_ids)


def _die_with_parent():
    """Linux: SIGTERM this child when the process that started it dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class ManagedProcess:
    """A child process of ours with a log file: stopped with SIGTERM (then SIGKILL), killed like a crash,
    and its log at hand for when something fails. Children die with us (PR_SET_PDEATHSIG)."""

    def __init__(self, name: str, log_path: str):
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log_file = None

    def _spawn(self, argv: list[str], cwd: str | None = None, env: dict | None = None):
        self._log_file = open(self.log_path, "a")
        self.process = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=cwd, env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the demo, which then stops us
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def kill(self):
        """SIGKILL: the process dies as in a crash, with no draining."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f"----- {self.name} log ({self.log_path}) -----\n{f.read()}----- end of {self.name} log -----"
        except OSError:
            return f"(no log for {self.name})"


class EnvoyProcess(ManagedProcess):
    """One Envoy: started on a rendered config, with its log kept for when something fails."""

    def __init__(self, name: str, config_text: str, workdir: str, admin_port: int | None = None,
                 workers: int = 2, envoy_bin: str = ENVOY_BIN, extra_args: list[str] | None = None,
                 cpus: str | None = None, holds: list[PortHold] | None = None, wrapper: list[str] | None = None):
        """`admin_port` 0: the bootstrap's admin listens on port 0, and the port Envoy took is read from
        --admin-address-path. `holds`: the listener ports this Envoy binds, released once it is ready.
        `wrapper`: a command Envoy runs under (e.g. valgrind and its options)."""
        super().__init__(name, os.path.join(workdir, f"{name}.log"))
        self.workdir = workdir
        self.admin_port = admin_port
        self.holds = list(holds or [])
        self.admin_address_path = os.path.join(workdir, f"{name}.admin-address") if admin_port == 0 else None
        self.workers = workers
        self.envoy_bin = envoy_bin
        self.extra_args = extra_args or []
        self.cpus = cpus  # pin every thread with `taskset -c <cpus>` (benchmarks)
        self.wrapper = list(wrapper or [])
        self.base_id = next_base_id()
        self.config_path = os.path.join(workdir, f"{name}.yaml")
        with open(self.config_path, "w") as f:
            f.write(config_text)

    def start(self) -> "EnvoyProcess":
        pin = (["taskset", "-c", self.cpus] if self.cpus else []) + self.wrapper
        address = ["--admin-address-path", self.admin_address_path] if self.admin_address_path else []
        self._spawn([*pin, self.envoy_bin, "-c", self.config_path, "--base-id", str(self.base_id),
                     "--concurrency", str(self.workers), "-l", "info", "--drain-time-s", "1", *address,
                     *self.extra_args], cwd=self.workdir)
        return self

    def release_holds(self):
        for hold in self.holds:
            hold.release()
        self.holds = []

    def stop(self):
        self.release_holds()
        super().stop()

    def _resolve_admin_port(self):
        """With admin port 0: the port Envoy wrote to --admin-address-path, once it has."""
        if self.admin_port == 0 and self.admin_address_path:
            try:
                with open(self.admin_address_path) as f:
                    self.admin_port = int(f.read().strip().rsplit(":", 1)[1])
            except (OSError, ValueError, IndexError):
                pass

    def wait_ready(self, deadline_s: float = 30.0):
        """Wait for the admin /ready (or, without admin, for `ready_probe`) within a deadline."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name}: Envoy exited with {self.process.returncode} before it was ready\n"
                                   + self.log())
            try:
                if self.admin("/ready").strip() == "LIVE":
                    self.release_holds()
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not ready within {deadline_s}s\n{self.log()}")

    def wait_serving(self, port: int, path: str = "/healthz", deadline_s: float = 30.0):
        """For an Envoy without admin: wait until it answers 200 on `path`."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name}: Envoy exited with {self.process.returncode}\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    if r.status == 200:
                        self.release_holds()
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not serving on {port} within {deadline_s}s\n{self.log()}")

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout=timeout_s)

    # -- admin ---------------------------------------------------------------------------------------

    def admin(self, path: str) -> str:
        self._resolve_admin_port()
        if not self.admin_port:
            raise OSError(f"{self.name} has no admin interface (yet)")
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
        raise RuntimeError(f"{self.name}: {name} did not reach {at_least} within {deadline_s}s "
                           f"(now {self.stat(name)})\n{self.log()}")


CANARYCTL = os.environ.get("CANARYCTL_BIN") or os.path.join(ROOT, "target", "release", "canaryctl")


class Canaryctl(ManagedProcess):
    """`canaryctl serve`, and its CLI pointed at it. Ports 0 (the default) let canaryctl pick free ones: it
    says which in its log, and they are read from there."""

    def __init__(self, workdir: str, wasm_path: str = WASM, init_config: str | None = None,
                 token: str | None = None, xds_port: int = 0, admin_port: int = 0,
                 native_module: str | None = None, extra_args: list[str] | None = None,
                 tls: dict[str, str] | None = None, state_fs_bytes: int | None = None,
                 store: str | None = None, replica: str | None = None):
        """`store`: an etcd:// URL shared with other replicas (`replica`: this one's name, and its log's)."""
        name = f"canaryctl-{replica}" if replica else "canaryctl"
        super().__init__(name, os.path.join(workdir, f"{name}.log"))
        self.store = store
        self.replica = replica
        self.workdir = workdir
        self.xds_port = xds_port
        self.admin_port = admin_port
        self.state_path = os.path.join(workdir, "canaryctl-state.json")
        # The state on a filesystem of its own, this small (a tmpfs in a private mount namespace, made by
        # `unshare`), so that a test can fill it up for real: fill_state_fs(), free_state_fs().
        self.state_fs_bytes = state_fs_bytes
        if state_fs_bytes is not None:
            self.state_dir = os.path.join(workdir, "state-fs")
            os.makedirs(self.state_dir, exist_ok=True)
            self.state_path = os.path.join(self.state_dir, "canaryctl-state.json")
        self.wasm_path = wasm_path
        self.native_module = native_module
        self.extra_args = extra_args or []
        # mTLS on the xDS port: {"cert", "key", "client_ca"} files.
        self.tls = tls
        self.token = token
        self.token_path = None
        if token is not None:
            # Given as a file (0600), as operators should: a --token argument is visible in `ps`.
            self.token_path = os.path.join(workdir, "admin-token")
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        self.init_config_path = None
        if init_config is not None:
            self.init_config_path = os.path.join(workdir, "init-config.json")
            with open(self.init_config_path, "w") as f:
                f.write(init_config)

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def args(self) -> list[str]:
        args = [CANARYCTL, "serve", "--xds", f"127.0.0.1:{self.xds_port}", "--admin", f"127.0.0.1:{self.admin_port}",
                "--state", self.state_path]
        args += ["--native-module", self.native_module] if self.native_module else ["--wasm-path", self.wasm_path]
        if self.store:
            args += ["--store", self.store]
        if self.replica:
            args += ["--replica-name", self.replica]
        if self.init_config_path:
            args += ["--init-config", self.init_config_path]
        if self.token_path:
            args += ["--token-file", self.token_path]
        if self.tls:
            args += ["--xds-tls-cert", self.tls["cert"], "--xds-tls-key", self.tls["key"],
                     "--xds-client-ca", self.tls["client_ca"]]
        args += self.extra_args
        if self.state_fs_bytes is not None:
            # unshare and sh exec: the pid is canaryctl's, and /proc/<pid>/root shows its filesystem.
            args = ["unshare", "--map-root-user", "--mount", "sh", "-c",
                    'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"', "sh",
                    str(self.state_fs_bytes), self.state_dir, *args]
        return args

    def state_fs(self, name: str) -> str:
        """A path on the state's own filesystem, as this process sees it."""
        return f"/proc/{self.process.pid}/root{self.state_dir}/{name}"

    def fill_state_fs(self):
        """Fills the state's filesystem: every write to it fails with ENOSPC until free_state_fs()."""
        with open(self.state_fs("filler"), "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)  # a tmpfs allocates pages: none is left half used
            except OSError as err:
                if err.errno != 28:  # ENOSPC
                    raise

    def free_state_fs(self):
        os.remove(self.state_fs("filler"))

    def start(self, deadline_s: float = 15.0) -> "Canaryctl":
        env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYCTL_")}
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self._spawn(self.args(), env=env)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"canaryctl serve exited with {self.process.returncode}\n{self.log()}")
            with open(self.log_path, errors="replace") as f:
                f.seek(offset)
                found = re.search(r"serving ADS on 127\.0\.0\.1:(\d+), admin API on http://127\.0\.0\.1:(\d+)",
                                  f.read())
            if found:
                self.xds_port, self.admin_port = int(found.group(1)), int(found.group(2))
                try:
                    with urllib.request.urlopen(f"{self.server}/healthz", timeout=2):
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"canaryctl serve not answering within {deadline_s}s\n{self.log()}")

    def run(self, *args: str, token: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a CLI command against this server (`token`: sent with it, by CANARYCTL_TOKEN; default none)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYCTL_")}
        if token:
            env["CANARYCTL_TOKEN"] = token
        return subprocess.run([CANARYCTL, "--server", self.server, *args], capture_output=True, text=True,
                              env=env, timeout=timeout)

    def api(self, path: str, body: dict | None = None, token: str | None = "default") -> dict:
        """An admin API call, with this server's token unless told otherwise (None: no token)."""
        token = self.token if token == "default" else token
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.server}{path}", data=data, headers=headers,
                                         method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.load(r)

    def status(self) -> dict:
        return self.api("/v1/status")

    def envoys_connected(self) -> list[str]:
        """The node ids of the connected Envoys in this server's fleet view."""
        return [e["node_id"] for e in self.status()["envoys"] if e["link"] == "connected"]

    def wait_envoys(self, count: int, version: int | None = None, deadline_s: float = 30.0) -> dict:
        """Wait until `count` Envoys are connected and have applied `version` (default: the desired one)."""
        deadline = time.monotonic() + deadline_s
        status = {}
        while time.monotonic() < deadline:
            status = self.status()
            want = version if version is not None else status["desired"]["version"]
            current = [e for e in status["envoys"] if e["link"] == "connected" and e["acked_version"] == want]
            if len(current) >= count:
                return status
            time.sleep(0.05)
        raise RuntimeError(f"{count} Envoys did not apply the config within {deadline_s}s: {status}\n{self.log()}")


ETCD = os.environ.get("ETCD_BIN") or "etcd"


class EtcdMember(ManagedProcess):
    """One member of a real etcd cluster on loopback (Debian's etcd-server), its data in its own directory."""

    def __init__(self, workdir: str, name: str, client_port: int, peer_port: int, initial_cluster: str):
        super().__init__(f"etcd-{name}", os.path.join(workdir, f"etcd-{name}.log"))
        self.member = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = os.path.join(workdir, f"etcd-{name}.data")
        self.initial_cluster = initial_cluster

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> "EtcdMember":
        state = "existing" if os.path.exists(self.data_dir) else "new"
        self._spawn([ETCD, "--name", self.member, "--data-dir", self.data_dir,
                     "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
                     "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
                     "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                     "--initial-cluster", self.initial_cluster, "--initial-cluster-state", state,
                     "--initial-cluster-token", "canaryctl-lab", "--log-level", "warn",
                     # Loopback: elections in a few hundred ms rather than seconds.
                     "--heartbeat-interval", "50", "--election-timeout", "500"])
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"
        except (OSError, ValueError):
            return False


class EtcdCluster:
    """A real etcd cluster of `size` members on loopback, for canaryctl replicas to share. Ports are chosen
    free just before it starts."""

    def __init__(self, workdir: str, size: int = 3):
        names = [f"m{i}" for i in range(size)]
        ports = [(free_port(), free_port()) for _ in names]
        initial = ",".join(f"{n}=http://127.0.0.1:{peer}" for n, (_, peer) in zip(names, ports))
        self.members = [EtcdMember(workdir, n, client, peer, initial) for n, (client, peer) in zip(names, ports)]

    @property
    def url(self) -> str:
        """The `--store` URL naming every member."""
        return "etcd://" + ",".join(m.endpoint for m in self.members)

    def start(self, deadline_s: float = 30.0) -> "EtcdCluster":
        for member in self.members:
            member.start()
        return self.wait_healthy(deadline_s)

    def wait_healthy(self, deadline_s: float = 30.0, members: list[EtcdMember] | None = None) -> "EtcdCluster":
        members = members or [m for m in self.members if m.alive()]
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if all(m.healthy() for m in members):
                return self
            for m in members:
                if not m.alive():
                    raise RuntimeError(f"{m.name} exited\n{m.log()}")
            time.sleep(0.1)
        raise RuntimeError("etcd not healthy in time\n" + "\n".join(m.log() for m in members))

    def get(self, key: str) -> str | None:
        """A key's value through the v3 JSON gateway of a live member (None: no such key)."""
        found = self.get_kv(key)
        return found[0] if found else None

    def get_kv(self, key: str) -> tuple[str, int] | None:
        """A key's value and mod_revision (None: no such key)."""
        import base64
        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        for member in self.members:
            if not member.alive():
                continue
            request = urllib.request.Request(f"http://{member.endpoint}/v3/kv/range", data=body, method="POST")
            with urllib.request.urlopen(request, timeout=5) as r:
                kvs = json.load(r).get("kvs") or []
            if not kvs:
                return None
            return base64.b64decode(kvs[0]["value"]).decode(), int(kvs[0]["mod_revision"])
        raise RuntimeError("no etcd member is alive")

    def stop(self):
        for member in self.members:
            member.stop()

    def log(self) -> str:
        return "\n".join(m.log() for m in self.members)


PROMETHEUS = os.environ.get("PROMETHEUS_BIN") or "prometheus"


class Prometheus(ManagedProcess):
    """A real Prometheus server (Debian's `prometheus`) scraping Envoys' /stats/prometheus every second, with
    its data in `workdir`. Its port is chosen free just before it starts (it cannot be told to pick one), and
    another is tried if that one was taken meanwhile."""

    def __init__(self, workdir: str, targets: list[str], job: str = "envoy", scrape_interval: str = "1s",
                 port: int = 0, apps: list[str] | None = None):
        """`port` 0: a free one. `apps`: applications whose own /metrics it scrapes too (job "app")."""
        super().__init__("prometheus", os.path.join(workdir, "prometheus.log"))
        self.workdir = workdir
        self.port = port
        self.fixed_port = port != 0
        self.config_path = os.path.join(workdir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            f.write(f"""global:
  scrape_interval: {scrape_interval}
  scrape_timeout: {scrape_interval}
scrape_configs:
  - job_name: {job}
    metrics_path: /stats/prometheus
    static_configs:
      - targets: [{", ".join(targets)}]
""")
            if apps:
                f.write(f"""  - job_name: app
    metrics_path: /metrics
    static_configs:
      - targets: [{", ".join(apps)}]
""")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, deadline_s: float = 30.0) -> "Prometheus":
        for _ in range(1 if self.fixed_port else 5):
            if not self.fixed_port:
                self.port = free_port()
            self._spawn([PROMETHEUS, f"--config.file={self.config_path}",
                         f"--storage.tsdb.path={os.path.join(self.workdir, 'data')}",
                         f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], cwd=self.workdir)
            deadline = time.monotonic() + deadline_s
            while time.monotonic() < deadline and self.alive():
                try:
                    with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.1)
            if self.alive():
                break
            self.stop()  # the port was taken meanwhile: another one
        raise RuntimeError(f"prometheus not ready within {deadline_s}s\n{self.log()}")

    def query(self, query: str) -> list[dict]:
        """An instant query's result (the API's `data.result`)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["data"]["result"]

    def scraped(self, count: int) -> bool:
        """True once `count` targets are up."""
        return sum(float(s["value"][1]) for s in self.query("up")) >= count


def eventually(check, deadline_s: float = 10.0, interval_s: float = 0.02, what: str = "the condition"):
    """Poll `check()` until it returns something truthy, within a deadline; return it. Envoy applies a pushed
    config on its workers a moment after it ACKs it, so tests poll the effect instead of asserting at once."""
    deadline = time.monotonic() + deadline_s
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {deadline_s} s (last: {last!r})")
        time.sleep(interval_s)


# --------------------------------------------------------------------------------------------------
# A webhook receiver for `canaryctl serve --notify`: the tests' and the demo's.
# --------------------------------------------------------------------------------------------------
class Receiver:
    """An HTTP server on loopback that keeps every POST it gets (headers, body, when) and verifies each
    body's signature (x-canaryctl-signature-256: sha256=HMAC-SHA256(secret, body)) with Python's hmac, not
    canaryctl's code. `hang`: accept and never answer (a receiver that hangs). `log`: print each event's text
    as it comes (the demo's log)."""

    def __init__(self, secret: bytes | None = None, port: int = 0, hang: bool = False, log=None):
        import hashlib
        import hmac
        import http.server
        import threading

        self.events: list[dict] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.hang = threading.Event()
        if hang:
            self.hang.set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if receiver.hang.is_set():
                    time.sleep(3600)
                    return
                signature = self.headers.get("x-canaryctl-signature-256")
                verified = None
                if secret is not None:
                    want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
                    verified = signature is not None and hmac.compare_digest(want, signature)
                event = {"path": self.path, "headers": dict(self.headers.items()), "body": json.loads(body),
                         "verified": verified, "at": time.monotonic()}
                with receiver.lock:
                    receiver.events.append(event)
                    if verified is False:
                        receiver.bad_signatures += 1
                if log is not None:
                    text = event["body"].get("text", "")
                    log(f"notification received: {text}")
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path: str | None = None) -> list[dict]:
        with self.lock:
            return [e["body"] for e in self.events if path is None or e["path"] == path]

    def close(self):
        self.hang.clear()
        self.server.shutdown()
        self.server.server_close()
