"""`hearth cert`: a self-signed TLS certificate for a LAN box, and its SHA-256 fingerprint.

    hearth cert --out-dir /etc/hearth/tls --name hearth.lan --name 192.168.1.20
    hearth serve --ssl-certfile /etc/hearth/tls/cert.pem --ssl-keyfile /etc/hearth/tls/key.pem

Clients either trust cert.pem (curl --cacert, httpx verify=..., REQUESTS_CA_BUNDLE) or compare the
printed fingerprint once. The key is written readable by its owner only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CERT_FILE, KEY_FILE = "cert.pem", "key.pem"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cert", help="make a self-signed TLS certificate (and print its fingerprint)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out-dir", default=".", help="where cert.pem and key.pem go [.]")
    parser.add_argument("--name", action="append", default=None, metavar="HOST|IP",
                        help="a name or address clients use (repeatable; default: this host's "
                             "name, localhost, 127.0.0.1, ::1)")
    parser.add_argument("--days", type=int, default=825, help="validity in days [825]")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    from hearth.appliance.tls import default_names, make_self_signed

    out = Path(args.out_dir)
    cert_path, key_path = out / CERT_FILE, out / KEY_FILE
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists (--force overwrites it)")
        return 1
    try:
        cert_pem, key_pem, info = make_self_signed(args.name or default_names(), args.days)
        out.mkdir(parents=True, exist_ok=True)
        _write(key_path, key_pem, 0o600)
        _write(cert_path, cert_pem, 0o644)
    except (ValueError, OSError) as error:
        print(f"error: {error}")
        return 1
    print(f"certificate: {cert_path}\nkey:         {key_path}\nsubject:     {info.subject}")
    print(f"valid until: {info.not_after:%Y-%m-%d} UTC")
    print(f"SHA-256 fingerprint: {info.sha256}")
    print(f"serve with: hearth serve --ssl-certfile {cert_path} --ssl-keyfile {key_path}")
    return 0


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
