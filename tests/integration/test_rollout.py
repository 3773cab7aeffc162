"""Progressive rollouts against real Envoys reporting their load to canaryctl (LRS on the ADS port): a canary
failing a few % behind the fallback is rolled back with no user-visible error; a healthy one is promoted
through every step; a paused rollout stays paused, and a canaryctl killed mid-rollout resumes where it was;
the reports of two Envoys add up to exactly what the apps served."""

import json
import signal
import time
import urllib.request

import pytest

from harness import Traffic
from lab import eventually

ADS = "envoy-ads.yaml"
CLUSTERS = ["--stable-cluster", "app-v1", "--canary-cluster", "app-v2", "--canary-route-cluster", "app-v2-or-v1"]


def config() -> str:
    return json.dumps({"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 0}],
                                     "sticky": {"keys": [{"header": "x-user-id"}]}}]})


def rollout(server, name: str = "web") -> dict:
    return {r["rollout"]: r for r in server.api("/v1/rollouts")["rollouts"]}[name]


def verdict(server, deadline_s: float = 60, interval_s: float = 0.2, what: str = "a verdict") -> dict:
    """Polls the rollout `web` until it is no longer progressing (promoted, rolled back, paused, inconclusive)."""
    return eventually(lambda: (r := rollout(server))["phase"] != "progressing" and r, deadline_s=deadline_s,
                      interval_s=interval_s, what=what)


def canary_percent(server, version: str = "v2") -> tuple[str, str]:
    """The desired percent of `version` as a canary, and the stable version."""
    web = server.status()["desired"]["config"]["rollouts"][0]
    return str({c["version"]: c["percent"] for c in web["canaries"]}.get(version)), web["stable"]


def counter(server, name: str) -> int:
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        text = r.read().decode()
    return int(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def fleet(start_envoy, server, count: int = 2, **kwargs):
    """`count` Envoys on the shipped ADS bootstrap, connected, and streaming load reports and stats (so a
    rollout started now compares latency too)."""
    envoys = [start_envoy(ADS, xds_port=server.xds_port, node_id=f"front-{i}", **kwargs)
              for i in range(1, count + 1)]
    server.wait_envoys(count)
    eventually(lambda: counter(server, "canaryctl_stats_flushes_total") >= count
               and counter(server, "canaryctl_load_reports_total") >= count, what="reports from every Envoy")
    return envoys


# The Python upstreams are not latency-twins: v2, with a tenth of the load, answers on colder connections, so at
# the 1 ms bound their shares of slow requests differ by more than 1.5× now and then. Tests that are not about
# latency tolerate 100× there, so only what they test decides; the latency test uses the default 1.5.
NOT_ABOUT_LATENCY = ["--latency-tolerance", "100"]


def start(server, *args: str):
    if "--latency-tolerance" not in args:
        args = (*NOT_ABOUT_LATENCY, *args)
    result = server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_canary_failing_a_few_percent_behind_the_fallback_is_rolled_back_and_no_user_sees_an_error(
        start_envoy, canaryctl, upstreams):
    upstreams["v2"].fail_rate = 0.05
    server = canaryctl(config())
    envoys = fleet(start_envoy, server)
    with Traffic(envoys[0], clients=3) as one, Traffic(envoys[1], clients=3) as two:
        begun = time.monotonic()
        started = start(server, "--steps", "20,50,100", "--hold", "30s", "--min-canary-requests", "100")
        assert "rollout web: v2 started at step 1/3 (20%)" in started.stdout, started.stdout
        done = verdict(server, deadline_s=60, interval_s=0.2, what="the failing canary rolled back")
        took = time.monotonic() - begun
    assert done["phase"] == "rolled_back", done
    # Users saw nothing: every failed canary attempt was retried on stable.
    for traffic in (one, two):
        statuses, served = traffic.snapshot()
        assert traffic.errors == [] and set(statuses) == {200}, (statuses, traffic.errors[:3])
        assert served["v2"] > 0
    assert upstreams["v2"].failed > 0
    errors = done["evidence"]["errors"]
    assert errors["canary_errors"] >= 3 and errors["stable_errors"] == 0, errors
    assert errors["e_value"] >= errors["threshold"] == 100
    assert done["reason"].startswith("errors ") and "on v2 vs 0.00% on v1" in done["reason"], done["reason"]
    assert "(1/α, α = 0.01: 0.05 over 5 tests) at step 1/3 (20%)" in done["reason"], done["reason"]
    # Within the first step's hold (30 s): it did not wait for the step to end.
    assert took < 30, f"rolled back after {took:.1f}s"
    assert canary_percent(server) == ("0", "v1")
    assert "rolled back: errors" in server.log()
    shown = server.run("rollout", "status", "web")
    assert "rollout web: v2 rolled_back at step 1/3 (20%)" in shown.stdout and "why: errors" in shown.stdout, \
        shown.stdout
    watch = server.run("rollout", "status", "web", "--watch")
    assert watch.returncode == 1, watch.stdout + watch.stderr


def test_a_slower_canary_is_rolled_back_on_latency_against_stable_s_own_distribution(
        start_envoy, canaryctl, upstreams):
    upstreams["v2"].delay_s = 0.03  # 30 ms a request; v1 answers in about 1 ms
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=4) as traffic:
        # Envoy streams its stats every second: stable's latency before the start is the baseline.
        eventually(lambda: upstreams["v1"].app_requests > 1500, deadline_s=30, what="stable's baseline")
        time.sleep(1.5)  # one more stats flush after those requests
        start(server, "--steps", "20,50,100", "--hold", "30s", "--latency-tolerance", "1.5")
        begun = time.monotonic()
        done = verdict(server, deadline_s=60, interval_s=0.2, what="the slow canary rolled back")
        took = time.monotonic() - begun
    statuses, served = traffic.snapshot()
    assert set(statuses) == {200} and served["v2"] > 0, statuses
    assert done["phase"] == "rolled_back", done
    assert done["reason"].startswith("latency: ") and "of v2 requests slower than" in done["reason"], done["reason"]
    assert "(1/α, α = 0.01: 0.05 over 5 tests)" in done["reason"], done["reason"]
    checks = done["latency"]["checks"]
    assert done["latency"]["compared"] and len(checks) >= 1, done["latency"]
    assert any(c["canary_rate"] > 0.9 and c["stable_rate"] < 0.5 for c in checks), checks
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        text = r.read().decode()
    for c in checks:
        assert f'canaryctl_rollout_evidence{{rollout="web",metric="latency_{c["slower_than_us"]}us"}} ' in text, text
        assert f'canaryctl_rollout_evidence_threshold{{rollout="web",metric="latency_{c["slower_than_us"]}us"}} 100\n' \
            in text, text
    assert took < 30, f"rolled back after {took:.1f}s"
    assert canary_percent(server) == ("0", "v1")


