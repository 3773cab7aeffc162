"""A failing canary never reaches users: the shipped routes fall back to stable, and the canary's share
returns when it comes back. Runs the shipped demo apps (Envoy direct responses) as the two versions."""

import json
import time

import pytest

import lab
from harness import Traffic, expected_version

pytestmark = pytest.mark.both_artifacts

HALF = json.dumps({"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 50}],
                                  "sticky": {"keys": [{"header": "x-user-id"}]}}]})


def wait_until(condition, deadline_s: float, what: str):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {deadline_s}s: {what}")


def front(start_envoy, demo_apps):
    return start_envoy(plugin_config=HALF, upstream_ports={v: app.port for v, app in demo_apps.items()})


def test_killing_the_canary_during_traffic_fails_no_request(start_envoy, demo_apps):
    envoy = front(start_envoy, demo_apps)
    with Traffic(envoy, clients=8) as traffic:
        wait_until(lambda: traffic.snapshot()[1]["v2"] > 200, 20, "the canary serves its share")
        demo_apps["v2"].kill()  # SIGKILL: no drain, in-flight requests are reset
        # Traffic goes on through every phase: in-flight requests reset, requests before the health check
        # notices (connect failures, retried on stable), and requests after it marks the canary down.
        envoy.wait_stat("cluster.app-v2.health_check.failure", 1, deadline_s=15)
        detected_at = traffic.total()
        wait_until(lambda: traffic.total() > detected_at + 1000, 60, "1000 more requests after detection")
    statuses, served = traffic.snapshot()
    assert traffic.errors == [], traffic.errors[:5]
    assert set(statuses) == {200}, f"non-2xx responses reached users: {statuses}"
    after = Traffic(envoy, clients=2)
    with after:
        wait_until(lambda: after.total() > 200, 20, "200 requests")
    assert set(after.snapshot()[1]) == {"v1"}, after.snapshot()


def test_a_restarted_canary_gets_its_share_back(start_envoy, demo_apps, processes):
    envoy = front(start_envoy, demo_apps)
    conn = envoy.connection()

    def share_matches_spec(users=200) -> bool:
        return all(envoy.get("/", {"x-user-id": f"r{i}"}, conn=conn).served_by ==
                   expected_version("web", f"r{i}", "v1", [("v2", 50)]) for i in range(users))

    assert share_matches_spec()
    with Traffic(envoy, clients=4) as traffic:
        hold = lab.PortHold(port=demo_apps["v2"].port)  # nothing else takes the port while v2 is down
        demo_apps["v2"].stop()  # a clean stop this time (SIGTERM)
        wait_until(lambda: envoy.get("/", {"x-user-id": "r-canary-probe"}, conn=conn).served_by == "v1" and
                   all(envoy.get("/", {"x-user-id": f"r{i}"}, conn=conn).served_by == "v1" for i in range(50)),
                   20, "every user on stable while the canary is down")
        restarted = lab.EnvoyProcess("app-v2-restarted", lab.render_app("v2", demo_apps["v2"].port),
                                     demo_apps["v2"].workdir, workers=1, holds=[hold])
        processes.append(restarted)
        restarted.start().wait_serving(demo_apps["v2"].port)
        wait_until(share_matches_spec, 30, "canary users back on the canary, by the spec")
    statuses, served = traffic.snapshot()
    assert traffic.errors == [] and set(statuses) == {200}, (statuses, traffic.errors[:5])
    assert served["v1"] and served["v2"], served
