"""Error signatures from Envoy's access logs (ALS on canaryctl's gRPC port) and from applications' log lines,
canary against stable: a canary that fails only POST /checkout, hidden from users by the fallback and small in
its overall error rate, is rolled back by that signature; an error both versions produce at the same rate is
`known` and rolls nothing back; application lines posted for a version become signatures."""

import json
import os
import threading
import time
import urllib.error
import urllib.request

from harness import Traffic
from lab import eventually
from test_rollout import config, fleet, rollout, start, verdict

# 2 % of requests are POST /checkout/<id>, 30 % GET /flaky/<id>, the rest GET /.
REQUESTS = [("GET", "/")] * 34 + [("GET", f"/flaky/{i}") for i in range(15)] + [("POST", "/checkout/991")]
# Both versions answer 500 to a quarter of /flaky (not retried: users see those), the same rate: noise enough
# that the canary's overall error rate (its checkout failures add 1 %) is slow to tell apart, while its checkout
# signature, on the canary alone, is quick to. (With half of /flaky failing, the shared error was found worse on v2
# in 3 runs of 4, 16-18 % vs 13-14 %: not yet explained; outlier ejection of v2's host, which sends the canary
# route's requests to v1 through the aggregate cluster, is the suspect.)
SHARED = {"GET /flaky": (0.25, 500)}


def post_logs(server, lines: list[dict] | str) -> tuple[int, dict]:
    body = lines if isinstance(lines, str) else "\n".join(json.dumps(line) for line in lines)
    request = urllib.request.Request(f"{server.server}/v1/logs", data=body.encode(), method="POST",
                                     headers={"content-type": "application/x-ndjson"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def signatures(r: dict) -> dict[str, dict]:
    return {f'{s["origin"]} {s["signature"]}': s for s in r["findings"]["signatures"]}


def test_a_canary_failing_one_endpoint_behind_the_fallback_is_rolled_back_by_that_signature(
        start_envoy, canaryctl, upstreams):
    upstreams["v1"].fail_rules = dict(SHARED)
    upstreams["v2"].fail_rules = {**SHARED, "POST /checkout": 0.5}
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 2)
    with Traffic(envoys[0], clients=3, requests=REQUESTS) as one, \
            Traffic(envoys[1], clients=3, requests=REQUESTS) as two:
        start(server, "--steps", "20,50,100", "--hold", "60s", "--min-canary-requests", "100")
        # An application's own error lines, as a log shipper posts them (JSON lines; other fields ignored),
        # once the rollout's warm-up is over (failures before it are not counted).
        counted_from = rollout(server)["counted_from_unix"]
        eventually(lambda: time.time() >= counted_from + 1, deadline_s=10, what="the warm-up over")
        status, answer = post_logs(server, [
            {"version": "v2", "message": "payment 4411 declined for order 3f2a1c9e-8b7d-4e6f-a1b2-c3d4e5f60718",
             "level": "error", "host": "app-2"},
            {"version": "v2", "message": "payment 17 declined for order 00000000-0000-4000-8000-000000000000"},
            {"version": "v1", "message": "cache miss for key 'user:42'", "rollout": "web"},
            {"version": "v2", "message": "started in 1.2s", "level": "info"},
        ])
        assert (status, answer) == (200, {"accepted": 3, "ignored": 1}), answer
        done = verdict(server, deadline_s=90, interval_s=0.2, what="the canary rolled back")
    assert done["phase"] == "rolled_back", done
    reason = done["reason"]
    assert reason.startswith("finding new on v2: attempt POST /checkout/{n} 503 "), reason
    assert "vs 0 on v1" in reason and "in order of arrival" in reason, reason
    found = signatures(done)
    checkout = found["attempt POST /checkout/{n} 503"]
    assert (checkout["class"], checkout["stable"], checkout["rolls_back"]) == ("new", 0, True), checkout
    assert checkout["example"].startswith("POST /checkout/991 → 503"), checkout
    # The overall error rate stayed small: the error test had not decided.
    errors = done["evidence"]["errors"]
    print(f"rolled back by the checkout signature; the errors test at {errors['e_value']:.3g} of "
          f"{errors['threshold']:.0f}")
    assert errors["e_value"] < errors["threshold"], errors
    assert errors["canary_rate"] < 2.5 * errors["stable_rate"], errors
    # The shared error is known on both versions, at similar rates, and rolled nothing back.
    flaky = found["request GET /flaky/{n} 500"]
    assert flaky["class"] == "known" and flaky["stable"] > 0 and flaky["canary"] > 0, flaky
    assert not flaky["rolls_back"]
    # Users saw the shared /flaky 500s, never a failed checkout: the fallback retried those on stable.
    for traffic in (one, two):
        failed = {(m, p, s): n for (m, p, s), n in traffic.outcomes.items() if s >= 500}
        assert failed and all(p.startswith("/flaky/") and s == 500 for (_, p, s) in failed), failed
        assert traffic.errors == []
    assert upstreams["v2"].failed > 0
    # The application's lines are signatures of their own, templated.
    app = found["app payment {n} declined for order {uuid}"]
    assert (app["class"], app["canary"], app["stable"], app["rolls_back"]) == ("new", 2, 0, False), app
    assert found["app cache miss for key '{s}'"]["stable"] == 1
    shown = server.run("rollout", "findings", "web")
    assert shown.returncode == 0, shown.stderr
    assert "attempt POST /checkout/{n} 503" in shown.stdout and "e.g. POST /checkout/991" in shown.stdout, \
        shown.stdout
    as_json = json.loads(server.run("rollout", "findings", "web", "--json").stdout)
    assert as_json["signatures"][0]["signature"] == "POST /checkout/{n} 503", as_json
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        text = r.read().decode()
    assert 'canaryctl_rollout_findings{rollout="web",class="new"} ' in text
    # The findings' gauges are the signature nearest its own threshold: it reached it.
    gauge = {m: float(line.split()[-1]) for line in text.splitlines() for m in ("evidence", "evidence_threshold")
             if line.startswith(f'canaryctl_rollout_{m}{{rollout="web",metric="findings"}} ')}
    assert gauge["evidence"] >= gauge["evidence_threshold"] > 0, gauge


def test_an_error_both_versions_share_is_known_and_a_healthy_canary_is_promoted(start_envoy, canaryctl, upstreams):
    upstreams["v1"].fail_rules = dict(SHARED)
    upstreams["v2"].fail_rules = dict(SHARED)
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=4, requests=REQUESTS):
        start(server, "--steps", "20,50,100", "--hold", "4s", "--min-canary-requests", "100")
        done = verdict(server, deadline_s=90, interval_s=0.2, what="the rollout ended")
    assert done["phase"] == "promoted", done["reason"]
    flaky = signatures(done)["request GET /flaky/{n} 500"]
    assert flaky["class"] == "known" and flaky["stable"] > 10 and flaky["canary"] > 10, flaky
    canary_rate, stable_rate = flaky["canary_rate"], flaky["stable_rate"]
    assert 0.02 < canary_rate < 0.1 and 0.02 < stable_rate < 0.1, flaky


