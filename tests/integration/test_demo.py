"""The README's demo command works: the full local demo, on free ports, with short steps."""

import os
import re
import subprocess
import sys

import lab


def test_the_local_demo_ramps_to_100_percent_rolls_back_a_buggy_v2_promotes_a_fixed_one_and_cleans_up():
    # The Envoy listeners' ports are held until the demo ends (Envoy binds beside the hold); Envoy's admin
    # and canaryctl take port 0 and say which port they got.
    holds = [lab.PortHold() for _ in range(3)]
    listener, v1, v2 = (str(hold.port) for hold in holds)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(lab.ROOT, "tools", "demo.py"), "local", "--hold", "1.5", "--users", "300",
             "--port", listener, "--admin-port", "0", "--v1-port", v1, "--v2-port", v2,
             "--xds-port", "0", "--canaryctl-port", "0", "--release-hold", "1.5"],
            capture_output=True, text=True, timeout=300,
        )
    finally:
        for hold in holds:
            hold.release()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    steps = re.findall(r"canary\s+(\d+)% │ applied in\s+\d+ ms │\s+(\d+) requests │ v1\s+([\d.]+)% │ v2\s+([\d.]+)%", out)
    assert [s[0] for s in steps] == ["0", "5", "25", "50", "100"], out
    assert all(int(s[1]) > 100 for s in steps), steps
    assert (steps[0][3], steps[-1][2]) == ("0.0", "0.0"), "0 % serves only v1, 100 % only v2"
    # The release loop: the buggy v2 rolled back by its error rate (users saw none), the fixed one promoted.
    # Its failures (retried on v1) show as errors of v2's hosts, and as slower requests on v2's route.
    rolled_back = re.search(r"   rolled back: (errors [\d.]+% on v2 vs [\d.]+% on v1|latency: [\d.]+% of v2 requests slower "
                            r"than .* vs [\d.]+% of v1) .*evidence \S+ ≥ 100 ", out)
    assert rolled_back, out
    assert "   promoted: every step passed: v2 is stable now" in out, out
    assert out.count("non-2xx: 0 ") == 2, out
    assert "stopped every process the demo started" in out
    leftovers = subprocess.run(["pgrep", "-f", f"{lab.ROOT}/.run/demo/"],
                               capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"
