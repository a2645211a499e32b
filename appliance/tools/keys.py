"""`hearth keys add | list | revoke`: edit the API keys file (`--api-keys-file`).

    hearth keys add kiosk --endpoints chat --requests-per-minute 30 --max-concurrent 2
    hearth keys list
    hearth keys revoke kiosk

`add` prints the new key once: only its scrypt hash is stored. The file is rewritten atomically,
checked before it replaces the old one, with the old file's owner, group and mode (a new file:
readable by its writer only; the installer makes /etc/hearth/keys.toml root:hearth 0640, so the
service can read what root writes there); a running server picks the change up on SIGHUP
(`systemctl reload hearth`), without dropping the streams in progress.
"""

from __future__ import annotations

import argparse
import datetime
import os
import stat
from pathlib import Path

from hearth.appliance.auth.keys import (
    ENDPOINT_GROUPS,
    KeyEntry,
    dump_keys,
    hash_key,
    load_keys,
    new_secret,
)

_ENV = "HEARTH_API_KEYS_FILE"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="add, list or revoke named API keys",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", default=os.environ.get(_ENV), required=_ENV not in os.environ,
                        help=f"the keys file [env {_ENV}]")
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a key and print it (once)")
    add.add_argument("name")
    for flag in ("--requests-per-minute", "--tokens-per-minute", "--max-concurrent"):
        add.add_argument(flag, type=int, default=None, help="limit (default: none)")
    add.add_argument("--priority", type=int, default=0, help="added to requests' priority; "
                     "lower runs first [0]")
    add.add_argument("--weight", type=float, default=1.0, help="fair share weight [1]")
    add.add_argument("--endpoints", nargs="+", default=list(ENDPOINT_GROUPS),
                     choices=ENDPOINT_GROUPS, help="what the key may call [all]")
    actions.add_parser("list", help="the keys and their limits (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="remove a key")
    revoke.add_argument("name")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        entries = load_keys(path) if path.exists() or args.keys_action != "add" else ()
        if args.keys_action == "add":
            return _add(path, entries, args)
        if args.keys_action == "revoke":
            return _revoke(path, entries, args.name)
    except ValueError as error:
        print(f"error: {error}")
        return 1
    _list(entries)
    return 0


def _add(path: Path, entries: tuple[KeyEntry, ...], args: argparse.Namespace) -> int:
    if any(e.name == args.name for e in entries):
        raise ValueError(f"a key named {args.name!r} exists; revoke it first or pick another")
    key_id, key = new_secret()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = KeyEntry(args.name, key_id, hash_key(key), args.requests_per_minute,
                     args.tokens_per_minute, args.max_concurrent, args.priority, args.weight,
                     frozenset(args.endpoints), created)
    _save(path, (*entries, entry))
    print(f"added key {args.name!r}; it is shown once, store it now:\n{key}")
    _remind()
    return 0


def _revoke(path: Path, entries: tuple[KeyEntry, ...], name: str) -> int:
    kept = tuple(e for e in entries if e.name != name)
    if len(kept) == len(entries):
        raise ValueError(f"no key named {name!r} in {path}")
    _save(path, kept)
    print(f"revoked key {name!r}")
    _remind()
    return 0


def _list(entries: tuple[KeyEntry, ...]) -> None:
    print(f"{'name':<20} {'id':<9} {'req/min':>8} {'tok/min':>9} {'conc':>5} {'prio':>5} "
          f"{'weight':>6}  endpoints")
    for e in entries:
        limits = [e.requests_per_minute, e.tokens_per_minute, e.max_concurrent]
        shown = ["-" if v is None else str(v) for v in limits]
        print(f"{e.name:<20} {e.id:<9} {shown[0]:>8} {shown[1]:>9} {shown[2]:>5} "
              f"{e.priority:>5} {e.weight:>6g}  {','.join(sorted(e.endpoints))}")


def _save(path: Path, entries: tuple[KeyEntry, ...]) -> None:
    """Write atomically (a server reloading mid-write sees the old file or the new one), and
    only a file that reads back: a bad value leaves the old file as it was. The new file keeps
    the old one's owner, group and mode, so `hearth keys` run as root leaves the file the
    installer made (root:hearth, 0640) readable by the service."""
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = path.stat()
    except FileNotFoundError:
        old = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dump_keys(entries))
        if old is not None:
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                pass  # not root: the file stays its writer's
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
        try:
            load_keys(tmp)  # what we wrote must read back
        except ValueError as error:
            raise ValueError(str(error).replace(str(tmp), str(path))) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _remind() -> None:
    print("a running server reloads the file on SIGHUP (systemctl reload hearth)")
