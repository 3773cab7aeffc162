"""docker-compose.yaml cannot run here (no Docker engine), so everything around it is proven instead:
it is valid Compose, its mounts exist and land where the configs expect them, the front Envoy's own start
command (run here with the mounts replicated) renders a config that `envoy --mode validate` accepts, its
service names and ports agree with the Envoy configs, and its health check works against a real Envoy."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request

import pytest
import yaml

import ecds
import lab

COMPOSE_FILE = os.path.join(lab.ROOT, "docker-compose.yaml")
IMAGE = "envoyproxy/envoy:v1.40.0"
CONTROL_PLANE_IMAGE = "debian:bookworm-slim"


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as Compose itself resolves it (interpolation done, paths absolute)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose (Debian package) is needed to validate the compose file: `make setup` installs it")
    check = subprocess.run(["docker-compose", "-f", COMPOSE_FILE, "config", "-q"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    resolved = subprocess.run(["docker-compose", "-f", COMPOSE_FILE, "config"], capture_output=True, text=True,
                              check=True).stdout
    return yaml.safe_load(resolved)


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume["source"], volume["target"], volume.get("read_only", False)))
        else:
            parts = volume.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def replicate_mounts(service: dict, root: str) -> str:
    """Lay the service's mounts out under `root` as the container would see them; returns its working dir.
    Read-only mounts link to the repository; writable ones are fresh empty directories, as on a new machine."""
    for source, target, read_only in mounts(service):
        path = root + target
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if read_only:
            assert os.path.exists(source), f"compose mounts {source}, which does not exist (build it first?)"
            os.symlink(source, path)
        else:
            os.makedirs(path)
    workdir = root + service.get("working_dir", "/")
    os.makedirs(workdir, exist_ok=True)
    return workdir


def test_every_envoy_runs_the_pinned_official_image_and_canaryctl_a_slim_debian(compose):
    assert {name: s["image"] for name, s in compose["services"].items()} == \
        {"app-v1": IMAGE, "app-v2": IMAGE, "envoy": IMAGE, "canaryctl": CONTROL_PLANE_IMAGE}


def test_the_wasm_mount_is_where_the_shipped_ecds_resource_points(compose):
    envoy = compose["services"]["envoy"]
    wasm_mounts = [(s, t) for s, t, _ in mounts(envoy) if t.endswith(".wasm")]
    assert wasm_mounts == [(os.path.join(lab.ROOT, ecds.DEFAULT_WASM),
                            os.path.join(envoy["working_dir"], ecds.DEFAULT_WASM))]


def run_front_command(compose, tmp: str, envoy_args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the envoy service's own command here, with `envoy` replaced by a wrapper adding `envoy_args`."""
    service = compose["services"]["envoy"]
    workdir = replicate_mounts(service, os.path.join(tmp, "root"))
    bin_dir = os.path.join(tmp, "bin")
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "envoy"), "w") as f:
        f.write(f'#!/bin/sh\nexec {lab.ENVOY_BIN} {envoy_args} "$@"\n')
    os.chmod(os.path.join(bin_dir, "envoy"), 0o755)
    # `docker-compose config` keeps `$$` escaped; at run time Compose passes it as `$`.
    command = [arg.replace("$$", "$") for arg in service["command"]]
    assert command[:2] == ["bash", "-c"], command
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=tmp)
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    return proc, workdir


def test_the_front_command_renders_a_config_envoy_validates(compose):
    with tempfile.TemporaryDirectory() as tmp:
        proc, workdir = run_front_command(compose, tmp, f"--mode validate --base-id {lab.next_base_id()} -l warning")
        assert proc.returncode == 0 and "OK" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        with open(os.path.join(tmp, "envoy.yaml")) as f:
            rendered = f.read()
    # Every address the Envoy configs need is a service of the compose file, on the port its config listens on.
    upstreams = dict(re.findall(r"address: (app-v\d), port_value: (\d+)", rendered))
    assert set(upstreams) == {"app-v1", "app-v2"}, rendered
    for name, port in upstreams.items():
        app = compose["services"][name]
        config_path = app["command"][app["command"].index("-c") + 1]
        host_path = next(s + config_path[len(t):] for s, t, _ in mounts(app) if config_path.startswith(t))
        with open(host_path) as f:
            assert f"address: 0.0.0.0, port_value: {port}" in f.read(), f"{name} does not listen on {port}"
    assert "127.0.0.1, port_value: 800" not in rendered, "an upstream address was left unsubstituted"
    # The published ports are the listener and the admin interface of the rendered config.
    published = {int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1].split("/")[0])
                 for p in compose["services"]["envoy"]["ports"]}
    assert published == {10000, 9901}
    assert "address: 0.0.0.0, port_value: 10000" in rendered
    assert "address: 0.0.0.0, port_value: 9901" in rendered
    # The filter config comes from the canaryctl service, on the port it serves xDS on.
    control = compose["services"]["canaryctl"]["command"]
    xds_port = control[control.index("--xds") + 1].rsplit(":", 1)[1]
    assert f"address: canaryctl, port_value: {xds_port}" in rendered
    assert "ads: {}" in rendered
    # Over mTLS: canaryctl listens beyond loopback in its container.
    assert "envoy.transport_sockets.tls" in rendered and "sni: canaryctl" in rendered


