"""Error signatures from Envoy's access logs (ALS on canaryctl's gRPC port) and from applications' log lines,
canary against stable: a canary that fails only POST /checkout, hidden from users by the fallback and small in
its overall error rate, is rolled back by that signature; an error both versions produce at the same rate is
`known` and rolls nothing back; application lines posted for a version become signatures."""

import json
import time
import urllib.error
import urllib.request

from harness import Traffic
from lab import eventually
from test_rollout import config, fleet, rollout, start

# 2 % of requests are POST /checkout/<id>, 30 % GET /flaky/<id>, the rest GET /.
REQUESTS = [("GET", "/")] * 34 + [("GET", f"/flaky/{i}") for i in range(15)] + [("POST", "/checkout/991")]
# Both versions answer 500 to 10 % of /flaky (not retried: users see those), the same rate.
SHARED = {"GET /flaky": (0.10, 500)}


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
        done = eventually(lambda: (r := rollout(server))["phase"] != "progressing" and r, deadline_s=90,
                          interval_s=0.2, what="the canary rolled back")
    assert done["phase"] == "rolled_back", done
    reason = done["reason"]
    assert reason.startswith("finding new on v2: attempt POST /checkout/{n} 503 "), reason
    assert "vs 0 on v1" in reason and "over 32 signatures" in reason, reason
    found = signatures(done)
    checkout = found["attempt POST /checkout/{n} 503"]
    assert (checkout["class"], checkout["stable"], checkout["rolls_back"]) == ("new", 0, True), checkout
    assert checkout["example"].startswith("POST /checkout/991 → 503"), checkout
    # The overall error rate stayed small: the error test had not decided.
    errors = done["evidence"]["errors"]
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
    assert 'canaryctl_rollout_evidence_threshold{rollout="web",metric="findings"} 3200' in text, text


def test_an_error_both_versions_share_is_known_and_a_healthy_canary_is_promoted(start_envoy, canaryctl, upstreams):
    upstreams["v1"].fail_rules = dict(SHARED)
    upstreams["v2"].fail_rules = dict(SHARED)
    server = canaryctl(config())
    envoys = fleet(start_envoy, server, 1)
    with Traffic(envoys[0], clients=4, requests=REQUESTS):
        start(server, "--steps", "20,50,100", "--hold", "4s", "--min-canary-requests", "100")
        done = eventually(lambda: (r := rollout(server))["phase"] != "progressing" and r, deadline_s=90,
                          interval_s=0.2, what="the rollout ended")
    assert done["phase"] == "promoted", done["reason"]
    flaky = signatures(done)["request GET /flaky/{n} 500"]
    assert flaky["class"] == "known" and flaky["stable"] > 10 and flaky["canary"] > 10, flaky
    canary_rate, stable_rate = flaky["canary_rate"], flaky["stable_rate"]
    assert 0.01 < canary_rate < 0.06 and 0.01 < stable_rate < 0.06, flaky


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
