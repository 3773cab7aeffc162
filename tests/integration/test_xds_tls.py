"""mTLS on canaryctl's gRPC port, against real Envoys (envoy/envoy-ads-tls.yaml): an Envoy with a certificate
from the fleet CA gets the config and ACKs; a plaintext one, one without a client certificate, one with a
certificate from another CA, an expired one, and one claiming another Envoy's node id are refused before any
config leaves canaryctl, and the fleet view names each; the serving certificate and the client CA rotate under
a connected fleet without a restart, and a broken rotation keeps the previous files; plaintext xDS beyond
loopback needs --insecure-xds."""

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.request

import pytest

import lab
from harness import Traffic, Upstream
from lab import eventually

sys.path.insert(0, os.path.join(lab.ROOT, "tools"))
import certs  # noqa: E402

TLS_BOOTSTRAP = "envoy-ads-tls.yaml"
# Envoy's counters of the filter's ECDS subscription.
ECDS_STATS = "extension_config_discovery.http_filter.canary-router"
TLS13 = "          tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }\n"


def config(percent: float) -> str:
    return json.dumps({"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": percent}],
                                     "sticky": {"keys": [{"header": "x-user-id"}]}}]})


@pytest.fixture
def pki():
    """A fleet CA with canaryctl's serving certificate, and a second CA that is not the fleet's."""
    directory = tempfile.mkdtemp(prefix="canaryctl-pki-")
    certs.make_ca(directory)
    certs.make_ca(directory, name="other-ca", subject="someone else's CA")
    certs.issue_server(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def server_tls(pki: str) -> dict:
    return {"cert": os.path.join(pki, "canaryctl.pem"), "key": os.path.join(pki, "canaryctl.key"),
            "client_ca": os.path.join(pki, "ca.pem")}


def envoy_tls(pki: str, cert: str, key: str) -> dict:
    return {"cert": cert, "key": key, "ca": os.path.join(pki, "ca.pem")}


def served_certificate(port: int, pki: str) -> bytes:
    """The certificate canaryctl serves to a new connection (DER), read with a client certificate of the fleet."""
    cert, key = certs.issue_envoy(pki, "probe", name="probe")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(os.path.join(pki, "ca.pem"))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="canaryctl") as tls:
            return tls.getpeercert(binary_form=True)


def der_of(path: str) -> bytes:
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def metrics(server) -> str:
    with urllib.request.urlopen(f"{server.server}/metrics") as r:
        return r.read().decode()


def metric(server, name: str) -> int:
    """One sample of canaryctl's /metrics, by its name and labels as written."""
    return int(next(line.split()[-1] for line in metrics(server).splitlines() if line.startswith(name + " ")))


def share_v2(envoy, users: int = 100) -> float:
    conn = envoy.connection()
    served = [envoy.get("/", {"x-user-id": f"u{i}"}, conn=conn).served_by for i in range(users)]
    return served.count("v2") / users * 100


