"""Grammar-constrained decoding on one GPU: what a grammar costs, and what it costs the others.

    schemas  Qwen3-0.6B (random bf16 weights), 64 concurrent requests each with its own JSON
             schema, against the same 64 requests unconstrained, with async scheduling (the
             default on CUDA) and without; target: constrained >= 80% of unconstrained tok/s.
             Constrained answers that finish early shrink the batch (the unconstrained ones
             run to max_tokens), so a third run decodes unconstrained to each answer's length
             ("matched"): the same tokens at the same batch sizes
    w1       bench/throughput.py's W1 "before" (the engine's structured output switched off and
             the runner's logits hook replaced by nothing: the code path before grammars
             existed) and "after" (all of it live), alternating; no request carries a grammar
             or a logit_bias: the hook must cost nothing measurable

The dummy Qwen3 config has no tokenizer; the grammar needs one, so the run copies the config
beside a tokenizer.json: `--tokenizer DIR` (a directory with tokenizer.json), by default the
embedded model's (SmolLM2's 49k byte-level BPE, written from its GGUF; the mask covers Qwen3's
151,936 ids, the ids past the tokenizer's are never allowed).

    python bench/structured.py schemas w1 [--seqs 64] [--max-tokens 256] [--repeats 2]
                               [--tokenizer DIR] [--json out.json]
"""

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT / "bench"))

import torch  # noqa: E402
from throughput import CONFIGS, make_workload, run_hearth  # noqa: E402

from hearth import LLM, SamplingParams  # noqa: E402
from hearth.engine.structured_output import StructuredOutput  # noqa: E402

_KINDS = [
    {"type": "string"},
    {"type": "integer"},
    {"type": "array", "items": {"type": "string"}},
    {"type": "object", "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"}},
     "required": ["x", "ok"], "additionalProperties": False},
    {"type": "number"},
]


def schema(i: int) -> dict:
    """The i-th request's schema: 4-6 fields of rotating kinds, names of its own."""
    rng = random.Random(i)
    fields = {f"f{i}_{k}": (_KINDS[(i + k) % len(_KINDS)] if (i + k) % 7
                            else {"enum": [f"v{i}", f"w{k}", "z"]})
              for k in range(4 + i % 3)}
    names = list(fields)
    rng.shuffle(names)
    return {"type": "object", "properties": {n: fields[n] for n in names},
            "required": names, "additionalProperties": False}


def model_with_tokenizer(tokenizer_dir: Path | None) -> str:
    """Qwen3-0.6B's config beside a tokenizer (see the module docstring)."""
    out = Path(tempfile.mkdtemp(prefix="hearth-qwen3-tok-"))
    shutil.copy(CONFIGS["qwen3"] / "config.json", out / "config.json")
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, out / name)
        return str(out)
    from hearth.engine.catalog import resolve_model
    from hearth.engine.loader.gguf_loader import load_gguf

    tokenizer = load_gguf(resolve_model(None).path).tokenizer
    (out / "tokenizer.json").write_text(tokenizer.to_json())
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokenizer.eos_token}))
    return str(out)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": elapsed, "output_tokens": num_out, "tok_s": num_out / elapsed,
            "outputs": outs}


