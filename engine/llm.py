"""LLM: the offline API users know from vLLM.

    from hearth import LLM, SamplingParams
    llm = LLM()                                   # the catalogue's default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from hearth.engine.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine
from hearth.engine.outputs import RequestOutput
from hearth.engine.progress import progress_bar
from hearth.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict]


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        progress = kwargs.pop("progress", True)
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), progress=progress)
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> LLM:
        """An LLM over an EngineConfig made elsewhere, e.g. `hearth serve`'s settings.engine, so
        that an offline run uses exactly the server's engine options (bench/served.py)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config, progress=progress)
        llm._ids = itertools.count()
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: SequenceABC[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p, priority[i] if priority else 0)
                request_ids.append(request_id)
            return self._run(request_ids, use_tqdm)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise

    def chat(
        self,
        messages: Messages | list[Messages],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        enable = use_tqdm and len(request_ids) > 1
        with progress_bar(len(request_ids), "Generating", "req", enable=enable) as bar:
            while len(done) < len(request_ids):
                for out in self.engine.step(finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in request_ids]

    def shutdown(self) -> None:
        self.engine.shutdown()


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params
