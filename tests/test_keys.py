"""Named API keys without a server: the keys file (hashing, checks, clear errors), `hearth keys`,
quotas, and the TLS checks and `hearth cert`."""

from __future__ import annotations

import datetime
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hearth.appliance.auth.keyring import Keyring
from hearth.appliance.auth.keys import (
    KeyEntry,
    dump_keys,
    hash_key,
    load_keys,
    new_secret,
    verify_key,
)
from hearth.appliance.auth.quotas import QuotaExceededError, Quotas
from hearth.appliance.protocol import APIError
from hearth.appliance.settings import Settings
from hearth.appliance.tls import check_tls_files
from hearth.cli import main


def write_key(path, name: str = "kiosk", **limits) -> str:
    """Append a key to the keys file at `path`; the key."""
    key_id, key = new_secret()
    entries = load_keys(path) if path.exists() else ()
    path.write_text(dump_keys((*entries, KeyEntry(name, key_id, hash_key(key), **limits))))
    return key


def test_hash_is_salted_scrypt_and_verifies():
    first, second = hash_key("hk_a_secret"), hash_key("hk_a_secret")
    assert first.startswith("scrypt$16384$8$1$") and first != second
    assert verify_key("hk_a_secret", first) and not verify_key("hk_a_secreT", first)


def test_keys_file_round_trip(tmp_path):
    path = tmp_path / "keys.toml"
    key = write_key(path, "kiosk", requests_per_minute=3, max_concurrent=1, weight=2.0,
                    endpoints=frozenset({"chat"}))
    assert key not in path.read_text()  # stored hashed only
    [entry] = load_keys(path)
    assert (entry.name, entry.requests_per_minute, entry.max_concurrent, entry.weight) == (
        "kiosk", 3, 1, 2.0)
    assert entry.allows("chat") and not entry.allows("completions")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[key]\nname = 1", "not valid TOML"),
        ('[[key]]\nname = "a"\nid = "x"\nkey = "hk_x_plain"', "unknown field"),
        ('[[key]]\nname = "a"\nid = "x"\nhash = "sha256$abc"', "scrypt"),
        ('[[key]]\nname = "a"\nid = "x"\nhash = "scrypt$1024$8$1$'
         'AAAAAAAAAAAAAAAAAAAAAA==$' + "A" * 44 + '"', "too weak"),
        ('[[key]]\nname = "a"\nid = "x"\nhash = "HASH"\nweight = -1', "weight"),
        ('[[key]]\nname = "a"\nid = "x"\nhash = "HASH"\nendpoints = ["admin"]', "endpoints"),
        ('[[key]]\nname = "a"\nid = "x"\nhash = "HASH"\nmax_concurrent = 0', "max_concurrent"),
        ('[[key]]\nname = "a"\nid = "x"\nhash = "HASH"\n[[key]]\nname = "a"\nid = "y"\n'
         'hash = "HASH"', "two keys have the name 'a'"),
        ('[server]\nport = 1', "only .* tables are allowed"),
    ],
)
def test_bad_keys_file_is_a_clear_startup_error(tmp_path, text, message):
    path = tmp_path / "keys.toml"
    path.write_text(text.replace("HASH", hash_key("hk_x_s")))
    with pytest.raises(ValueError, match=message) as error:
        Settings(api_keys_file=str(path))
    assert str(path) in str(error.value)


def test_missing_keys_file_says_how_to_make_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--api-keys-file", str(tmp_path / "nope.toml")])
    assert "hearth keys add" in capsys.readouterr().err


def test_keys_cli_add_list_revoke(tmp_path, capsys):
    path = str(tmp_path / "keys.toml")
    assert main(["keys", "--file", path, "add", "kiosk", "--endpoints", "chat",
                 "--requests-per-minute", "30", "--weight", "2"]) == 0
    key = capsys.readouterr().out.splitlines()[1]
    assert Keyring(path, None).authenticate(f"Bearer {key}").name == "kiosk"
    assert main(["keys", "--file", path, "add", "kiosk"]) == 1  # names are unique
    assert "exists" in capsys.readouterr().out
    assert main(["keys", "--file", path, "list"]) == 0
    listing = capsys.readouterr().out
    assert "kiosk" in listing and "30" in listing and key not in listing
    assert main(["keys", "--file", path, "revoke", "kiosk"]) == 0
    assert load_keys(path) == ()


