"""canaryctl against real Envoys over real gRPC (ADS), for both builds of the filter: changes reach the whole
fleet and are ACKed; what the filter would refuse never leaves canaryctl (float noise included), so canaryctl
always restarts from what it saved; a filter that still refuses shows as a NACK while traffic goes on; a
0→100→0 ramp under load loses nothing; the control plane can die and come back; a write names the Envoys it
did not reach; with a token, nothing is readable without it and no secret is ever shown."""

import json
import os
import shutil
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

import lab
from harness import Traffic, expected_version
from lab import eventually

SKEW = {
    "wasm": os.path.join(lab.ROOT, "target", "skew", "wasm32-wasip1", "release", "canary_router.wasm"),
    "native": os.path.join(lab.ROOT, "target", "skew", "native", "libcanary_router_native.so"),
}
ADS_BOOTSTRAP = {"wasm": "envoy-ads.yaml", "native": "envoy-ads-native.yaml"}
FLOAT_NOISE = ["0.30000000000000004", "12.500000001", "99.999999999"]


def config(percent: float, **extra) -> str:
    web = {"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": percent}],
           "sticky": {"keys": [{"header": "x-user-id"}]}}
    web.update(extra)
    return json.dumps({"rollouts": [web]})


def control_plane(canaryctl, artifact, init, **kwargs):
    """canaryctl serving the build under test: the .wasm, or the native module (--native-module)."""
    if artifact == "native":
        kwargs.setdefault("native_module", lab.NATIVE)
    return canaryctl(init, **kwargs)


def fleet(start_envoy, server, count: int, artifact="wasm", first=1, **kwargs):
    envoys = [start_envoy(ADS_BOOTSTRAP[artifact], xds_port=server.xds_port, node_id=f"front-{i}", **kwargs)
              for i in range(first, first + count)]
    server.wait_envoys(count)
    return envoys


def share(envoy, users: int = 200, prefix: str = "u") -> float:
    conn = envoy.connection()
    served = Counter(envoy.get("/", {"x-user-id": f"{prefix}{i}"}, conn=conn).served_by for i in range(users))
    return served["v2"] / users * 100


def matches_spec(envoy, percent: float, users: int = 100) -> bool:
    conn = envoy.connection()
    return all(envoy.get("/", {"x-user-id": f"s{i}"}, conn=conn).served_by ==
               expected_version("web", f"s{i}", "v1", [("v2", percent)]) for i in range(users))


def serves(envoys, percent: float):
    """An Envoy ACKs a config before its workers switch to it: poll the split until it is the spec's."""
    for envoy in envoys:
        eventually(lambda: matches_spec(envoy, percent), what=f"{envoy.name} serving {percent}%")


def metrics(server) -> str:
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        return r.read().decode()


@pytest.mark.both_artifacts
def test_a_change_reaches_every_envoy_which_acks_it(start_envoy, canaryctl, artifact):
    server = control_plane(canaryctl, artifact, config(0))
    envoys = fleet(start_envoy, server, 2, artifact)
    serves(envoys, 0)

    result = server.run("set", "web", "v2=25")
    assert result.returncode == 0, result.stderr
    assert "web: v2 0% → 25%" in result.stdout
    assert "saved as version 2" in result.stdout
    assert "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
    serves(envoys, 25)

    status = json.loads(server.run("status", "--json").stdout)
    assert status["desired"]["version"] == 2
    assert sorted((e["node_id"], e["cluster"], e["acked_version"], e["nack"], e["link"]) for e in status["envoys"]) \
        == [("front-1", "edge", 2, None, "connected"), ("front-2", "edge", 2, None, "connected")]
    table = server.run("status").stdout
    assert "rollout web: v1 75% (stable), v2 25%" in table and table.count("2 (current)") == 2, table
    assert table.count("connected") == 2, table

    promoted = server.run("promote", "web")
    assert promoted.returncode == 0, promoted.stderr
    assert "web: stable v1 → v2 (now 100%)" in promoted.stdout
    for envoy in envoys:
        eventually(lambda: share(envoy) == 100, what="v2 promoted")
    rolled = server.run("promote", "web", "v1")  # and back: v1 stable again at 100 %
    assert rolled.returncode == 0, rolled.stderr
    for envoy in envoys:
        eventually(lambda: share(envoy) == 0, what="v1 promoted back")

    text = metrics(server)
    for line in ("canaryctl_desired_version 4", "canaryctl_envoys_connected 2", "canaryctl_envoys_current 2",
                 "canaryctl_envoys_in_fleet 2", "canaryctl_envoys_disconnected 0",
                 'canaryctl_writes_total{result="applied"} 3', "canaryctl_xds_nacks_total 0"):
        assert line + "\n" in text, f"{line!r} not in\n{text}"


