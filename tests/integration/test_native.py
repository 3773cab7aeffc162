"""The native build (an Envoy 1.40 dynamic module) beyond the shared suite: it loads with a matching ABI,
and a panic inside it is contained: no abort of Envoy, nothing on stderr, the request goes to stable."""

import json
import os
import re

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
        assert r.received("x-version") == [], "and the client's route header is gone"
    # Envoy is alive, routing goes on, and the panic went to Envoy's log, not to stderr via the default hook.
    assert envoy.get("/", {"x-user-id": canary_user}, conn=conn).served_by == "v2"
    assert envoy.process.poll() is None
    log = envoy.log()
    assert "canary-router: internal error, request sent to stable" in log
    assert "deliberate panic (test build)" in log
    assert not re.search(r"thread '.*' panicked at", log), "the default panic hook must not print"
