"""Notifications (`serve --notify`) from rollouts judged on real Envoys' reports: each change of a rollout is
posted once, in order, signed; a receiver down for 30 s gets every event afterwards; a receiver that hangs
never slows a rollback; a receiver for one rollout gets only that rollout's events, in Slack's form when asked."""

import os
import re
import time
import urllib.request

from harness import Traffic
from lab import Receiver, eventually, free_port
from test_rollout import CLUSTERS, NOT_ABOUT_LATENCY, config, fleet, rollout, start, verdict

TOKEN = "admin-token-0123"

SECRET = b"a-test-secret-of-32-bytes-length"


def secret_file(tmp_path) -> str:
    path = os.path.join(tmp_path, "notify-secret")
    with open(path, "wb") as f:
        f.write(SECRET + b"\n")
    return path


def metric(server, name: str, target: str) -> int:
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        text = r.read().decode()
    pattern = re.compile(rf'^{name}\{{target="{re.escape(target)}"\}} (\d+)$', re.M)
    found = pattern.search(text)
    assert found, f"{name} of {target} not in /metrics:\n{text}"
    return int(found.group(1))


def test_each_change_of_a_rollout_is_posted_once_in_order_signed_and_naming_the_operator(
        start_envoy, canaryctl, tmp_path):
    every = Receiver(secret=SECRET)
    slack = Receiver(secret=SECRET)
    other = Receiver(secret=SECRET)
    try:
        server = canaryctl(config(), token=TOKEN, extra_args=[
            "--notify", every.url + "/hooks/all",
            "--notify", f"rollout=web,format=slack,url={slack.url}/services/T0/B0/secret-path",
            "--notify", f"rollout=api,url={other.url}/",
            "--notify-secret-file", secret_file(tmp_path)])
        envoys = fleet(start_envoy, server, 1)
        with Traffic(envoys[0], clients=3):
            started = server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *NOT_ABOUT_LATENCY,
                                 "--steps", "20,pause,100", "--hold", "3s", "--min-canary-requests", "20", token=TOKEN)
            assert started.returncode == 0, started.stdout + started.stderr
            paused = verdict(server, deadline_s=60, what="the gate")
            assert paused["phase"] == "paused" and paused["step"] == 2, paused
            resumed = server.run("rollout", "resume", "web", token=TOKEN)
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            done = verdict(server, deadline_s=60, what="the promotion")
        assert done["phase"] == "promoted", done
        kinds = ["started", "step_passed", "paused", "resumed", "step_passed", "promoted"]
        events = eventually(lambda: len(every.bodies()) >= len(kinds) and every.bodies(), deadline_s=20,
                            what="every event delivered")
        time.sleep(1.5)  # nothing more comes: each change once
        events = every.bodies()
        assert [e["event"] for e in events] == kinds, [e["text"] for e in events]
        assert [e["seq"] for e in events] == list(range(1, len(kinds) + 1))
        assert len({e["id"] for e in events}) == len(kinds)
        assert all(e["version"] == 1 and e["rollout"] == "web" and e["canary"] == "v2" and e["stable"] == "v1"
                   for e in events), events
        # Signed: verified by Python's hmac over the exact body, every one.
        assert every.bad_signatures == 0 and all(e["verified"] for e in every.events)
        assert all(e["headers"]["x-canaryctl-delivery"] == e["body"]["id"] for e in every.events)
        # The operator's changes name the token (never the token itself) and where they came from; the
        # judge's name nobody.
        by = {e["event"] + str(e["seq"]): e["by"] for e in events}
        assert by["started1"]["token"] == "admin" and by["started1"]["address"].startswith("127.0.0.1:"), by
        assert by["resumed4"]["token"] == "admin" and by["step_passed5"]["token"] == "admin", by
        assert by["step_passed2"] is None and by["paused3"] is None and by["promoted6"] is None, by
        assert events[1]["passed_step_name"] == "step 1/3 (20%)", events[1]
        assert events[2]["reason"].startswith("step 2/3 (pause): a manual gate"), events[2]
        assert events[5]["reason"] == "every step passed" and events[5]["phase"] == "promoted", events[5]
        for e in every.events:
            assert TOKEN not in str(e), e
        # The Slack-form target of rollout web: the same events as one line of text each.
        texts = eventually(lambda: len(slack.bodies()) >= len(kinds) and slack.bodies(), deadline_s=20,
                           what="the Slack-form events")
        assert [set(t) for t in texts] == [{"text"}] * len(kinds), texts
        assert texts[0]["text"] == "rollout web: v2 started against v1 at step 1/3 (20%) " \
                                   "(by an operator with the admin token from " + by["started1"]["address"] + ")"
        assert texts[-1]["text"] == "rollout web: v2 promoted, now stable: every step passed", texts[-1]
        # The other rollout's target got nothing.
        assert other.events == []
        assert metric(server, "canaryctl_notifications_sent_total", "#1 127.0.0.1:" + str(every.port)) == 6
        assert metric(server, "canaryctl_notifications_waiting", "#3 127.0.0.1:" + str(other.port)) == 0
        # The log names a target by host, never by its path (a webhook's secret).
        assert "secret-path" not in server.log() and "notify #2 127.0.0.1:" in server.log(), server.log()
    finally:
        for receiver in (every, slack, other):
            receiver.close()


