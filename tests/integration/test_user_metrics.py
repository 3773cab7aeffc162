"""Your own metrics in the judgment (`rollout start --metric`): a real Prometheus (Debian's) scrapes the apps'
business counters per version (payments and declined payments: every answer is a 200) and the Envoys. A canary
whose payments are declined three times as often is rolled back by that metric, while Envoy sees no error; an
equal one is promoted. A query Prometheus refuses is refused at the start, naming the metric."""

import tempfile
import urllib.request

from harness import Traffic
from lab import eventually, free_port
from test_rollout import CLUSTERS, NOT_ABOUT_LATENCY, config, fleet, rollout
from test_rollout_prometheus import reset

DECLINES = ["--metric", 'declines=payments_declined_total{job="app",version="{version}"}',
            "--metric-requests", 'declines=payments_total{job="app",version="{version}"}']


def start(server, *args: str):
    return server.run("rollout", "start", "web", "--canary", "v2", *CLUSTERS, *NOT_ABOUT_LATENCY, *args)


def ended(server, deadline_s: float) -> dict:
    return eventually(lambda: (r := rollout(server))["phase"] in ("promoted", "rolled_back") and r,
                      deadline_s=deadline_s, interval_s=0.2, what="the rollout to end")


def test_a_canary_declining_payments_three_times_as_often_is_rolled_back_by_that_metric_and_an_equal_one_promoted(
        start_envoy, canaryctl, upstreams, prometheus):
    workdir = tempfile.mkdtemp(prefix="user-metrics-")
    port = free_port()
    server = canaryctl(config(), extra_args=["--prometheus-url", f"http://127.0.0.1:{port}"])
    envoys = fleet(start_envoy, server, 1)
    scraper = prometheus(envoys, port=port, apps=list(upstreams.values()))
    # A query Prometheus cannot parse is refused at the start, naming the metric; nothing starts.
    bad = start(server, "--steps", "20,100", "--metric", "declines=payments_declined_total{version=\"{version}\"",
                "--metric-requests", 'declines=payments_total{version="{version}"}')
    assert bad.returncode == 1 and "metric declines: Prometheus:" in bad.stderr, bad.stdout + bad.stderr
    unpaired = start(server, "--steps", "20,100", "--metric", 'declines=x{version="{version}"}')
    assert unpaired.returncode == 1 and "--metric-requests declines=SELECTOR" in unpaired.stderr, unpaired.stderr
    with Traffic(envoys[0], clients=4) as traffic:
        # 3× the declines on v2: 6 % against 2 %.
        upstreams["v1"].decline_rate, upstreams["v2"].decline_rate = 0.02, 0.06
        started = start(server, "--steps", "20,50,100", "--hold", "2m", *DECLINES)
        assert started.returncode == 0, started.stdout + started.stderr
        worse = ended(server, deadline_s=120)
        # The same rates: promoted through every step, the metric's evidence never near its threshold.
        upstreams["v2"].decline_rate = 0.02
        reset(server, workdir)
        started = start(server, "--steps", "20,100", "--hold", "10s", "--min-canary-requests", "200", *DECLINES)
        assert started.returncode == 0, started.stdout + started.stderr
        equal = ended(server, deadline_s=120)
    statuses, served = traffic.snapshot()
    assert traffic.errors == [] and set(statuses) == {200}, (statuses, traffic.errors[:3])

    assert worse["phase"] == "rolled_back", worse
    assert worse["reason"].startswith("metric declines: "), worse["reason"]
    # Its own share of the budget: errors, three latency bounds, the findings and the metric.
    assert ": 0.05 over 6 tests)" in worse["reason"], worse["reason"]
    (metric,) = worse["metrics"]
    assert metric["name"] == "declines" and metric["e_value"] >= metric["threshold"], metric
    assert metric["canary_rate"] > 2 * metric["stable_rate"] > 0, metric
    # Envoy saw nothing wrong: the errors test never came near.
    assert worse["evidence"]["errors"]["canary_errors"] == 0, worse["evidence"]
    assert worse["evidence"]["errors"]["e_value"] < 1.5, worse["evidence"]

    assert equal["phase"] == "promoted" and equal["reason"] == "every step passed", equal
    (metric,) = equal["metrics"]
    assert metric["canary_requests"] >= 200 and metric["e_value"] < metric["threshold"] / 10, metric
    # What Prometheus holds agrees with what the app counted (the counters canaryctl read).
    total = scraper.query('sum(payments_total{job="app"})')
    assert float(total[0]["value"][1]) > 0, total
    shown = server.run("rollout", "status", "web")
    assert "metric declines: v2 " in shown.stdout, shown.stdout
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        text = r.read().decode()
    assert 'canaryctl_rollout_evidence{rollout="web",metric="metric_declines"} ' in text, text
    # The figures behind the closing note.
    print(f"\n3x declines: {worse['reason']}\nequal: {equal['metrics'][0]}")