def test_an_invalid_change_is_refused_by_canaryctl_never_pushed_and_canaryctl_restarts(start_envoy, canaryctl,
                                                                                      tmp_path):
    server = canaryctl(config(10))
    envoys = fleet(start_envoy, server, 2)
    updates = [e.stat("extension_config_discovery.http_filter.canary-router.update_success") for e in envoys]
    refused = [
        (("set", "web", "v2=150"), "rollouts[0].canaries[0].percent: 150 is not allowed: "
                                   "a number from 0 to 100 with at most two decimals"),
        (("set", "web", "v3=5"), "web has no canary \"v3\" (canaries: v2)"),
        (("set", "shop", "v2=5"), "no rollout named \"shop\" (rollouts: web)"),
        (("rollback", "shop"), "no rollout named \"shop\""),
    ]
    # Float noise a ramp script sends (0.1 * 3), a typo-class tail, and a value a float rounds to 100: the
    # filter's own message, before anything is saved.
    for noise in FLOAT_NOISE:
        refused.append((("set", "web", f"v2={noise}"),
                        f"invalid config: rollouts[0].canaries[0].percent: {noise} is not allowed: "
                        "a number from 0 to 100 with at most two decimals"))
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(config(10, rules=[{"header": "x-group", "values": ["beta"], "version": "v9"}]))
    refused.append((("apply", "-f", str(bad_file)),
                    "rollouts[0].rules[0].version: \"v9\" is not allowed: one of this rollout's versions (v1, v2)"))
    noisy_file = tmp_path / "noisy.json"
    noisy_file.write_text(config(10).replace('"percent": 10', '"percent": 0.30000000000000004'))
    refused.append((("apply", "-f", str(noisy_file)),
                    "rollouts[0].canaries[0].percent: 0.30000000000000004 is not allowed"))
    for args, message in refused:
        result = server.run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, f"one clear line, not a backtrace: {result.stderr!r}"
    assert server.status()["desired"]["version"] == 1
    assert [e.stat("extension_config_discovery.http_filter.canary-router.update_success") for e in envoys] \
        == updates, "nothing was pushed"
    with open(server.state_path) as f:
        assert json.load(f)["version"] == 1, "nothing was saved"
    # What was saved is what canaryctl restarts from.
    server.stop()
    restarted = lab.Canaryctl(server.workdir, xds_port=server.xds_port, admin_port=server.admin_port)
    restarted.init_config_path = None
    restarted.start()
    try:
        assert restarted.status()["desired"]["version"] == 1
        assert restarted.run("set", "web", "v2=12.50").returncode == 0
        assert restarted.status()["desired"]["summary"] == "route_header x-version; rollout web: v1 87.5% (stable), v2 12.5%"
    finally:
        restarted.stop()


@pytest.mark.both_artifacts
def test_a_config_the_filter_refuses_is_a_nack_and_traffic_stays_on_the_old_one(start_envoy, canaryctl, artifact,
                                                                                tmp_path):
    # Version skew: front-2 runs an older build of the filter that does not know `assign_cookie`.
    skew = SKEW[artifact]
    assert os.path.exists(skew), "build it with `make skew-wasm skew-native` (make integration does)"
    name = os.path.basename(skew)
    # A relative path: each Envoy loads its own copy from its working directory (with "./" for dlopen).
    server = canaryctl(config(100), wasm_path=name, native_module=f"./{name}" if artifact == "native" else None)
    builds = {"front-1": lab.WASM if artifact == "wasm" else lab.NATIVE, "front-2": skew}
    envoys = [start_envoy(ADS_BOOTSTRAP[artifact], xds_port=server.xds_port, node_id=node,
                          before_start=lambda e, b=build: shutil.copy(b, os.path.join(e.workdir, name)))
              for node, build in builds.items()]
    server.wait_envoys(2)
    new = tmp_path / "new.json"
    new.write_text(config(0, assign_cookie={"name": "canary_id"}))
    with Traffic(envoys[1], clients=3) as traffic:
        result = server.run("apply", "-f", str(new), "--timeout", "20")
        time.sleep(0.3)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "+ rollouts[0].assign_cookie" in result.stdout and "~ rollouts[0].canaries[0].percent: 100 → 0" in result.stdout
    assert "Envoy front-2 refused version 2:" in result.stderr and "it keeps serving version 1" in result.stderr
    nack = {e["node_id"]: e for e in server.status()["envoys"]}
    assert nack["front-1"]["acked_version"] == 2 and nack["front-1"]["nack"] is None
    assert nack["front-2"]["acked_version"] == 1 and nack["front-2"]["nack"]["version"] == 2
    assert nack["front-2"]["nack"]["message"], "the NACK carries Envoy's error detail"
    assert "NACK of version 2" in server.run("status").stdout
    eventually(lambda: "unknown field `assign_cookie`" in envoys[1].log(),
               what="the filter's own reason in that Envoy's log")
    eventually(lambda: share(envoys[0]) == 0, what="front-1 applying version 2")
    assert share(envoys[1]) == 100, "front-2 still serves version 1"
    assert set(traffic.statuses) == {200} and traffic.errors == [], (traffic.statuses, traffic.errors[:3])


