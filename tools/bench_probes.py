#!/usr/bin/env python3
"""Cost-breakdown builds of the .wasm and of the native module: each is the committed `src/filter.rs` (or
`native/src/lib.rs`) with one small edit that skips part of the work, built in a scratch git worktree. `tools/bench.py --probe NAME=PATH` then measures them
beside the real filter (see BENCHMARKS.md, "What each part of the .wasm costs"). None of them is shipped.

    .venv/bin/python tools/bench_probes.py --out /tmp/probes floor write read readwrite
    .venv/bin/python tools/bench_probes.py --out /tmp/probes native-floor native-write   # .so probes
    .venv/bin/python tools/bench_probes.py --list

An edit that no longer applies (the source changed) stops the build with the text it looked for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST_HEADERS_TOP = ") -> u32 {\n    let active = STATE"
READ = "let mut h = HostRequest::default(); let _ = h.header(\"x-user-id\").map(|v| v.len());"
WRITE = "replace_header(REQUEST_HEADERS, \"x-version\", b\"v1\");"
# Counts the request in the newest config's first counter, as the filter counts every request.
COUNT = ("let id = STATE.with(|s| s.borrow().roots.values().next().and_then(|a| a.counters.first().copied().flatten()));"
         " if let Some(id) = id { let _ = unsafe { host::proxy_increment_metric(id, 1) }; }")

# Reads headers one by one (proxy_get_header_map_value: one host call each, and one allocation callback
# each present one) instead of all of them in one proxy_get_header_map_pairs call.
ONE_BY_ONE = '''
impl Request for HostRequest {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: as in `returned_buffer`.
        let status = unsafe {
            by_value::proxy_get_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), &mut data, &mut size)
        };
        if status != STATUS_OK {
            return None;
        }
        self.values.push(owned(data, size));
        self.values.last().map(|v| v.as_slice())
    }
}

mod by_value {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_get_header_map_value(map: u32, key: *const u8, key_size: usize, value: *mut *mut u8,
                                          value_size: *mut usize) -> u32;
    }
}

'''


def replace(source: str, old: str, new: str) -> str:
    if old not in source:
        raise SystemExit(f"bench_probes: the probed source no longer contains:\n{old}")
    return source.replace(old, new)


def at_top(work: str, top: str = REQUEST_HEADERS_TOP, status: str = "ACTION_CONTINUE"):
    """Do `work` first in the request-headers hook whose body opens with `top` (the .wasm's by default), then
    return `status`: the rest of the filter is skipped."""
    opening, rest = top.split("\n", 1)
    return lambda s: replace(s, top, f"{opening}\n    if true {{ {work} return {status}; }}\n{rest}")


def unexport(function: str):
    """Envoy calls only what a module exports: the function stays, unexported."""
    return lambda s: replace(s, f'#[no_mangle]\npub extern "C" fn {function}',
                             f'#[allow(dead_code)]\npub extern "C" fn {function}')


NATIVE_TOP = ") -> u32 {\n    let decided = guard(false, || {"


# SAFETY (in the probe): Envoy's pointer for this hook, as in the real hook.
NATIVE_WRITE = ("let mut stream = unsafe { Stream::new(filter_envoy) }; "
                "stream.set(abi::REQUEST_HEADER, \"x-version\", Some(b\"v1\")); stream.route_changed(); stream.finish();")


def one_by_one(s: str) -> str:
    s = replace(s, "struct HostRequest {\n    pairs: Option<Vec<u8>>,\n}", "struct HostRequest {\n    values: Vec<Vec<u8>>,\n}")
    start, end = s.index("impl Request for HostRequest {"), s.index("impl RequestHeaders for HostRequest")
    return s[:start] + ONE_BY_ONE + s[end:]


WASM_PROBES = {
    "floor": ("returns at once: Envoy's per-stream wasm context and the exported callbacks only", at_top("")),
    "write": ("only writes x-version: v1 (and so clears the route cache)", at_top(WRITE)),
    "read": ("only reads the request headers (one proxy_get_header_map_pairs) and looks up x-user-id", at_top(READ)),
    "readwrite": ("reads as (read), then writes as (write)", at_top(READ + " " + WRITE)),
    "readwritecount": ("reads and writes as (readwrite), then increments a counter", at_top(READ + " " + WRITE + " " + COUNT)),
    "nocount": ("the whole filter, without the counter increment",
                lambda s: replace(s, "let _ = unsafe { host::proxy_increment_metric(id, 1) };", "let _ = id;")),
    "noresp": ("the whole filter, proxy_on_response_headers not exported (no assigned cookie)",
               unexport("proxy_on_response_headers")),
    "noctx": ("the whole filter, proxy_on_context_create not exported (one plugin config per VM)",
              unexport("proxy_on_context_create")),
    "nodelete": ("the whole filter, proxy_on_delete not exported (roots and streams never forgotten)",
                 unexport("proxy_on_delete")),
    "lean": ("the whole filter, neither of those two callbacks exported",
             lambda s: unexport("proxy_on_context_create")(unexport("proxy_on_response_headers")(s))),
    "values": ("the whole filter, reading headers one by one (proxy_get_header_map_value)", one_by_one),
}
NATIVE_PROBES = {
    "native-floor": ("native: returns at once (Envoy's per-stream filter object and the hook calls only)",
                     at_top("", NATIVE_TOP, "CONTINUE")),
    "native-write": ("native: only sets x-version: v1 and clears the route cache", at_top(NATIVE_WRITE, NATIVE_TOP, "CONTINUE")),
}
PROBES = WASM_PROBES | NATIVE_PROBES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "canary-router-probes"))
    parser.add_argument("--list", action="store_true", help="list the probes and what each skips")
    parser.add_argument("probes", nargs="*", metavar="PROBE")
    args = parser.parse_args()
    if args.list or not args.probes:
        for name, (what, _) in PROBES.items():
            print(f"{name:15} {what}")
        return 0
    unknown = [p for p in args.probes if p not in PROBES]
    if unknown:
        print(f"unknown probe(s): {', '.join(unknown)} (--list shows them)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="canary-router-probe-src-")
    worktree = os.path.join(scratch, "wt")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--quiet", "--detach", worktree, "HEAD"], check=True)
    try:
        target = os.path.join(ROOT, "target", "probes")
        env = dict(os.environ, CARGO_TARGET_DIR=target)
        for name in args.probes:
            native = name in NATIVE_PROBES
            source = os.path.join(worktree, "native", "src", "lib.rs") if native else os.path.join(worktree, "src", "filter.rs")
            with open(source) as f:
                original = f.read()
            with open(source, "w") as f:
                f.write(PROBES[name][1](original))
            if native:
                build = ["cargo", "build", "--quiet", "--profile", "native", "-p", "canary-router-native"]
                built, out = os.path.join(target, "native", "libcanary_router_native.so"), f"{name}.so"
            else:
                build = ["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "-p", "canary-router"]
                built, out = os.path.join(target, "wasm32-wasip1", "release", "canary_router.wasm"), f"{name}.wasm"
            subprocess.run(build, cwd=worktree, env=env, check=True)
            with open(source, "w") as f:
                f.write(original)
            out = os.path.join(args.out, out)
            shutil.copyfile(built, out)
            print(f"--probe {name}={out}")
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
