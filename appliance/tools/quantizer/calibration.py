"""Calibration and evaluation on the shipped text, running our own model densely (no KV cache).

calibration.txt is public-domain prose (Austen, Dickens, Melville, Carroll, the Declaration of
Independence, Lincoln) plus a few paragraphs written for Hearth. The part before the held-out
marker calibrates `hearth quantize`; the part after it measures perplexity, so quality numbers are
never measured on the text the quantizer saw.

A dense backend stands in for paged attention: one sequence, causal SDPA over the new tokens only,
with the same call signature as engine/attention.py's backends.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hearth.engine.loader import iter_hf_weights, load_hf_config
from hearth.engine.models.registry import model_class
from hearth.engine.tokenizer import Tokenizer

TEXT_FILE = Path(__file__).with_name("calibration.txt")
HELD_OUT_MARKER = "==== held-out"


def split_text(path: Path = TEXT_FILE) -> tuple[str, str]:
    """(calibration part, held-out part) of the shipped text."""
    text = path.read_text(encoding="utf-8")
    calib, _, held_out = text.partition(HELD_OUT_MARKER)
    return calib.strip(), held_out.split("\n", 1)[1].strip()


class DenseCausalAttention:
    """Attention for one whole sequence at once; the KV cache and metadata are ignored."""

    rotates = False  # q and k arrive rotated (the backend interface: engine/attention.py)

    def forward(self, q, k, v, kv_cache, meta, scale: float) -> torch.Tensor:
        # q: (T, num_heads, head_dim); k, v: (T, num_kv_heads, head_dim)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True, scale=scale)
        return out.transpose(0, 1)  # (T, num_heads, head_dim)


def load_float_model(model_dir: str | Path) -> torch.nn.Module:
    """Our model on the CPU in float32 from an HF directory (float or quantized checkpoint)."""
    config = load_hf_config(model_dir)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = model_class(config)(config)
    finally:
        torch.set_default_dtype(default)
    model.load_weights(iter_hf_weights(model_dir))
    return model.eval()


def hidden_states_dense(model, input_ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(input_ids.shape[0])
    caches = [None] * len(model.layers)
    return model(input_ids, positions, caches, None, DenseCausalAttention())


@torch.no_grad()
def forward_dense(model, input_ids: torch.Tensor, logit_rows: int | None = None) -> torch.Tensor:
    """Logits (T, vocab) for one sequence. `logit_rows`: the LM head takes that many rows per
    call, as decode calls it (the CPU's int8 head serves only a few rows at a time)."""
    hidden = hidden_states_dense(model, input_ids)
    if logit_rows is None:
        return model.compute_logits(hidden).float()
    return torch.cat([model.compute_logits(rows).float() for rows in hidden.split(logit_rows)])


def token_ids(model_dir: str | Path, text: str) -> list[int]:
    return Tokenizer.from_hf_dir(Path(model_dir)).encode(text, add_special_tokens=False)


def eval_token_ids(model_dir: str | Path) -> list[int]:
    return token_ids(model_dir, split_text()[1])


def calibration_samples(model_dir: str | Path, num_samples: int,
                        seq_len: int) -> list[torch.Tensor]:
    """`num_samples` windows of `seq_len` tokens, evenly spaced over the calibration part."""
    ids = torch.tensor(token_ids(model_dir, split_text()[0]))
    if len(ids) <= seq_len:
        return [ids]
    starts = torch.linspace(0, len(ids) - seq_len, num_samples).round().long().unique()
    return [ids[s : s + seq_len] for s in starts.tolist()]


@torch.no_grad()
def perplexity(model, ids: list[int], window: int = 512, logit_rows: int | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of the token stream (`logit_rows`:
    see forward_dense)."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1])
        if len(chunk) < 2:
            break
        logits = forward_dense(model, chunk[:-1], logit_rows)
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return float(torch.exp(torch.tensor(total / count)))
