"""canaryctl against real Envoys over real gRPC (ADS): changes reach the whole fleet and are ACKed; what the
filter would refuse never leaves canaryctl; a filter that still refuses shows as a NACK while traffic goes
on; a 0→100→0 ramp under load loses nothing; the control plane can die and come back; writes need the token."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter

import lab
from harness import Traffic, expected_version

SKEW_WASM = os.path.join(lab.ROOT, "target", "skew", "wasm32-wasip1", "release", "canary_router.wasm")
ECDS_SUCCESS = "extension_config_discovery.http_filter.canary-router.update_success"


def config(percent: float, **extra) -> str:
    web = {"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": percent}],
           "sticky": {"keys": [{"header": "x-user-id"}]}}
    web.update(extra)
    return json.dumps({"rollouts": [web]})


def fleet(start_envoy, server, count: int, **kwargs):
    envoys = [start_envoy("envoy-ads.yaml", xds_port=server.xds_port, node_id=f"front-{i + 1}", **kwargs)
              for i in range(count)]
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


def test_a_change_reaches_every_envoy_which_acks_it(start_envoy, canaryctl):
    server = canaryctl(config(0))
    envoys = fleet(start_envoy, server, 2)
    assert all(share(e) == 0 for e in envoys)

    result = server.run("set", "web", "v2=25")
    assert result.returncode == 0, result.stderr
    assert "web: v2 0% → 25%" in result.stdout
    assert "saved as version 2" in result.stdout
    assert "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
    for envoy in envoys:
        assert matches_spec(envoy, 25), "every Envoy applies the new split as the spec says"

    status = json.loads(server.run("status", "--json").stdout)
    assert status["desired"]["version"] == 2
    assert sorted((e["node_id"], e["cluster"], e["acked_version"], e["nack"]) for e in status["envoys"]) == \
        [("front-1", "edge", 2, None), ("front-2", "edge", 2, None)]
    table = server.run("status").stdout
    assert "rollout web: v1 75% (stable), v2 25%" in table and table.count("2 (current)") == 2, table

    promoted = server.run("promote", "web")
    assert promoted.returncode == 0, promoted.stderr
    assert "web: stable v1 → v2 (now 100%)" in promoted.stdout
    assert all(share(e) == 100 for e in envoys)
    rolled = server.run("promote", "web", "v1")  # and back: v1 stable again at 100 %
    assert rolled.returncode == 0 and all(share(e) == 0 for e in envoys), rolled.stderr

    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        metrics = r.read().decode()
    for line in ("canaryctl_desired_version 4", "canaryctl_envoys_connected 2", "canaryctl_envoys_current 2",
                 'canaryctl_writes_total{result="applied"} 3', "canaryctl_xds_nacks_total 0"):
        assert line + "\n" in metrics, f"{line!r} not in\n{metrics}"


def test_an_invalid_change_is_refused_by_canaryctl_and_never_pushed(start_envoy, canaryctl, tmp_path):
    server = canaryctl(config(10))
    envoys = fleet(start_envoy, server, 2)
    updates = [e.stat(ECDS_SUCCESS) for e in envoys]
    refused = [
        (("set", "web", "v2=150"), "rollouts[0].canaries[0].percent: 150 is not allowed: "
                                   "a number from 0 to 100 with at most two decimals"),
        (("set", "web", "v3=5"), "web has no canary \"v3\" (canaries: v2)"),
        (("set", "shop", "v2=5"), "no rollout named \"shop\" (rollouts: web)"),
        (("rollback", "shop"), "no rollout named \"shop\""),
    ]
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(config(10, rules=[{"header": "x-group", "values": ["beta"], "version": "v9"}]))
    refused.append((("apply", "-f", str(bad_file)),
                    "rollouts[0].rules[0].version: \"v9\" is not allowed: one of this rollout's versions (v1, v2)"))
    for args, message in refused:
        result = server.run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, f"one clear line, not a backtrace: {result.stderr!r}"
    assert server.status()["desired"]["version"] == 1
    time.sleep(0.3)
    assert [e.stat(ECDS_SUCCESS) for e in envoys] == updates, "nothing was pushed"
    with open(server.state_path) as f:
        assert json.load(f)["version"] == 1, "nothing was saved"


def test_a_config_the_filter_refuses_is_a_nack_and_traffic_stays_on_the_old_one(start_envoy, canaryctl, tmp_path):
    # Version skew: front-2 runs an older build of the filter that does not know `assign_cookie`.
    assert os.path.exists(SKEW_WASM), "build it with `make skew-wasm` (make integration does)"
    server = canaryctl(config(100), wasm_path="canary_router.wasm")  # relative: each Envoy's own copy
    builds = {"front-1": lab.WASM, "front-2": SKEW_WASM}
    envoys = [start_envoy("envoy-ads.yaml", xds_port=server.xds_port, node_id=node,
                          before_start=lambda e, b=build: shutil.copy(b, os.path.join(e.workdir, "canary_router.wasm")))
              for node, build in builds.items()]
    server.wait_envoys(2)
    new = tmp_path / "new.json"
    new.write_text(config(0, assign_cookie={"name": "canary_id"}))
    with Traffic(envoys[1], clients=3) as traffic:
        result = server.run("apply", "-f", str(new), "--timeout", "20")
        time.sleep(0.3)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "+ rollouts[0].assign_cookie" in result.stdout and "~ rollouts[0].canaries[0].percent: 100.0 → 0.0" in result.stdout
    assert "Envoy front-2 refused version 2:" in result.stderr and "it keeps serving version 1" in result.stderr
    nack = {e["node_id"]: e for e in server.status()["envoys"]}
    assert nack["front-1"]["acked_version"] == 2 and nack["front-1"]["nack"] is None
    assert nack["front-2"]["acked_version"] == 1 and nack["front-2"]["nack"]["version"] == 2
    assert nack["front-2"]["nack"]["message"], "the NACK carries Envoy's error detail"
    assert "NACK of version 2" in server.run("status").stdout
    assert "unknown field `assign_cookie`" in envoys[1].log(), "the filter's own reason is in that Envoy's log"
    assert share(envoys[0]) == 0, "front-1 applied version 2"
    assert share(envoys[1]) == 100, "front-2 still serves version 1"
    assert set(traffic.statuses) == {200} and traffic.errors == [], (traffic.statuses, traffic.errors[:3])


def test_a_ramp_0_100_0_in_20_steps_under_traffic_loses_no_request(start_envoy, canaryctl):
    server = canaryctl(config(0))
    envoys = fleet(start_envoy, server, 2)
    steps = list(range(10, 101, 10)) + list(range(90, -1, -10))
    assert len(steps) >= 20
    with Traffic(envoys[0], clients=4) as a, Traffic(envoys[1], clients=4) as b:
        for percent in steps:
            result = server.run("set", "web", f"v2={percent}")
            assert result.returncode == 0 and "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
            # Requests flow on every step's config, on both Envoys, before the next change.
            marks = (a.total() + 30, b.total() + 30)
            deadline = time.monotonic() + 10
            while (a.total() < marks[0] or b.total() < marks[1]) and time.monotonic() < deadline:
                time.sleep(0.01)
    for traffic in (a, b):
        assert traffic.total() > 30 * len(steps), traffic.statuses
        assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors[:3])
        assert traffic.mismatches == []
    assert all(share(e) == 0 for e in envoys)
    assert server.status()["desired"]["version"] == 1 + len(steps)


def test_the_control_plane_can_die_and_come_back_without_anyone_noticing(start_envoy, canaryctl):
    server = canaryctl(config(30))
    envoys = fleet(start_envoy, server, 2)
    assert server.run("set", "web", "v2=60").returncode == 0
    with Traffic(envoys[0], clients=4) as traffic:
        server.kill()  # SIGKILL
        # While it is down, the Envoys keep serving their last config.
        time.sleep(1.5)
        assert all(matches_spec(e, 60) for e in envoys)
        down_total = traffic.total()
        # Restarted from its state file alone (no --init-config): the same version and config.
        restarted = lab.Canaryctl(server.workdir, wasm_path=server.wasm_path, xds_port=server.xds_port,
                                  admin_port=server.admin_port)
        restarted.init_config_path = None
        restarted.start()
        try:
            assert restarted.status()["desired"]["version"] == 2
            assert restarted.wait_envoys(2, version=2, deadline_s=30)  # they resubscribed
            result = restarted.run("set", "web", "v2=90")
            assert result.returncode == 0 and "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
            assert all(matches_spec(e, 90) for e in envoys)
        finally:
            restarted.stop()
    assert traffic.total() > down_total > 0
    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors[:3])


def test_writes_need_the_token_when_one_is_set(start_envoy, canaryctl):
    server = canaryctl(config(10), token="s3cret-admin")
    fleet(start_envoy, server, 1)
    for token in (None, "wrong"):
        result = server.run("set", "web", "v2=50", token=token)
        assert result.returncode == 1 and result.stderr.startswith("canaryctl: unauthorized:"), result.stderr
    request = urllib.request.Request(f"{server.server}/v1/rollback", data=b'{"rollout":"web"}', method="POST",
                                     headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(request)
        raise AssertionError("an unauthenticated write was accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    assert server.status()["desired"]["version"] == 1, "nothing changed"
    assert server.run("status").returncode == 0, "reads need no token"
    ok = server.run("set", "web", "v2=50", token="s3cret-admin")
    assert ok.returncode == 0 and "applied by 1/1 Envoys" in ok.stdout, ok.stderr


def test_serve_refuses_to_start_without_state_with_a_bad_one_or_open_to_the_network(tmp_path):
    def serve(*args, admin="127.0.0.1:0"):
        return subprocess.run([lab.CANARYCTL, "serve", "--xds", "127.0.0.1:0", "--admin", admin, *args],
                              capture_output=True, text=True, timeout=10)

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
    assert result.returncode == 1 and "not a canaryctl state file" in result.stderr, result.stderr