def test_envoys_with_a_fleet_certificate_get_the_config_ack_and_show_who_they_are(start_envoy, canaryctl, pki):
    server = canaryctl(config(0), tls=server_tls(pki))
    one = envoy_tls(pki, *certs.issue_envoy(pki, "edge", "front-1"))  # this Envoy only
    cluster = envoy_tls(pki, *certs.issue_envoy(pki, "edge"))  # any Envoy of cluster edge
    envoys = [start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-1", tls=one),
              start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-2", tls=cluster)]
    server.wait_envoys(2)

    result = server.run("set", "web", "v2=100")
    assert result.returncode == 0, result.stderr
    assert "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
    for envoy in envoys:
        eventually(lambda: share_v2(envoy) == 100, what=f"{envoy.name} on v2")

    status = server.status()
    assert status["xds"]["mtls"] is True
    assert status["xds"]["serving_certificate"] == "CN=canaryctl"
    assert {e["node_id"]: e["certificate"] for e in status["envoys"]} == {
        "front-1": "spiffe://canary-router.local/envoy/edge/front-1",
        "front-2": "spiffe://canary-router.local/envoy/edge"}
    assert status["refused"] == []
    table = server.run("status").stdout
    assert "xds: mTLS (TLS 1.3), serving certificate valid until" in table, table
    text = metrics(server)
    assert 'canaryctl_xds_refused_total{reason="identity_mismatch"} 0\n' in text, text
    assert "canaryctl_xds_tls_certificate_expiry_seconds " in text, text


def test_peers_without_a_fleet_certificate_or_speaking_for_another_node_are_refused_and_get_nothing(
        start_envoy, canaryctl, pki):
    server = canaryctl(config(100), tls=server_tls(pki))
    real = start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-1",
                       tls=envoy_tls(pki, *certs.issue_envoy(pki, "edge", "front-1")))
    server.wait_envoys(1)
    eventually(lambda: share_v2(real) == 100, what="the real Envoy on v2")

    def without_client_certificate(text: str) -> str:
        block = ("          tls_certificates:\n          - certificate_chain: { filename: %s }\n"
                 "            private_key: { filename: %s }\n")
        cert, key = os.path.join(pki, "unused.pem"), os.path.join(pki, "unused.key")
        assert block % (cert, key) in text
        return text.replace(block % (cert, key), "")

    other_ca = certs.issue_envoy(pki, "edge", "front-5", name="other-ca-front-5", ca="other-ca")
    expired = certs.issue_envoy(pki, "edge", "front-6", name="expired-front-6", expired=True)
    impostor = certs.issue_envoy(pki, "edge", "front-3")  # a real certificate, for front-3
    bad = {
        "not_tls": start_envoy("envoy-ads.yaml", xds_port=server.xds_port, node_id="front-4"),
        "no_certificate": start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-7",
                                      tls=envoy_tls(pki, os.path.join(pki, "unused.pem"),
                                                    os.path.join(pki, "unused.key")),
                                      edit=without_client_certificate),
        "unknown_ca": start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-5",
                                  tls=envoy_tls(pki, *other_ca)),
        "bad_certificate": start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-6",
                                       tls=envoy_tls(pki, *expired)),
        # Envoy's client default: TLS 1.2 at most.
        "tls_version": start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-8",
                                   tls=envoy_tls(pki, *certs.issue_envoy(pki, "edge", "front-8")),
                                   edit=lambda text: lab.substitute(text, {TLS13: ""}, TLS_BOOTSTRAP)),
        # front-3's certificate, claiming to be front-1.
        "identity_mismatch": start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-1",
                                         tls=envoy_tls(pki, *impostor)),
    }

    def refused() -> dict:
        return {r["reason"]: r for r in server.status()["refused"]}

    seen = eventually(lambda: (r := refused()) and set(bad) <= set(r) and r, deadline_s=30,
                      what="every bad peer refused")
    mismatch = seen["identity_mismatch"]
    assert mismatch["node_id"] == "front-1"
    assert mismatch["message"] == ('node "front-1" (cluster "edge") is not named by its certificate '
                                   '(URI SANs: spiffe://canary-router.local/envoy/edge/front-3)')
    assert "not signed by --xds-client-ca" in seen["unknown_ca"]["message"]
    assert "expired" in seen["bad_certificate"]["message"]
    assert "no client certificate" in seen["no_certificate"]["message"]
    assert "did not speak TLS" in seen["not_tls"]["message"]
    assert seen["tls_version"]["message"].startswith("offers TLS 1.2 at most; canaryctl speaks TLS 1.3 only")
    assert all(r["peer"] == "127.0.0.1" for r in seen.values())
    assert 'refused 127.0.0.1:' in server.log() and 'node "front-1" (cluster "edge") is not named' in server.log()

    # None of them got the config: no ECDS update ever reached them, and each still routes by the bootstrap's
    # fail-safe default, so every user stays on v1 although the desired config sends everyone to v2.
    assert real.stat(f"{ECDS_STATS}.update_success") >= 1
    for reason, envoy in bad.items():
        assert envoy.stats().get(f"{ECDS_STATS}.update_success", 0) == 0, reason
        assert envoy.stats().get(f"{ECDS_STATS}.config_reload", 0) == 0, reason
        assert share_v2(envoy) == 0, reason
    # The fleet holds the real front-1 alone: the impostor neither joined it nor shares its node id.
    status = server.status()
    assert [(e["node_id"], e["link"], e["streams"]) for e in status["envoys"]] == [("front-1", "connected", 1)]
    assert server.run("set", "web", "v2=50").stdout.count("applied by 1/1 Envoys") == 1
    eventually(lambda: share_v2(real) < 100, what="the real Envoy applying v2=50")

    text = metrics(server)
    for reason in bad:
        line = next(line for line in text.splitlines()
                    if line.startswith(f'canaryctl_xds_refused_total{{reason="{reason}"}}'))
        assert int(line.split()[-1]) >= 1, line
    table = server.run("status").stdout
    assert "refused on the xDS port:" in table and "identity_mismatch" in table and "front-1" in table, table


