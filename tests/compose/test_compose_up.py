"""`docker compose up`, for real: the shipped docker-compose.yaml, unchanged, run by podman-compose (Debian's podman
4.3 and podman-compose 1.0.3) with stand-in images (tools/compose_images.py: the venv's Envoy 1.40.0 binary, the
tools the compose file's commands use, and their libraries), checked against what the README's Docker section
promises. Every container, network and volume of the run is removed afterwards, also when a check fails, and each
container's log is printed when one does.

Run by `make compose-test` (which installs podman and builds the filter, canaryctl and the certificates)."""

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

import compose_images
import lab

COMPOSE_FILE = os.path.join(lab.ROOT, "docker-compose.yaml")
PROJECT = "canary-router-compose-test"
STATE = os.path.join(lab.ROOT, ".run", "canaryctl", "canaryctl-state.json")
TOKEN = "canary-demo"  # the compose file's default CANARYCTL_TOKEN
USERS = [f"user-{i}" for i in range(200)]
ENV = dict(os.environ, CONTAINERS_CONF=compose_images.containers_conf(
    os.path.join(lab.ROOT, ".run", "compose", "containers.conf")))
ENV.pop("CANARYCTL_TOKEN", None)


def podman(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, timeout=timeout, check=check)


def podman_compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman-compose", "-f", COMPOSE_FILE, "-p", PROJECT, *args], capture_output=True,
                          text=True, env=ENV, cwd=lab.ROOT, timeout=timeout)


def leftovers() -> dict[str, list[str]]:
    """What of this project is still there: containers, networks, volumes."""
    label = f"label=io.podman.compose.project={PROJECT}"
    names = lambda r: [line for line in r.stdout.split() if line]  # noqa: E731
    return {
        "containers": names(podman("ps", "-a", "--filter", label, "--format", "{{.Names}}")),
        "networks": [n for n in names(podman("network", "ls", "--format", "{{.Name}}")) if n.startswith(PROJECT)],
        "volumes": [v for v in names(podman("volume", "ls", "--format", "{{.Name}}")) if v.startswith(PROJECT)],
    }


def down():
    """`podman-compose down -v`, then the network it leaves: podman-compose 1.0.3 does not remove it."""
    result = podman_compose("down", "-v")
    for network in leftovers()["networks"]:
        podman("network", "rm", "-f", network)
    return result


@pytest.fixture(scope="module")
def compose_file() -> dict:
    with open(COMPOSE_FILE) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def stack(request, compose_file):
    """The compose file brought up under a project of its own, from a fresh canaryctl state; torn down after."""
    for path in (lab.CANARYCTL, lab.WASM, os.path.join(lab.ROOT, ".run", "certs", "envoy.pem")):
        assert os.path.exists(path), f"{path} is missing: run `make compose-prep` (make compose-test does)"
    compose_images.build(ENV)
    down()  # a previous run that was killed
    if os.path.exists(STATE):
        os.remove(STATE)  # the plugin config from the compose file's --init-config, as on a first `up`
    up = podman_compose("up", "-d")
    failed = False
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        containers = {s: f"{PROJECT}_{s}_1" for s in compose_file["services"]}
        yield containers
        failed = request.session.testsfailed > 0
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            for service in compose_file["services"]:
                logs = podman("logs", f"{PROJECT}_{service}_1")
                print(f"\n----- {service} log -----\n{logs.stdout[-6000:]}{logs.stderr[-6000:]}----- end -----")
        result = down()
        left = leftovers()
        for container in left["containers"]:
            podman("rm", "-f", container)
        for volume in left["volumes"]:
            podman("volume", "rm", "-f", volume)
        # Reported as an error of the last test when `down` left anything (removed above regardless).
        assert result.returncode == 0 and left == {"containers": [], "networks": [], "volumes": []}, \
            (result.stdout[-2000:], result.stderr[-2000:], left)


def http(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def served(user: str) -> str | None:
    try:
        status, headers, _ = http("http://127.0.0.1:10000/", {"x-user-id": user})
    except OSError:
        return None
    return headers.get("x-served-by") if status == 200 else None


def routed_as_spec(percent: float) -> bool:
    want = {u: lab.expected_version("web", u, "v1", [("v2", percent)]) for u in USERS}
    return all(served(u) == want[u] for u in USERS)


def canaryctl(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if token:
        env["CANARYCTL_TOKEN"] = token
    return subprocess.run([lab.CANARYCTL, "--server", "http://127.0.0.1:9902", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_the_front_passes_the_compose_file_s_own_health_check(stack, compose_file):
    check = compose_file["services"]["envoy"]["healthcheck"]["test"]
    assert check[0] == "CMD", check
    lab.eventually(lambda: podman("exec", stack["envoy"], *check[1:]).returncode == 0, deadline_s=90,
                   interval_s=1, what="the front's health check passing inside its container")


def test_users_are_routed_as_the_plugin_config_says(stack):
    # The front gets its filter config from canaryctl over mTLS (ADS): 10 % of users on v2 by the sticky hash.
    lab.eventually(lambda: routed_as_spec(10), deadline_s=90, interval_s=1, what="users routed as the spec says")
    assert {served(u) for u in USERS} == {"v1", "v2"}
    status, headers, _ = http("http://127.0.0.1:10000/", {"x-user-id": USERS[0], "x-user-group": "beta"})
    assert (status, headers.get("x-served-by")) == (200, "v2"), "the beta group rule"


def test_canaryctl_set_through_the_published_port_changes_the_split_and_needs_the_token(stack):
    lab.eventually(lambda: routed_as_spec(10), deadline_s=90, interval_s=1, what="the initial split")
    refused = canaryctl("set", "web", "v2=60", token=None)
    assert refused.returncode == 1 and "token" in refused.stderr.lower(), refused.stdout + refused.stderr
    status, _, body = http("http://127.0.0.1:9902/v1/set", {"content-type": "application/json"},
                           json.dumps({"rollout": "web", "percents": {"v2": 60}}).encode())
    assert status == 401, body
    assert routed_as_spec(10), "a refused write changed nothing"
    result = canaryctl("set", "web", "v2=25")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"applied by 1/1 Envoys", result.stdout), result.stdout
    lab.eventually(lambda: routed_as_spec(25), deadline_s=30, interval_s=0.5, what="users routed at 25 %")
    status = json.loads(canaryctl("status", "--json").stdout)
    assert [e["node_id"] for e in status["envoys"]] == ["compose-envoy"], status["envoys"]
    assert status["envoys"][0]["certificate"].startswith("spiffe://"), status["envoys"][0]


def test_the_labelled_counters_are_on_the_admin_port(stack):
    lab.eventually(lambda: served(USERS[0]) is not None, deadline_s=90, interval_s=1, what="the front serving")
    for user in USERS[:50]:
        served(user)
    _, _, text = http("http://127.0.0.1:9901/stats/prometheus")
    counters = re.findall(r'^canary_router_requests\{rollout="web",version="(v\d)",reason="(\w+)"\} (\d+)$', text, re.M)
    assert {version for version, _, n in counters if int(n) > 0} >= {"v1", "v2"}, text[:2000]


def test_canaryctl_promote_sends_every_user_to_the_new_stable(stack):
    # Last: it changes the stack for good. The compose front's default route still serves v1; the plugin config
    # says so (default_route_version), so the filter writes v2 for every user once v2 is stable.
    result = canaryctl("promote", "web")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "applied by 1/1 Envoys" in result.stdout, result.stdout
    lab.eventually(lambda: all(served(u) == "v2" for u in USERS), deadline_s=30, interval_s=0.5,
                   what="every user on v2 after the promotion")
