"""canaryctl replicas sharing a real etcd cluster (Debian's etcd-server, 3 members on loopback) with real Envoys:
a write on any replica reaches the Envoys of every replica and concurrent writes lose nothing; one replica judges
the rollouts and a deposed one writes nothing; a killed leader's successor takes over and finishes the rollout;
an Envoy whose replica dies keeps its config on another; one etcd member lost changes nothing; a lost quorum
refuses what would add canary traffic, in one line, and holds the rollout until it returns."""

import json
import os
import signal
import subprocess
import threading
import time

import lab
from harness import Traffic
from lab import eventually

ADS = "envoy-ads.yaml"
ROLLOUTS = 4


def config() -> str:
    """Rollouts web0…web3 on paths /r0…/r3, each v1 with v2 at 0 %, and `web` on the rest."""
    rollouts = [{"name": f"web{i}", "stable": "v1", "canaries": [{"version": "v2", "percent": 0}],
                 "match": {"path_prefix": f"/r{i}"}, "sticky": {"keys": [{"header": "x-user-id"}]}}
                for i in range(ROLLOUTS)]
    rollouts.append({"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 0}],
                     "sticky": {"keys": [{"header": "x-user-id"}]}})
    return json.dumps({"rollouts": rollouts})


def store(server) -> dict:
    return server.status()["store"]


def leader(replicas) -> object:
    """The replica that says it leads, once exactly one does."""
    def one():
        leading = [r for r in replicas if r.alive() and store(r)["role"] == "leader"]
        return leading[0] if len(leading) == 1 else None
    return eventually(one, deadline_s=15, interval_s=0.05, what="one replica leading")


def two_replicas(etcd, replica):
    """An etcd cluster and replicas a and b on it: (cluster, the leader, the other)."""
    cluster = etcd()
    a = replica(cluster.url, "a", init_config=config())
    b = replica(cluster.url, "b", init_config=config())
    first = leader([a, b])
    return cluster, first, (b if first is a else a)


def percents(server) -> dict:
    return {r["name"]: r["canaries"][0]["percent"] for r in server.status()["desired"]["config"]["rollouts"]}


def connected_acked(server, node: str, version: int, on: str | None = None) -> bool:
    """Whether `server` shows `node` connected (to replica `on`, when given) with `version` applied."""
    return any(e["node_id"] == node and e["link"] == "connected" and e["acked_version"] == version
               and (on is None or e.get("replica") == on) for e in server.status()["envoys"])


