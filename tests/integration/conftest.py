"""Fixtures: upstreams per version and Envoys that print their log when a test fails."""

import os

import pytest

from harness import ENVOY_BIN, WASM, Envoy, Upstream


def pytest_sessionstart(session):
    missing = [p for p in (ENVOY_BIN, WASM) if not os.path.exists(p)]
    if missing:
        pytest.exit(f"missing {missing}: run the tests with `make test`, which installs Envoy and builds the filter", 2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def upstreams():
    servers = {"v1": Upstream("v1"), "v2": Upstream("v2")}
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def start_envoy(request, upstreams):
    """start_envoy(bootstrap, plugin_config=None, expect_ready=True) -> a started Envoy."""
    started: list[Envoy] = []

    def start(bootstrap="envoy-inline.yaml", plugin_config=None, expect_ready=True, workers=2):
        envoy = Envoy(bootstrap, upstreams, plugin_config, workers=workers)
        started.append(envoy)
        return envoy.start(expect_ready=expect_ready)

    yield start
    failed = any(getattr(request.node, f"rep_{when}", None) and getattr(request.node, f"rep_{when}").failed
                 for when in ("setup", "call"))
    for envoy in started:
        envoy.stop()
        if failed:
            print(f"\nEnvoy (base-id {envoy.base_id}, {envoy.config_path}):\n{envoy.log()}")
