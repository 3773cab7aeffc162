"""The README's demo command works: the full local demo, on free ports, with short steps."""

import os
import re
import subprocess
import sys

import lab


def demo(args: list[str], holds: list[lab.PortHold]) -> tuple[subprocess.CompletedProcess, str]:
    """tools/demo.py with `args`, the ports in `holds` held until it ends (Envoy binds beside a hold); the process
    and its output."""
    try:
        proc = subprocess.run([sys.executable, os.path.join(lab.ROOT, "tools", "demo.py"), *args],
                              capture_output=True, text=True, timeout=300)
    finally:
        for hold in holds:
            hold.release()
    return proc, proc.stdout + proc.stderr


def test_the_local_demo_ramps_rolls_back_a_buggy_v2_one_that_breaks_checkout_and_one_that_hurts_a_business_metric_promotes_a_fixed_one_and_cleans_up():
    # The Envoy listeners' ports are held until the demo ends (Envoy binds beside the hold); Envoy's admin
    # and canaryctl take port 0 and say which port they got.
    listener, v1, v2 = ports = [lab.PortHold() for _ in range(3)]
    proc, out = demo(["local", "--hold", "1.5", "--users", "300", "--port", str(listener.port), "--admin-port", "0",
                      "--v1-port", str(v1.port), "--v2-port", str(v2.port), "--xds-port", "0",
                      "--canaryctl-port", "0", "--release-hold", "1.5"], ports)
    assert proc.returncode == 0, out
    steps = re.findall(r"canary\s+(\d+)% │ applied in\s+\d+ ms │\s+(\d+) requests │ v1\s+([\d.]+)% │ v2\s+([\d.]+)%", out)
    assert [s[0] for s in steps] == ["0", "5", "25", "50", "100"], out
    assert all(int(s[1]) > 100 for s in steps), steps
    assert (steps[0][3], steps[-1][2]) == ("0.0", "0.0"), "0 % serves only v1, 100 % only v2"
    # The release loop. 1: the buggy v2 rolled back by its errors, its latency or its new error signature (users saw
    # none of its 503s: the fallback retried them). Its failures show as errors of v2's hosts, as slower requests
    # on v2's route, and as failed attempts in Envoy's access logs.
    rolled_back = re.findall(r"   rolled back: (.*)", out)
    assert len(rolled_back) == 3, out
    assert re.match(r"(errors [\d.]+% on v2 vs [\d.]+% on v1|latency: [\d.]+% of v2 requests slower than .* vs [\d.]+% "
                    r"of v1|finding new on v2: attempt GET / 503) .*evidence \S+ ≥ \d+ ", rolled_back[0]), out
    # 2: the v2 that breaks only POST /checkout (0.5 % of its requests) is rolled back, by that signature or by its
    # errors (each step waits for complete evidence, so the error test may reach its threshold first), and the
    # signature is found `new`, while the search errors both versions share stay known.
    assert re.match(r"(finding new on v2: (request|attempt) POST /checkout/\{n\} 500 \d+ vs 0 on v1|"
                    r"errors [\d.]+% on v2 vs [\d.]+% on v1) .*evidence \S+ ≥ \d+ ", rolled_back[1]), out
    assert re.search(r"new\b.*? \d+ \([\d.]+%\) +0 \(0\.00%\) .* (request|attempt) POST /checkout/\{n\} 500", out), out
    assert re.search(r"known .* (request|attempt) GET /search 500", out), out
    # 3: the v2 whose searches find nothing 3× as often, answering 200 to all: rolled back by the business metric
    # read from a real Prometheus, Envoy's errors test seeing nothing.
    assert re.match(r"metric empty_searches: [\d.]+% on v2 vs [\d.]+% on v1 \(\d+/\d+ vs \d+/\d+ events per request\), "
                    r"evidence \S+ ≥ \d+ ", rolled_back[2]), out
    assert re.search(r"Prometheus on http://127\.0\.0\.1:\d+ scrapes Envoy and the business metric", out), out
    # 4: the fixed v2 promoted.
    assert "   promoted: every step passed: v2 is stable now" in out, out
    # ... and after it every user is on v2 (Envoy's default route still serves v1).
    after = re.search(r"   after the promotion: v2 served (\d+) of (\d+) requests \(100\.0%\)", out)
    assert after and after.group(1) == after.group(2) and int(after.group(2)) > 100, out
    # The ramp lost no request; in the release loop users saw only the failures the apps answer on purpose.
    assert out.count("non-2xx: 0 (a canary change lost no request)") == 1, out
    assert "non-2xx: 0 other (the fallback hid every 503 of the buggy v2)" in out, out
    assert re.search(r"GET /search 500: \d+ \(the flaky search both versions share", out), out
    # Every change of each release was posted to the demo's receiver, signed, and verified by it.
    notified = re.findall(r"   notified \(signature verified\): (\w+): rollout web: v2 ", out)
    assert notified.count("started") == 4 and notified.count("rolled_back") == 3, out
    assert notified.count("promoted") == 1 and notified.count("step_passed") >= 3, out
    page = re.search(r"the rollout page: (http://127\.0\.0\.1:\d+/) ", out)
    assert page, out
    assert "SIGNATURE DID NOT VERIFY" not in out and "notifications: every change of a rollout is posted" in out, out
    assert "stopped every process the demo started" in out
    leftovers = subprocess.run(["pgrep", "-f", f"{lab.ROOT}/.run/demo/"],
                               capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"


def test_the_ha_demo_kills_the_leading_replica_mid_rollout_and_another_promotes_v2_with_no_user_error():
    holds = [lab.PortHold() for _ in range(2)]
    proc, out = demo(["ha", "--users", "200", "--clients", "4", "--ports", ",".join(str(h.port) for h in holds),
                      "--release-hold", "2"], holds)
    assert proc.returncode == 0, out
    leader = re.search(r"replica (\w) leads: it alone judges", out)
    killed = re.search(r"killed replica (\w), the leader, at step 2/4 \(25%\)", out)
    assert leader and killed and killed.group(1) == leader.group(1), out
    moved = re.search(r"replica (\w) leads ([\d.]+) s later", out)
    assert moved and moved.group(1) != leader.group(1) and float(moved.group(2)) <= 5.5, out
    assert "promoted: every step passed" in out, out
    assert re.findall(r"front on :\d+: (\d+) requests, non-2xx: 0", out) and "no user saw an error" in out, out
    assert "stopped every process the demo started" in out
    leftovers = subprocess.run(["pgrep", "-f", f"{lab.ROOT}/.run/demo-ha/"], capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"
