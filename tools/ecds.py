#!/usr/bin/env python3
"""Publish a canary-router plugin configuration to Envoys that read it by ECDS from a watched directory.

Envoy applies a new file only when it is renamed into the watched directory (an in-place rewrite is
ignored), so `publish` writes a temporary file in that directory, fsyncs it, and renames it over the
target: every Envoy sees either the old or the new config, never half a file.

    python3 tools/ecds.py check   --config my-config.json
    python3 tools/ecds.py render  --config my-config.json [--version V] [--wasm PATH]
    python3 tools/ecds.py publish --config my-config.json --dir envoy/ecds [--version V] [--wasm PATH]
    python3 tools/ecds.py publish --config my-config.json --dir envoy/ecds --native PATH   # the native module

The plugin configuration itself is validated by Envoy (the filter's on_configure): an invalid one is
rejected there, and the last good one keeps serving. `check` runs the same validation first, natively,
when the project is built (cargo run --example check_config).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

FILTER_NAME = "canary-router"
RESOURCE_FILE = "canary-router.json"
DEFAULT_WASM = "target/wasm32-wasip1/release/canary_router.wasm"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
NATIVE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"


def wasm_filter(plugin_config: str, wasm_path: str = DEFAULT_WASM, name: str = FILTER_NAME) -> dict:
    """The Wasm HTTP filter config, as in envoy/envoy-inline.yaml, carrying `plugin_config` (JSON text).
    `name` is also the root and VM id: another name gets its own VM (the benchmark runs builds side by side)."""
    return {
        "@type": WASM_TYPE,
        "config": {
            "name": name,
            "root_id": name,
            "failure_policy": "FAIL_RELOAD",
            "vm_config": {
                "vm_id": name,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm_path}},
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": plugin_config,
            },
        },
    }


def native_filter(plugin_config: str, module_path: str, name: str = "canary_router_native") -> dict:
    """The native build's filter config, as in envoy/envoy-native.yaml, carrying `plugin_config`. `name` is the
    module's name."""
    return {
        "@type": NATIVE_TYPE,
        "dynamic_module_config": {
            "name": name,
            "metrics_namespace": "canary_router_native",
            "module": {"local": {"filename": module_path}},
        },
        "filter_name": FILTER_NAME,
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin_config},
    }


def content_version(plugin_config: str, wasm_path: str) -> str:
    return hashlib.sha256(f"{wasm_path}\n{plugin_config}".encode()).hexdigest()[:16]


def discovery_response(plugin_config: str, version: str | None = None, wasm_path: str = DEFAULT_WASM,
                       native_path: str | None = None) -> dict:
    """The file Envoy's path_config_source reads: a DiscoveryResponse with one TypedExtensionConfig (the
    .wasm filter, or the native module's when `native_path` is given)."""
    artifact = native_path or wasm_path
    typed = native_filter(plugin_config, native_path) if native_path else wasm_filter(plugin_config, wasm_path)
    return {
        "version_info": version or content_version(plugin_config, artifact),
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": FILTER_NAME,
                "typed_config": typed,
            }
        ],
    }


def render(plugin_config: str, version: str | None = None, wasm_path: str = DEFAULT_WASM,
           native_path: str | None = None) -> str:
    return json.dumps(discovery_response(plugin_config, version, wasm_path, native_path), indent=2) + "\n"


def publish(directory: str, plugin_config: str, version: str | None = None, wasm_path: str = DEFAULT_WASM,
            native_path: str | None = None) -> str:
    """Atomically replace `directory`/canary-router.json; returns the version published."""
    body = discovery_response(plugin_config, version, wasm_path, native_path)
    fd, tmp = tempfile.mkstemp(prefix=".canary-router.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(body, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, os.path.join(directory, RESOURCE_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return body["version_info"]


def check(plugin_config: str) -> tuple[bool, str]:
    """Validate with the filter's own code, compiled natively; returns (ok, the one-line message)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        ["cargo", "run", "--quiet", "--example", "check_config", "--", "-"],
        input=plugin_config, capture_output=True, text=True, cwd=root,
    )
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "render", "publish"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True, help="plugin configuration (JSON file, - for stdin)")
        if name != "check":
            p.add_argument("--version", help="version_info (default: a hash of the content)")
            p.add_argument("--wasm", default=DEFAULT_WASM, help=f"path of the .wasm as Envoy sees it ({DEFAULT_WASM})")
            p.add_argument("--native", metavar="SO", help="serve the native module at this path instead of the .wasm "
                           "(the bootstrap's type_urls must list DynamicModuleFilter)")
        if name == "publish":
            p.add_argument("--dir", required=True, help="the watched directory of the ECDS bootstrap")
            p.add_argument("--no-check", action="store_true", help="skip the native validation")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.config == "-" else open(args.config).read()
    if args.command == "check" or (args.command == "publish" and not args.no_check):
        ok, message = check(text)
        print(message, file=sys.stderr if not ok else sys.stdout)
        if not ok:
            return 1
        if args.command == "check":
            return 0
    if args.command == "render":
        sys.stdout.write(render(text, args.version, args.wasm, args.native))
    elif args.command == "publish":
        version = publish(args.dir, text, args.version, args.wasm, args.native)
        print(f"published version {version} to {os.path.join(args.dir, RESOURCE_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
