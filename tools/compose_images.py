#!/usr/bin/env python3
"""Stand-in images for running docker-compose.yaml where no image registry can be reached (CI here).

    .venv/bin/python tools/compose_images.py        # needs podman; run as root (rootful podman)

docker-compose.yaml names two images: `envoyproxy/envoy:v1.40.0` (the front Envoy and the demo apps) and
`debian:bookworm-slim` (canaryctl, whose binary is mounted in). Neither can be pulled here, so both are made
locally with `podman import` from one small root filesystem: the venv's Envoy 1.40.0 binary (the same binary as
the official image of that version), bash, sed and grep (the front's start command and health check use them),
and the shared libraries `ldd` lists for those and for canaryctl. It stands in for everything else in those
images: no entrypoint script, no other tools. Both tags are written in full (docker.io/...), as podman resolves
the compose file's short names to them.

`containers_conf()` writes the engine settings the compose run needs on this machine: default per-container
limits low enough to be granted here (podman's default asks for more open files than this kernel allows), and
the runc runtime (Debian's podman defaults to crun, which refuses to start any container on a host whose cgroups
are in hybrid mode, v1 controllers beside a v2 mount: "crun: cgroups in hybrid mode not supported", seen here on
2026-12-06; runc runs in every mode). It is handed to podman through CONTAINERS_CONF, so nothing under /etc
changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import count_instructions  # noqa: E402
import lab  # noqa: E402

IMAGES = ("docker.io/envoyproxy/envoy:v1.40.0", "docker.io/library/debian:bookworm-slim")
TOOLS = ("bash", "sed", "grep", "sh", "cat")


def libraries(binary: str) -> set[str]:
    """The shared libraries a binary loads (and the loader), as `ldd` names them."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            found.add(match.group(1))
    return found


def copy_into(root: str, path: str, as_path: str | None = None):
    """Copy `path` (following links) to the same place under `root` (or to `as_path`)."""
    target = root + (as_path or path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.realpath(path), target)


def root_filesystem(root: str):
    # Debian 12 merges /usr: /bin, /lib and /lib64 are links into it, as in the real images.
    for directory in ("usr/bin", "usr/local/bin", "usr/lib", "usr/lib64", "etc", "tmp", "root"):
        os.makedirs(os.path.join(root, directory), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    for link, to in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/bin")):
        os.symlink(to, os.path.join(root, link))
    envoy = count_instructions.envoy_binary()
    binaries = [(envoy, "/usr/local/bin/envoy")]
    binaries += [(shutil.which(tool), f"/usr/bin/{tool}") for tool in TOOLS]
    needed = set()
    for source, target in binaries:
        if source is None:
            raise RuntimeError(f"missing a tool for the stand-in image: {binaries}")
        copy_into(root, source, target)
        needed |= libraries(source)
    needed |= libraries(lab.CANARYCTL)  # canaryctl is mounted in at run time; its libraries must be there
    for library in sorted(needed):
        copy_into(root, library)
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/bash\nenvoy:x:101:101::/home/envoy:/usr/sbin/nologin\n")
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write("root:x:0:\nenvoy:x:101:\n")


def build(podman_env: dict | None = None) -> list[str]:
    """Makes both images; returns their names."""
    for path in (lab.CANARYCTL,):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: `make canaryctl` first")
    workdir = tempfile.mkdtemp(prefix="canary-router-images-")
    try:
        root = os.path.join(workdir, "rootfs")
        root_filesystem(root)
        archive = os.path.join(workdir, "rootfs.tar")
        with tarfile.open(archive, "w") as tar:
            def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                return info
            for name in sorted(os.listdir(root)):
                tar.add(os.path.join(root, name), arcname=name, filter=as_root)
        for image in IMAGES:
            subprocess.run(["podman", "import", "--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin",
                            "--change", "WORKDIR /", archive, image],
                           check=True, capture_output=True, text=True, env=podman_env)
        return list(IMAGES)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def containers_conf(path: str) -> str:
    """The engine settings for this machine (see the module doc); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n\n'
                '[engine]\nruntime = "runc"\n')
    return path


if __name__ == "__main__":
    env = dict(os.environ, CONTAINERS_CONF=containers_conf(os.path.join(lab.ROOT, ".run", "compose",
                                                                         "containers.conf")))
    for name in build(env):
        print(f"built {name}")