@pytest.mark.both_artifacts
def test_a_ramp_0_100_0_in_20_steps_under_traffic_loses_no_request(start_envoy, canaryctl, artifact):
    server = control_plane(canaryctl, artifact, config(0))
    envoys = fleet(start_envoy, server, 2, artifact)
    steps = list(range(10, 101, 10)) + list(range(90, -1, -10))
    assert len(steps) >= 20
    with Traffic(envoys[0], clients=4) as a, Traffic(envoys[1], clients=4) as b:
        for percent in steps:
            result = server.run("set", "web", f"v2={percent}")
            assert result.returncode == 0 and "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
            # Requests flow on every step's config, on both Envoys, before the next change.
            marks = (a.total() + 30, b.total() + 30)
            eventually(lambda: a.total() >= marks[0] and b.total() >= marks[1], what="traffic on this step")
    for traffic in (a, b):
        assert traffic.total() > 30 * len(steps), traffic.statuses
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors[:3])
        assert traffic.mismatches == []
    serves(envoys, 0)
    assert server.status()["desired"]["version"] == 1 + len(steps)


@pytest.mark.both_artifacts
def test_the_control_plane_can_die_and_come_back_without_anyone_noticing(start_envoy, canaryctl, artifact):
    server = control_plane(canaryctl, artifact, config(30))
    envoys = fleet(start_envoy, server, 2, artifact)
    assert server.run("set", "web", "v2=60").returncode == 0
    serves(envoys, 60)
    with Traffic(envoys[0], clients=4) as traffic:
        server.kill()  # SIGKILL
        # While it is down, the Envoys keep serving their last config.
        eventually(lambda: traffic.total() > 200, what="traffic while canaryctl is down")
        assert all(matches_spec(e, 60) for e in envoys)
        down_total = traffic.total()
        # Restarted from its state file alone (no --init-config): the same version, config and fleet.
        restarted = lab.Canaryctl(server.workdir, wasm_path=server.wasm_path, xds_port=server.xds_port,
                                  admin_port=server.admin_port, native_module=server.native_module)
        restarted.init_config_path = None
        restarted.start()
        try:
            status = restarted.status()
            assert status["desired"]["version"] == 2
            assert sorted(e["node_id"] for e in status["envoys"]) == ["front-1", "front-2"], \
                "the fleet is remembered across the restart"
            assert restarted.wait_envoys(2, version=2, deadline_s=30)  # they resubscribed
            result = restarted.run("set", "web", "v2=90")
            assert result.returncode == 0 and "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
            serves(envoys, 90)
        finally:
            restarted.stop()
    assert traffic.total() > down_total > 0
    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors[:3])


@pytest.mark.both_artifacts
def test_a_write_names_every_envoy_it_did_not_reach_and_exits_3(start_envoy, canaryctl, artifact, processes):
    # During an incident a rollback must not "succeed" while part of the fleet still sends users to the canary.
    server = control_plane(canaryctl, artifact, config(50),
                           extra_args=["--reconnect-grace", "1s", "--fleet-window", "1h"])
    envoys = fleet(start_envoy, server, 3, artifact)
    envoys[2].kill()  # front-3's stream drops; it keeps its last config (50 %) wherever it runs
    eventually(lambda: {e["node_id"]: e["link"] for e in server.status()["envoys"]}["front-3"] == "disconnected",
               what="front-3 disconnected past the grace")

    result = server.run("rollback", "web")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "applied by 2/3 Envoys" in result.stdout, result.stdout
    assert "front-3 (edge): not applied: disconnected since " in result.stdout, result.stdout
    assert "it gets version 2 when it reconnects" in result.stdout
    assert "1 Envoy of the fleet did not apply version 2: disconnected (front-3)" in result.stderr, result.stderr
    serves(envoys[:2], 0)
    table = server.run("status").stdout
    assert "disconnected since" in table and "front-3" in table, table
    assert "canaryctl_envoys_disconnected 1\n" in metrics(server)

    allowed = server.run("set", "web", "v2=5", "--allow-disconnected")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "front-3 (edge): not applied" in allowed.stdout and "allowed by --allow-disconnected" in allowed.stdout

    # front-3 comes back under the same node id: it gets the current version, and writes reach 3/3 again.
    back = start_envoy(ADS_BOOTSTRAP[artifact], xds_port=server.xds_port, node_id="front-3")
    server.wait_envoys(3)
    serves([back], 5)
    again = server.run("set", "web", "v2=10")
    assert again.returncode == 0 and "applied by 3/3 Envoys" in again.stdout, again.stdout + again.stderr
    assert len(server.status()["envoys"]) == 3, "one entry per node id, not per stream"