def test_a_write_on_either_replica_reaches_every_envoy_and_concurrent_writes_lose_nothing(
        etcd, replica, start_envoy, upstreams):
    cluster = etcd()
    a = replica(cluster.url, "a", init_config=config())
    b = replica(cluster.url, "b", init_config=config())
    # Each Envoy on its own replica.
    front_a = start_envoy(ADS, node_id="front-a", xds_replicas=[a.xds_port])
    front_b = start_envoy(ADS, node_id="front-b", xds_replicas=[b.xds_port])
    a.wait_envoys(1)
    b.wait_envoys(1)
    assert store(b)["replicas"] and {r["replica"] for r in store(b)["replicas"]} == {"a", "b"}

    # Each replica shows the whole fleet.
    for server in (a, b):
        eventually(lambda: {e["node_id"] for e in server.status()["envoys"] if e["link"] == "connected"}
                   == {"front-a", "front-b"}, what="both Envoys in each replica's fleet view")
    # One write on a: b pushes it to its Envoy too, the write waits for both, and b's route table follows.
    done = a.run("set", "web3", "v2=100")
    assert done.returncode == 0 and "applied by 2/2 Envoys" in done.stdout, done.stdout + done.stderr
    version = json.loads(cluster.get("/canaryctl/state"))["version"]
    eventually(lambda: connected_acked(b, "front-b", version), deadline_s=10, what="front-b on b applying a's write")
    eventually(lambda: front_b.get("/r3/x", {"x-user-id": "u1"}).served_by == "v2", what="front-b routing /r3 to v2")

    # Eight writes at once, half on each replica, each to its own rollout and percent: every one is kept.
    before = version
    results = []
    wanted = {}

    def write(server, rollout, percent):
        results.append(server.run("set", rollout, f"v2={percent}", "--no-wait"))

    threads = []
    for i in range(8):
        rollout, percent = f"web{i % ROLLOUTS}", 10 + i
        wanted[rollout] = percent  # the later write of a rollout may land first; checked below
        threads.append(threading.Thread(target=write, args=(a if i % 2 else b, rollout, percent)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stdout + r.stderr for r in results]
    final = json.loads(cluster.get("/canaryctl/state"))
    assert final["version"] == before + 8, (before, final["version"])
    # Each rollout holds one of the two percents written to it, and the two replicas serve the same.
    stored = {r["name"]: r["canaries"][0]["percent"] for r in final["config"]["rollouts"]}
    for i in range(ROLLOUTS):
        assert stored[f"web{i}"] in (10 + i, 10 + i + ROLLOUTS), stored
    eventually(lambda: percents(a) == stored and percents(b) == stored, what="both replicas serving the last state")
    eventually(lambda: connected_acked(a, "front-a", final["version"]) and connected_acked(b, "front-b", final["version"]),
               what="both Envoys applying it")
    assert "version" in b.log() and "written by another replica" in b.log()
    # The CLI's fleet table names each Envoy's replica.
    shown = a.run("status").stdout
    assert "replica a (" in shown and "replicas: a, b" in shown, shown
    assert any("front-b" in line and "replica b" in line for line in shown.splitlines()), shown


def test_an_envoy_whose_replica_dies_keeps_its_config_on_another(etcd, replica, start_envoy, upstreams):
    cluster = etcd()
    a = replica(cluster.url, "a", init_config=config())
    b = replica(cluster.url, "b", init_config=config())
    front = start_envoy(ADS, node_id="front-1", xds_replicas=[a.xds_port, b.xds_port])
    a.wait_envoys(1)
    assert a.run("set", "web", "v2=50").returncode == 0
    version = a.status()["desired"]["version"]
    eventually(lambda: connected_acked(a, "front-1", version, on="a"), what="front-1 applying version on a")
    reloads = front.stat("extension_config_discovery.canary-router.config_reload")
    with Traffic(front, clients=3) as traffic:
        eventually(lambda: sum(traffic.served.values()) > 100, what="traffic flowing")
        a.kill()
        moved = time.monotonic()
        eventually(lambda: connected_acked(b, "front-1", version, on="b"), deadline_s=20, interval_s=0.1,
                   what="front-1 reconnected to b with the same version")
        took = time.monotonic() - moved
        served = sum(traffic.served.values())
        eventually(lambda: sum(traffic.served.values()) > served + 100, what="traffic still flowing")
    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.errors[:3], traffic.statuses)
    # No new version: the Envoy kept what it applied (b offered the same version; nothing was reloaded).
    assert b.status()["desired"]["version"] == version
    assert front.stat("extension_config_discovery.canary-router.config_reload") == reloads
    print(f"front-1 on b after {took:.1f}s")


