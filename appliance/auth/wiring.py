"""Auth: the keyring, quotas, per-key counters and audit log of one server, built once from the
settings (AppContext holds it; the gate, SIGHUP, the monitor tab and the UI's chat use it).

A UI session is its key's: with a keys file the login's user name is the key's name ("default"
for `--api-key`), and each chat from the session is admitted, charged, counted and audited as
that key's call to /v1/chat/completions would be (endpoint "ui/chat" in the audit log)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from hearth.appliance.auth import gate
from hearth.appliance.auth.audit import AuditLog
from hearth.appliance.auth.call import CallRecord
from hearth.appliance.auth.key_stats import KeyRow, KeyStats
from hearth.appliance.auth.keyring import SINGLE_KEY_NAME, Keyring
from hearth.appliance.auth.keys import KeyEntry
from hearth.appliance.auth.quotas import Quotas
from hearth.appliance.protocol import APIError
from hearth.appliance.settings import Settings

UI_CHAT_ENDPOINT = "ui/chat"


@dataclass
class Auth:
    keyring: Keyring
    quotas: Quotas
    stats: KeyStats
    audit: AuditLog | None

    def reload_keys(self) -> bool:
        """Re-read the keys file (SIGHUP); streams in progress keep running."""
        return self.keyring.reload()

    @property
    def requires_key(self) -> bool:
        return self.keyring.enabled

    def login(self, username: str, key: str) -> bool:
        """The UI's login (scrypt only the first time a key is seen): a valid key, and with a
        keys file the key's name as the user name, so the session's chats are that key's."""
        try:
            entry = self.keyring.authenticate(f"Bearer {key}")
        except APIError:
            return False
        return self.keyring.keys_file is None or username.strip() == entry.name

    def admit(self, call: CallRecord, entry: KeyEntry | None, group: str | None) -> None:
        gate.admit(self.quotas, self.stats, call, entry, group)

    def end(self, call: CallRecord, entry: KeyEntry | None, status: int, method: str | None,
            body: bytes | None = None) -> None:
        gate.end(self.quotas, self.stats, self.audit, call, entry, status, method, body)

    def log(self, call: CallRecord, status: int, method: str | None) -> None:
        gate.log(self.audit, call, status, method)

    def open_ui_call(self, username: str | None,
                     model: str | None) -> tuple[CallRecord, KeyEntry | None]:
        """A UI chat as its session key's API call: admitted (raises 401 for a key revoked since
        the login, 403 for a key without "chat", 429 past a quota); close it with `end`."""
        call = CallRecord(None, endpoint=UI_CHAT_ENDPOINT, model=model)
        entry = None
        try:
            if self.requires_key:
                name = SINGLE_KEY_NAME if self.keyring.keys_file is None else (username or "")
                entry = self.keyring.entry_named(name.strip())
                if entry is None:
                    raise APIError(401, "the API key this session logged in with is no longer "
                                   "valid; reload the page and log in again",
                                   type="authentication_error", code="invalid_api_key")
            self.admit(call, entry, "chat")
        except APIError as error:
            self.log(call, error.status, "UI")
            raise
        return call, entry

    def rows(self) -> list[KeyRow]:
        return self.stats.rows()

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()


def build_auth(settings: Settings, registry: CollectorRegistry) -> Auth:
    audit = None
    if settings.state_dir is not None:
        audit = AuditLog(Path(settings.state_dir) / "audit",
                         int(settings.audit_log_max_mib * 2**20), settings.log_prompts)
    keyring = Keyring(settings.api_keys_file, settings.api_key)
    return Auth(keyring, Quotas(), KeyStats(registry), audit)
