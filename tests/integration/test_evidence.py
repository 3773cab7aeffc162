"""A verdict you can trust, on real Envoys 1.40 with the shipped ADS bootstrap: no step passes, and nothing is
promoted, on evidence that does not cover it.

- An outage of the evidence source in the last step (the Envoys' report streams held back by a partitioned
  network, or Prometheus stopped) while the canary begins to fail: the rollout waits and names what is
  missing, is never promoted, and is rolled back once the evidence returns.
- One Envoy of two partitioned (canaryctl's keepalive then closes its streams): the step is held and the Envoy
  named; a rollback it cannot apply is reported by
  `rollout status --watch` with exit 3, naming it, until it applies it.
- No number breaks it: a load report of 2^64-1 is refused and counted, the evidence stays finite and the state
  restarts; a state file that holds a non-finite number (an older release's) is recovered with a clear line.
- A rollback always lands: with the state on a full filesystem, a failing canary is rolled back as fast as
  ever, the state is saved once space returns, and a restart from the older state holds the fleet where it is
  until an operator writes."""

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from harness import Relay, Traffic
import lab
from lab import eventually, free_port
from test_rollout import ADS, config, counter, rollout, start, verdict

SELECTOR = 'job="envoy"'


def connected(server, envoys: int):
    server.wait_envoys(envoys)
    eventually(lambda: counter(server, "canaryctl_stats_flushes_total") >= envoys
               and counter(server, "canaryctl_load_reports_total") >= envoys, what="reports from every Envoy")


def still_progressing(server, seconds: float) -> dict:
    """Polls the rollout for `seconds`: it must stay progressing (never promoted) all along."""
    until = time.monotonic() + seconds
    while True:
        r = rollout(server)
        assert r["phase"] == "progressing", (r["phase"], r["reason"], [e["what"] for e in r["history"]])
        if time.monotonic() >= until:
            return r
        time.sleep(0.5)


@pytest.mark.parametrize("source", ["envoy", "prometheus"])
def test_an_evidence_outage_in_the_last_step_never_promotes_a_canary_that_began_failing_in_it(
        start_envoy, canaryctl, upstreams, prometheus, source):
    port = free_port()
    server = canaryctl(config(), extra_args=["--prometheus-url", f"http://127.0.0.1:{port}"])
    relay = Relay(server.xds_port)
    envoy = start_envoy(ADS, xds_port=relay.port, node_id="front-1")
    connected(server, 1)
    scraper = prometheus([envoy], port=port) if source == "prometheus" else None
    extra = ["--evidence", "prometheus", "--prometheus-selector", SELECTOR] if source == "prometheus" else []
    try:
        with Traffic(envoy, clients=3) as traffic:
            # The last step at 50 %: at 100 % stable serves nothing to compare with on Prometheus's per-cluster
            # counters (the retries of the canary's failures are charged to the aggregate cluster).
            start(server, "--steps", "20,50", "--hold", "10s", "--min-canary-requests", "50", *extra)
            eventually(lambda: (r := rollout(server))["step_name"] == "step 2/2 (50%)" and r["step_canary_requests"] >= 200,
                       deadline_s=60, interval_s=0.2, what="the last step under way")
            # The evidence goes silent, and the canary begins to fail 20 % of its requests.
            if source == "envoy":
                relay.partition()
            else:
                os.kill(scraper.process.pid, signal.SIGSTOP)
            upstreams["v2"].fail_rate = 0.2
            # Three holds without evidence: never promoted; it waits, and says what it waits for.
            held = still_progressing(server, 30)
            assert held["step_name"] == "step 2/2 (50%)", held["step_name"]
            assert held["step_covered_s"] < 10, held["step_covered_s"]
            missing = held["evidence_gap"]["missing"]
            # canaryctl's keepalive closes the silent Envoy's streams within seconds: "no load report", then
            # "not connected".
            wanted = '"front-1" (edge): ' if source == "envoy" else "Prometheus: no answer"
            assert any(m.startswith(wanted) for m in missing), missing
            shown = server.run("rollout", "status", "web")
            assert "waiting for evidence since" in shown.stdout and wanted in shown.stdout, shown.stdout
            # The evidence returns: the failure it shows rolls the canary back.
            healed = time.monotonic()
            if source == "envoy":
                relay.heal()
            else:
                os.kill(scraper.process.pid, signal.SIGCONT)
            done = verdict(server, deadline_s=30, interval_s=0.2, what="a verdict once the evidence is back")
            took = time.monotonic() - healed
    finally:
        relay.heal()
        if scraper:
            os.kill(scraper.process.pid, signal.SIGCONT)
    print([(e["at_unix"] % 1000, e["what"]) for e in done["history"]])
    print([(t["at_unix"] % 1000, t["requests"], t["routed"], t["served"]) for t in done["recent_ticks"]])
    assert done["phase"] == "rolled_back", (done["phase"], done["reason"])
    # By its errors or its new error signature (whichever reaches its threshold first on what returned), led by its
    # health when Envoy ejected the failing host meanwhile ("canary unhealthy: …; errors …").
    assert "errors " in done["reason"] or "finding new on v2" in done["reason"], done["reason"]
    assert not any(e["what"].startswith("promoted") for e in done["history"])
    history = [e["what"] for e in done["history"]]
    assert any(h.startswith("waiting for evidence: ") and wanted in h for h in history), history
    statuses, _ = traffic.snapshot()
    assert set(statuses) == {200}, statuses
    print(source, f"rolled back {took:.1f} s after the evidence returned: {done['reason']}")