def test_one_replica_judges_and_a_deposed_leader_writes_nothing(etcd, replica, start_envoy, upstreams):
    cluster, first, second = two_replicas(etcd, replica)
    assert store(second)["leader"] == first.replica
    front = start_envoy(ADS, node_id="front-1", xds_replicas=[first.xds_port, second.xds_port])
    first.wait_envoys(1)
    with Traffic(front, clients=2):
        started = first.run("rollout", "start", "web", "--canary", "v2", "--steps", "10,100", "--hold", "10m",
                            "--stable-cluster", "app-v1", "--canary-cluster", "app-v2",
                            "--canary-route-cluster", "app-v2-or-v1")
        assert started.returncode == 0, started.stdout + started.stderr
        # The leader judges: it writes the rollout's evidence each tick.
        eventually(lambda: json.loads(cluster.get("/canaryctl/state")).get("written_by") == first.replica
                   and json.loads(cluster.get("/canaryctl/state"))["rollouts"][0]["history"], what="the leader judging")
        # The leader freezes past its lease: the other takes the lead.
        os.kill(first.process.pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            eventually(lambda: store(second)["role"] == "leader", deadline_s=15, interval_s=0.1,
                       what="the other replica leading")
            took = time.monotonic() - frozen
            time.sleep(1)
        finally:
            os.kill(first.process.pid, signal.SIGCONT)
        _, at_resume = cluster.get_kv("/canaryctl/state")
        resumed = time.monotonic()
        # Back, the old leader writes nothing: every state written from now on is the new leader's, and the new
        # leader goes on writing the rollout's evidence.
        writers = {}
        while time.monotonic() - resumed < 5:
            value, revision = cluster.get_kv("/canaryctl/state")
            if revision > at_resume:
                writers[revision] = json.loads(value).get("written_by")
            time.sleep(0.02)
        assert writers and set(writers.values()) == {second.replica}, writers
        assert "lost the lead" in first.log(), first.log()
        assert store(first)["role"] == "follower" and store(first)["leader"] == second.replica
    print(f"the lead moved {took:.1f}s after the leader froze (lease 4s)")


def start_rollout(server, steps="50,100", hold="4s", *extra):
    started = server.run("rollout", "start", "web", "--canary", "v2", "--steps", steps, "--hold", hold,
                         "--min-canary-requests", "20", "--stable-cluster", "app-v1", "--canary-cluster", "app-v2",
                         "--canary-route-cluster", "app-v2-or-v1", "--latency-tolerance", "100", *extra)
    assert started.returncode == 0, started.stdout + started.stderr


def rollout_of(server) -> dict:
    return {r["rollout"]: r for r in server.api("/v1/rollouts")["rollouts"]}["web"]


def web_percent(server) -> float:
    return percents(server)["web"]


def test_a_leader_killed_mid_rollout_is_followed_by_another_that_finishes_it(etcd, replica, start_envoy, upstreams):
    cluster, first, second = two_replicas(etcd, replica)
    fronts = [start_envoy(ADS, node_id=f"front-{i}", xds_replicas=[first.xds_port, second.xds_port]) for i in (1, 2)]
    first.wait_envoys(2)
    with Traffic(fronts[0], clients=3) as traffic, Traffic(fronts[1], clients=3) as traffic2:
        start_rollout(first)
        eventually(lambda: web_percent(first) == 50, deadline_s=30, what="the first step")
        first.kill()
        killed = time.monotonic()
        eventually(lambda: store(second)["role"] == "leader", deadline_s=15, interval_s=0.05,
                   what="the other replica leading")
        took = time.monotonic() - killed
        done = eventually(lambda: (r := rollout_of(second))["phase"] != "progressing" and r, deadline_s=60,
                          interval_s=0.2, what="the rollout's verdict on the new leader")
        assert done["phase"] == "promoted", (done["phase"], done.get("reason"))
        assert "leads the rollouts" in second.log()
    # Users saw nothing: every request answered 200, during the kill too.
    for t in (traffic, traffic2):
        assert t.errors == [] and set(t.statuses) == {200}, (t.errors[:3], t.statuses)
    assert took <= 5.5, f"the lead moved {took:.1f}s after the leader was killed"
    print(f"the lead moved {took:.1f}s after the leader was killed (lease 4s)")


def test_one_etcd_member_lost_changes_nothing(etcd, replica, start_envoy, upstreams):
    cluster, first, second = two_replicas(etcd, replica)
    front = start_envoy(ADS, node_id="front-1", xds_replicas=[first.xds_port])
    first.wait_envoys(1)
    with Traffic(front, clients=3) as traffic:
        start_rollout(first)
        eventually(lambda: web_percent(first) == 50, deadline_s=30, what="the first step")
        cluster.members[0].kill()
        # Writes on both replicas still work, at once.
        for server, rollout in ((first, "web0"), (second, "web1")):
            done = server.run("set", rollout, "v2=5", "--no-wait")
            assert done.returncode == 0, done.stdout + done.stderr
        done = eventually(lambda: (r := rollout_of(first))["phase"] != "progressing" and r, deadline_s=60,
                          interval_s=0.2, what="the rollout's verdict")
        assert done["phase"] == "promoted", (done["phase"], done.get("reason"))
        assert store(first)["role"] == "leader"
    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.errors[:3], traffic.statuses)
    for server in (first, second):
        assert "lost the lead" not in server.log() and "not saved" not in server.log(), server.log()


