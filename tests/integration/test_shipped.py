"""The files in envoy/ agree with each other and work as shipped, so the examples cannot rot."""

import json
import os
import re

import pytest

import ecds
from harness import ENVOY_DIR, expected_version, indent, shipped_plugin_config


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
