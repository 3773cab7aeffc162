"""docker-compose.yaml cannot run here (no Docker engine), so everything around it is proven instead:
it is valid Compose, its mounts exist and land where the configs expect them, the front Envoy's own start
command (run here with the mounts replicated) renders a config that `envoy --mode validate` accepts, its
service names and ports agree with the Envoy configs, and its health check works against a real Envoy."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

import ecds
import lab

COMPOSE_FILE = os.path.join(lab.ROOT, "docker-compose.yaml")
IMAGE = "envoyproxy/envoy:v1.40.0"


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


def test_every_service_runs_the_pinned_official_envoy_image(compose):
    assert {name: s["image"] for name, s in compose["services"].items()} == \
        {"app-v1": IMAGE, "app-v2": IMAGE, "envoy": IMAGE}


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
        assert os.path.exists(os.path.join(workdir, "ecds", ecds.RESOURCE_FILE)), "the ECDS directory is seeded"
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
    assert "path: ecds/canary-router.json" in rendered and "watched_directory: { path: ecds }" in rendered


def test_the_health_check_passes_on_a_live_envoy_and_fails_without_one(compose, start_envoy):
    test = compose["services"]["envoy"]["healthcheck"]["test"]
    assert test[0] == "CMD" and ":9901" not in " ".join(test) and "/9901" in " ".join(test)
    envoy = start_envoy()
    live = [arg.replace("/9901", f"/{envoy.admin_port}") for arg in test[1:]]
    assert subprocess.run(live, timeout=10).returncode == 0
    dead = [arg.replace("/9901", f"/{lab.free_port()}") for arg in test[1:]]
    assert subprocess.run(dead, timeout=10, stderr=subprocess.DEVNULL).returncode != 0
