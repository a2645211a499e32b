"""open_tiers: the engine's PrefixStore from its config and built model, or None.

The model identity (engine/kv_tiers/identity.py) is only computed when the disk tier is on: the
host tier lives and dies with the process, so nothing can be stale there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hearth.engine.catalog import ResolvedModel, model_files
from hearth.engine.config import EngineConfig
from hearth.engine.kv_cache import LayerKVCache
from hearth.engine.kv_tiers.identity import ModelIdentity, weights_sha256
from hearth.engine.kv_tiers.prefix_store import PrefixStore, TierConfig, open_prefix_store
from hearth.engine.model_config import ModelConfig


def open_tiers(config: EngineConfig, resolved: ResolvedModel | None, model_config: ModelConfig,
               kv_caches: list[LayerKVCache], precision: str) -> PrefixStore | None:
    if config.prefix_cache_dir is None and config.kv_offload_gib <= 0:
        return None
    cache_dir = Path(config.prefix_cache_dir) if config.prefix_cache_dir else None
    tiers = TierConfig(cache_dir, config.prefix_cache_gib, config.kv_offload_gib)
    weights = "in-process"
    if cache_dir is not None:
        weights = _weights_id(config, resolved, cache_dir)
    identity = ModelIdentity(
        weights_sha256=weights,
        dtype=precision,
        kv_dtype=str(kv_caches[0].key.dtype).removeprefix("torch."),
        block_size=config.block_size,
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
    )
    return open_prefix_store(tiers, identity, kv_caches)


def _weights_id(config: EngineConfig, resolved: ResolvedModel | None, cache_dir: Path) -> str:
    """The weights' sha256, or for dummy weights their seed and the config file's sha256."""
    if resolved is None:
        return "unknown"
    if config.load_format == "dummy":
        config_file = resolved.path / "config.json" if resolved.format == "hf" else resolved.path
        digest = hashlib.sha256(config_file.read_bytes()).hexdigest()
        return f"dummy:{config.seed}:{digest}"
    known = {}
    if resolved.spec is not None:
        known = {Path(name).name: digest for name, digest in resolved.spec.sha256.items()}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # the disk store reports it when it opens the directory
    memo = cache_dir / "weights-sha256.json" if cache_dir.is_dir() else None
    return weights_sha256(model_files(resolved), known, memo)
