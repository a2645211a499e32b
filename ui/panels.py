"""The monitor's text panels, as pure functions of snapshots and samples: cache summary, scheduler
table, GPU panel, host panel. Units are formatted here, once (`format_bytes`, `format_rate`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from hearth.appliance.serving import BlockSnapshot, GpuSample, HostSample, SpecDecodeStats

SCHEDULER_COLUMNS = ["request", "state", "grammar", "prompt tokens", "generated", "blocks",
                     "age (s)"]
GRAMMAR_MARK = "{ }"  # the request's output must match a grammar (JSON schema, tool call, ...)


def format_bytes(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def format_rate(tokens_per_s: float | None) -> str:
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:.1f} tok/s"


def hit_rate(blocks: BlockSnapshot) -> float | None:
    """Prompt tokens found in the prefix cache over those looked up; None before any lookup."""
    if not blocks.prefix_queries_tokens:
        return None
    return blocks.prefix_hits_tokens / blocks.prefix_queries_tokens


def cache_summary(blocks: BlockSnapshot, num_preemptions: int) -> str:
    """One Markdown line under the block map."""
    rate = hit_rate(blocks)
    hits = "n/a" if rate is None else f"{rate:.0%}"
    return (
        f"**KV cache {blocks.usage:.1%} used** ({blocks.num_used} / {blocks.num_blocks} blocks) · "
        f"{blocks.num_cached} cached · prefix-cache hit rate {hits} "
        f"({blocks.prefix_hits_tokens} / {blocks.prefix_queries_tokens} prompt tokens) · "
        f"preemptions {num_preemptions}"
    )


def speculation_summary(spec: SpecDecodeStats | None) -> str:
    """The speculative-decoding part of the monitor's header: "" when it is off."""
    if spec is None:
        return ""
    if not spec.num_draft_tokens:
        return f" · speculative {spec.method}: no proposals verified yet"
    per_pos = " / ".join(f"{n / spec.num_drafts:.0%}" for n in spec.accepted_per_pos)
    return (f" · speculative {spec.method} (K={spec.num_speculative_tokens}): acceptance "
            f"{spec.acceptance_rate:.0%} ({spec.num_accepted_tokens} / {spec.num_draft_tokens} "
            f"tokens), {spec.mean_acceptance_length:.2f} tokens a step, by position {per_pos}")


def scheduler_rows(seqs: Sequence) -> list[list]:
    """One row per live sequence (SeqSnapshot): running first, then waiting; constrained ones
    (structured output) carry GRAMMAR_MARK."""
    return [
        [
            s.request_id,
            s.state,
            GRAMMAR_MARK if getattr(s, "constrained", False) else "",
            s.num_prompt_tokens,
            s.num_output_tokens,
            s.num_blocks,
            round(s.age_s, 1),
        ]
        for s in seqs
    ]


KEY_COLUMNS = ["key", "requests", "refused", "running", "prompt tokens", "generated tokens"]


def key_rows(rows: Sequence) -> list[list]:
    """One row per API key that has called (KeyRow): its totals since the start."""
    return [
        [r.key, r.num_requests, r.num_rejected, r.num_running, r.num_prompt_tokens,
         r.num_generation_tokens]
        for r in rows
    ]


def gpu_panel(samples: Sequence[GpuSample], status: str,
              engine_gpus: Sequence[int] = ()) -> str:
    """HTML: one card per GPU, the engine's own (`engine_gpus`, NVML indices) first and marked,
    or the sampler's status ("no NVIDIA GPU") stated plainly."""
    if not samples:
        return (
            f'<div class="hearth-gpu" data-num-gpus="0"><b>{html.escape(_capitalized(status))}'
            "</b>: the engine runs on the CPU; there is no GPU to show.</div>"
        )
    ordered = sorted(samples, key=lambda s: s.index not in engine_gpus)
    cards = "".join(_gpu_card(s, s.index in engine_gpus) for s in ordered)
    serving = ",".join(str(i) for i in engine_gpus)
    return (f'<div class="hearth-gpu" data-num-gpus="{len(samples)}" '
            f'data-engine-gpus="{serving}">{cards}</div>')


def _gpu_card(sample: GpuSample, serving: bool = False) -> str:
    def optional(value: float | None, unit: str) -> str:
        return "n/a" if value is None else f"{value:.0f} {unit}"

    memory = sample.memory_used_bytes / max(1, sample.memory_total_bytes)
    # Clocks: shown when the telemetry sampler reports them.
    sm_clock = getattr(sample, "sm_clock_mhz", None)
    memory_clock = getattr(sample, "memory_clock_mhz", None)
    rows = [
        ("utilisation", f"{sample.utilization:.0%}"),
        (
            "memory",
            f"{format_bytes(sample.memory_used_bytes)} / "
            f"{format_bytes(sample.memory_total_bytes)} ({memory:.0%})",
        ),
        ("temperature", optional(sample.temperature_c, "°C")),
        ("power", optional(sample.power_w, "W")),
        ("clocks", f"SM {optional(sm_clock, 'MHz')}, memory {optional(memory_clock, 'MHz')}"),
    ]
    body = "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    title = html.escape(f"GPU {sample.index}: {sample.name}" + (" · engine" if serving else ""))
    return f"<div><b>{title}</b><table>{body}</table></div>"


def host_panel(sample: HostSample) -> str:
    memory = sample.memory_used_bytes / max(1, sample.memory_total_bytes)
    rows = [
        ("CPU", f"{sample.cpu_utilization:.0%} (all cores)"),
        (
            "RAM",
            f"{format_bytes(sample.memory_used_bytes)} / "
            f"{format_bytes(sample.memory_total_bytes)} ({memory:.0%})",
        ),
        ("process RSS", format_bytes(sample.process_rss_bytes)),
    ]
    body = "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<div class="hearth-host"><table>{body}</table></div>'


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
