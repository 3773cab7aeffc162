"""The files in envoy/ agree with each other and work as shipped, so the examples cannot rot."""

import json
import os
import re

import pytest
import yaml

import ecds
from harness import ENVOY_DIR, expected_version, indent, shipped_plugin_config
from lab import eventually


def read(name: str) -> str:
    with open(os.path.join(ENVOY_DIR, name)) as f:
        return f.read()


def test_the_inline_bootstrap_embeds_the_shipped_plugin_config_verbatim():
    assert indent(shipped_plugin_config()) in read("envoy-inline.yaml")


def test_the_shipped_ecds_resource_is_what_the_publisher_writes():
    assert json.loads(read("ecds/canary-router.json")) == \
        ecds.discovery_response(shipped_plugin_config(), version="1")


def test_every_shipped_filter_uses_fail_reload():
    assert "failure_policy: FAIL_RELOAD" in read("envoy-inline.yaml")
    resource = json.loads(read("ecds/canary-router.json"))["resources"][0]
    assert resource["typed_config"]["config"]["failure_policy"] == "FAIL_RELOAD"


def test_every_version_of_the_shipped_config_has_a_route_in_each_bootstrap():
    config = json.loads(shipped_plugin_config())
    versions = {v for r in config["rollouts"] for v in [r["stable"]] + [c["version"] for c in r["canaries"]]}
    for bootstrap in ("envoy-inline.yaml", "envoy-ecds.yaml", "envoy-ads.yaml", "envoy-ads-native.yaml",
                      "envoy-native.yaml"):
        text = read(bootstrap)
        routed = set(re.findall(r"name: x-version, string_match: \{ exact: ([^ }]+) \}", text))
        assert routed == versions, f"{bootstrap} routes {routed}, the config has {versions}"


@pytest.mark.parametrize("bootstrap", ["envoy-inline.yaml", "envoy-native.yaml"])
def test_the_shipped_inline_setup_routes_as_documented(start_envoy, bootstrap):
    envoy = start_envoy(bootstrap)  # the shipped plugin config, unchanged
    conn = envoy.connection()
    for i in range(200):
        user = f"shipped-{i}"
        r = envoy.get("/", {"x-user-id": user}, conn=conn)
        assert r.served_by == expected_version("web", user, "v1", [("v2", 10)]), user
    assert envoy.get("/", {"x-user-group": "beta", "x-user-id": "x"}, conn=conn).served_by == "v2"
    first = envoy.get("/", conn=conn)
    assert first.header("set-cookie")[0].startswith("canary_id="), first.header_pairs


def test_the_shipped_ecds_setup_starts_with_the_shipped_resource(start_envoy):
    envoy = start_envoy("envoy-ecds.yaml")
    assert envoy.get("/", {"x-user-group": "staff"}).served_by == "v2"
    dump = envoy.admin("/config_dump?resource=ecds_filters")
    assert '"name": "canary-router"' in dump


def _without_filter_and_header(text: str) -> str:
    body = text[text.index("node:\n"):]
    start = body.index("          - name: canary-router\n")
    end = body.index("          - name: envoy.filters.http.router")
    return body[:start] + body[end:]


def test_the_inline_and_ecds_bootstraps_differ_only_in_how_the_filter_config_arrives():
    assert _without_filter_and_header(read("envoy-inline.yaml")) == _without_filter_and_header(read("envoy-ecds.yaml"))


def test_the_native_bootstrap_differs_from_the_inline_one_only_in_the_filter_entry():
    assert _without_filter_and_header(read("envoy-inline.yaml")) == _without_filter_and_header(read("envoy-native.yaml"))
    assert indent(shipped_plugin_config()) in read("envoy-native.yaml")


def test_the_native_ads_bootstrap_differs_from_the_wasm_one_only_in_the_filter_entry():
    assert _without_filter_and_header(read("envoy-ads.yaml")) == _without_filter_and_header(read("envoy-ads-native.yaml"))
    native = read("envoy-ads-native.yaml")
    assert "DynamicModuleFilter" in native and "envoy.extensions.filters.http.wasm" not in native


