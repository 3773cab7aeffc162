"""Istio and Envoy Gateway manifests cannot run here; what can be checked is: they parse, the plugin config
inside each passes the filter's own validation (the same Rust code, built natively), their routes cover
every version of that config on the config's route header, the OCI image they pull is what the Dockerfile
builds and is pinned by digest, the filter is scoped to its app's host, a client can never pick the version
(even when Envoy Gateway skips a failed filter), and Istio gets the shipped bootstrap's stats tags (which
the routing tests check on a live Envoy)."""

import json
import os
import re
import subprocess

import pytest
import yaml

import ecds
import lab

DEPLOY = os.path.join(lab.ROOT, "deploy")


@pytest.fixture(scope="module")
def check_config():
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "check_config"], cwd=lab.ROOT, check=True)
    binary = os.path.join(lab.ROOT, "target", "release", "examples", "check_config")

    def check(config: dict) -> str:
        proc = subprocess.run([binary, "-"], input=json.dumps(config), capture_output=True, text=True)
        assert proc.returncode == 0, f"the filter refuses this plugin config: {proc.stderr}"
        return proc.stdout

    return check


def documents(path: str) -> dict:
    with open(os.path.join(DEPLOY, path)) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def versions(config: dict) -> tuple[str, list[str], str]:
    """(route header, canary versions, stable) of a single-rollout plugin config."""
    (rollout,) = config["rollouts"]
    return config.get("route_header", "x-version"), [c["version"] for c in rollout["canaries"]], rollout["stable"]


def dockerfile_image() -> str:
    with open(os.path.join(lab.ROOT, "Dockerfile")) as f:
        return re.search(r"docker build -t (\S+) \.", f.read()).group(1)


def test_the_checker_really_refuses_bad_configs(check_config):
    with pytest.raises(AssertionError, match="percent: 150 is not allowed"):
        check_config({"rollouts": [{"name": "a", "stable": "v1", "canaries": [{"version": "v2", "percent": 150}]}]})


def test_the_dockerfile_packages_the_built_filter_as_plugin_wasm():
    with open(os.path.join(lab.ROOT, "Dockerfile")) as f:
        steps = [line.split() for line in f if line.strip() and not line.startswith("#")]
    assert steps == [["FROM", "scratch"], ["COPY", ecds.DEFAULT_WASM, "./plugin.wasm"]]
    with open(os.path.join(lab.ROOT, ".dockerignore")) as f:
        rules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert rules == ["*", f"!{ecds.DEFAULT_WASM}"], "the build context is the .wasm alone"


DIGEST = re.compile(r"^[0-9a-f]{64}$")


def shipped_stats_tags() -> list[dict]:
    with open(os.path.join(lab.ENVOY_DIR, "envoy-ads.yaml")) as f:
        return yaml.safe_load(f)["stats_config"]["stats_tags"]


def test_istio_wasmplugin_virtualservice_and_destinationrule_agree(check_config):
    docs = documents("istio/canary-router.yaml")
    assert set(docs) == {"WasmPlugin", "VirtualService", "DestinationRule", "EnvoyFilter"}
    plugin = docs["WasmPlugin"]["spec"]
    assert plugin["failStrategy"] == "FAIL_RELOAD"
    assert plugin["url"] == f"oci://{dockerfile_image()}"
    assert DIGEST.match(plugin["sha256"]), "the plugin is pinned by digest"
    summary = check_config(plugin["pluginConfig"])
    assert "rollout shop: v1 95% (stable), v2 5%" in summary
    header, canaries, stable = versions(plugin["pluginConfig"])

    http = docs["VirtualService"]["spec"]["http"]
    routed = {}
    for route in http:
        matches = route.get("match", [])
        version = matches[0]["headers"][header]["exact"] if matches else None
        routed[version] = route["route"][0]["destination"]["subset"]
    assert routed == {**{v: v for v in canaries}, None: stable}, "each canary by header, stable as the default"
    # The default route does not add the route header, so the filter must write it for every version: no
    # default_route_version. After a promotion (v2 stable) v2's users then get x-version: v2 and its route.
    assert "default_route_version" not in plugin["pluginConfig"]["rollouts"][0]
    assert list(routed)[-1] is None, "the default route comes last"
    subsets = {s["name"]: s["labels"]["version"] for s in docs["DestinationRule"]["spec"]["subsets"]}
    assert subsets == {v: v for v in [stable, *canaries]}
    hosts = plugin["pluginConfig"]["rollouts"][0]["match"]["hosts"]
    assert hosts == docs["VirtualService"]["spec"]["hosts"], "the filter decides only for its app's host"

    # The labels: the shipped bootstrap's stats tags, on the gateways the plugin runs in.
    envoy_filter = docs["EnvoyFilter"]["spec"]
    assert envoy_filter["workloadSelector"]["labels"] == docs["WasmPlugin"]["spec"]["selector"]["matchLabels"]
    (patch,) = envoy_filter["configPatches"]
    assert (patch["applyTo"], patch["patch"]["operation"]) == ("BOOTSTRAP", "MERGE")
    wasm_tags = [t for t in shipped_stats_tags() if t["tag_name"] != "artifact"]
    assert patch["patch"]["value"]["stats_config"]["stats_tags"] == wasm_tags


def test_envoy_gateway_policy_and_httproute_agree(check_config):
    docs = documents("envoy-gateway/canary-router.yaml")
    assert set(docs) == {"EnvoyExtensionPolicy", "HTTPRoute", "ClientTrafficPolicy"}
    policy = docs["EnvoyExtensionPolicy"]["spec"]
    assert policy["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "shop"}], \
        "attached to its app's HTTPRoute, not to every app behind the Gateway"
    (wasm,) = policy["wasm"]
    assert wasm["code"]["type"] == "Image" and wasm["code"]["image"]["url"] == dockerfile_image()
    assert DIGEST.match(wasm["code"]["image"]["sha256"]), "the plugin is pinned by digest"
    check_config(wasm["config"])
    header, canaries, stable = versions(wasm["config"])
    assert wasm["config"]["rollouts"][0]["match"]["hosts"] == docs["HTTPRoute"]["spec"]["hostnames"]
    # Fail-open skips a failed filter rather than failing every request of the worker; a client-sent route
    # header is removed before any filter runs, so skipping the filter never lets a client pick the version.
    assert wasm["failOpen"] is True
    traffic = docs["ClientTrafficPolicy"]["spec"]
    assert traffic["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "shop"}]
    assert traffic["headers"]["earlyRequestHeaders"]["remove"] == [header]

    route = docs["HTTPRoute"]["spec"]
    assert route["parentRefs"] == [{"name": "shop"}]
    routed = {}
    for rule in route["rules"]:
        matches = rule.get("matches", [])
        version = None
        if matches:
            (h,) = matches[0]["headers"]
            assert h["name"] == header
            version = h["value"]
        routed[version] = rule["backendRefs"][0]["name"]
    assert routed == {**{v: f"shop-{v}" for v in canaries}, None: f"shop-{stable}"}
    # As under Istio: the default rule adds no route header, so the filter writes it for every version.
    assert "default_route_version" not in wasm["config"]["rollouts"][0]
