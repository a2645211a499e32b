"""The keys file: named API keys with their limits, stored hashed (TOML, `--api-keys-file`).

    [[key]]
    name = "kiosk"
    id = "3f9a1c0e"                       # public: the key is "hk_3f9a1c0e_<secret>"
    hash = "scrypt$16384$8$1$<salt b64>$<digest b64>"
    requests_per_minute = 30              # optional quotas; absent: unlimited
    tokens_per_minute = 20000
    max_concurrent = 2
    priority = 0                          # added to each request's priority (lower runs first)
    weight = 1.0                          # fair share of the engine's tokens when it is saturated
    endpoints = ["chat"]                  # what the key may call; absent: everything

A key is `hk_<id>_<secret>`: the id finds the entry without trying every hash, and the secret is
checked against a salted scrypt digest (hashlib, standard library) with hmac.compare_digest. Only
scrypt with at least the parameters below is accepted: a file holding plain keys or a weak hash is
refused at startup with a message naming the entry. `hearth keys add|list|revoke` edits the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Endpoint groups a key may be allowed; each path the gate guards belongs to one.
ENDPOINT_GROUPS = ("chat", "completions", "models", "tokenize")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 16384, 8, 1  # the minimum accepted (OWASP's scrypt advice)
_FIELDS = {"name", "id", "hash", "requests_per_minute", "tokens_per_minute", "max_concurrent",
           "priority", "weight", "endpoints", "created"}


@dataclass(frozen=True)
class KeyEntry:
    name: str
    id: str
    hash: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    priority: int = 0
    weight: float = 1.0
    endpoints: frozenset[str] = field(default_factory=lambda: frozenset(ENDPOINT_GROUPS))
    created: str | None = None

    def allows(self, group: str) -> bool:
        return group in self.endpoints


def new_secret() -> tuple[str, str]:
    """A fresh (id, key): the key is what the client sends, the id is stored in clear."""
    key_id = secrets.token_hex(4)
    return key_id, f"hk_{key_id}_{secrets.token_urlsafe(24)}"


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "hk" or not parts[2]:
        return None
    return parts[1]


def hash_key(key: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(key, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_key(key: str, stored: str) -> bool:
    """Constant-time check of `key` against a stored `scrypt$...` hash."""
    n, r, p, salt, digest = _parse_hash(stored)
    return hmac.compare_digest(_scrypt(key, salt, n, r, p), digest)


def _scrypt(key: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20,
                          dklen=32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("hash must be 'scrypt$N$r$p$salt$digest' (made by `hearth keys add`); "
                         "plain keys and other hashes are refused")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5])
    except ValueError:
        raise ValueError("hash is malformed: N, r, p must be integers, salt and digest "
                         "base64") from None
    if n < _SCRYPT_N or r < _SCRYPT_R or p < _SCRYPT_P or len(salt) < 16 or len(digest) < 32:
        raise ValueError(f"hash is too weak: scrypt needs N >= {_SCRYPT_N}, r >= {_SCRYPT_R}, "
                         f"p >= {_SCRYPT_P}, a 16-byte salt; re-create the key with "
                         "`hearth keys add`")
    return n, r, p, salt, digest


def load_keys(path: str | Path) -> tuple[KeyEntry, ...]:
    """Read and check a keys file. Raises ValueError naming the file and the bad entry."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"keys file {path} does not exist (create it with "
                         f"`hearth keys add NAME --file {path}`)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"keys file {path} cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"keys file {path} is not valid TOML: {error}") from None
    unknown = set(data) - {"key"}
    if unknown or not isinstance(data.get("key", []), list):
        raise ValueError(f"keys file {path}: only [[key]] tables are allowed, found "
                         f"{', '.join(sorted(unknown)) or 'key = ...'}")
    entries = tuple(_entry(path, i, table) for i, table in enumerate(data.get("key", [])))
    _check_unique(path, entries)
    return entries


def _entry(path: Path, index: int, table: object) -> KeyEntry:
    where = f"keys file {path}, key #{index + 1}"
    try:
        if not isinstance(table, dict):
            raise ValueError("must be a [[key]] table")
        where = f"{where} ({table.get('name', 'no name')!r})"
        unknown = set(table) - _FIELDS
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; "
                             f"allowed: {', '.join(sorted(_FIELDS))}")
        return _checked_entry(table)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None


def _checked_entry(table: dict) -> KeyEntry:
    name, key_id = table.get("name"), table.get("id")
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise ValueError("name must be a non-empty string of at most 64 characters")
    if not isinstance(key_id, str) or not key_id or "_" in key_id:
        raise ValueError("id must be the key's id (the part after 'hk_')")
    stored = table.get("hash")
    if not isinstance(stored, str):
        raise ValueError("hash is missing (made by `hearth keys add`)")
    _parse_hash(stored)
    endpoints = table.get("endpoints", list(ENDPOINT_GROUPS))
    if not isinstance(endpoints, list) or not set(endpoints) <= {*ENDPOINT_GROUPS, "*"}:
        raise ValueError(f"endpoints must be a list of {', '.join(ENDPOINT_GROUPS)} (or '*')")
    groups = frozenset(ENDPOINT_GROUPS) if "*" in endpoints else frozenset(endpoints)
    weight = table.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
            weight > 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be a positive number, got {weight!r}")
    priority = table.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    return KeyEntry(
        name.strip(), key_id, stored,
        _limit(table, "requests_per_minute"), _limit(table, "tokens_per_minute"),
        _limit(table, "max_concurrent"), priority, float(weight), groups, table.get("created"),
    )


def _limit(table: dict, name: str) -> int | None:
    value = table.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (leave it out for no limit), "
                         f"got {value!r}")
    return value


def _check_unique(path: Path, entries: tuple[KeyEntry, ...]) -> None:
    for attribute in ("name", "id"):
        seen: set[str] = set()
        for entry in entries:
            value = getattr(entry, attribute)
            if value in seen:
                raise ValueError(f"keys file {path}: two keys have the {attribute} {value!r}; "
                                 f"names and ids must be unique (`hearth keys revoke` one)")
            seen.add(value)


def dump_keys(entries: tuple[KeyEntry, ...]) -> str:
    """The keys file's text for `entries` (what `hearth keys` writes)."""
    lines = ["# Hearth API keys: `hearth keys add | list | revoke` edit this file; a running",
             "# server reloads it on SIGHUP. Keys are stored hashed (scrypt).", ""]
    for entry in entries:
        lines.append("[[key]]")
        for name in ("name", "id", "hash", "created", "requests_per_minute",
                     "tokens_per_minute", "max_concurrent", "priority", "weight"):
            value = getattr(entry, name)
            if value is not None:
                lines.append(f"{name} = {json.dumps(value)}")
        groups = [g for g in ENDPOINT_GROUPS if g in entry.endpoints]
        lines.append(f"endpoints = {json.dumps(groups)}")
        lines.append("")
    return "\n".join(lines)
