"""Auth: the keyring, quotas, per-key counters and audit log of one server, built once from the
settings (AppContext holds it; the gate, SIGHUP and the monitor tab use it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from hearth.appliance.auth.audit import AuditLog
from hearth.appliance.auth.key_stats import KeyRow, KeyStats
from hearth.appliance.auth.keyring import Keyring
from hearth.appliance.auth.quotas import Quotas
from hearth.appliance.protocol import APIError
from hearth.appliance.settings import Settings


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

    def accepts(self, key: str) -> bool:
        """Whether `key` is valid: the UI's login (scrypt only the first time a key is seen)."""
        try:
            self.keyring.authenticate(f"Bearer {key}")
        except APIError:
            return False
        return True

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