def test_a_lost_quorum_refuses_more_canary_traffic_in_one_line_and_holds_the_rollout(
        etcd, replica, start_envoy, upstreams):
    cluster, first, second = two_replicas(etcd, replica)
    front = start_envoy(ADS, node_id="front-1", xds_replicas=[first.xds_port])
    first.wait_envoys(1)
    with Traffic(front, clients=3) as traffic:
        start_rollout(first, "20,50,100")
        eventually(lambda: web_percent(first) == 20, deadline_s=30, what="the first step")
        version = first.status()["desired"]["version"]
        for member in cluster.members[1:]:
            member.kill()
        lost = time.monotonic()
        # More canary traffic is refused, in one line that says why.
        refused = first.run("set", "web0", "v2=5", "--no-wait")
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stdout + refused.stderr
        assert "etcd" in refused.stderr and "not saved" in refused.stderr, refused.stderr
        print(refused.stderr.strip())
        # The rollout holds: well past its hold, no step is taken and nothing is promoted; users are served.
        while time.monotonic() - lost < 10:
            assert web_percent(first) == 20 and rollout_of(first)["phase"] == "progressing"
            time.sleep(0.2)
        assert first.status()["desired"]["version"] == version
        assert connected_acked(first, "front-1", version)
        # Quorum returns: the rollout goes on to its verdict, whichever replica leads then (the Envoy's evidence
        # reaches it through the store).
        for member in cluster.members[1:]:
            member.start()
        cluster.wait_healthy()
        leader([first, second])
        done = eventually(lambda: (r := rollout_of(first))["phase"] != "progressing" and r, deadline_s=90,
                          interval_s=0.2, what="the rollout's verdict after quorum returned")
        assert done["phase"] == "promoted", (done["phase"], done.get("reason"))
    assert traffic.errors == [] and set(traffic.statuses) == {200}, (traffic.errors[:3], traffic.statuses)


def test_a_rollout_over_envoys_on_two_replicas_is_judged_on_both_s_evidence(etcd, replica, start_envoy, upstreams):
    cluster, first, second = two_replicas(etcd, replica)
    # front-1 on the leader, front-2 on the other replica: only front-2 gets traffic.
    quiet = start_envoy(ADS, node_id="front-1", xds_replicas=[first.xds_port])
    busy = start_envoy(ADS, node_id="front-2", xds_replicas=[second.xds_port])
    eventually(lambda: sorted(first.envoys_connected()) == ["front-1", "front-2"], what="the leader seeing both Envoys")
    upstreams["v2"].fail_rate = 0.3
    with Traffic(busy, clients=4) as traffic:
        start_rollout(first, "20,100", "30s")
        done = eventually(lambda: (r := rollout_of(first))["phase"] != "progressing" and r, deadline_s=60,
                          interval_s=0.2, what="the leader's verdict on the other replica's Envoy")
        assert done["phase"] == "rolled_back", (done["phase"], done.get("reason"))
        eventually(lambda: web_percent(second) == 0, what="the rollback on the other replica")
    # The errors the leader counted are the ones front-2 (on the other replica) reported.
    errors = done["evidence"]["errors"]
    assert errors["canary_errors"] > 0 and errors["canary_requests"] > 0, errors
    assert quiet.stat("cluster.app-v2.upstream_rq_total") == 0
    assert traffic.errors == [], traffic.errors[:3]


def test_a_state_file_moves_into_etcd_once(etcd, replica, canaryctl):
    cluster = etcd()
    single = canaryctl(config())
    assert single.run("set", "web", "v2=7", "--no-wait").returncode == 0
    version = single.status()["desired"]["version"]
    single.stop()
    migrate = [lab.CANARYCTL, "store", "migrate", "--state", single.state_path, "--store", cluster.url]
    moved = subprocess.run(migrate, capture_output=True, text=True, timeout=30)
    assert moved.returncode == 0 and f"(version {version}," in moved.stdout, moved.stdout + moved.stderr
    again = subprocess.run(migrate, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "already holds a state: nothing was copied" in again.stderr, again.stderr
    # A replica started without --init-config serves what was moved.
    served = replica(cluster.url, "a")
    assert served.status()["desired"]["version"] == version and web_percent(served) == 7
