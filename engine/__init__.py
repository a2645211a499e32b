"""Hearth's synchronous inference engine. `from engine import LLM, SamplingParams`.

LLM and LLMEngine are imported lazily so that `engine.scheduler` & co. stay importable without
torch.
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
