#!/usr/bin/env python3
"""Certificates for mTLS between canaryctl and its Envoys, made with Debian's openssl (never committed).

    tools/certs.py DIR [--envoy CLUSTER[/NODE] ...] [--server-name NAME ...] [--trust-domain DOMAIN]

DIR receives (a CA already in DIR is kept, so more Envoys can be issued later):
  ca.pem, ca.key               the fleet CA: signs canaryctl's serving certificate and every Envoy's
  canaryctl.pem, canaryctl.key canaryctl's serving certificate (DNS/IP SANs: --server-name, default
                               canaryctl, localhost, 127.0.0.1)
  envoy.pem, envoy.key         the first --envoy's client certificate (what envoy/envoy-ads-tls.yaml reads)
  envoy-<cluster>[-<node>].pem the client certificate of each --envoy, named in a URI SAN:
                               spiffe://<trust domain>/envoy/<cluster>[/<node>] (no node: any node of the cluster)

`make certs` runs it for the demo and docker-compose (.run/certs, cluster canary-router). The tests import it.
Keys are ECDSA P-256, written 0600. docs/canaryctl.md shows the same steps with plain openssl commands.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

DEFAULT_TRUST_DOMAIN = "canary-router.local"
DEFAULT_SERVER_NAMES = ["canaryctl", "localhost", "127.0.0.1"]
DEFAULT_CLUSTER = "canary-router"  # node.cluster in the shipped envoy-ads*.yaml


def _openssl(*args: str, cwd: str | None = None) -> None:
    if shutil.which("openssl") is None:
        sys.exit("openssl is missing: sudo apt-get install openssl")
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr.strip()}")


def _key(path: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    os.chmod(path, 0o600)


def make_ca(directory: str, name: str = "ca", subject: str = "canary-router fleet CA", days: int = 3650) -> str:
    """A self-signed CA: DIR/<name>.pem and DIR/<name>.key. Returns the certificate's path."""
    os.makedirs(directory, exist_ok=True)
    cert, key = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    _key(key)
    _openssl("req", "-new", "-x509", "-key", key, "-out", cert, "-days", str(days), "-subj", f"/CN={subject}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash")
    return cert


def issue(directory: str, name: str, sans: list[str], usage: str, ca: str = "ca", days: int = 365,
          not_before_days_ago: int = 0, expired: bool = False) -> tuple[str, str]:
    """A leaf certificate signed by DIR/<ca>.pem: DIR/<name>.pem and DIR/<name>.key. `sans` are openssl SAN
    entries (URI:…, DNS:…, IP:…); `usage` is serverAuth or clientAuth. `expired`: valid yesterday only."""
    cert, key = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    _key(key)
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = os.path.join(tmp, "leaf.csr"), os.path.join(tmp, "leaf.ext")
        _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\n"
                    f"extendedKeyUsage={usage}\n"
                    f"subjectAltName={','.join(sans)}\n"
                    "authorityKeyIdentifier=keyid\n")
        ca_cert, ca_key = os.path.join(directory, f"{ca}.pem"), os.path.join(directory, f"{ca}.key")
        if expired:
            # openssl x509 -req cannot back-date; `openssl ca` can, with a throwaway database.
            db = os.path.join(tmp, "index.txt")
            open(db, "w").close()
            conf = os.path.join(tmp, "ca.cnf")
            with open(conf, "w") as f:
                f.write(f"[ca]\ndefault_ca=d\n[d]\ndatabase={db}\nnew_certs_dir={tmp}\nserial={tmp}/serial\n"
                        "default_md=sha256\npolicy=p\nunique_subject=no\n[p]\ncommonName=supplied\n")
            with open(os.path.join(tmp, "serial"), "w") as f:
                f.write("01\n")
            _openssl("ca", "-batch", "-config", conf, "-in", csr, "-out", cert, "-cert", ca_cert, "-keyfile", ca_key,
                     "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-extfile", ext, "-notext")
        else:
            _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
                     "-CAserial", os.path.join(tmp, "serial"), "-out", cert, "-days", str(days), "-extfile", ext,
                     "-sha256")
    return cert, key


def spiffe_id(cluster: str, node: str | None = None, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The URI SAN that lets an Envoy of `cluster` (as `node`, or any node) talk to canaryctl."""
    path = "/".join(urllib.parse.quote(part, safe="") for part in [cluster] + ([node] if node else []))
    return f"spiffe://{trust_domain}/envoy/{path}"


def server_sans(names: list[str]) -> list[str]:
    sans = []
    for name in names:
        try:
            ipaddress.ip_address(name)
            sans.append(f"IP:{name}")
        except ValueError:
            sans.append(f"DNS:{name}")
    return sans


def issue_server(directory: str, names: list[str] | None = None, name: str = "canaryctl", ca: str = "ca") \
        -> tuple[str, str]:
    return issue(directory, name, server_sans(names or DEFAULT_SERVER_NAMES), "serverAuth", ca=ca)


def issue_envoy(directory: str, cluster: str, node: str | None = None, name: str | None = None, ca: str = "ca",
                trust_domain: str = DEFAULT_TRUST_DOMAIN, **kwargs) -> tuple[str, str]:
    name = name or "envoy-" + "-".join(urllib.parse.quote(p, safe="") for p in [cluster] + ([node] if node else []))
    return issue(directory, name, [f"URI:{spiffe_id(cluster, node, trust_domain)}"], "clientAuth", ca=ca, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--envoy", action="append", metavar="CLUSTER[/NODE]",
                        help=f"a client certificate for this cluster (and node); default {DEFAULT_CLUSTER}")
    parser.add_argument("--server-name", action="append", metavar="NAME",
                        help=f"a DNS name or IP of canaryctl's certificate; default {', '.join(DEFAULT_SERVER_NAMES)}")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    args = parser.parse_args()
    directory = args.directory
    if os.path.exists(os.path.join(directory, "ca.pem")) and os.path.exists(os.path.join(directory, "ca.key")):
        print(f"keeping the CA in {directory}")
    else:
        make_ca(directory)
    issue_server(directory, args.server_name)
    envoys = args.envoy or [DEFAULT_CLUSTER]
    for i, spec in enumerate(envoys):
        cluster, _, node = spec.partition("/")
        cert, key = issue_envoy(directory, cluster, node or None, trust_domain=args.trust_domain)
        if i == 0:
            shutil.copyfile(cert, os.path.join(directory, "envoy.pem"))
            shutil.copyfile(key, os.path.join(directory, "envoy.key"))
            os.chmod(os.path.join(directory, "envoy.key"), 0o600)
        print(f"{cert}: {spiffe_id(cluster, node or None, args.trust_domain)}")
    print(f"{directory}/canaryctl.pem: {', '.join(server_sans(args.server_name or DEFAULT_SERVER_NAMES))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
