"""Fixtures: upstreams per version, demo apps, and Envoys that print their log when a test fails."""

import os
import tempfile

import pytest

import lab
from harness import ENVOY_BIN, NATIVE, WASM, Envoy, Upstream

# The two builds of the filter, and the shipped bootstrap that loads each with the config inline.
ARTIFACT_BOOTSTRAPS = {"wasm": "envoy-inline.yaml", "native": "envoy-native.yaml"}


def pytest_sessionstart(session):
    missing = [p for p in (ENVOY_BIN, WASM, NATIVE) if not os.path.exists(p)]
    if missing:
        pytest.exit(f"missing {missing}: run the tests with `make test`, which installs Envoy and builds the filter", 2)


def pytest_configure(config):
    config.addinivalue_line("markers", "both_artifacts: run the test against the .wasm and the native module")


def pytest_generate_tests(metafunc):
    """Tests marked `both_artifacts` run once per build: one suite proves both."""
    if "artifact" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_artifacts"):
        metafunc.parametrize("artifact", list(ARTIFACT_BOOTSTRAPS), indirect=True)


@pytest.fixture
def artifact(request):
    """Which build `start_envoy` loads by default: "wasm" unless the test is parameterised."""
    return getattr(request, "param", "wasm")


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
def start_envoy(upstreams, processes, artifact):
    """start_envoy(bootstrap, plugin_config=None, expect_ready=True, upstream_ports=None) -> a started Envoy.
    Without a bootstrap: the inline bootstrap of the artifact under test (envoy-inline.yaml for the .wasm,
    envoy-native.yaml for the native module)."""

    def start(bootstrap=None, plugin_config=None, expect_ready=True, workers=2, upstream_ports=None,
              xds_port=18000, node_id=None, before_start=None, native=NATIVE, **kwargs):
        ports = upstream_ports or {v: u.port for v, u in upstreams.items()}
        envoy = Envoy(bootstrap or ARTIFACT_BOOTSTRAPS[artifact], ports, plugin_config, workers=workers,
                      xds_port=xds_port, node_id=node_id, native=native, artifact=artifact, **kwargs)
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
        hold = lab.PortHold()
        app = lab.EnvoyProcess(f"app-{version}", lab.render_app(version, hold.port), workdir, workers=1,
                               holds=[hold])
        app.port = hold.port
        processes.append(app)
        apps[version] = app.start()
    for app in apps.values():
        app.wait_serving(app.port)
    return apps


@pytest.fixture
def canaryctl(processes):
    """canaryctl(init_config, token=None, wasm_path=WASM, native_module=None) -> a started `canaryctl serve`."""

    def start(init_config=None, token=None, wasm_path=WASM, workdir=None, native_module=None, extra_args=None,
              tls=None, state_fs_bytes=None):
        server = lab.Canaryctl(workdir or tempfile.mkdtemp(prefix="canaryctl-test-"), wasm_path=wasm_path,
                               init_config=init_config, token=token, native_module=native_module,
                               extra_args=extra_args, tls=tls, state_fs_bytes=state_fs_bytes)
        processes.append(server)
        return server.start()

    return start


@pytest.fixture
def prometheus(processes):
    """prometheus(envoys, job="envoy", port=0, apps=None) -> a real Prometheus server scraping those Envoys'
    /stats/prometheus every second (job "envoy"), and the `apps` (upstreams) /metrics (job "app"), ready and with
    every target up."""

    def start(envoys, job="envoy", port=0, apps=None):
        apps = apps or []
        server = lab.Prometheus(tempfile.mkdtemp(prefix="prometheus-test-"),
                                [f"127.0.0.1:{e.admin_port}" for e in envoys], job=job, port=port,
                                apps=[f"127.0.0.1:{a.port}" for a in apps])
        processes.append(server)
        server.start()
        lab.eventually(lambda: server.scraped(len(envoys) + len(apps)), deadline_s=30, interval_s=0.2,
                       what="Prometheus scraping every Envoy and app")
        return server

    return start


@pytest.fixture
def etcd(processes):
    """etcd(size=3) -> a real etcd cluster on loopback (its members stopped after the test, their logs printed
    if it failed)."""

    def start(size=3):
        cluster = lab.EtcdCluster(tempfile.mkdtemp(prefix="etcd-test-"), size=size)
        processes.extend(cluster.members)
        return cluster.start()

    return start


@pytest.fixture
def replica(processes):
    """replica(store_url, name, init_config=None, workdir=None, extra_args=None) -> a started `canaryctl serve`
    sharing the etcd store `store_url` with other replicas."""

    def start(store, name, init_config=None, workdir=None, extra_args=None, token=None):
        server = lab.Canaryctl(workdir or tempfile.mkdtemp(prefix=f"canaryctl-{name}-"), init_config=init_config,
                               store=store, replica=name, extra_args=extra_args, token=token)
        processes.append(server)
        return server.start()

    return start
