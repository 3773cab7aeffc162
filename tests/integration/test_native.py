"""The native build (an Envoy 1.40 dynamic module) beyond the shared suite: it loads with a matching ABI,
a panic inside it is contained (no abort of Envoy, nothing on stderr, the request goes to stable with no
client-chosen header left), and it cannot be built with panic = "abort"."""

import json
import os
import re
import subprocess

import lab
from harness import ROOT, expected_version

# Built by `make native-panic`: the module with a panic on the header x-canary-router-panic (test only).
PANIC_BUILD = os.path.join(ROOT, "target", "native-panic", "native", "libcanary_router_native.so")
HALF = json.dumps({"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 50}],
                                  "sticky": {"keys": [{"header": "x-user-id"}]}}]})


def test_the_module_loads_with_the_abi_version_envoy_expects(start_envoy):
    envoy = start_envoy("envoy-native.yaml")
    log = envoy.log()
    assert "Dynamic module ABI version v0.2.0 matched" in log, log
    assert "mismatch" not in log.lower()


def test_a_panic_in_the_module_is_contained_and_the_request_goes_to_stable(start_envoy):
    assert os.path.exists(PANIC_BUILD), "run `make native-panic`"
    envoy = start_envoy("envoy-native.yaml", plugin_config=HALF, native=PANIC_BUILD)
    canary_user = next(u for u in (f"p{i}" for i in range(100)) if expected_version("web", u, "v1", [("v2", 50)]) == "v2")
    conn = envoy.connection()
    for _ in range(20):
        r = envoy.get("/", {"x-user-id": canary_user, "x-version": "v2", "x-canary-router-panic": "1"}, conn=conn)
        assert r.status == 200 and r.served_by == "v1", "a caught panic sends the request to stable"
        assert r.received("x-version") == ["v1"], "the client's route header is gone (the stable route names itself)"
    # Envoy is alive, routing goes on, and the panic went to Envoy's log, not to stderr via the default hook.
    assert envoy.get("/", {"x-user-id": canary_user}, conn=conn).served_by == "v2"
    assert envoy.process.poll() is None
    log = envoy.log()
    assert "canary-router: internal error, request sent to stable" in log
    assert "deliberate panic (test build)" in log
    assert not re.search(r"thread '.*' panicked at", log), "the default panic hook must not print"


def test_after_a_panic_no_header_a_client_could_pick_by_reaches_the_upstream(start_envoy):
    # A configured route header, and an override with a token: the fail-safe path strips them all, not
    # only the default x-version.
    config = json.dumps({"route_header": "x-canary", "rollouts": [{
        "name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 50}],
        "override": {"header": "x-pick", "token_header": "x-token", "token": "t0k"}}]})
    envoy = start_envoy("envoy-native.yaml", plugin_config=config, native=PANIC_BUILD)
    r = envoy.get("/", {"x-canary": "v2", "x-version": "v2", "x-pick": "v2", "x-token": "t0k",
                        "x-canary-router-panic": "1"})
    assert r.status == 200 and r.served_by == "v1"
    # x-version: v1 is the shipped stable route's own value, not the client's v2.
    assert {name: r.received(name) for name in ("x-canary", "x-version", "x-pick", "x-token")} == \
        {"x-canary": [], "x-version": ["v1"], "x-pick": [], "x-token": []}, r.json["headers"]


def test_a_native_build_with_panic_abort_is_refused_at_compile_time(tmp_path):
    # `catch_unwind` is the only thing between a bug and an aborted Envoy; `panic = "abort"` (the release
    # profile) would make it dead code. The module refuses to compile that way, saying why.
    result = subprocess.run(["cargo", "check", "--release", "-p", "canary-router-native",
                             "--target-dir", os.path.join(ROOT, "target", "guard")],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0, "a panic = \"abort\" build of the native module compiled"
    assert 'canary-router-native must be built with panic = "unwind"' in result.stderr, result.stderr[-2000:]
    assert "make native" in result.stderr
