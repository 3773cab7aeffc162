"""Fixtures: upstreams per version, demo apps, and Envoys that print their log when a test fails."""

import os
import tempfile

import pytest

import lab
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


def _failed(request) -> bool:
    return any(getattr(request.node, f"rep_{when}", None) is not None and getattr(request.node, f"rep_{when}").failed
               for when in ("setup", "call"))


@pytest.fixture
def upstreams():
    """Python upstreams that report the headers they received."""
    servers = {"v1": Upstream("v1"), "v2": Upstream("v2")}
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture
def processes(request):
    """Every Envoy a test starts: stopped after the test, their logs printed if it failed."""
    started: list[lab.EnvoyProcess] = []
    yield started
    for process in started:
        process.stop()
    if _failed(request):
        for process in started:
            print(f"\n{process.log()}")


@pytest.fixture
def start_envoy(upstreams, processes):
    """start_envoy(bootstrap, plugin_config=None, expect_ready=True, upstream_ports=None) -> a started Envoy."""

    def start(bootstrap="envoy-inline.yaml", plugin_config=None, expect_ready=True, workers=2, upstream_ports=None,
              xds_port=18000, node_id=None, before_start=None):
        ports = upstream_ports or {v: u.port for v, u in upstreams.items()}
        envoy = Envoy(bootstrap, ports, plugin_config, workers=workers, xds_port=xds_port, node_id=node_id)
        processes.append(envoy)
        if before_start:
            before_start(envoy)
        envoy.start()
        if expect_ready:
            envoy.wait_ready()
        return envoy

    return start


@pytest.fixture
def demo_apps(processes):
    """The shipped demo apps (envoy/demo-app-v*.yaml), one Envoy each, on free ports."""
    workdir = tempfile.mkdtemp(prefix="canary-router-apps-")
    apps = {}
    for version in ("v1", "v2"):
        port = lab.free_port()
        app = lab.EnvoyProcess(f"app-{version}", lab.render_app(version, port), workdir, workers=1)
        app.port = port
        processes.append(app)
        apps[version] = app.start()
    for app in apps.values():
        app.wait_serving(app.port)
    return apps


@pytest.fixture
def canaryctl(processes):
    """canaryctl(init_config, token=None, wasm_path=WASM) -> a started `canaryctl serve`."""

    def start(init_config=None, token=None, wasm_path=WASM, workdir=None):
        server = lab.Canaryctl(workdir or tempfile.mkdtemp(prefix="canaryctl-test-"), wasm_path=wasm_path,
                               init_config=init_config, token=token)
        processes.append(server)
        return server.start()

    return start
