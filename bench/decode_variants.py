"""W5 (Llama-3-8B config, AWQ int4 g128 dummy weights, batch 1, 128 in / 256 out) under launch
and kernel-shape variants, one process and one card, so the rows compare:

    python bench/decode_variants.py pdl=0 pdl=1,trigger=1,small=1 pdl=1 splits=256 blocks=4x4x8

A variant is comma-separated settings over the defaults:
    pdl=0|1          programmatic dependent launch (kernels/pdl.py ENABLED)
    trigger=1|2|3    where int4_tc lets the next kernel launch: start, after its loop, never
    small=0|1|2|3    the same for norm / rotary / attention / SiLU (0: launched without PDL)
    splits=N         decode attention's minimum tokens a split (_MIN_TOKENS_PER_SPLIT)
    blocks=TxWxV     int4_tc n tiles a program, warps, waves (TcBlocks)
    rope=0|1         rotary inside decode attention (1) or its own kernel (TritonAttention.rotates)
Prints ms per output token (best and median of 3 generates) and the first tokens (equal in every
row: the variants change speed, not results). Results: docs/benchmarks.md.
"""

import argparse
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

import hearth.kernels.paged_attention as paged_attention  # noqa: E402
import hearth.kernels.quant.int4_tc as int4_tc  # noqa: E402
from bench.quant_gpu import int4_config_dir  # noqa: E402
from hearth import LLM, SamplingParams  # noqa: E402
from hearth.engine.triton_attention import TritonAttention  # noqa: E402
from hearth.kernels import pdl  # noqa: E402

DEFAULTS = {"pdl": "1", "trigger": str(pdl.TRIGGER), "small": str(pdl.TRIGGER_SMALL),
            "splits": str(paged_attention._MIN_TOKENS_PER_SPLIT), "blocks": "4x4x4", "rope": "1"}


def parse_variant(text: str) -> dict[str, str]:
    settings = dict(DEFAULTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS or not value:
            raise SystemExit(f"unknown setting {item!r}; settings: {', '.join(DEFAULTS)}")
        settings[key] = value
    return settings


def apply(settings: dict[str, str]) -> None:
    pdl.ENABLED = settings["pdl"] == "1"
    pdl.TRIGGER, pdl.TRIGGER_SMALL = int(settings["trigger"]), int(settings["small"])
    paged_attention._MIN_TOKENS_PER_SPLIT = int(settings["splits"])
    blocks = int4_tc.TcBlocks(*(int(v) for v in settings["blocks"].split("x")))
    int4_tc.default_blocks = lambda m, blocks=blocks: blocks
    TritonAttention.rotates = settings["rope"] == "1"


def run(model_dir: Path, settings: dict[str, str]) -> dict:
    apply(settings)
    llm = LLM(str(model_dir), device="cuda", load_format="dummy", progress=False,
              kv_cache_gib=2.0, max_model_len=512)
    prompt = list(range(100, 228))
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # compiles, captures the graphs
    times, tokens = [], []
    for _ in range(3):
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        times.append((time.perf_counter() - start) / 256 * 1e3)
        tokens = out.outputs[0].token_ids
    llm.shutdown()
    torch.cuda.empty_cache()
    return {"best_ms": min(times), "median_ms": sorted(times)[1], "first_tokens": tokens[:6]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--config", type=Path, default=_ROOT / "bench/configs/llama-3-8b")
    args = parser.parse_args()
    variants = [(v, parse_variant(v)) for v in args.variants]
    defaults = (pdl.ENABLED, pdl.TRIGGER, pdl.TRIGGER_SMALL,
                paged_attention._MIN_TOKENS_PER_SPLIT, int4_tc.default_blocks)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model_dir = int4_config_dir(args.config, Path(work))
        for text, settings in variants:
            rows.append((text, run(model_dir, settings)))
            print(text, rows[-1][1], flush=True)
    (pdl.ENABLED, pdl.TRIGGER, pdl.TRIGGER_SMALL, paged_attention._MIN_TOKENS_PER_SPLIT,
     int4_tc.default_blocks) = defaults
    TritonAttention.rotates = True
    print(f"\n{torch.cuda.get_device_name()}  W5 int4, ms per output token")
    for text, r in rows:
        print(f"{text:40s} {r['best_ms']:.3f}  {r['median_ms']:.3f}  {r['first_tokens']}")


if __name__ == "__main__":
    main()