def test_a_receiver_down_30s_gets_every_event_after_and_one_that_hangs_never_slows_a_rollback(
        start_envoy, canaryctl, upstreams, tmp_path):
    upstreams["v2"].fail_rate = 0.05
    down_port = free_port()
    hanging = Receiver(secret=SECRET, hang=True)
    late = None
    try:
        server = canaryctl(config(), extra_args=[
            "--notify", f"http://127.0.0.1:{down_port}/",
            "--notify", hanging.url,
            "--notify-secret-file", secret_file(tmp_path)])
        envoys = fleet(start_envoy, server, 2)
        down_since = time.monotonic()
        with Traffic(envoys[0], clients=3), Traffic(envoys[1], clients=3):
            begun = time.monotonic()
            start(server, "--steps", "20,50,100", "--hold", "30s", "--min-canary-requests", "100")
            done = verdict(server, deadline_s=60, what="the failing canary rolled back")
            took = time.monotonic() - begun
        assert done["phase"] == "rolled_back", done
        # As fast as without notifications (test_rollout: within the first step's 30 s hold), though one
        # receiver has held every attempt for its whole 5 s timeout since the start.
        assert took < 30, f"rolled back after {took:.1f}s"
        assert metric(server, "canaryctl_notifications_sent_total", f"#2 127.0.0.1:{hanging.port}") == 0
        assert metric(server, "canaryctl_notifications_waiting", f"#2 127.0.0.1:{hanging.port}") == 2
        assert metric(server, "canaryctl_notifications_failed_total", f"#1 127.0.0.1:{down_port}") >= 1
        assert metric(server, "canaryctl_notifications_waiting", f"#1 127.0.0.1:{down_port}") == 2
        # The first receiver comes up 30 s after its target went silent, and gets both events, once, in order.
        time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
        late = Receiver(secret=SECRET, port=down_port)
        up = time.monotonic()
        events = eventually(lambda: len(late.bodies()) >= 2 and late.bodies(), deadline_s=20,
                            what="the events after the receiver came up")
        after = time.monotonic() - up
        time.sleep(1.5)
        events = late.bodies()
        assert [e["event"] for e in events] == ["started", "rolled_back"], events
        assert late.bad_signatures == 0 and all(e["verified"] for e in late.events)
        rolled_back = events[1]
        assert rolled_back["reason"] == done["reason"] and rolled_back["reason"].startswith("errors "), rolled_back
        assert rolled_back["by"] is None and rolled_back["step_name"] == "step 1/3 (20%)", rolled_back
        # Retried every 10 s at most once failing: delivered within one backoff of coming up.
        assert after < 12, f"delivered {after:.1f}s after the receiver came up"
        assert metric(server, "canaryctl_notifications_sent_total", f"#1 127.0.0.1:{down_port}") == 2
        assert metric(server, "canaryctl_notifications_dropped_total", f"#1 127.0.0.1:{down_port}") == 0
        # The hanging receiver: every attempt timed out (5 s each), both events still wait, nothing dropped.
        assert metric(server, "canaryctl_notifications_failed_total", f"#2 127.0.0.1:{hanging.port}") >= 3
        assert metric(server, "canaryctl_notifications_sent_total", f"#2 127.0.0.1:{hanging.port}") == 0
        assert metric(server, "canaryctl_notifications_waiting", f"#2 127.0.0.1:{hanging.port}") == 2
        log = server.log()
        assert f"notify #1 127.0.0.1:{down_port}: event web/" in log and "trying again with backoff" in log, log
        assert f"notify #1 127.0.0.1:{down_port}: delivering again after" in log, log
        assert rollout(server)["phase"] == "rolled_back"
        # The figures behind the closing note.
        print(f"\nrolled back {took:.1f}s after the start with a hanging receiver; the receiver down 30 s got both "
              f"events {after:.1f}s after it came up")
    finally:
        hanging.close()
        if late is not None:
            late.close()