def test_bad_log_lines_are_refused_naming_the_line_and_field_and_nothing_is_counted(canaryctl):
    server = canaryctl(config(), token="s3cret-token")
    lines = [{"version": "v2", "message": "ok line"}, {"message": "no version"}]
    request = urllib.request.Request(f"{server.server}/v1/logs", method="POST",
                                     data="\n".join(json.dumps(x) for x in lines).encode())
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("accepted without the token")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    request.add_header("authorization", "Bearer s3cret-token")
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("a line without a version was accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 400
        message = json.load(err)["error"]
        assert message.startswith("logs: line 2: missing field `version`"), message
    request = urllib.request.Request(f"{server.server}/v1/logs", method="POST", data=b'{"version": "v2", "message": 3}',
                                     headers={"authorization": "Bearer s3cret-token"})
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("a number as message was accepted")
    except urllib.error.HTTPError as err:
        message = json.load(err)["error"]
        assert err.code == 400 and message.startswith("logs: line 1: invalid type") and "(at message)" in message, \
            message
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        assert "canaryctl_app_log_lines_total 0" in r.read().decode()


def letters(i: int) -> str:
    """A word of letters g–z for i: kept whole by the templates (no digits, not hex)."""
    word = ""
    while True:
        word += "ghijklmnopqrstuvwxyz"[i % 20]
        i //= 20
        if not i:
            return word


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:")))


def test_a_flood_of_junk_signatures_first_does_not_crowd_out_the_canary_s_new_failure(
        start_envoy, canaryctl, upstreams):
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=3):
        start(server, "--steps", "20,100", "--hold", "30s", "--min-canary-requests", "50")
        counted_from = rollout(server)["counted_from_unix"]
        eventually(lambda: time.time() >= counted_from + 1, deadline_s=10, what="the warm-up over")
        # 3,000 distinct junk signatures charged to stable, posted first (a runaway or hostile log shipper):
        # more than findings keep in their bytes, and a hundred times the 32 slots an older release had.
        for post in range(3):
            status, answer = post_logs(server, [
                {"version": "v1", "message": f"junk {letters(post * 1000 + i)} " + "x" * 300}
                for i in range(1000)])
            assert (status, answer) == (200, {"accepted": 1000, "ignored": 0}), answer
            time.sleep(1.1)  # one post a tick, as a shipper would
        eventually(lambda: len(rollout(server)["findings"]["signatures"]) >= 32, deadline_s=10, interval_s=0.2,
                   what="the junk among the findings")
        # Then the canary's new failure, which Envoy does not see (every response a 200): its application logs
        # a declined payment a few times a second.
        stop = threading.Event()

        def ship():
            n = 0
            while not stop.is_set():
                n += 1
                post_logs(server, [{"version": "v2", "message": f"payment {n} declined by the gateway"}])
                time.sleep(0.3)

        shipper = threading.Thread(target=ship, daemon=True)
        began = time.monotonic()
        shipper.start()
        try:
            done = verdict(server, deadline_s=60, interval_s=0.2, what="a verdict")
        finally:
            stop.set()
            shipper.join(timeout=5)
        took = time.monotonic() - began
    assert done["phase"] == "rolled_back", (done["phase"], done["reason"])
    reason = done["reason"]
    assert reason.startswith("finding new on v2: app payment {n} declined by the gateway "), reason
    payment = signatures(done)["app payment {n} declined by the gateway"]
    assert payment["arrival"] > 1000 and payment["rolls_back"], payment
    findings = done["findings"]
    # Memory held to its bytes: junk seen only on stable made room.
    assert findings["set_aside"] > 0 and findings["bytes"] <= findings["max_bytes"], findings["bytes"]
    print(f"after {payment['arrival'] - 1} junk signatures ({findings['set_aside']} set aside, "
          f"{findings['untracked']} junk events untracked): rolled back {took:.1f} s after the failure began "
          f"(threshold {payment['threshold']:.3g})")