def test_the_mtls_ads_bootstrap_differs_from_the_plain_one_only_in_the_canaryctl_transport_socket():
    plain, tls = read("envoy-ads.yaml"), read("envoy-ads-tls.yaml")
    body = tls[tls.index("node:\n"):]
    start = body.index("    # mTLS: this Envoy's certificate")
    end = body.index("    load_assignment:\n      cluster_name: canaryctl\n")
    assert plain[plain.index("node:\n"):] == body[:start] + body[end:]
    socket = body[start:end]
    # TLS 1.3 both ways, a client certificate, and canaryctl's certificate checked against the fleet CA.
    for needed in ("tls_minimum_protocol_version: TLSv1_3", "tls_certificates:", "trusted_ca:",
                   "match_typed_subject_alt_names:", "sni: canaryctl"):
        assert needed in socket, needed


def test_the_two_demo_apps_differ_only_in_version_and_port():
    v1, v2 = read("demo-app-v1.yaml"), read("demo-app-v2.yaml")
    normalised = [text.replace("v1", "vN").replace("v2", "vN").replace("8001", "PORT").replace("8002", "PORT")
                  for text in (v1, v2)]
    assert normalised[0] == normalised[1]
    assert '{\\"version\\":\\"v1\\"}' in v1 and '{\\"version\\":\\"v2\\"}' in v2


FRONTS = ("envoy-inline.yaml", "envoy-ecds.yaml", "envoy-ads.yaml", "envoy-ads-tls.yaml", "envoy-ads-native.yaml",
          "envoy-native.yaml")


def default_route(bootstrap: str) -> dict:
    """The front's route for requests without a route header: the last route, matching on no header."""
    config = yaml.safe_load(read(bootstrap))
    (listener,) = [l for l in config["static_resources"]["listeners"] if l["name"] == "ingress"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = manager["route_config"]["virtual_hosts"]
    last = host["routes"][-1]
    assert "headers" not in last["match"], f"{bootstrap}: the last route must be the default (no header match)"
    return last


@pytest.mark.parametrize("bootstrap", FRONTS)
def test_the_config_names_the_version_the_default_route_serves(bootstrap):
    # The filter writes nothing for users it keeps on default_route_version: that must be the version the
    # default route sends them to, and the route must name it in the route header itself. A promotion changes
    # stable, never this.
    config = json.loads(shipped_plugin_config())
    (web,) = config["rollouts"]
    version = web["default_route_version"]
    route = default_route(bootstrap)
    assert route["route"]["cluster"] == f"app-{version}", (bootstrap, route)
    added = {h["header"]["key"]: (h["header"]["value"], h["append_action"]) for h in route["request_headers_to_add"]}
    assert added == {"x-version": (version, "OVERWRITE_IF_EXISTS_OR_ADD")}, (bootstrap, added)
    inline = re.search(r'"default_route_version": "([^"]+)"', read(bootstrap))
    assert inline is None or inline.group(1) == version, f"{bootstrap}'s inline config"


def test_the_ecds_setup_promoted_by_a_published_config_sends_every_user_to_v2(start_envoy):
    # The ECDS example's way to promote: publish the shipped config with v2 as stable (tools/ecds.py).
    envoy = start_envoy("envoy-ecds.yaml")
    promoted = json.loads(shipped_plugin_config())
    web = promoted["rollouts"][0]
    web["stable"], web["canaries"] = "v2", [{"version": "v1", "percent": 0}]
    envoy.publish(json.dumps(promoted))
    conn = envoy.connection()

    def all_on_v2():
        responses = [envoy.get("/", {"x-user-id": f"e{i}"}, conn=conn) for i in range(200)]
        return all(r.served_by == "v2" and r.received("x-version") == ["v2"] for r in responses)

    eventually(all_on_v2, deadline_s=10, what="every user on v2 after the promoted config was published")