def test_the_health_check_passes_on_a_live_envoy_and_fails_without_one(compose, start_envoy):
    test = compose["services"]["envoy"]["healthcheck"]["test"]
    assert test[0] == "CMD" and ":9901" not in " ".join(test) and "/9901" in " ".join(test)
    envoy = start_envoy()
    live = [arg.replace("/9901", f"/{envoy.admin_port}") for arg in test[1:]]
    assert subprocess.run(live, timeout=10).returncode == 0
    nobody = lab.PortHold()  # bound, never listening: nothing answers there
    try:
        dead = [arg.replace("/9901", f"/{nobody.port}") for arg in test[1:]]
        assert subprocess.run(dead, timeout=10, stderr=subprocess.DEVNULL).returncode != 0
    finally:
        nobody.release()


def test_the_canaryctl_service_starts_from_its_own_command(compose, tmp_path):
    service = compose["services"]["canaryctl"]
    envoy = compose["services"]["envoy"]
    command = service["command"]
    # It pushes the .wasm path as the front Envoy sees it (relative to that container's working dir).
    wasm_target = next(t for _, t, _ in mounts(envoy) if t.endswith(".wasm"))
    assert os.path.join(envoy["working_dir"], command[command.index("--wasm-path") + 1]) == wasm_target
    # Its admin API listens beyond loopback in the container, so a token must be set (or it refuses to start).
    assert command[command.index("--admin") + 1].startswith("0.0.0.0:")
    assert service["environment"]["CANARYCTL_TOKEN"], "writes must need a token"
    published = {str(p).split(":")[-1].split("/")[0] if not isinstance(p, dict) else str(p["target"])
                 for p in service["ports"]}
    assert published == {command[command.index("--admin") + 1].rsplit(":", 1)[1]}

    proc, lines = start_control_plane(compose, str(tmp_path / "root"))
    try:
        assert "started from" in lines and "version 1" in lines, lines
        assert "xDS requires mTLS (TLS 1.3)" in lines, lines
        state = str(tmp_path / "root") + command[command.index("--state") + 1]
        assert os.path.exists(state), "the state lands in the writable mount"
    finally:
        proc.kill()
        proc.wait()


def start_control_plane(compose, root: str) -> tuple[subprocess.Popen, str]:
    """The canaryctl service's own command, run here: mounts laid out under `root`, listen addresses moved to
    loopback port 0. Returns the process and its log up to the line saying where it serves."""
    service = compose["services"]["canaryctl"]
    replicate_mounts(service, root)
    argv = []
    for arg in service["command"]:
        if arg.startswith("0.0.0.0:"):
            arg = "127.0.0.1:0"
        elif arg.startswith("/"):
            arg = root + arg
        argv.append(arg)
    env = dict(os.environ, PATH=f"{root}/usr/local/bin:{os.environ['PATH']}",
               CANARYCTL_TOKEN=service["environment"]["CANARYCTL_TOKEN"])
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    lines = ""
    while "serving ADS on" not in lines:
        line = proc.stderr.readline()
        if not line:
            break
        lines += line
    return proc, lines


def test_the_compose_envoy_and_canaryctl_connect_over_mtls_with_the_certificates_compose_prep_makes(
        compose, tmp_path, processes):
    """Both services' own commands, with the mounts `make compose-prep` fills: the front Envoy's client
    certificate is accepted by canaryctl, which names it in the fleet view."""
    control, lines = start_control_plane(compose, str(tmp_path / "control"))
    try:
        found = re.search(r"serving ADS on 127\.0\.0\.1:(\d+), admin API on http://127\.0\.0\.1:(\d+)", lines)
        assert found, lines
        xds_port, admin_port = found.groups()
        proc, workdir = run_front_command(compose, str(tmp_path / "front"),
                                          f"--mode validate --base-id {lab.next_base_id()} -l warning")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(tmp_path / "front" / "envoy.yaml") as f:
            rendered = f.read()
        hold = lab.PortHold()
        text = lab.substitute(rendered, {
            "address: canaryctl, port_value: 18000": f"address: 127.0.0.1, port_value: {xds_port}",
            "address: 0.0.0.0, port_value: 9901": "address: 127.0.0.1, port_value: 0",
            "address: 0.0.0.0, port_value: 10000": f"address: 127.0.0.1, port_value: {hold.port}"},
            "the compose front's rendered config")
        command = compose["services"]["envoy"]["command"][2]
        node = re.search(r"--service-node (\S+)", command).group(1)
        envoy = lab.EnvoyProcess("compose-front", text, workdir, admin_port=0, holds=[hold],
                                 extra_args=["--service-node", node])
        processes.append(envoy)
        envoy.start().wait_ready()
        token = compose["services"]["canaryctl"]["environment"]["CANARYCTL_TOKEN"]

        def fleet():
            request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/status",
                                             headers={"authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                status = json.load(r)
            return [(e["node_id"], e["link"], e["acked_version"], e["certificate"]) for e in status["envoys"]]

        lab.eventually(lambda: fleet() == [(node, "connected", 1, "spiffe://canary-router.local/envoy/canary-router")],
                       deadline_s=20, what="the compose front connected over mTLS and ACKed")
    finally:
        control.kill()
        control.wait()