def test_a_healthy_canary_is_promoted_through_every_step(start_envoy, canaryctl):
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=4) as traffic:
        start(server, "--steps", "10,50,100", "--hold", "2s", "--min-canary-requests", "50")
        done = eventually(lambda: (r := rollout(server))["phase"] == "promoted" and r, deadline_s=60,
                          interval_s=0.2, what="the healthy canary promoted")
    statuses, served = traffic.snapshot()
    assert set(statuses) == {200} and served["v2"] > 0
    assert canary_percent(server, "v1") == ("0", "v2"), "v2 is stable, v1 a canary at 0 %"
    history = [e["what"] for e in done["history"]]
    assert [h.split(" passed:")[0] for h in history if " passed:" in h] == \
        ["step 1/3 (10%)", "step 2/3 (50%)", "step 3/3 (100%)"], history
    assert history[0] == "started at step 1/3 (10%)" and history[-1] == "promoted: every step passed"
    assert done["evidence"]["errors"]["canary_errors"] == 0
    text = server.run("rollout", "status", "--watch")
    assert text.returncode == 0 and "promoted" in text.stdout
    metrics = server.run("status").stdout  # the plain status still works with a rollout in the state
    assert "rollout web" in metrics


def test_a_paused_rollout_stays_paused_and_a_killed_canaryctl_resumes_where_it_was(start_envoy, canaryctl):
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=3):
        start(server, "--steps", "10,pause,50,100", "--hold", "2s", "--min-canary-requests", "30")
        gate = eventually(lambda: (r := rollout(server))["phase"] == "paused" and r, deadline_s=30,
                          interval_s=0.2, what="held at the gate")
        assert gate["step_name"] == "step 2/4 (pause)" and canary_percent(server)[0] == "10"
        assert "rollout resume web" in gate["reason"]
        # Latency is compared: its bounds, chosen from stable's distribution, are in the state.
        learned = eventually(lambda: (r := rollout(server))["latency"]["checks"] and r["latency"], deadline_s=30,
                             interval_s=0.2, what="the latency bounds chosen")

        # Killed while paused, restarted from its state file: still paused at the gate, and it stays there.
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        server.start()
        server.wait_envoys(1)
        time.sleep(5)  # well past the hold: a paused rollout must not move on its own
        held = rollout(server)
        assert (held["phase"], held["step"], canary_percent(server)[0]) == ("paused", 2, "10"), held
        # The restart kept the latency baseline and bounds, and the evidence went on from where it was.
        kept = held["latency"]
        assert kept["baseline_requests"] == learned["baseline_requests"]
        assert [c["slower_than_us"] for c in kept["checks"]] == [c["slower_than_us"] for c in learned["checks"]]
        assert all(after["canary_requests"] >= before["canary_requests"]
                   for before, after in zip(learned["checks"], kept["checks"])), (learned, kept)
        # Latency is judged again once the step's first canary requests (new connections) are past.
        eventually(lambda: all(c["canary_requests"] > before["canary_requests"] for c, before in
                               zip(rollout(server)["latency"]["checks"], learned["checks"])),
                   deadline_s=60, interval_s=0.5, what="the latency evidence going on after the restart")
        assert rollout(server)["phase"] == "paused"

        resumed = server.run("rollout", "resume", "web")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "rollout web: paused → progressing" in resumed.stdout and "saved as version" in resumed.stdout
        eventually(lambda: rollout(server)["step_name"] == "step 3/4 (50%)", deadline_s=10, what="step 3")

        # Killed mid-step: it resumes at that step with the evidence it had, and finishes.
        before = rollout(server)["evidence"]["errors"]["canary_requests"]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        server.start()
        after = rollout(server)
        assert after["step_name"] == "step 3/4 (50%)" and after["evidence"]["errors"]["canary_requests"] >= before
        eventually(lambda: rollout(server)["phase"] == "promoted", deadline_s=60, interval_s=0.2,
                   what="promoted after the restart")


