"""Speculative decoding: decode tok/s with and without it on a copy-heavy workload.

The default model (or --model) answers "repeat / edit this code" requests, greedy, so every
configuration produces the same tokens (checked and reported). For each batch size B it runs
max(B, --requests) prompts (16) in groups of B, one group after the other, and reports decode
tok/s (tokens after each request's first / the groups' time from first first-token to last
finish), the speedup over the plain engine of the same run, and the acceptance rates. (Until
2026-12-06 batch 1 ran one request: 19 tokens, 6 drafts, too few to rank configurations.)

    python bench/spec.py                                     # CPU: batch 1 and 64, n-gram
    python bench/spec.py --device cuda --batch 1 64          # GPU (the lead's command)
    python bench/spec.py --device cuda --sweep               # speculation forced at every batch
                                                             # size: where it stops paying
    python bench/spec.py --cpu-fast-path --batch 1 64        # CPU: the precision `hearth serve`
                                                             # picks (bf16 + int4 blocks)
    python bench/spec.py --draft-model PATH                  # also draft-model speculation

`--sweep` sets disable_by_batch_size above the largest batch so every step speculates; without
it the engine's default switch-off applies (batch 64 then runs without speculation).
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from hearth import LLM, SamplingParams

SNIPPETS = [
    '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
''',
    '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()
''',
    '''def read_config(path):
    with open(path) as handle:
        lines = handle.read().splitlines()
    config = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config
''',
    '''function debounce(fn, wait) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), wait);
  };
}
''',
]
TASKS = [
    "Repeat this code exactly, with no comments:\n\n{code}",
    "Add type hints to this code and output the whole code:\n\n{code}",
    "Rename every variable to a longer, clearer name and output the whole code:\n\n{code}",
    "Add a docstring to this code and output the whole code:\n\n{code}",
]


def workload(llm: LLM, num: int) -> list[str]:
    prompts = []
    for i in range(num):
        code = SNIPPETS[i % len(SNIPPETS)]
        task = TASKS[(i // len(SNIPPETS)) % len(TASKS)]
        messages = [{"role": "user", "content": task.format(code=code)}]
        prompts.append(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return prompts


def run(llm: LLM, batch: int, max_tokens: int, requests: int = 16) -> dict:
    """max(batch, requests) prompts in groups of `batch`, one group at a time (batch 1: each
    request alone, as a chat user sends them); decode tok/s over every group's decode time
    (from its first first-token to its last finish)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    prompts = workload(llm, max(batch, requests))
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    before = llm.engine.snapshot().spec_decode
    outs, seconds = [], 0.0
    for first_prompt in range(0, len(prompts), batch):
        group = llm.generate(prompts[first_prompt : first_prompt + batch], params,
                             use_tqdm=False)
        first = min(o.metrics.first_token_time for o in group)
        seconds += max(o.metrics.finished_time for o in group) - first
        outs += group
    after = llm.engine.snapshot().spec_decode
    decoded = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    result = {"batch": batch, "requests": len(prompts), "decode_tok_s": decoded / seconds,
              "tokens": decoded, "outputs": [o.outputs[0].token_ids for o in outs]}
    if after is not None:
        drafts = after.num_drafts - before.num_drafts
        proposed = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        per_pos = [(a - b) / drafts if drafts else 0.0
                   for a, b in zip(after.accepted_per_pos, before.accepted_per_pos)]
        result.update(acceptance_rate=accepted / proposed if proposed else None,
                      mean_acceptance_length=1 + accepted / drafts if drafts else None,
                      accepted_per_pos=per_pos, drafts=drafts)
    return result


def configurations(args) -> list[tuple[str, dict | None]]:
    limit = max(args.batch) + 1 if args.sweep else 8
    configs: list[tuple[str, dict | None]] = [("plain", None)]
    configs.append(("ngram", {"method": "ngram", "num_speculative_tokens": args.k,
                              "disable_by_batch_size": limit}))
    if args.draft_model:
        configs.append(("draft", {"method": "draft", "draft_model": args.draft_model,
                                  "num_speculative_tokens": args.k,
                                  "disable_by_batch_size": limit}))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft-model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-fast-path", action="store_true",
                        help="the CPU precision `hearth serve` picks (bf16 + int4 blocks + int8 "
                             "head where the CPU supports them) instead of LLM's exact float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--k", type=int, default=None,
                        help="K (default: the engine's: 3 on a CPU in 16-bit, else 4)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--requests", type=int, default=16,
                        help="prompts per batch size, run in groups of the batch size")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.sweep and args.batch == [1, 64]:
        args.batch = [1, 2, 4, 8, 16, 32, 64]
    results: dict[str, list[dict]] = {}
    for name, spec in configurations(args):
        llm = LLM(args.model, device=args.device, dtype=args.dtype, progress=False,
                  max_num_seqs=max(64, max(args.batch)), speculative=spec,
                  gpu_memory_utilization=0.45, cpu_fast_path=args.cpu_fast_path)
        results[name] = [run(llm, b, args.max_tokens, args.requests) for b in args.batch]
        device = llm.engine.device
        if spec is not None:
            args.k = llm.engine.config.speculative.num_speculative_tokens  # as resolved
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report(results, device, args)


def report(results: dict[str, list[dict]], device: str, args) -> None:
    on_gpu = device.startswith("cuda")
    card = torch.cuda.get_device_name() if on_gpu else f"cpu x{torch.get_num_threads()}"
    print(f"# bench/spec.py on {card}, K={args.k}, max_tokens {args.max_tokens}, greedy")
    print("| config | batch | decode tok/s | vs plain | acceptance | tokens/step | by position "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row, base in zip(rows, results["plain"], strict=True):
            same = row["outputs"] == base["outputs"]
            rate = row.get("acceptance_rate")
            length = row.get("mean_acceptance_length")
            per_pos = " / ".join(f"{p:.2f}" for p in row.get("accepted_per_pos", []))
            print(f"| {name} | {row['batch']} | {row['decode_tok_s']:.1f} | "
                  f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
                  f"{'-' if rate is None else f'{rate:.0%}'} | "
                  f"{'-' if length is None else f'{length:.2f}'} | {per_pos or '-'} | {same} |")
    if args.json:
        slim = {k: [{f: v for f, v in r.items() if f != "outputs"} for r in rows]
                for k, rows in results.items()}
        with open(args.json, "w") as handle:
            json.dump({"device": card, "k": args.k, "results": slim}, handle, indent=1)


if __name__ == "__main__":
    main()