def test_keys_cli_keeps_a_good_file_and_its_mode(tmp_path, capsys):
    """A bad value never replaces the file; a rewrite keeps the file's mode (and, as root, its
    owner and group: the installer's root:hearth 0640 stays readable by the service)."""
    path = tmp_path / "keys.toml"
    assert main(["keys", "--file", str(path), "add", "kiosk"]) == 0
    path.chmod(0o640)
    before = path.read_text()
    capsys.readouterr()
    assert main(["keys", "--file", str(path), "add", "b", "--requests-per-minute", "0"]) == 1
    error = capsys.readouterr().out
    assert "requests_per_minute must be an integer >= 1" in error and ".tmp" not in error
    assert path.read_text() == before and not (tmp_path / "keys.toml.tmp").exists()
    assert main(["keys", "--file", str(path), "add", "other"]) == 0
    assert path.stat().st_mode & 0o777 == 0o640
    assert [e.name for e in load_keys(path)] == ["kiosk", "other"]


def test_keyring_rejects_and_reloads(tmp_path):
    path = tmp_path / "keys.toml"
    key = write_key(path)
    ring = Keyring(path, "plain-admin")
    assert ring.authenticate(f"Bearer {key}").name == "kiosk"
    assert ring.authenticate("Bearer plain-admin").name == "default"
    for header in (None, "Basic abc", f"Bearer {key}x", "Bearer hk_zz_nope"):
        with pytest.raises(APIError) as error:
            ring.authenticate(header)
        assert error.value.status == 401
    path.write_text("not toml [")
    assert not ring.reload()  # a bad file keeps the old keys
    assert ring.authenticate(f"Bearer {key}").name == "kiosk"
    path.write_text(dump_keys(()))
    assert ring.reload()
    with pytest.raises(APIError):
        ring.authenticate(f"Bearer {key}")  # revoked: the cached verification is gone too


def test_quotas_requests_tokens_concurrency():
    now = [1000.0]
    quotas = Quotas(clock=lambda: now[0])
    entry = KeyEntry("k", "i", "", requests_per_minute=2, tokens_per_minute=100,
                     max_concurrent=1)
    quotas.acquire(entry)
    with pytest.raises(QuotaExceededError, match="concurrency"):
        quotas.acquire(entry)
    quotas.release(entry, 40)
    now[0] += 10
    quotas.acquire(entry)
    quotas.release(entry, 70)  # 110 tokens in the window: over
    with pytest.raises(QuotaExceededError) as error:
        quotas.acquire(entry)
    assert error.value.status == 429 and error.value.headers["Retry-After"] == "50"
    now[0] += 51  # the first request (40 tokens) left the window: 70 < 100
    quotas.acquire(entry)
    quotas.release(entry, 0)
    with pytest.raises(QuotaExceededError, match="requests quota"):
        quotas.acquire(entry)  # 2 requests in the last minute (t=1010 and t=1061)


def _pair(tmp_path, days: int = 30, start_days: int = -1, other_key: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now + datetime.timedelta(days=start_days))
            .not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    if other_key:
        key = ec.generate_private_key(ec.SECP256R1())
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("expired", "expired on"), ("future", "not valid before"),
     ("mismatch", "does not belong to the certificate")],
)
def test_bad_certificate_is_a_clear_startup_error(tmp_path, kind, message):
    cert, key = _pair(tmp_path, days=-2 if kind == "expired" else 30,
                      start_days={"future": 5, "expired": -10}.get(kind, -1),
                      other_key=kind == "mismatch")
    with pytest.raises(ValueError, match=message):
        Settings(ssl_certfile=cert, ssl_keyfile=key)


def test_tls_needs_both_files_and_real_pem(tmp_path):
    cert, key = _pair(tmp_path)
    with pytest.raises(ValueError, match="both --ssl-certfile and --ssl-keyfile"):
        Settings(ssl_certfile=cert)
    with pytest.raises(ValueError, match="not a PEM certificate"):
        check_tls_files(key, key)
    with pytest.raises(ValueError, match="cannot read"):
        check_tls_files(str(tmp_path / "none.pem"), key)


def test_hearth_cert_makes_a_pair_that_ssl_accepts(tmp_path, capsys):
    assert main(["cert", "--out-dir", str(tmp_path), "--name", "hearth.lan",
                 "--name", "10.0.0.5"]) == 0
    out = capsys.readouterr().out
    fingerprint = next(line for line in out.splitlines() if "SHA-256" in line).split()[-1]
    assert len(fingerprint.split(":")) == 32
    info = check_tls_files(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    assert info.sha256 == fingerprint
    assert (tmp_path / "key.pem").stat().st_mode & 0o077 == 0
    ssl.create_default_context().load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert main(["cert", "--out-dir", str(tmp_path)]) == 1  # never overwrites by accident
