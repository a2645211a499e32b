"""Make the GGUF test files with llama.cpp's own converter (tests/data/gguf; .ci/gguf-converter).

Runs in the converter's venv (torch, transformers, sentencepiece, safetensors), never the repo's;
it imports no Hearth module.

    python bench/gguf_fixtures.py tokenizer OUT            # tiny SentencePiece BPE, byte fallback
    python bench/gguf_fixtures.py models TOKENIZER WORK    # tiny random HF dirs, one per family
    python bench/gguf_fixtures.py convert LLAMA_CPP WORK OUT

`convert` runs vendor/llama.cpp/convert_hf_to_gguf.py (from the llama-cpp-python sdist) at F16
and Q8_0 for every family, copies each HF dir's config.json and safetensors beside the files,
adds the window the converter drops to a copy of Mistral's F16 file, writes FAMILY-Q4_K_M.gguf
for every family (the F16 file's tensors re-typed as llama-quantize's Q4_K_M picks them,
q4_k_m_types) and llama-MIXED.gguf (llama's tensors re-typed by hand: Q4_K, Q6_K, Q5_0, Q4_0,
Q4_1 and Q8_0 in one file). The converter itself writes no K-quants (its outtypes
are f32, f16, bf16, q8_0, tq1_0, tq2_0; K-quants come from the compiled llama-quantize), so the
Q4_K and Q6_K blocks are encoded here and checked against gguf-py's own dequantizer.

Weights are random, rounded to float16 and saved as float16, so the F16 files hold them exactly;
Gemma's norm weights are multiples of 1/256, so the converter's float16 (1 + w) is exact too.
Qwen3-MoE's converter path reads only byte-level BPE vocabularies whose pre-tokenizer hash it
knows; its tiny byte-level vocabulary is declared "qwen2" by patching that one lookup.
"""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SEED = 0
# intermediate 256: the down projections' rows (and the experts') are one K-quant block wide
SHARED = dict(hidden_size=32, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2, rms_norm_eps=1e-6)
TINY_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}
# family -> (transformers config class, model class, config beyond SHARED)
FAMILIES = {
    # Llama 3.1-style RoPE (the converter writes rope_freqs)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(tie_word_embeddings=False, rope_parameters=TINY_LLAMA3)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(tie_word_embeddings=True,
                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=16,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0},
                                     "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 10000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",  # Phi-4-mini's partial rotary, Phi-3 128k's longrope
             dict(tie_word_embeddings=False, partial_rotary_factor=0.75,
                  original_max_position_embeddings=64, pad_token_id=0,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                   "long_factor": [1.0, 2.0, 4.0, 6.0, 8.0, 12.0]})),
    # every layer slides; the converter drops the window (llama.cpp runs Mistral v0.1 without
    # it): mistral-F16-SWA.gguf is the F16 file with llama.attention.sliding_window added
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(tie_word_embeddings=False, sliding_window=8)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(tie_word_embeddings=True, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=256, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2)),
}
BYTE_LEVEL = ("qwen3moe",)  # families converted with a byte-level BPE vocabulary
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path, text_path: Path) -> None:
    """A 384-piece SentencePiece BPE with byte fallback, as Llama 2 / Mistral train theirs, and
    its transformers tokenizer.json (converted by transformers, with sentencepiece)."""
    import sentencepiece as spm
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    text = text_path.read_text(encoding="utf-8")
    extra = ["héllo wörld ñ 日本語のテキスト 中文 한국어", "def f(x):\n    return x**2  # square\n",
             "12345 + 678 = 99,999.5", "I'm sure you're right, they'll see we've done it."]
    (out / "train.txt").write_text(text + "\n" + "\n".join(extra * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(out / "train.txt"), model_prefix=str(out / "tokenizer"), vocab_size=384,
        model_type="bpe", byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, character_coverage=0.995,
        user_defined_symbols=SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    for name in ("train.txt", "tokenizer.vocab"):
        (out / name).unlink()
    (out / "config.json").write_text('{"model_type": "llama"}')  # AutoTokenizer needs a type
    tok = transformers.AutoTokenizer.from_pretrained(out, legacy=False)
    (out / "config.json").unlink()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)


def make_models(tokenizer: Path, work: Path) -> None:
    import torch
    import transformers

    vocab = json.loads((tokenizer / "tokenizer.json").read_text())
    spm_vocab_size = len(vocab["model"]["vocab"])
    for family, (config_cls, model_cls, extra) in FAMILIES.items():
        out = work / family
        shutil.rmtree(out, ignore_errors=True)
        byte_level = family in BYTE_LEVEL
        config = getattr(transformers, config_cls)(
            **(SHARED | {"vocab_size": 259 if byte_level else spm_vocab_size} | extra))
        torch.manual_seed(SEED)
        model = getattr(transformers, model_cls)(config)
        _randomize(model, gemma=family.startswith("gemma"))
        model.to(torch.float16).save_pretrained(out)
        _portable_config(out / "config.json")
        if byte_level:
            _save_byte_level_tokenizer(out)
        else:
            for f in tokenizer.iterdir():
                shutil.copy(f, out / f.name)
        print(f"{family}: {sum(p.numel() for p in model.parameters())} parameters")


def _portable_config(path: Path) -> None:
    """transformers 5.25 writes Qwen3-MoE's expert count as num_local_experts only; the GPU
    machine's 5.17 (and the Hub's configs) read num_experts: write both."""
    config = json.loads(path.read_text())
    if "num_local_experts" in config and config.get("model_type") == "qwen3_moe":
        config["num_experts"] = config["num_local_experts"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _randomize(model, gemma: bool) -> None:
    """N(0, 0.2) weights (greedy decoding is no string of ties), fp16-representable; norms near
    their neutral value (Gemma's w is an offset from 1, a multiple of 1/256)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                noise = torch.randint(-32, 33, p.shape, generator=gen).float() / 256
                value = noise if gemma else 1.0 + noise
            else:
                value = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(value.half().float())


def _save_byte_level_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def convert(llama_cpp: Path, work: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        hf_out = out / family
        hf_out.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(work / family / name, hf_out / name)
        for outtype in ("f16", "q8_0"):
            target = out / f"{family}-{outtype.upper()}.gguf"
            cmd = [sys.executable, __file__, "_run-converter", str(llama_cpp), family,
                   str(work / family), "--outtype", outtype, "--outfile", str(target)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            print(f"{target.name}: {target.stat().st_size} bytes")
    sys.path.insert(0, str(llama_cpp / "gguf-py"))  # the converter's own gguf package
    rewrite(out / "llama-F16.gguf", out / "llama-MIXED.gguf", MIXED)
    for family in FAMILIES:
        src = out / f"{family}-F16.gguf"
        rewrite(src, out / f"{family}-Q4_K_M.gguf", q4_k_m_types(src))
    rewrite(out / "mistral-F16.gguf", out / "mistral-F16-SWA.gguf", {},
            {"llama.attention.sliding_window": 8})


def _run_converter(llama_cpp: Path, family: str, argv: list[str]) -> None:
    """convert_hf_to_gguf.py as a script, in this process (one lookup patched for byte-level)."""
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    if family in BYTE_LEVEL:
        from conversion import base

        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


# ---- per-tensor types, as llama.cpp's Q4_K_M mixes them ----
MIXED = {"token_embd": "Q8_0", "output": "Q8_0", "blk.0.attn_q": "Q8_0", "blk.0.attn_k": "Q8_0",
         "blk.0.attn_v": "Q6_K_ROWS", "blk.0.attn_output": "Q5_0", "blk.0.ffn_gate": "Q4_0",
         "blk.0.ffn_up": "Q4_0", "blk.0.ffn_down": "Q6_K", "blk.1.attn_q": "Q4_1",
         "blk.1.attn_k": "Q4_1", "blk.1.attn_v": "Q8_0", "blk.1.attn_output": "Q4_1",
         "blk.1.ffn_gate": "Q4_1", "blk.1.ffn_up": "Q4_1", "blk.1.ffn_down": "Q4_K"}


def q4_k_m_types(src: Path) -> dict[str, str]:
    """GGUF name -> type, as llama-quantize's Q4_K_M picks them (llama-quant.cpp): the output
    (or tied embedding) Q6_K, fused qkv Q5_K, attn_v and ffn_down (experts too) Q6_K on
    use_more_bits layers, the rest Q4_K; rows not a multiple of 256 fall back (Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0); routers and 1-D tensors keep their type. Tiny models: only
    the 256-wide down projections hold K blocks."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    names = {t.name.removesuffix(".weight") for t in reader.tensors}
    fallback = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    types = {}
    for tensor in reader.tensors:
        name = tensor.name.removesuffix(".weight")
        if tensor.data.ndim < 2 or "ffn_gate_inp" in name:
            types[name] = tensor.tensor_type.name
            continue
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        qtype = "Q4_K"
        if name == "output" or (name == "token_embd" and "output" not in names):
            qtype = "Q6_K"
        elif name.endswith("attn_qkv"):
            qtype = "Q5_K"
        elif (name.endswith("attn_v") or ".ffn_down" in name) and _more_bits(layer, n_layer):
            qtype = "Q6_K"
        types[name] = fallback[qtype] if tensor.data.shape[-1] % 256 else qtype
    return types


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def rewrite(src: Path, dst: Path, qtypes: dict[str, str], extra: dict | None = None) -> None:
    """src's metadata (plus `extra` uint32 keys) and tensors, re-typed per tensor by `qtypes`
    (GGUF name without .weight -> type; others F16, 1-D F32)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        qtype = qtypes.get(tensor.name.removesuffix(".weight"), "F32" if weights.ndim == 1
                           else "F16")
        if qtype == "Q6_K_ROWS":  # 32-wide rows cannot hold a K block: llama.cpp falls back
            qtype = "Q8_0"
        data, raw = _encode(weights.astype(np.float32), qtype)
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{dst.name}: {dst.stat().st_size} bytes")


def _encode(w: np.ndarray, qtype: str):
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return w, None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype in ("Q4_K", "Q6_K"):
        blocks = (q4_k_blocks if qtype == "Q4_K" else q6_k_blocks)(w.reshape(-1, 256))
        data = blocks.reshape(*w.shape[:-1], -1)
    else:
        data = gguf.quants.quantize(w, kind)
    back = gguf.quants.dequantize(data, kind)
    err = np.abs(back - w).max() / np.abs(w).max()
    assert err < 0.15, f"{qtype} round trip error {err:.3f}"
    return data, kind


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) Q4_K blocks: 8 sub-blocks of 32, w = d sc q - dmin m."""
    sub = x.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0), sub.max(-1)
    scale, offset = (hi - lo) / 15, -lo  # (n, 8), both >= 0
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum(offset.max(-1), 1e-8) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(offset / dmin[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.round((sub + (dmin[:, None] * m)[..., None]) / step), 0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-blocks 2c (low), 2c+1
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=1)


def q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) Q6_K blocks: 16 sub-blocks of 16, w = d sc (q - 32)."""
    n = x.shape[0]
    scale = np.abs(x.reshape(n, 16, 16)).max(-1) / 31  # (n, 16)
    d = (np.maximum(scale.max(-1), 1e-8) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    step = np.repeat(d[:, None] * sc, 16, axis=1)  # (n, 256)
    q = (np.clip(np.round(x / step), -32, 31) + 32).astype(np.uint8).reshape(n, 8, 32)
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for g in range(8):  # group g of 32: half g // 4, nibble (g % 4) // 2, bytes (g % 2) * 32
        h, s, j = g // 4, (g % 4) // 2, (g % 2) * 32
        ql[:, h * 64 + j:h * 64 + j + 32] |= (q[:, g] & 0x0F) << (4 * s)
        qh[:, h * 32:h * 32 + 32] |= (q[:, g] >> 4) << (2 * (g % 4))
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tokenizer":
        make_tokenizer(Path(args[0]), Path(__file__).parents[1] / "appliance" / "tools"
                       / "quantizer" / "calibration.txt")
    elif cmd == "models":
        make_models(Path(args[0]), Path(args[1]))
    elif cmd == "convert":
        convert(Path(args[0]), Path(args[1]), Path(args[2]))
    elif cmd == "_run-converter":
        _run_converter(Path(args[0]), args[1], [args[2], *args[3:]])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