def test_the_reports_of_two_envoys_add_up_to_what_the_apps_served(start_envoy, canaryctl, upstreams):
    server = canaryctl(config())
    envoys = fleet(start_envoy, server)
    start(server, "--steps", "30,100", "--hold", "1h")
    # Reports in the rollout's warm-up are not counted: send traffic only once it is over.
    counted_from = rollout(server)["counted_from_unix"]
    eventually(lambda: time.time() >= counted_from + 1, deadline_s=10, what="the warm-up over")
    with Traffic(envoys[0], clients=2), Traffic(envoys[1], clients=2):
        eventually(lambda: upstreams["v2"].app_requests > 600, deadline_s=30, what="traffic on both versions")
    served = {v: u.app_requests for v, u in upstreams.items()}

    def counted():
        errors = rollout(server)["evidence"]["errors"]
        return (errors["stable_requests"], errors["canary_requests"]) == (served["v1"], served["v2"])

    eventually(counted, deadline_s=10, interval_s=0.2, what=f"the reports adding up to {served}")
    shares = served["v2"] / (served["v1"] + served["v2"])
    assert 0.2 < shares < 0.4, served  # both Envoys' canary share, about 30 %


@pytest.mark.parametrize("args, message", [
    (["--steps", "5,1"], "steps: 1 after 5: percentages must go up"),
    (["--steps", "5,100", "--false-rollback-budget", "2"], "false-rollback-budget: 2 must be between 0 and 1"),
    (["--steps", "5,x"], "steps"),
])
def test_a_bad_plan_is_refused_with_the_field_named_and_changes_nothing(canaryctl, args, message):
    server = canaryctl(config())
    result = server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert server.api("/v1/rollouts")["rollouts"] == []
    assert server.status()["desired"]["version"] == 1


def test_manual_commands_cannot_fight_a_rollout_and_a_manual_rollback_always_works(start_envoy, canaryctl):
    server = canaryctl(config())
    fleet(start_envoy, server, 1)
    start(server, "--steps", "10,50,100", "--hold", "1h")
    refused = server.run("set", "web", "v2=50")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "a progressive rollout of v2 is progressing at step 1/3 (10%)" in refused.stderr, refused.stderr
    assert "`canaryctl rollout pause|abort|promote web` first" in refused.stderr
    assert server.run("promote", "web", "v1").returncode == 1
    assert canary_percent(server) == ("10", "v1")

    # The operator's rollback at 05:00 wins, and ends the rollout.
    rolled = server.run("rollback", "web")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    done = rollout(server)
    assert done["phase"] == "rolled_back" and done["reason"].startswith("aborted by an operator"), done
    assert canary_percent(server) == ("0", "v1")
    time.sleep(2)  # the controller must not raise it again
    assert canary_percent(server) == ("0", "v1")
    assert server.run("set", "web", "v2=5").returncode == 0, "a finished rollout no longer holds the rollout"
