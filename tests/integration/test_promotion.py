"""A promotion promotes: after each way a canary becomes stable (`canaryctl promote`, `canaryctl apply` of a
config whose stable changed, a progressive rollout passing its last step), every request reaches the new
stable, on both builds, with the shipped ADS bootstraps and the shipped plugin config unchanged. Envoy's
routes are not touched by a promotion: their default route still serves v1, and the config says so
("default_route_version": "v1"), so the filter must write the new stable's name for its users."""

import json
from collections import Counter

import pytest

import lab
from harness import Traffic
from lab import eventually

pytestmark = pytest.mark.both_artifacts

ADS_BOOTSTRAP = {"wasm": "envoy-ads.yaml", "native": "envoy-ads-native.yaml"}
USERS = 200


def shipped() -> dict:
    return json.loads(lab.shipped_plugin_config())


def serve(canaryctl, start_envoy, artifact, config: dict):
    kwargs = {"native_module": lab.NATIVE} if artifact == "native" else {}
    server = canaryctl(json.dumps(config), **kwargs)
    envoy = start_envoy(ADS_BOOTSTRAP[artifact], xds_port=server.xds_port, node_id="front-1")
    server.wait_envoys(1)
    return server, envoy


def served(envoy, prefix: str = "u") -> Counter:
    """Who served each of USERS users: by x-user-id, then users with no key at all (each gets a cookie), then the
    beta group (a rule naming v2). Every upstream must also receive exactly one route header, its own name."""
    conn = envoy.connection()
    seen = Counter()
    requests = [{"x-user-id": f"{prefix}{i}"} for i in range(USERS)]
    requests += [{} for _ in range(20)] + [{"x-user-group": "beta", "x-user-id": f"b{i}"} for i in range(10)]
    for headers in requests:
        r = envoy.get("/", headers, conn=conn)
        assert r.status == 200, (headers, r.status)
        assert r.received("x-version") == [r.served_by], (headers, r.received("x-version"), r.served_by)
        seen[r.served_by] += 1
    return seen


def all_on(envoy, version: str) -> Counter:
    """An ACK comes before Envoy's workers switch: poll until every request reaches `version`."""
    return eventually(lambda: (s := served(envoy)) and set(s) == {version} and s, deadline_s=10,
                      what=f"every request on {version}")


def test_canaryctl_promote_sends_every_user_to_the_new_stable(canaryctl, start_envoy, artifact):
    server, envoy = serve(canaryctl, start_envoy, artifact, shipped())
    before = served(envoy)
    assert before["v1"] > 0 and before["v2"] > 0, before
    result = server.run("promote", "web")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Envoy's default route still serves v1 (default_route_version): v2's users get the route header written" \
        in result.stdout, result.stdout
    server.wait_envoys(1)
    assert sum(all_on(envoy, "v2").values()) == USERS + 30
    web = server.status()["desired"]["config"]["rollouts"][0]
    assert (web["stable"], web["default_route_version"]) == ("v2", "v1")


def test_apply_of_a_config_whose_stable_changed_sends_every_user_to_it(canaryctl, start_envoy, artifact, tmp_path):
    server, envoy = serve(canaryctl, start_envoy, artifact, shipped())
    promoted = shipped()
    web = promoted["rollouts"][0]
    web["stable"], web["canaries"] = "v2", [{"version": "v1", "percent": 0}]
    path = tmp_path / "promoted.json"
    path.write_text(json.dumps(promoted))
    result = server.run("apply", "--file", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    server.wait_envoys(1)
    all_on(envoy, "v2")
    # The removed field that caused "0 of 599 on v2" is refused with one line naming its replacement, and
    # nothing changes: v2 keeps serving everyone.
    version = server.status()["desired"]["version"]
    del web["default_route_version"]
    web["stable_by_default_route"] = True
    path.write_text(json.dumps(promoted))
    refused = server.run("apply", "--file", str(path))
    assert refused.returncode != 0
    lines = (refused.stdout + refused.stderr).strip().splitlines()
    assert len(lines) == 1 and "rollouts[0].stable_by_default_route: removed" in lines[0] \
        and '"default_route_version": "v2"' in lines[0], lines
    assert server.status()["desired"]["version"] == version
    assert set(served(envoy)) == {"v2"}


def test_a_rollout_that_passes_its_last_step_sends_every_user_to_the_canary(canaryctl, start_envoy, artifact):
    config = shipped()
    config["rollouts"][0]["canaries"][0]["percent"] = 0
    server, envoy = serve(canaryctl, start_envoy, artifact, config)
    with Traffic(envoy, clients=3) as traffic:
        result = server.run("rollout", "start", "web", "--canary", "v2", "--steps", "50,100", "--hold", "2s",
                            "--min-canary-requests", "20", "--stable-cluster", "app-v1", "--canary-cluster",
                            "app-v2", "--canary-route-cluster", "app-v2-or-v1", "--latency-tolerance", "100")
        assert result.returncode == 0, result.stdout + result.stderr
        done = eventually(lambda: (r := {r["rollout"]: r for r in server.api("/v1/rollouts")["rollouts"]}["web"])
                          ["phase"] == "promoted" and r, deadline_s=60, interval_s=0.2, what="the rollout promoted")
        server.wait_envoys(1)
        all_on(envoy, "v2")
    statuses, _ = traffic.snapshot()
    assert set(statuses) == {200} and traffic.errors == [] and traffic.mismatches == [], \
        (statuses, traffic.errors[:3], traffic.mismatches[:3])
    # canaryctl read this build's own counters from the stats stream (what the filter sent to v2), and they
    # matched what v2's hosts got: the canary was judged up on both builds.
    ticks = [t for t in done["recent_ticks"] if t["routed"]]
    assert ticks and sum(t["routed"] for t in ticks) <= 1.1 * sum(t["served"] or 0 for t in ticks), done["recent_ticks"]