def test_posted_fields_are_bounded_in_bytes_and_a_flood_keeps_memory_flat(canaryctl):
    server = canaryctl(config())
    pid = server.process.pid
    # The attack an older release fell to: a 1.9 MB version string. Refused whole, in one line.
    status, answer = post_logs(server, [{"version": "v" * 1_900_000, "message": "boom"}])
    assert status == 400 and answer["error"] == "logs: line 1: version: 1900000 bytes, at most 128", answer
    for field, value, limit in (("rollout", "r" * 129, 128), ("level", "e" * 33, 32),
                                ("message", "m" * 16385, 16384)):
        line = {"version": "v2", "message": "boom", field: value}
        status, answer = post_logs(server, [line])
        assert status == 400 and answer["error"] == f"logs: line 1: {field}: {len(value)} bytes, at most {limit}", \
            answer
    # A flood within the bounds: 200 posts of ~2 MB, each line a new signature with the longest fields.
    before = rss_kib(pid)
    peak = before
    for post in range(200):
        lines = [{"version": f"v{post % 7}" * 60, "rollout": "r" * 128, "level": "error",
                  "message": f"flood {letters(post * 190 + i)} " + "m" * 10_000} for i in range(190)]
        status, answer = post_logs(server, lines)
        assert status == 200, answer
        if post % 20 == 0:
            peak = max(peak, rss_kib(pid))
    after = rss_kib(pid)
    peak = max(peak, after)
    print(f"flood of 200 posts x 190 lines (~400 MB): canaryctl RSS {before / 1024:.1f} MB before, "
          f"peak {peak / 1024:.1f} MB, {after / 1024:.1f} MB after")
    # Bounded by the posts in flight and the failures kept between two ticks, not by what was posted.
    assert peak - before < 150 * 1024, (before, peak)