def test_certificates_rotate_under_a_connected_fleet_without_a_restart(start_envoy, canaryctl, pki):
    tls = server_tls(pki)
    server = canaryctl(config(0), tls=tls)
    edge = envoy_tls(pki, *certs.issue_envoy(pki, "edge"))
    envoys = [start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id=f"front-{i}", tls=edge) for i in (1, 2)]
    server.wait_envoys(2)
    assert served_certificate(server.xds_port, pki) == der_of(tls["cert"])

    # A new serving certificate, moved into place as a secret manager would: picked up without a signal.
    staging = tempfile.mkdtemp(dir=pki)
    shutil.copy(os.path.join(pki, "ca.pem"), staging)
    shutil.copy(os.path.join(pki, "ca.key"), staging)
    new_cert, new_key = certs.issue_server(staging, name="canaryctl-2")
    os.replace(new_key, tls["key"])
    os.replace(new_cert, tls["cert"])
    eventually(lambda: served_certificate(server.xds_port, pki) == der_of(tls["cert"]), deadline_s=10,
               what="the new serving certificate in use")
    assert "xDS TLS files re-read (changed): serving certificate CN=canaryctl-2" in server.log()

    # The connected Envoys kept their streams and apply the next change; a new Envoy connects with the new one.
    result = server.run("set", "web", "v2=100")
    assert "applied by 2/2 Envoys" in result.stdout, result.stdout + result.stderr
    envoys.append(start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-3", tls=edge))
    server.wait_envoys(3)
    eventually(lambda: share_v2(envoys[2]) == 100, what="the new Envoy on v2")

    # A half-done rotation (a certificate whose key is elsewhere) is refused; the previous pair keeps serving.
    serving = der_of(tls["cert"])
    stray_cert, _ = certs.issue_server(staging, name="canaryctl-3")
    shutil.copy(stray_cert, tls["cert"])
    eventually(lambda: "xDS TLS files refused (changed), the previous ones keep serving" in server.log(),
               deadline_s=10, what="the broken pair refused")
    assert "--xds-tls-cert" in server.log().split("keep serving: ")[-1]
    assert served_certificate(server.xds_port, pki) == serving
    assert 'canaryctl_xds_tls_reloads_total{result="refused"} 1\n' in metrics(server)

    # A new client CA, rolled out as a bundle (old and new), admits Envoys of either; SIGHUP re-reads at once.
    with open(tls["cert"], "w") as f:
        f.write(ssl.DER_cert_to_PEM_cert(serving))
    new_ca = certs.make_ca(pki, name="ca-2", subject="canary-router fleet CA 2")
    with open(tls["client_ca"], "a") as bundle, open(new_ca) as added:
        bundle.write(added.read())
    server.process.send_signal(signal.SIGHUP)
    eventually(lambda: "xDS TLS files re-read (SIGHUP)" in server.log(), deadline_s=5, what="SIGHUP handled")
    assert server.process.poll() is None, "SIGHUP must not stop canaryctl"
    fresh = envoy_tls(pki, *certs.issue_envoy(pki, "edge", "front-4", ca="ca-2"))
    start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-4", tls=fresh)
    server.wait_envoys(4)
    assert server.status()["refused"] == []


def test_serve_refuses_plaintext_xds_beyond_loopback_unless_told_and_names_bad_tls_files(tmp_path, pki):
    init = tmp_path / "init.json"
    init.write_text(config(0))

    def serve(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
        argv = [lab.CANARYCTL, "serve", "--admin", "127.0.0.1:0", "--state", str(tmp_path / "state.json"),
                "--init-config", str(init), *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as running:
            return subprocess.CompletedProcess(argv, None, "", running.stderr.decode() if running.stderr else "")

    refused = serve("--xds", "0.0.0.0:0")
    assert refused.returncode == 1
    assert "xDS on 0.0.0.0:0 would be plaintext beyond loopback" in refused.stderr
    assert "--insecure-xds" in refused.stderr

    allowed = serve("--xds", "0.0.0.0:0", "--insecure-xds", timeout=3)
    assert allowed.returncode is None, allowed.stderr  # still serving when the timeout stopped it
    assert "WARNING: --insecure-xds: ADS on 0.0.0.0:0 is plaintext and unauthenticated" in allowed.stderr

    half = serve("--xds", "0.0.0.0:0", "--xds-tls-cert", os.path.join(pki, "canaryctl.pem"))
    # A usage error: one line, exit 1 (refused), like every CLI error.
    assert half.returncode == 1 and "--xds-tls-key" in half.stderr and half.stderr.count("\n") == 1, half.stderr

    tls = server_tls(pki)
    wrong_key = serve("--xds", "0.0.0.0:0", "--xds-tls-cert", tls["cert"], "--xds-tls-key",
                      os.path.join(pki, "ca.key"), "--xds-client-ca", tls["client_ca"])
    assert wrong_key.returncode == 1
    assert wrong_key.stderr.startswith(f"canaryctl: --xds-tls-cert {tls['cert']} with --xds-tls-key "), wrong_key.stderr
    assert wrong_key.stderr.count("\n") == 1, wrong_key.stderr

    no_ca = serve("--xds", "0.0.0.0:0", "--xds-tls-cert", tls["cert"], "--xds-tls-key", tls["key"],
                  "--xds-client-ca", tls["cert"] + ".missing")
    assert no_ca.returncode == 1 and f"--xds-client-ca {tls['cert']}.missing: " in no_ca.stderr, no_ca.stderr


def test_only_the_rollout_s_fleet_is_evidence_and_no_certificate_takes_over_another_cluster_s_node(
        start_envoy, canaryctl, upstreams, pki):
    upstreams["v2"].fail_rate = 0.05
    server = canaryctl(config(0), tls=server_tls(pki))
    real = start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-1",
                       tls=envoy_tls(pki, *certs.issue_envoy(pki, "edge", "front-1")))
    # A certificate for any node of cluster batch: another fleet's Envoy, with healthy upstreams of its own and
    # the same upstream cluster names, and the same certificate claiming the edge Envoy's node id.
    batch_cert = certs.issue_envoy(pki, "batch", name="batch")
    healthy = {v: Upstream(v) for v in ("v1", "v2")}
    try:
        batch = start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="batch-1", cluster="batch",
                            tls=envoy_tls(pki, *batch_cert), upstream_ports={v: u.port for v, u in healthy.items()})
        server.wait_envoys(2)
        thief = start_envoy(TLS_BOOTSTRAP, xds_port=server.xds_port, node_id="front-1", cluster="batch",
                            tls=envoy_tls(pki, *batch_cert), upstream_ports={v: u.port for v, u in healthy.items()})
        claimed = eventually(lambda: {r["reason"]: r for r in server.status()["refused"]}.get("node_of_another_cluster"),
                             deadline_s=30, what="the claim on front-1 refused")
        assert claimed["node_id"] == "front-1" and claimed["message"] == (
            'node "front-1" is an Envoy of cluster "edge", not "batch": a certificate cannot take over another '
            "cluster's node"), claimed
        rows = sorted((e["node_id"], e["cluster"], e["link"]) for e in server.status()["envoys"])
        assert rows == [("batch-1", "batch", "connected"), ("front-1", "edge", "connected")], rows
        assert thief.stats().get(f"{ECDS_STATS}.update_success", 0) == 0
        with Traffic(real, clients=2), Traffic(batch, clients=6):
            eventually(lambda: metric(server, "canaryctl_load_reports_total") >= 4, deadline_s=30,
                       what="load reports")
            result = server.run("rollout", "start", "web", "--canary", "v2", "--steps", "20,100", "--hold", "30s",
                                "--min-canary-requests", "50", "--fleet-cluster", "edge", "--stable-cluster",
                                "app-v1", "--canary-cluster", "app-v2", "--canary-route-cluster", "app-v2-or-v1",
                                "--latency-tolerance", "100")
            assert result.returncode == 0, result.stdout + result.stderr
            done = eventually(lambda: (r := server.api("/v1/rollouts")["rollouts"][0])["phase"] != "progressing"
                              and r, deadline_s=60, interval_s=0.2, what="a verdict")
        # batch served three times the canary requests front-1 did, all healthy: none of them is evidence.
        assert done["phase"] == "rolled_back" and "errors " in done["reason"], (done["phase"], done["reason"])
        errors = done["evidence"]["errors"]
        assert errors["canary_requests"] <= upstreams["v2"].app_requests, (errors, upstreams["v2"].app_requests)
        assert healthy["v2"].app_requests > errors["canary_requests"], healthy["v2"].app_requests
        assert sorted(done["fleet"]["clusters"]) == ["edge"], done["fleet"]
        assert metric(server, 'canaryctl_xds_refused_total{reason="node_of_another_cluster"}') >= 1
        print(f"rolled back on front-1's {errors['canary_requests']} canary requests; batch's "
              f"{healthy['v2'].app_requests} healthy ones not counted: {done['reason']}")
    finally:
        for upstream in healthy.values():
            upstream.close()