def test_a_partitioned_envoy_holds_the_step_is_named_and_a_rollback_it_missed_exits_3(
        start_envoy, canaryctl, upstreams):
    server = canaryctl(config())
    relay = Relay(server.xds_port)
    direct = start_envoy(ADS, xds_port=server.xds_port, node_id="front-1")
    cut = start_envoy(ADS, xds_port=relay.port, node_id="front-2")
    connected(server, 2)
    try:
        with Traffic(direct, clients=3), Traffic(cut, clients=3):
            start(server, "--steps", "20,100", "--hold", "5s", "--min-canary-requests", "50")
            eventually(lambda: rollout(server).get("step_covered_s", 1) >= 1, deadline_s=15, what="evidence from both")
            relay.partition()
            # Four holds: front-1's evidence alone does not pass the step.
            held = still_progressing(server, 20)
            assert held["step_name"] == "step 1/2 (20%)", held["step_name"]
            fleet = held["fleet"]
            assert sorted(e["node_id"] for e in fleet["envoys"]) == ["front-1", "front-2"], fleet
            assert fleet["clusters"] == ["edge"], fleet
            missing = held["evidence_gap"]["missing"]
            assert any(m.startswith('"front-2" (edge): ') for m in missing), missing
            assert not any("front-1" in m for m in missing), missing
            shown = server.run("rollout", "status", "web")
            assert '"front-2" (edge): ' in shown.stdout and "waiting for evidence since" in shown.stdout, shown.stdout

            # The operator rolls back: front-1 applies it, front-2 cannot.
            aborted = server.run("rollout", "abort", "web", "--no-wait")
            assert aborted.returncode == 0, aborted.stdout + aborted.stderr
            watch = server.run("rollout", "status", "web", "--watch")
            assert watch.returncode == 3, (watch.returncode, watch.stdout, watch.stderr)
            assert "did not reach every Envoy of its fleet" in watch.stderr, watch.stderr
            assert '"front-2" (edge): ' in watch.stderr and "has not applied" in watch.stderr, watch.stderr
            assert "front-1" not in watch.stderr, watch.stderr
            ended = rollout(server)["fleet"]
            assert not ended["applied_everywhere"], ended
            assert [e["node_id"] for e in ended["not_applied"]] == ["front-2"], ended

            # Healed: front-2 applies the rollback, and the watch says rolled back.
            relay.heal()
            eventually(lambda: rollout(server)["fleet"]["applied_everywhere"], deadline_s=30,
                       what="front-2 applying the rollback")
            watch = server.run("rollout", "status", "web", "--watch")
            assert watch.returncode == 1 and "rolled back" in watch.stderr, (watch.returncode, watch.stderr)
    finally:
        relay.heal()


FORGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "target", "release", "examples", "forge_report")


def forge(server, node: str, cluster: str, ok: int, errors: int = 0):
    """One load report on canaryctl's gRPC port, as a hostile or broken peer would send it."""
    sent = subprocess.run([FORGE, f"127.0.0.1:{server.xds_port}", node, "edge", cluster, str(ok), str(errors)],
                          capture_output=True, text=True, timeout=30)
    assert sent.returncode == 0 and "sent" in sent.stdout, sent.stdout + sent.stderr


def test_a_report_of_2_64_is_refused_and_counted_the_evidence_stays_finite_and_a_restart_is_clean(
        start_envoy, canaryctl, upstreams):
    upstreams["v2"].fail_rate = 0.05
    server = canaryctl(config())
    envoy = start_envoy(ADS, xds_port=server.xds_port, node_id="front-1")
    connected(server, 1)
    with Traffic(envoy, clients=3):
        start(server, "--steps", "20,100", "--hold", "1h", "--min-canary-requests", "50")
        counted_from = rollout(server)["counted_from_unix"]
        eventually(lambda: time.time() >= counted_from + 1, deadline_s=10, what="the warm-up over")
        # Before the canary's errors are enough evidence: stable "served" 2^64-1 requests, under the real
        # Envoy's own node id.
        forge(server, "front-1", "app-v1", 2**64 - 1)
        forge(server, "front-1", "app-v2", 2**63, 2**63)
        done = verdict(server, deadline_s=60, interval_s=0.2, what="the failing canary rolled back")
    assert done["phase"] == "rolled_back" and "errors " in done["reason"], done["reason"]
    errors = done["evidence"]["errors"]
    assert errors["stable_requests"] < 10**7 and errors["e_value"] >= errors["threshold"], errors
    metrics = server.run("status").returncode == 0 and urllib.request.urlopen(f"{server.server}/metrics").read().decode()
    refused = re.search(r'^canaryctl_reports_refused_total\{reason="implausible"\} (\d+)$', metrics, re.M)
    with open(server.state_path) as f:
        saved = json.load(f)["rollouts"][0]["errors"]
    assert all(isinstance(x, float) for x in saved["log_likelihood"]), saved
    # Killed and restarted from that state: it starts, and the rollout is as it was.
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    server.start()
    assert rollout(server)["phase"] == "rolled_back"
    assert refused and refused.group(1) == "2", "both reports refused and counted"
    assert 'refused a report of "front-1": 18446744073709551615 requests of "app-v1" in 1s' in server.log()