def test_a_restarted_canaryctl_remembers_who_is_missing_and_forgets_them_in_time(start_envoy, canaryctl):
    # Short windows for a test (the defaults are 1h and 7d), with room for a slow machine before the write.
    server = canaryctl(config(50), extra_args=["--reconnect-grace", "1s", "--fleet-window", "15s",
                                              "--forget-after", "25s"])
    envoys = fleet(start_envoy, server, 2)
    envoys[1].stop()
    eventually(lambda: server.status()["envoys"][1]["link"] == "disconnected", what="front-2 gone")
    # Restart canaryctl: front-2 is still known from the state file, and reported, not silently dropped.
    server.stop()
    restarted = lab.Canaryctl(server.workdir, xds_port=server.xds_port, admin_port=server.admin_port,
                              extra_args=server.extra_args)
    restarted.init_config_path = None
    restarted.start()
    try:
        assert [e["node_id"] for e in restarted.status()["envoys"]] == ["front-1", "front-2"]
        restarted.wait_envoys(1)
        result = restarted.run("set", "web", "v2=20")
        assert result.returncode == 3 and "front-2 (edge): not applied" in result.stdout, \
            result.stdout + result.stderr
        # Past the fleet window, writes no longer wait for it; past forget_after it is forgotten.
        eventually(lambda: restarted.status()["envoys"][1]["link"] == "gone", deadline_s=30, what="out of the window")
        assert restarted.run("set", "web", "v2=30").returncode == 0
        eventually(lambda: [e["node_id"] for e in restarted.status()["envoys"]] == ["front-1"], deadline_s=30,
                   what="front-2 forgotten")
        # The state file follows (saved after the fleet view changed, not with it).

        def saved_fleet():
            with open(restarted.state_path) as f:
                return [e["node_id"] for e in json.load(f)["fleet"]] == ["front-1"]
        eventually(saved_fleet, deadline_s=10, what="front-2 forgotten in the state file")
        assert "forgot Envoy \"front-2\"" in restarted.log()
    finally:
        restarted.stop()


