"""Verdicts that are right, on real Envoys 1.40 with the shipped ADS bootstrap:

- the latency test counts what the load reports count (Envoy's stats stream sends interval histograms, read as
  sent), from the Envoys' streams and from Prometheus;
- equal versions with latency compared are promoted, rollout after rollout;
- a canary whose process dies mid-step is rolled back within seconds, naming its health, from either evidence
  source, while users see no error."""

import json
import os
import statistics
import tempfile
import time

import pytest

from harness import Traffic
from lab import eventually, free_port
from test_rollout import CLUSTERS, config, fleet, rollout, verdict

SELECTOR = 'job="envoy"'


def start(server, *args: str):
    result = server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def reset(server):
    """Back to v1 stable with v2 at 0 %, as before each rollout (a promotion made v2 stable)."""
    path = os.path.join(tempfile.mkdtemp(prefix="reset-"), "config.json")
    with open(path, "w") as f:
        f.write(config())
    result = server.run("apply", "-f", path)
    assert result.returncode == 0, result.stdout + result.stderr


def steady_ticks(server, count: int) -> list[dict]:
    """The rollout's last `count` ticks once that many have both sources' counts."""
    def ready():
        ticks = [t for t in rollout(server)["recent_ticks"] if t["requests"] and t["latency_requests"]]
        return len(ticks) >= count + 3 and ticks[3:][-count:]  # the first ticks straddle the start
    return eventually(ready, deadline_s=count + 30, interval_s=0.5, what=f"{count} ticks with both counts")


def agreement(ticks: list[dict]) -> dict:
    """Per version: the latency ticks' requests over the load reports', in total and per tick (median and
    worst relative difference)."""
    out = {}
    for i, version in enumerate(("stable", "canary")):
        lrs = [t["requests"][i] for t in ticks]
        lat = [t["latency_requests"][i] for t in ticks]
        diffs = [abs(a - b) / b for a, b in zip(lat, lrs) if b]
        out[version] = {"total": sum(lat) / sum(lrs), "median": statistics.median(diffs), "worst": max(diffs)}
    return out


@pytest.mark.parametrize("source", ["envoy", "prometheus"])
def test_the_latency_ticks_count_the_requests_the_load_reports_count(start_envoy, canaryctl, prometheus, source):
    port = free_port()
    server = canaryctl(config(), extra_args=["--prometheus-url", f"http://127.0.0.1:{port}"])
    envoys = fleet(start_envoy, server)
    if source == "prometheus":
        prometheus(envoys, port=port)
    with Traffic(envoys[0], clients=3), Traffic(envoys[1], clients=3):
        extra = ["--evidence", "prometheus", "--prometheus-selector", SELECTOR] if source == "prometheus" else []
        start(server, "--steps", "25,100", "--hold", "1h", "--latency-tolerance", "100", *extra)
        ticks = steady_ticks(server, 20)
    seen = agreement(ticks)
    print(source, json.dumps(seen), ticks[-3:])
    for i, (version, a) in enumerate(seen.items()):
        if source == "envoy":
            # Both Envoys stream every second at their own phase; a report can land on either side of a tick.
            assert 0.98 <= a["total"] <= 1.02, (version, seen, ticks)
            assert a["median"] <= 0.03, (version, seen, ticks)
        else:
            # /stats/prometheus shows a counter as it is now but a histogram as of Envoy's last stats flush
            # (1 s), so each scrape's latency count lags its request count by up to one flush. The per-tick
            # differences telescope: over the window the totals differ by the lag at its two ends, at most
            # one tick's requests (about 5 % of 20 ticks), and no more however long the rollout runs.
            lrs = [t["requests"][i] for t in ticks]
            lat = sum(t["latency_requests"][i] for t in ticks)
            assert abs(lat - sum(lrs)) <= max(lrs), (version, lat, sum(lrs), max(lrs), seen, ticks)
    shares = [t["latency_requests"][1] / sum(t["latency_requests"]) for t in ticks]
    assert all(0.15 < s < 0.35 for s in shares), shares  # 25 % in every tick, not 0.01 then 0.99


