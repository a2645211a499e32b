"""`hearth models list | show | add | remove | verify | import`: the catalogue, from the shell.

The catalogue is the file `engine.catalog.load_catalog` reads: `--catalog`, else
$HEARTH_MODELS_TOML, else models.toml of the source checkout. `add` records the sha256 of every
file of the model; `verify` recomputes them (the engine does too, before it loads a model).
`import` merges the entries of another catalogue, checking their hashes: the offline installer
uses it to put a bundle's models into the installed catalogue.

SOURCE for `add`: a .gguf file, a Hugging Face directory (config.json, *.safetensors,
tokenizer.json), or `package:PACKAGE/FILE` for a file inside an installed Python package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from hearth.engine.catalog import (
    Catalog,
    ModelSpec,
    ResolvedModel,
    catalog_path,
    hash_files,
    load_catalog,
    model_files,
    resolve_model,
    save_catalog,
    verify,
)

_PACKAGE_PREFIX = "package:"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list, add, remove and verify the models of the catalogue",
        description=__doc__.split("\n\n")[1],
    )
    where = "default: $HEARTH_MODELS_TOML, else the checkout's models.toml"
    parser.add_argument("--catalog", metavar="PATH", help=f"the models.toml to use ({where})")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="one line per model")
    actions.add_parser("show", help="every field of one model").add_argument("name")
    add = actions.add_parser("add", help="add a model (records the sha256 of its files)")
    add.add_argument("name")
    add.add_argument("source", help="a .gguf file, an HF directory or package:PACKAGE/FILE")
    for flag in ("architecture", "dtype", "quantization", "description"):
        add.add_argument(f"--{flag}")
    add.add_argument("--max-model-len", type=int)
    add.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file")
    add.add_argument("--default", action="store_true", help="make it the default model")
    add.add_argument("--replace", action="store_true", help="overwrite an entry of that name")
    actions.add_parser("remove", help="remove a model (its files stay)").add_argument("name")
    check = actions.add_parser("verify", help="recompute the sha256 of the model files")
    check.add_argument("name", nargs="?", help="one model (default: all)")
    merge = actions.add_parser("import", help="merge another catalogue's models (hashes checked)")
    merge.add_argument("other", metavar="CATALOG")
    merge.add_argument("--replace", action="store_true", help="overwrite entries of those names")


def run(args: argparse.Namespace) -> int:
    action = {"list": _list, "show": _show, "add": _add, "remove": _remove,
              "verify": _verify, "import": _import}[args.models_command]
    try:
        return action(args)
    except ValueError as error:
        print(f"error: {error}")
        return 1


def _list(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    print(f"catalogue: {catalog.source}")
    for name, spec in catalog.models.items():
        mark = "*" if name == catalog.default else " "
        kind = spec.quantization or spec.dtype or ""
        print(f"{mark} {name:<32} {spec.source:<8} {kind:<10} {_where(spec)}")
        print(f"    {_served_as(catalog, name)}")
    print("(* = default)")
    return 0


def _show(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    spec = _get(catalog, args.name)
    for field in dataclasses.fields(ModelSpec):
        value = getattr(spec, field.name)
        if field.name != "sha256" and value is not None:
            print(f"{field.name + ':':<15} {value}")
    print(f"{'default:':<15} {spec.name == catalog.default}")
    try:
        resolved = resolve_model(spec.name, catalog)
        print(f"{'resolved:':<15} {resolved.path} ({resolved.format}, {_size(resolved)})")
        print(f"{'served as:':<15} {_served_as(catalog, spec.name)}")
    except ValueError as error:
        print(f"{'resolved:':<15} not available: {error}")
    for file_name, digest in spec.sha256.items():
        print(f"{'sha256:':<15} {digest}  {file_name}")
    return 0


def _served_as(catalog: Catalog, name: str) -> str:
    """What `hearth serve` would advertise for the model: its capabilities (as /api/show and
    /v1/models list them) and context length. Reads the config and tokenizer, not the weights."""
    from hearth.appliance.serving.capabilities import capabilities
    from hearth.engine.fim import model_fim
    from hearth.engine.loader import load_model_source  # torch: imported when asked for
    from hearth.engine.prepare import ModelInfo

    try:
        resolved = resolve_model(name, catalog)
        source = load_model_source(resolved)
        spec = resolved.spec
        vocab_size = source.config.vocab_size
        fim = model_fim(source.tokenizer, vocab_size, spec and spec.fim, spec and spec.fim_order)
    except Exception as error:  # noqa: BLE001 - a file that does not load: say so, list the rest
        return f"not available: {error}"
    info = ModelInfo(name, source.max_model_len, vocab_size, source.tokenizer, fim=fim)
    fill = f" (fill-in-the-middle: {fim.family}, {fim.order})" if fim else ""
    return f"{', '.join(capabilities(info))}{fill}; context {source.max_model_len} tokens"


def _add(args: argparse.Namespace) -> int:
    path = _writable(args.catalog)
    catalog = _load_or_empty(path)
    if args.name in catalog.models and not args.replace:
        raise ValueError(f"model {args.name!r} is already in {path}: pass --replace to overwrite")
    spec = _spec_from_source(args, path.parent)
    spec = dataclasses.replace(spec, **_detected(spec, args))
    resolved = resolve_model(spec.name, Catalog(spec.name, {spec.name: spec}, str(path)))
    print(f"hashing {len(model_files(resolved))} file(s), {_size(resolved)} ...")
    spec = dataclasses.replace(spec, sha256=hash_files(resolved))
    default = spec.name if args.default or not catalog.models else catalog.default
    save_catalog(Catalog(default, {**catalog.models, spec.name: spec}, str(path)), path)
    print(f"added {spec.name} ({resolved.format}, {_size(resolved)}) to {path}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    path = _writable(args.catalog)
    catalog = load_catalog(path)
    _get(catalog, args.name)
    models = {name: spec for name, spec in catalog.models.items() if name != args.name}
    if not models:
        raise ValueError(f"{args.name!r} is the only model of {path}; a catalogue needs one")
    default = catalog.default if catalog.default in models else next(iter(models))
    save_catalog(Catalog(default, models, str(path)), path)
    print(f"removed {args.name} from {path} (its files were left in place); default: {default}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog)
    names = [_get(catalog, args.name).name] if args.name else list(catalog.models)
    failures = 0
    for name in names:
        ok, line = check_model(catalog, name)
        failures += not ok
        print(line)
    return 1 if failures else 0


def check_model(catalog: Catalog, name: str) -> tuple[bool, str]:
    """(passed, one line saying so or what to fix) for one model's files."""
    spec = catalog.models[name]
    try:
        resolved = resolve_model(name, catalog)
        if not spec.sha256:
            return True, f"UNCHECKED {name}: no sha256 recorded (hearth models add records them)"
        verify(resolved)
    except ValueError as error:
        return False, f"FAIL {name}: {error}"
    return True, f"OK {name}: {len(spec.sha256)} file(s) match their sha256"