def run_schemas(args, path: str) -> dict:
    """Per mode, `--repeats` rounds of: the 64 requests unconstrained (to max_tokens), the same
    with their schemas, and unconstrained again with each request's max_tokens set to its
    constrained answer's length ("matched": the same tokens at the same batch sizes, so the
    ratio is the grammar's cost alone; answers that finish early shrink the batch, which the
    full-length ratio also counts). The median of each ratio is reported."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(args.prompt_len)] for _ in range(args.seqs)]
    specs = [StructuredOutput(json=schema(i)) for i in range(args.seqs)]
    result = {"seqs": args.seqs, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
              "repeats": args.repeats}
    for mode in ("async", "sync"):
        llm = LLM(path, load_format="dummy", dtype="bfloat16", progress=False, max_model_len=2048,
                  max_num_seqs=args.seqs, enable_prefix_caching=False, device=args.device,
                  async_scheduling=mode == "async", gpu_memory_utilization=args.gpu_util)
        free = SamplingParams(temperature=0.6, max_tokens=args.max_tokens, ignore_eos=True,
                              detokenize=False)
        warm = SamplingParams(temperature=0.6, max_tokens=8, detokenize=False,
                              structured_output=StructuredOutput(json_object=True))
        llm.generate(prompts[:16], warm, use_tqdm=False)  # graphs, kernels, the grammar path
        llm.generate(prompts[:16], free, use_tqdm=False)
        if mode == "async":  # cold compiles, off the timed runs (the cache keeps them)
            t0 = time.perf_counter()
            for spec in specs:
                llm.engine.grammars.compile(spec)
            result["compile_ms_per_schema"] = 1e3 * (time.perf_counter() - t0) / len(specs)
        params = [SamplingParams(temperature=0.6, max_tokens=args.max_tokens, detokenize=False,
                                 structured_output=spec) for spec in specs]
        rounds = []
        for _ in range(args.repeats):
            base = _timed(llm, prompts, [free] * args.seqs)
            constrained = _timed(llm, prompts, params)
            lengths = [len(o.outputs[0].token_ids) for o in constrained["outputs"]]
            matched = _timed(llm, prompts, [SamplingParams(
                temperature=0.6, max_tokens=n, ignore_eos=True, detokenize=False)
                for n in lengths])
            entry = {f"{name}_tok_s": r["tok_s"] for name, r in
                     (("unconstrained", base), ("constrained", constrained),
                      ("matched", matched))}
            entry.update(_validity(llm, constrained["outputs"]))
            entry["ratio_full"] = constrained["tok_s"] / base["tok_s"]
            entry["ratio_matched"] = constrained["tok_s"] / matched["tok_s"]
            rounds.append(entry)
            print(mode, json.dumps(entry), flush=True)
        result[mode] = {"rounds": rounds,
                        "ratio_full": statistics.median(r["ratio_full"] for r in rounds),
                        "ratio_matched": statistics.median(r["ratio_matched"] for r in rounds)}
        llm.shutdown()
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def _validity(llm: LLM, outs) -> dict:
    """Finished outputs must parse; the rest ran out of max_tokens."""
    tokenizer = llm.engine.tokenizer
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    valid = 0
    for out in stopped:
        ids = [t for t in out.token_ids if t not in tokenizer.eos_token_ids]
        try:
            json.loads(tokenizer.decode(ids))
            valid += 1
        except json.JSONDecodeError:
            pass
    return {"finished": len(stopped), "finished_valid": valid}


def run_w1(args, path: str) -> dict:
    """W1 before / after / before / after: alternating, so drift shows."""
    from hearth.engine.model_runner import ModelRunner

    hook = ModelRunner._process_logits
    w = make_workload("W1")
    runs = []
    for on in (False, True) * args.repeats:
        ModelRunner._process_logits = hook if on else (lambda self, logits, chunks, g: None)
        try:
            r = run_hearth(w, args, model_path=path, structured_output=on)
        finally:
            ModelRunner._process_logits = hook
        runs.append({"structured_output": on, "tok_s": r["tok_s"], "seconds": r["seconds"]})
        print("W1", "on" if on else "off", json.dumps(runs[-1]), flush=True)
    off = [r["tok_s"] for r in runs if not r["structured_output"]]
    on = [r["tok_s"] for r in runs if r["structured_output"]]
    return {"runs": runs, "off_tok_s": sum(off) / len(off), "on_tok_s": sum(on) / len(on),
            "on_over_off": sum(on) / sum(off)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=["schemas", "w1"])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gpu-util", type=float, default=0.9)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of `schemas` only")
    parser.add_argument("--repeats", type=int, default=2,
                        help="schemas: rounds per mode; w1: before/after pairs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.weights, args.kv_cache_dtype, args.profile = "bf16", "auto", False  # for run_hearth
    path = model_with_tokenizer(args.tokenizer)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"card": card, "date": time.strftime("%F"),
               "torch": torch.__version__}
    if "schemas" in args.parts:
        results["schemas"] = run_schemas(args, path)
        print("schemas", json.dumps(results["schemas"]), flush=True)
    if "w1" in args.parts:
        results["w1"] = run_w1(args, path)
        print("w1", json.dumps(results["w1"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
