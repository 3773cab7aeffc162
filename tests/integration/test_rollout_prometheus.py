"""Progressive rollouts that take their evidence from a real Prometheus server (Debian's `prometheus`, started
here, scraping the Envoys' /stats/prometheus every second) instead of the Envoys' own streams: on the same fleet
and traffic, they reach the same verdicts. The failing canary hides behind the fallback: users and the per-cluster
response codes see no error, and only the aggregate cluster's retries show it."""

import os
import tempfile

from harness import Traffic
from lab import eventually, free_port
from test_rollout import config, counter, fleet, rollout, start

SELECTOR = 'job="envoy"'


def run_to_the_end(server, source: str, *args: str) -> dict:
    extra = ["--evidence", source] + (["--prometheus-selector", SELECTOR] if source == "prometheus" else [])
    start(server, *extra, *args)
    return eventually(lambda: (r := rollout(server))["phase"] in ("promoted", "rolled_back") and r,
                      deadline_s=90, interval_s=0.2, what=f"the rollout on {source} evidence to end")


def reset(server, workdir: str):
    """Back to v1 stable with v2 at 0 %, as before each rollout (a promotion made v2 stable)."""
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        f.write(config())
    result = server.run("apply", "-f", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_reaches_the_same_verdicts_as_the_envoy_streams(start_envoy, canaryctl, upstreams, prometheus):
    # canaryctl is told Prometheus's URL at start, and Prometheus the Envoys' admin ports: canaryctl starts first
    # with the URL, and Prometheus on that port once the Envoys are up.
    workdir = tempfile.mkdtemp(prefix="verdicts-")
    port = free_port()
    server = canaryctl(config(), extra_args=["--prometheus-url", f"http://127.0.0.1:{port}"])
    envoys = fleet(start_envoy, server)
    scraper = prometheus(envoys, port=port)
    verdicts = {}
    with Traffic(envoys[0], clients=3) as one, Traffic(envoys[1], clients=3) as two:
        for scenario, fail_rate, plan in (
                ("failing", 0.05, ["--steps", "20,50,100", "--hold", "20s", "--min-canary-requests", "100"]),
                ("healthy", 0.0, ["--steps", "20,50,100", "--hold", "3s", "--min-canary-requests", "100"])):
            upstreams["v2"].fail_rate = fail_rate
            for source in ("envoy", "prometheus"):
                reset(server, workdir)
                done = run_to_the_end(server, source, *plan)
                verdicts[(scenario, source)] = done
    for traffic in (one, two):
        statuses, served = traffic.snapshot()
        assert traffic.errors == [] and set(statuses) == {200}, (statuses, traffic.errors[:3])
    # The per-cluster response codes Prometheus holds show no 5xx at all: the fallback hid every failure.
    fives = scraper.query('sum(envoy_cluster_upstream_rq_xx{envoy_response_code_class="5"})')
    assert not fives or float(fives[0]["value"][1]) == 0, fives
    retried = scraper.query('sum(envoy_cluster_upstream_rq_retry{envoy_cluster_name="app-v2-or-v1"})')
    assert float(retried[0]["value"][1]) > 0, retried

    summary = {k: (v["phase"], (v["reason"] or "").split(" ")[0], v["evidence"]["errors"]) for k, v in verdicts.items()}
    for source in ("envoy", "prometheus"):
        failing, healthy = verdicts[("failing", source)], verdicts[("healthy", source)]
        assert failing["phase"] == "rolled_back" and failing["reason"].startswith("errors "), summary
        assert healthy["phase"] == "promoted", summary
        assert failing["plan"]["evidence"] == source and healthy["plan"]["evidence"] == source
        # Both see the canary's real failure rate (5 %), not the 0 % users saw.
        errors = failing["evidence"]["errors"]
        assert 0.02 <= errors["canary_rate"] <= 0.10 and errors["stable_errors"] == 0, (source, errors)
        assert healthy["evidence"]["errors"]["canary_errors"] == 0, (source, healthy["evidence"])
    assert counter(server, 'canaryctl_prometheus_queries_total{result="ok"}') > 10
    assert counter(server, 'canaryctl_prometheus_queries_total{result="failed"}') == 0
    shown = server.run("rollout", "status", "web")
    assert f"evidence from: Prometheus (serve --prometheus-url), series {{{SELECTOR}}}" in shown.stdout, shown.stdout


def test_a_rollout_on_prometheus_evidence_is_refused_when_prometheus_cannot_give_it(
        start_envoy, canaryctl, prometheus):
    """Refused at the start with one line naming the cause, and nothing changes: no Prometheus configured, a
    Prometheus that does not answer, a selector that is not label matchers, one that matches no Envoy."""
    port = free_port()
    server = canaryctl(config(), extra_args=["--prometheus-url", f"http://127.0.0.1:{port}"])
    envoys = fleet(start_envoy, server, 1)
    version = server.status()["desired"]["version"]
    plan = ["--steps", "10,100", "--hold", "3s", "--evidence", "prometheus"]

    def refused(*args: str) -> str:
        result = server.run("rollout", "start", "web", "--canary", "v2", "--stable-cluster", "app-v1",
                            "--canary-cluster", "app-v2", "--canary-route-cluster", "app-v2-or-v1", *plan, *args)
        assert result.returncode != 0, result.stdout
        assert server.status()["desired"]["version"] == version
        assert server.api("/v1/rollouts")["rollouts"] == []
        return result.stderr.strip()

    down = refused()
    assert f"Prometheus at http://127.0.0.1:{port}" in down and "onnection refused" in down, down
    prometheus(envoys, port=port)
    assert refused("--prometheus-selector", 'job="envoy"} or vector(1) or {a="b"').startswith(
        "canaryctl: prometheus_selector: "), "not label matchers"
    nothing = refused("--prometheus-selector", 'job="elsewhere"')
    assert 'stable-cluster: Prometheus has no envoy_cluster_upstream_rq_completed{envoy_cluster_name="app-v1"} ' \
        'with job="elsewhere"' in nothing, nothing
    misnamed = server.run("rollout", "start", "web", "--canary", "v2", "--stable-cluster", "app-v1",
                          "--canary-cluster", "app-v2", "--canary-route-cluster", "app-v3-or-v1", *plan)
    assert "canary-route-cluster: Prometheus has no" in misnamed.stderr and misnamed.returncode != 0, misnamed.stderr
    # Without --prometheus-url, canaryctl says which flag is missing.
    other = canaryctl(config())
    result = other.run("rollout", "start", "web", "--canary", "v2", "--stable-cluster", "app-v1",
                       "--canary-cluster", "app-v2", *plan)
    assert result.returncode != 0 and "evidence: prometheus needs `canaryctl serve --prometheus-url URL`" \
        in result.stderr, result.stderr
    # And a selector is only for Prometheus.
    result = other.run("rollout", "start", "web", "--canary", "v2", "--stable-cluster", "app-v1",
                       "--canary-cluster", "app-v2", "--steps", "10,100", "--prometheus-selector", 'job="x"')
    assert result.returncode != 0 and "prometheus-selector: only with evidence from Prometheus" in result.stderr, \
        result.stderr