def test_a_report_from_a_node_without_an_ads_stream_is_refused_counted_listed_and_changes_no_verdict(
        start_envoy, canaryctl, upstreams):
    upstreams["v2"].fail_rate = 0.05
    server = canaryctl(config())
    envoy = start_envoy(ADS, xds_port=server.xds_port, node_id="front-1")
    connected(server, 1)
    stop = threading.Event()
    sent = []

    def flood():
        # A local process (no mTLS on loopback) posing as an Envoy of the fleet's cluster, with no ADS stream:
        # half a million successful canary requests a report.
        while not stop.is_set():
            forge(server, "ghost-1", "app-v2", 500_000)
            sent.append(1)

    with Traffic(envoy, clients=3):
        forger = threading.Thread(target=flood, daemon=True)
        forger.start()
        try:
            eventually(lambda: len(sent) >= 2, deadline_s=30, what="the forger under way")
            start(server, "--steps", "20,100", "--hold", "30s", "--min-canary-requests", "50")
            done = verdict(server, deadline_s=60, interval_s=0.2, what="a verdict")
            # Not evidence from its first report; refused and listed once it has kept reporting without an ADS
            # stream for the grace an Envoy's own streams get (10 s).
            refused = eventually(lambda: {r["reason"]: r for r in server.status()["refused"]}.get("no_ads_subscription"),
                                 deadline_s=30, interval_s=0.2, what="the forger refused and listed")
        finally:
            stop.set()
            forger.join(timeout=10)
    assert done["phase"] == "rolled_back" and "errors " in done["reason"], (done["phase"], done["reason"])
    errors = done["evidence"]["errors"]
    assert errors["canary_requests"] < upstreams["v2"].app_requests + 100, (errors, upstreams["v2"].app_requests)
    assert refused["node_id"] == "ghost-1" and refused["count"] >= 1, refused
    assert refused["message"] == ('a load report from node "ghost-1" of cluster "edge": no ADS stream holds that '
                                  'node and cluster, so it is not evidence'), refused
    metrics = urllib.request.urlopen(f"{server.server}/metrics").read().decode()
    counted = re.search(r'^canaryctl_reports_refused_total\{reason="no_ads_subscription"\} (\d+)$', metrics, re.M)
    assert counted and int(counted.group(1)) >= 1, metrics
    shown = server.run("status").stdout
    assert "no_ads_subscription" in shown and "ghost-1" in shown, shown
    # The real Envoy's own reports were never refused.
    assert 'node "front-1"' not in json.dumps(server.status()["refused"])


def test_a_state_file_holding_a_non_finite_number_is_recovered_with_a_clear_line(start_envoy, canaryctl):
    # What an older release saved after a wrapped count: `null` for a number. It starts, pauses the rollout
    # for an operator, and says so.
    server = canaryctl(config())
    envoy = start_envoy(ADS, xds_port=server.xds_port, node_id="front-1")
    connected(server, 1)
    with Traffic(envoy, clients=2):
        start(server, "--steps", "20,100", "--hold", "1h", "--min-canary-requests", "50")
        eventually(lambda: rollout(server)["evidence"]["errors"]["ticks"] >= 2, deadline_s=20, what="evidence")
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    with open(server.state_path) as f:
        state = json.load(f)
    state["rollouts"][0]["errors"]["log_likelihood"][0] = None
    with open(server.state_path, "w") as f:
        json.dump(state, f)
    server.start()
    r = rollout(server)
    assert r["phase"] == "paused", r["phase"]
    assert "its errors evidence was not a finite number in the state file, and starts over" in r["reason"], r["reason"]
    assert "rollout web: its errors evidence was not a finite number" in server.log()
    assert r["evidence"]["errors"]["e_value"] == 1.0


def v2_served_while(traffic, seconds: float) -> tuple[int, int]:
    """Requests served by v2 and by v1 over the next `seconds` of traffic."""
    _, before = traffic.snapshot()
    time.sleep(seconds)
    _, after = traffic.snapshot()
    return after["v2"] - before["v2"], after["v1"] - before["v1"]


