"""Hearth's synchronous inference engine (the public API re-exports LLM and SamplingParams as
`from hearth import LLM, SamplingParams`). LLM and LLMEngine load lazily, so that the scheduling
core (`hearth.engine.scheduler` & co.) imports without torch.
"""

from hearth.engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from hearth.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from hearth.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from hearth.engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
