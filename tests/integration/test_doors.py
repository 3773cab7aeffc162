"""One contract at every door: the admin API, the CLI and the state file refuse what the filter refuses, each
with one line, and change nothing. A JSON object with a repeated key is refused wherever it comes in (a JSON
map would keep the last value silently), a body over the limit gets a JSON error naming it (which the CLI
repeats), a usage error is one line, a false-rollback budget that could never roll back is refused, and a state
path that is a link to nothing is never replaced by a fresh state."""

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request

import lab

CONFIG = {"rollouts": [{"name": "web", "stable": "v1", "canaries": [{"version": "v2", "percent": 10}],
                        "sticky": {"keys": [{"header": "x-user-id"}]}}]}
CLUSTERS = ["--stable-cluster", "app-v1", "--canary-cluster", "app-v2"]


def post(server, path: str, body: bytes) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"{server.server}{path}", data=body,
                                     headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, text


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and result.stdout == "", (result.stdout, result.stderr)
    return lines[0]


def test_a_repeated_key_is_refused_at_every_door_and_changes_nothing(canaryctl):
    server = canaryctl(json.dumps(CONFIG))
    before = server.status()["desired"]
    doors = {
        "/v1/set": '{"rollout": "web", "percents": {"v2": 5, "v2": 50}}',
        "/v1/promote": '{"rollout": "web", "rollout": "api"}',
        "/v1/rollback": '{"rollout": "api", "rollout": "web"}',
        # The config inside the body: its own keys are checked like the file the CLI reads.
        "/v1/apply": '{"config": {"rollouts": [{"name": "web", "stable": "v1", "stable": "v2", '
                     '"canaries": [{"version": "v1", "percent": 0}]}]}}',
        "/v1/rollouts/start": '{"rollout": "web", "canary": "v2", "steps": ["5", "100"], "stable_cluster": "app-v1", '
                              '"canary_cluster": "app-v2", "canary_cluster": "app-v1"}',
        "/v1/rollouts/pause": '{"rollout": "web", "rollout": "web"}',
        "/v1/logs": '[{"version": "v2", "message": "boom", "version": "v1"}]',
    }
    for path, body in doors.items():
        status, answer = post(server, path, body.encode())
        assert status == 400 and isinstance(answer, dict), (path, status, answer)
        assert "duplicate key" in answer["error"] and "\n" not in answer["error"], (path, answer)
    # JSON lines too, each line on its own.
    status, answer = post(server, "/v1/logs", b'{"version": "v2", "message": "ok"}\n{"version": "v2", "version": "v1", '
                                             b'"message": "boom"}\n')
    assert status == 400 and answer["error"].startswith("logs: line 2: duplicate key \"version\""), answer
    # The same config as a file: the CLI and the filter's own check refuse it too, with the same kind of line.
    path = os.path.join(tempfile.mkdtemp(prefix="doors-"), "dup.json")
    with open(path, "w") as f:
        f.write(doors["/v1/apply"][len('{"config": '):-1])
    cli = server.run("apply", "-f", path)
    assert cli.returncode == 1 and "duplicate field `stable`" in one_line(cli), cli.stderr
    after = server.status()["desired"]
    assert after["version"] == before["version"] and after["config"] == before["config"]
    assert server.api("/v1/rollouts")["rollouts"] == []


def test_a_body_over_the_limit_gets_one_json_line_naming_it_which_the_cli_repeats(canaryctl):
    server = canaryctl(json.dumps(CONFIG))
    web = CONFIG["rollouts"][0]
    big = dict(CONFIG, rollouts=[dict(web, sticky=dict(web["sticky"], salt="x" * (3 * 1024 * 1024)))])
    status, answer = post(server, "/v1/apply", json.dumps({"config": big}).encode())
    assert status == 413 and isinstance(answer, dict), (status, str(answer)[:200])
    assert answer["error"] == "request body over the limit of 2097152 bytes (2 MiB): send less at once", answer
    path = os.path.join(tempfile.mkdtemp(prefix="doors-"), "big.json")
    with open(path, "w") as f:
        json.dump(big, f)
    cli = server.run("apply", "-f", path)
    assert cli.returncode == 1 and "over the limit of 2097152 bytes" in one_line(cli), cli.stderr
    assert server.status()["desired"]["version"] == 1


def test_usage_errors_and_useless_budgets_are_one_line_and_start_nothing(canaryctl):
    server = canaryctl(json.dumps(CONFIG))
    negative = server.run("rollout", "start", "web", "--canary", "v2", "--steps", "-5", *CLUSTERS)
    assert negative.returncode == 1 and '"-5": a step is a percentage in (0, 100]' in one_line(negative), \
        negative.stderr
    unknown = server.run("rollout", "start", "web", "--canary", "v2", "--steps", "5,100", "--bogus", *CLUSTERS)
    assert unknown.returncode == 1 and "unexpected argument '--bogus'" in one_line(unknown), unknown.stderr
    missing = server.run("rollout", "start", "web", "--canary", "v2")
    line = one_line(missing)
    assert missing.returncode == 1 and "--steps <STEPS>" in line and "--stable-cluster" in line, line
    budget = server.run("rollout", "start", "web", "--canary", "v2", "--steps", "5,100",
                        "--false-rollback-budget", "1e-300", *CLUSTERS)
    assert budget.returncode == 1 and "false-rollback-budget: 1e-300 is below 0.000001" in one_line(budget), \
        budget.stderr
    assert server.api("/v1/rollouts")["rollouts"] == []
    assert server.status()["desired"]["version"] == 1


def test_a_state_path_that_links_to_nothing_is_refused_and_one_that_links_to_a_file_is_kept(tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    link = tmp_path / "state.json"
    link.symlink_to(volume / "state.json")
    init = tmp_path / "init.json"
    init.write_text(json.dumps(CONFIG))
    serve = [lab.CANARYCTL, "serve", "--xds", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state", str(link),
             "--init-config", str(init)]
    refused = subprocess.run(serve, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "a symbolic link to" in line and "which does not exist: refusing to start a new state" in line, line
    assert not (volume / "state.json").exists() and link.is_symlink(), "nothing written in its place"
    # Linked to a real state file (moved to another volume): loaded and saved through the link, which stays.
    os.makedirs(tmp_path / "work")
    server = lab.Canaryctl(str(tmp_path / "work"), init_config=json.dumps(CONFIG))
    server.start()
    try:
        assert server.run("set", "web", "v2=20").returncode == 0
    finally:
        server.stop()
    os.rename(server.state_path, volume / "linked.json")
    os.symlink(volume / "linked.json", server.state_path)
    server.start()
    try:
        assert server.status()["desired"]["version"] == 2
        assert server.run("set", "web", "v2=30").returncode == 0
        assert os.path.islink(server.state_path)
        with open(volume / "linked.json") as f:
            assert json.load(f)["version"] == 3
    finally:
        server.stop()