def test_equal_versions_with_latency_compared_are_promoted_rollout_after_rollout(start_envoy, canaryctl):
    # A/A: v1 and v2 are the same Python upstream. Before, about one such rollout in ten was rolled back on
    # latency (the stats stream misread); the budget for each latency test is 1 in 100.
    server = canaryctl(config())
    envoys = fleet(start_envoy, server)
    runs, verdicts = 5, []
    with Traffic(envoys[0], clients=3) as one, Traffic(envoys[1], clients=3) as two:
        for _ in range(runs):
            reset(server)
            start(server, "--steps", "20,50,100", "--hold", "5s", "--min-canary-requests", "100")
            done = eventually(lambda: (r := rollout(server))["phase"] in ("promoted", "rolled_back") and r,
                              deadline_s=90, interval_s=0.2, what="the A/A rollout to end")
            verdicts.append(done)
    for traffic in (one, two):
        statuses, _ = traffic.snapshot()
        assert traffic.errors == [] and set(statuses) == {200}, statuses
    summary = [(v["phase"], v["reason"]) for v in verdicts]
    assert all(v["phase"] == "promoted" for v in verdicts), summary
    for v in verdicts:
        checks = v["latency"]["checks"]
        assert v["latency"]["tolerance"] == 1.5 and checks, v["latency"]
        assert all(c["canary_requests"] > 500 for c in checks), checks


@pytest.mark.parametrize("source", ["envoy", "prometheus"])
def test_a_canary_killed_mid_step_is_rolled_back_on_its_health_and_no_user_sees_an_error(
        start_envoy, canaryctl, demo_apps, prometheus, source):
    port = free_port()
    server = canaryctl(config(), extra_args=["--prometheus-url", f"http://127.0.0.1:{port}"])
    apps = {v: app.port for v, app in demo_apps.items()}
    envoys = fleet(start_envoy, server, upstream_ports=apps)
    if source == "prometheus":
        prometheus(envoys, port=port)
    extra = ["--evidence", "prometheus", "--prometheus-selector", SELECTOR] if source == "prometheus" else []
    with Traffic(envoys[0], clients=3) as one, Traffic(envoys[1], clients=3) as two:
        start(server, "--steps", "20,50,100", "--hold", "20s", "--min-canary-requests", "100", *extra)
        # 5 s into the step, with canary traffic judged: kill the canary's process.
        eventually(lambda: (r := rollout(server))["step_canary_requests"] > 200
                   and time.time() >= r["step_started_unix"] + 5, deadline_s=30, interval_s=0.2,
                   what="the canary serving its step")
        demo_apps["v2"].kill()
        killed = time.monotonic()
        done = verdict(server, deadline_s=30, interval_s=0.1, what="the dead canary rolled back")
        took = time.monotonic() - killed
        time.sleep(1)
    assert done["phase"] == "rolled_back", done
    # Down on every Envoy for 5 s rolls back ("canary unhealthy: 0 of 1 hosts healthy on 2 of 2 Envoys for 5 s").
    # The requests in flight when it died, and the connections refused before Envoy ejected it, may bring the
    # error (or latency) test to its threshold first: the line then still leads with the canary's health, as
    # far as the Envoys had reported it ("… on 1 of 2 Envoys: no healthy host there; errors …").
    assert done["reason"].startswith("canary unhealthy"), done["reason"]
    assert done["reason"].endswith("at step 1/3 (20%)"), done["reason"]
    assert took <= 10, f"rolled back {took:.1f} s after the kill"
    assert not any(" passed:" in e["what"] for e in done["history"]), done["history"]
    for traffic in (one, two):
        statuses, served = traffic.snapshot()
        assert traffic.errors == [] and set(statuses) == {200}, (statuses, traffic.errors[:3])
        assert served["v2"] > 0
    assert done["latency"]["compared"], "latency is compared from either source"
    print(source, f"rolled back {took:.1f} s after the kill: {done['reason']}", [e["what"] for e in done["history"]])
