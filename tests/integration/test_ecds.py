"""Configuration delivered by ECDS from a watched directory: live changes, refusals, no lost requests."""

import json
from collections import Counter

import pytest

from harness import Traffic, expected_version
from lab import eventually

# Both builds read their configuration by ECDS the same way: the .wasm's Wasm filter config, or the native
# module's DynamicModuleFilter config (tools/ecds.py --native), from the same watched directory.
pytestmark = pytest.mark.both_artifacts

ECDS_STATS = "extension_config_discovery.http_filter.canary-router."


def config(percent: float, **rollout) -> str:
    web = {"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": percent}],
           "sticky": {"keys": [{"header": "x-user-id"}]}}
    web.update(rollout)
    return json.dumps({"rollouts": [web]}, indent=2)


def served_share(envoy, users=200) -> float:
    conn = envoy.connection()
    served = Counter(envoy.get("/", {"x-user-id": f"share-{i}"}, conn=conn).served_by for i in range(users))
    return served["v2"] / users * 100


def publish_and_wait(envoy, plugin_config: str, stat: str = "update_success"):
    """Publish and wait until Envoy took it (applied or refused). Its workers switch a moment later."""
    before = envoy.stat(ECDS_STATS + stat)
    envoy.publish(plugin_config)
    envoy.wait_stat(ECDS_STATS + stat, before + 1)


def decides(envoy, percent: float, users: int, prefix: str) -> bool:
    """Every one of these users gets the version the spec says for `percent`."""
    conn = envoy.connection()
    try:
        return all(envoy.get("/", {"x-user-id": f"{prefix}-{i}"}, conn=conn).served_by ==
                   expected_version("web", f"{prefix}-{i}", "v1", [("v2", percent)]) for i in range(users))
    finally:
        conn.close()


def test_percentage_changes_apply_live_with_zero_failed_requests(start_envoy):
    envoy = start_envoy("envoy-ecds.yaml", plugin_config=config(0))
    assert served_share(envoy) == 0
    steps = [5, 25, 50, 75, 100, 50, 0, 100]
    with Traffic(envoy) as traffic:
        for percent in steps:
            publish_and_wait(envoy, config(percent))
            # Once the workers switched, every request uses the new split, exactly as the spec says.
            eventually(lambda: decides(envoy, percent, 50, f"check-{percent}"), what=f"the {percent}% split")
            marks = traffic.total() + 50  # let the concurrent clients run on this config too
            eventually(lambda: traffic.total() >= marks, what="traffic on this config")
    assert traffic.total() > 500, traffic.statuses
    assert traffic.errors == [], traffic.errors[:5]
    assert set(traffic.statuses) == {200}, traffic.statuses
    assert traffic.mismatches == [], traffic.mismatches[:5]
    assert envoy.stat(ECDS_STATS + "update_rejected") == 0
    assert envoy.stat("listener_manager.total_listeners_draining") == 0
    assert envoy.stat("http.ingress.downstream_cx_destroy_remote_active_rq") == 0


def counted(envoy, version: str) -> int:
    """Requests counted as sticky for `version` of rollout web, whichever build counted them."""
    suffix = f"canary_router_requests.rollout.web.version.{version}.reason.sticky"
    return sum(value for name, value in envoy.stats().items() if name.endswith(suffix))


def test_every_request_is_counted_once_across_a_config_change(start_envoy):
    # Dashboards compare versions by these counters across percentage changes: each request is counted
    # once, under the config that decided it, whichever config is live when the counters are read.
    envoy = start_envoy("envoy-ecds.yaml", plugin_config=config(0))
    conn = envoy.connection()
    for i in range(40):
        assert envoy.get("/", {"x-user-id": f"count-{i}"}, conn=conn).served_by == "v1"
    conn.close()
    eventually(lambda: (counted(envoy, "v1"), counted(envoy, "v2")) == (40, 0), what="40 counted for v1")
    publish_and_wait(envoy, config(100))
    # The workers switch a moment after the update; probe until they have (each probe is counted too).
    eventually(lambda: envoy.get("/", {"x-user-id": "probe"}).served_by == "v2", what="the 100% config")
    base = eventually(lambda: (lambda c: c if c == (counted(envoy, "v1"), counted(envoy, "v2")) else None)(
        (counted(envoy, "v1"), counted(envoy, "v2"))), what="settled counters")
    conn = envoy.connection()
    for i in range(60):
        assert envoy.get("/", {"x-user-id": f"count-{i}"}, conn=conn).served_by == "v2"
    eventually(lambda: (counted(envoy, "v1"), counted(envoy, "v2")) == (base[0], base[1] + 60),
               what=f"60 more counted for v2 (from {base})")


def test_a_refused_config_changes_nothing_and_the_next_good_one_applies(start_envoy):
    envoy = start_envoy("envoy-ecds.yaml", plugin_config=config(100))
    assert served_share(envoy) == 100
    refusals = [
        ('{"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 150}]}]}',
         "config rejected: rollouts[0].canaries[0].percent: 150 is not allowed: "
         "a number from 0 to 100 with at most two decimals"),
        ('{"rollouts": [], "extra": 1}',
         "config rejected: extra: unknown field `extra`, expected `route_header` or `rollouts`"),
        ('{"rollouts": [', "config rejected: rollouts: EOF while parsing a list"),
        (config(60, canaries=[{"version": "v2", "percent": 60}, {"version": "v3", "percent": 41}]),
         "config rejected: rollouts[0].canaries: a total of 101% is not allowed: "
         "canary percents that add up to at most 100"),
    ]
    with Traffic(envoy, clients=3) as traffic:
        for bad, message in refusals:
            publish_and_wait(envoy, bad, stat="update_rejected")
            eventually(lambda: message in envoy.log(), what=f"the filter logging: {message}")
            assert served_share(envoy, users=100) == 100, f"the last good config keeps serving after: {bad}"
        publish_and_wait(envoy, config(0))
        eventually(lambda: served_share(envoy) == 0, what="the next good config")
    assert set(traffic.statuses) == {200} and traffic.errors == [], (traffic.statuses, traffic.errors[:5])
    assert traffic.mismatches == []