def _import(args: argparse.Namespace) -> int:
    path = _writable(args.catalog)
    catalog = _load_or_empty(path)
    other = load_catalog(args.other)
    clashes = sorted(set(other.models) & set(catalog.models))
    if clashes and not args.replace:
        raise ValueError(f"{', '.join(clashes)} already in {path}: pass --replace to overwrite")
    for name in other.models:
        ok, line = check_model(other, name)
        if not ok or not other.models[name].sha256:
            raise ValueError(f"not importing: {line}")
    default = catalog.default if catalog.models else other.default
    save_catalog(Catalog(default, {**catalog.models, **other.models}, str(path)), path)
    print(f"imported {', '.join(other.models)} into {path}; default: {default}")
    return 0


def _writable(path: str | None) -> Path:
    found = catalog_path(path)
    if found is None:
        raise ValueError(
            "no catalogue file to write: pass --catalog PATH or set HEARTH_MODELS_TOML "
            "(the built-in catalogue is read-only)"
        )
    return found


def _load_or_empty(path: Path) -> Catalog:
    if path.is_file():
        return load_catalog(path)
    return Catalog(default="", models={}, source=str(path))


def _get(catalog: Catalog, name: str) -> ModelSpec:
    if name not in catalog.models:
        known = ", ".join(catalog.models)
        raise ValueError(f"no model {name!r} in {catalog.source}; it has: {known}")
    return catalog.models[name]


def _spec_from_source(args: argparse.Namespace, base: Path) -> ModelSpec:
    source = args.source
    if source.startswith(_PACKAGE_PREFIX):
        package, _, file = source[len(_PACKAGE_PREFIX) :].partition("/")
        if not package or not file:
            raise ValueError(f"{source!r}: expected package:PACKAGE/FILE")
        return ModelSpec(args.name, "package", package=package, file=file)
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelSpec(args.name, "hf", path=path)
    if path.suffix == ".gguf" and path.is_file():
        return ModelSpec(args.name, "gguf", path=path)
    raise ValueError(f"{source!r} is not a .gguf file, an HF directory, nor package:PACKAGE/FILE")


def _detected(spec: ModelSpec, args: argparse.Namespace) -> dict:
    """Fields from the flags, else from an HF config.json where it says them."""
    fields = {}
    if spec.source == "hf":
        config = json.loads((spec.path / "config.json").read_text(encoding="utf-8"))
        fields["architecture"] = (config.get("architectures") or [None])[0]
        fields["dtype"] = config.get("torch_dtype") or config.get("dtype")
        fields["quantization"] = (config.get("quantization_config") or {}).get("quant_method")
    elif spec.source == "gguf":
        fields["architecture"] = _gguf_architecture(spec.path)
    for key in ("architecture", "dtype", "quantization", "description", "max_model_len"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.chat_template:
        fields["chat_template"] = Path(args.chat_template).read_text(encoding="utf-8")
    return fields


def _gguf_architecture(path: Path) -> str | None:
    """general.architecture as an HF name (what load_model_source checks), None if unknown."""
    from hearth.engine.loader.gguf_config import hf_architecture
    from hearth.engine.loader.gguf_file import read_gguf

    try:
        metadata = read_gguf(path).metadata
    except ValueError:  # not readable: the hash is still recorded, loading will say why
        return None
    fields = ("general.architecture", "llama.expert_count")
    return hf_architecture({k: metadata[k] for k in fields if k in metadata})


def _where(spec: ModelSpec) -> str:
    return f"{spec.package}/{spec.file}" if spec.source == "package" else str(spec.path)


def _size(resolved: ResolvedModel) -> str:
    return f"{sum(p.stat().st_size for p in model_files(resolved)) / 1e6:.1f} MB"
