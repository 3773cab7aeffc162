"""The README's demo command works: the full local demo, on free ports, with short steps."""

import os
import re
import subprocess
import sys

import lab


def test_the_local_demo_ramps_to_100_percent_with_zero_errors_and_cleans_up():
    ports = [str(lab.free_port()) for _ in range(6)]
    proc = subprocess.run(
        [sys.executable, os.path.join(lab.ROOT, "tools", "demo.py"), "local", "--hold", "1.5", "--users", "300",
         "--port", ports[0], "--admin-port", ports[1], "--v1-port", ports[2], "--v2-port", ports[3],
         "--xds-port", ports[4], "--canaryctl-port", ports[5]],
        capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    steps = re.findall(r"canary\s+(\d+)% │ applied in\s+\d+ ms │\s+(\d+) requests │ v1\s+([\d.]+)% │ v2\s+([\d.]+)%", out)
    assert [s[0] for s in steps] == ["0", "5", "25", "50", "100"], out
    assert all(int(s[1]) > 100 for s in steps), steps
    assert (steps[0][3], steps[-1][2]) == ("0.0", "0.0"), "0 % serves only v1, 100 % only v2"
    assert "non-2xx: 0 " in out, out
    assert "stopped every process the demo started" in out
    leftovers = subprocess.run(["pgrep", "-f", f"{lab.ROOT}/.run/demo/|127.0.0.1:{ports[5]}"],
                               capture_output=True, text=True).stdout
    assert leftovers == "", f"processes left running: {leftovers}"
