"""Keyring: who a request's `Authorization: Bearer KEY` is, from the keys file and `--api-key`.

scrypt is slow on purpose (tens of milliseconds), so a key is checked against its hash once; after
that an HMAC of it under a per-process random pepper finds its entry. The cache is emptied when
the keys file is reloaded (SIGHUP), so a revoked key stops working at once. `--api-key` stays the
simple case: alone it is a key named "default" with no limits, and beside a keys file too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from pathlib import Path

from hearth.appliance.auth.keys import KeyEntry, key_id_of, load_keys, verify_key
from hearth.appliance.protocol import APIError

logger = logging.getLogger("hearth.auth")

SINGLE_KEY_NAME = "default"


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


class Keyring:
    def __init__(self, keys_file: str | Path | None, api_key: str | None) -> None:
        self.keys_file = None if keys_file is None else Path(keys_file)
        self._single = None if api_key is None else api_key.encode()
        self._pepper = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._entries: dict[str, KeyEntry] = {}  # by id
        self._verified: dict[bytes, KeyEntry] = {}  # HMAC(pepper, key) -> entry
        if self.keys_file is not None:
            self._install(load_keys(self.keys_file))  # a bad file stops the start here

    @property
    def enabled(self) -> bool:
        """Whether requests need a key at all."""
        return self.keys_file is not None or self._single is not None

    def entries(self) -> tuple[KeyEntry, ...]:
        return tuple(self._entries.values())

    def reload(self) -> bool:
        """Re-read the keys file (SIGHUP). A bad file is logged and the old keys stay."""
        if self.keys_file is None:
            return False
        try:
            entries = load_keys(self.keys_file)
        except ValueError as error:
            logger.error("keys file not reloaded, the previous keys stay in force: %s", error)
            return False
        self._install(entries)
        logger.info("keys file reloaded: %d key(s)", len(entries))
        return True

    def _install(self, entries: tuple[KeyEntry, ...]) -> None:
        with self._lock:
            self._entries = {entry.id: entry for entry in entries}
            self._verified = {}

    def authenticate(self, authorization: str | None) -> KeyEntry | None:
        """The entry of the request's key; None when no key is configured. Raises 401."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if self._single is not None and hmac.compare_digest(token.encode(), self._single):
            return KeyEntry(SINGLE_KEY_NAME, SINGLE_KEY_NAME, "")
        entry = self._lookup(token)
        if entry is None:
            raise _unauthorized("incorrect API key provided")
        return entry

    def entry_named(self, name: str) -> KeyEntry | None:
        """The key called `name` now (None once revoked): the UI's session knows its key by the
        name it logged in with."""
        if name == SINGLE_KEY_NAME and self._single is not None:
            return KeyEntry(SINGLE_KEY_NAME, SINGLE_KEY_NAME, "")
        with self._lock:
            return next((e for e in self._entries.values() if e.name == name), None)

    def _lookup(self, token: str) -> KeyEntry | None:
        tag = hmac.new(self._pepper, token.encode(), hashlib.sha256).digest()
        with self._lock:
            entry = self._verified.get(tag)
            candidate = self._entries.get(key_id_of(token) or "")
        if entry is not None:
            return entry
        if candidate is None or not verify_key(token, candidate.hash):
            return None
        with self._lock:
            if self._entries.get(candidate.id) is candidate:  # not revoked meanwhile
                self._verified[tag] = candidate
        return candidate
