"""The bridge's engine contract (appliance/async_engine.py's `Engine` Protocol): LLMEngine and the
tests' FakeEngine both implement it, with the same parameters, so server tests on the fake say
something about the real engine."""

import inspect

import pytest
from fake_engine import FakeEngine

from hearth.appliance.async_engine import Engine
from hearth.engine.data_parallel.replicated_engine import ReplicatedEngine
from hearth.engine.llm_engine import LLMEngine
from hearth.engine.prepare import ModelInfo

METHODS = [name for name, member in vars(Engine).items()
           if callable(member) and not name.startswith("_")]


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_contract_names_the_bridge_calls():
    assert sorted(METHODS) == ["abort_request", "add_prepared", "check_health",
                               "has_unfinished_requests", "shutdown", "snapshot", "step"]


@pytest.mark.parametrize("implementation", [LLMEngine, FakeEngine, ReplicatedEngine])
@pytest.mark.parametrize("method", METHODS)
def test_implementations_take_the_contracts_parameters(implementation, method):
    wanted = _parameters(getattr(Engine, method))
    got = _parameters(getattr(implementation, method))
    assert got[: len(wanted)] == wanted, f"{implementation.__name__}.{method}"
    assert all(default is not inspect.Parameter.empty for _, default in got[len(wanted):])


def test_engines_expose_model_info():
    assert isinstance(FakeEngine().model_info, ModelInfo)
    assert "self.model_info = ModelInfo(" in inspect.getsource(LLMEngine.__init__)
