"""The engine's step trace (HEARTH_STEP_TRACE, engine/step_trace.py) that bench/served.py reads:
one row per step with its batch and tokens, written at shutdown, summarized per time window."""

from __future__ import annotations

import json

from helpers import save_tiny_model

from hearth import LLM, SamplingParams
from hearth.engine.step_trace import summarize


def test_summary_of_steps_inside_a_window():
    columns = {"start": [0.0, 1.0, 2.0, 10.0], "end": [0.5, 1.5, 2.5, 10.5],
               "running": [4, 4, 2, 1], "tokens": [4, 4, 2, 1],
               "batched": [40, 4, 2, 1], "chunks": [4, 4, 2, 1]}
    s = summarize(columns, window=(0.0, 3.0), full_batch=4)
    assert s["steps"] == 3 and s["tokens"] == 10
    assert abs(s["wall_s"] - 2.5) < 1e-9 and abs(s["inside_steps_s"] - 1.5) < 1e-9
    assert abs(s["between_steps_s"] - 1.0) < 1e-9
    assert abs(s["mean_running"] - 10 / 3) < 1e-9
    assert abs(s["share_of_step_time_below_full"] - 1 / 3) < 1e-9
    assert s["prompt_steps"] == 1 and abs(s["prompt_steps_s"] - 0.5) < 1e-9
    assert summarize(columns, window=(20.0, 30.0)) == {"steps": 0}
    assert summarize(columns)["full_batch"] == 4  # the most seen, when not given


def test_engine_writes_its_steps_at_shutdown(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_STEP_TRACE", str(tmp_path / "steps"))
    llm = LLM(str(save_tiny_model(tmp_path / "model", "llama")), device="cpu", progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [8, 9, 10, 11]], [params, params], use_tqdm=False)
    llm.shutdown()
    (path,) = tmp_path.glob("steps.*.json")
    trace = json.loads(path.read_text())
    assert trace["summary"]["tokens"] == sum(len(o.outputs[0].token_ids) for o in outs) == 10
    assert max(trace["running"]) == 2 and len(trace["start"]) == trace["summary"]["steps"]
    assert all(e >= s for s, e in zip(trace["start"], trace["end"], strict=True))
    assert trace["batched"][0] == 7 and trace["chunks"][0] == 2  # both prompts in one forward
    assert trace["summary"]["prompt_steps"] == 1