def test_a_full_disk_never_keeps_users_on_a_failing_canary_and_a_restart_from_the_older_state_holds(
        start_envoy, canaryctl, upstreams, processes):
    server = canaryctl(config(), state_fs_bytes=1 << 20)
    envoy = start_envoy(ADS, xds_port=server.xds_port, node_id="front-1")
    connected(server, 1)
    on_disk = server.state_fs("canaryctl-state.json")
    with Traffic(envoy, clients=3) as traffic:
        start(server, "--steps", "20,100", "--hold", "10m", "--min-canary-requests", "50")
        eventually(lambda: rollout(server)["step_canary_requests"] >= 100, deadline_s=30, interval_s=0.2,
                   what="the first step under way")
        step_version = server.wait_envoys(1)["desired"]["version"]
        # The state's filesystem fills up, and the canary begins to fail.
        server.fill_state_fs()
        failing = time.monotonic()
        upstreams["v2"].fail_rate = 0.2
        done = verdict(server, deadline_s=60, interval_s=0.1, what="a verdict with the disk full")
        assert done["phase"] == "rolled_back", (done["phase"], done["reason"])
        back = server.status()["desired"]["version"]
        server.wait_envoys(1, version=back)
        took = time.monotonic() - failing
        v2, v1 = v2_served_while(traffic, 2)
        assert v2 == 0 and v1 > 0, (v2, v1)
        # Said everywhere: the status, the CLI, /metrics, the log.
        state = server.status()["state"]
        assert state["saved"] is False and "No space left on device" in state["reason"], state
        shown = server.run("status")
        assert "state not saved since" in shown.stdout and "No space left on device" in shown.stdout, shown.stdout
        assert counter(server, "canaryctl_state_saved") == 0
        assert counter(server, "canaryctl_state_save_failures_total") >= 1
        assert re.search(r"rollout web: rolled_back \(version \d+, pushed, NOT saved\)", server.log()), server.log()
        # What would add canary traffic is refused while unsaved, naming why.
        refused = server.run("rollout", "start", "web", "--canary", "v2", "--steps", "50", "--stable-cluster",
                             "app-v1", "--canary-cluster", "app-v2")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "state not saved since" in refused.stderr and "cannot start a rollout" in refused.stderr, refused.stderr
        # The file still holds the step: a restart now would start from it.
        older = open(on_disk, "rb").read()
        assert json.loads(older)["version"] == step_version
        # Space returns: saved within a few seconds, with the rollback.
        server.free_state_fs()
        eventually(lambda: server.status()["state"]["saved"], deadline_s=5, interval_s=0.1, what="the state saved")
        saved = json.load(open(on_disk))
        assert saved["version"] == back and saved["rollouts"][0]["phase"] == "rolled_back", saved["version"]
        assert "state saved again" in server.log()
        assert counter(server, "canaryctl_state_saved") == 1

        # canaryctl restarts from the older state (as if it had died before the disk came back): the Envoy
        # says it serves version `back`, newer than the state's, so nothing is pushed and nothing moves.
        server.stop()
        with open(server.state_path.replace(server.state_dir, server.workdir), "wb") as f:
            f.write(older)
        restarted = lab.Canaryctl(server.workdir, xds_port=server.xds_port, admin_port=server.admin_port)
        processes.append(restarted)
        restarted.start()
        hold = eventually(lambda: restarted.status()["hold"], deadline_s=30, interval_s=0.1,
                          what="the hold on a fleet ahead of the state")
        assert (hold["fleet_version"], hold["state_version"], hold["node_id"]) == (back, step_version, "front-1"), hold
        v2, v1 = v2_served_while(traffic, 3)
        assert v2 == 0 and v1 > 0, (v2, v1)
        held = rollout(restarted)
        assert held["phase"] == "progressing" and held["held"].startswith("holding: "), held.get("held")
        shown = restarted.run("status")
        assert 'holding: Envoy "front-1" (edge) serves version' in shown.stdout, shown.stdout
        assert counter(restarted, "canaryctl_fleet_ahead") == 1
        assert "holding: " in restarted.log()
        # The operator's word: a rollback, saved and pushed past the fleet's version; the hold ends.
        word = restarted.run("rollout", "abort", "web")
        assert word.returncode == 0, word.stdout + word.stderr
        now = restarted.wait_envoys(1)["desired"]["version"]
        assert now > back, (now, back)
        assert restarted.status()["hold"] is None
        assert counter(restarted, "canaryctl_fleet_ahead") == 0
        v2, _ = v2_served_while(traffic, 1)
        assert v2 == 0
    statuses, _ = traffic.snapshot()
    assert set(statuses) == {200}, statuses
    print(f"full disk: rolled back and applied {took:.1f} s after the canary began failing")