def test_with_a_token_nothing_is_readable_without_it_and_no_secret_is_ever_shown(start_envoy, canaryctl, tmp_path):
    secret_config = config(10, override={"header": "x-pick", "token_header": "x-token", "token": "hunter2-override"})
    server = canaryctl(secret_config, token="s3cret-admin")
    fleet(start_envoy, server, 1)

    def call(path, body=None, token=None, scheme="Bearer"):
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"{scheme} {token}"
        request = urllib.request.Request(f"{server.server}{path}", headers=headers, method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    endpoints = [
        ("/v1/status", None),
        ("/v1/set", {"rollout": "web", "percents": {"v2": 50}}),
        ("/v1/promote", {"rollout": "web"}),
        ("/v1/rollback", {"rollout": "web"}),
        ("/v1/apply", {"config": json.loads(config(60)), "dry_run": True}),
        ("/v1/apply", {"config": json.loads(config(60))}),
    ]
    for path, body in endpoints:
        for token in (None, "wrong"):
            code, text = call(path, body, token)
            assert code == 401, (path, token, code, text)
            assert "hunter2" not in text
    assert server.status()["desired"]["version"] == 1, "nothing changed"
    for path in ("/metrics", "/healthz"):
        code, text = call(path)
        assert code == 200 and "hunter2" not in text and "s3cret-admin" not in text, (path, text)

    # With the token (the scheme in any case), reads work and still show no secret.
    code, text = call("/v1/status", token="s3cret-admin", scheme="bearer")
    assert code == 200 and "hunter2" not in text and '"token":"(secret)"' in text.replace(" ", ""), text
    changed = json.loads(secret_config)
    changed["rollouts"][0]["override"]["token"] = "hunter3-override"
    code, text = call("/v1/apply", {"config": changed, "dry_run": True}, token="s3cret-admin")
    assert code == 200 and "hunter" not in text, text
    assert "rollouts[0].override.token" in text and "(new secret)" in text, text

    # The CLI: refused without the token, allowed with it, and the token is not in serve's command line.
    result = server.run("status")
    assert result.returncode == 1 and result.stderr.startswith("canaryctl: unauthorized:"), result.stderr
    ok = server.run("set", "web", "v2=50", token="s3cret-admin")
    assert ok.returncode == 0 and "applied by 1/1 Envoys" in ok.stdout, ok.stderr
    diff_file = tmp_path / "changed.json"
    diff_file.write_text(json.dumps(changed))
    dry = server.run("apply", "-f", str(diff_file), "--dry-run", token="s3cret-admin")
    assert dry.returncode == 0 and "hunter" not in dry.stdout + dry.stderr, dry.stdout
    with open(f"/proc/{server.process.pid}/cmdline", "rb") as f:
        assert b"s3cret-admin" not in f.read(), "the token is in `ps`"
    assert stat.S_IMODE(os.stat(server.state_path).st_mode) == 0o600, "the state file holds the override token"


def test_serve_refuses_to_start_without_state_with_a_bad_one_or_open_to_the_network(tmp_path):
    def serve(*args, admin="127.0.0.1:0"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYCTL_")}
        return subprocess.run([lab.CANARYCTL, "serve", "--xds", "127.0.0.1:0", "--admin", admin, *args],
                              capture_output=True, text=True, timeout=10, env=env)

    result = serve("--state", str(tmp_path / "none.json"))
    assert result.returncode == 1 and "give --init-config FILE to start one" in result.stderr, result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"rollouts": []}')
    result = serve("--state", str(tmp_path / "s.json"), "--init-config", str(bad))
    assert result.returncode == 1 and "rollouts: [] is not allowed: at least one rollout" in result.stderr
    assert not (tmp_path / "s.json").exists()
    good = tmp_path / "good.json"
    good.write_text(config(5))
    result = serve("--state", str(tmp_path / "s.json"), "--init-config", str(good), admin="0.0.0.0:0")
    assert result.returncode == 1 and "would accept writes from anyone" in result.stderr, result.stderr
    assert not (tmp_path / "s.json").exists(), "refused before touching the state"
    (tmp_path / "broken.json").write_text('{"version": 3')
    result = serve("--state", str(tmp_path / "broken.json"))
    assert result.returncode == 1 and "not a canaryctl state" in result.stderr, result.stderr
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    result = serve("--state", str(tmp_path / "s.json"), "--init-config", str(good), "--token-file", str(token_file))
    assert result.returncode == 1 and "the admin token is empty" in result.stderr, result.stderr


def test_a_state_file_holding_a_refused_config_is_reported_and_recovered_without_losing_the_rest(tmp_path):
    # What an older canaryctl saved after accepting float noise: every Envoy NACKs it, and this build refuses it.
    state = tmp_path / "state.json"
    state.write_text(json.dumps({
        "version": 9, "updated_at_unix": 1,
        "config": json.loads(config(10).replace('"percent": 10', '"percent": 0.30000000000000004')),
        "fleet": [{"node_id": "front-1", "cluster": "edge", "first_seen_unix": int(time.time()) - 600,
                   "last_seen_unix": int(time.time()) - 60, "acked_version": 8}],
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANARYCTL_")}
    result = subprocess.run([lab.CANARYCTL, "serve", "--xds", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                             "--state", str(state)], capture_output=True, text=True, timeout=10, env=env)
    assert result.returncode == 1, result.stderr
    assert "not a canaryctl state" not in result.stderr
    assert ("the config saved as version 9 is refused: rollouts[0].canaries[0].percent: 0.30000000000000004 is "
            "not allowed") in result.stderr, result.stderr
    assert "--recover-config FILE" in result.stderr and result.stderr.count("\n") == 1
    good = tmp_path / "good.json"
    good.write_text(config(0))
    server = lab.Canaryctl(str(tmp_path), extra_args=["--recover-config", str(good)])
    server.state_path = str(state)
    server.start()
    try:
        status = server.status()
        assert status["desired"]["version"] == 10 and status["desired"]["summary"].endswith("v2 0%")
        assert [(e["node_id"], e["acked_version"]) for e in status["envoys"]] == [("front-1", 8)], \
            "the fleet is kept"
    finally:
        server.stop()
