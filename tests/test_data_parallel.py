"""Data parallelism on CPU: the router (prefix cache first, then least outstanding work), replica
devices, and two real replicas behind one server, where a chat's second turn lands on the replica
that served its first turn and /metrics shows each replica."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from helpers import save_tiny_model
from server_harness import metric, running_server

from hearth.appliance.settings import Settings
from hearth.cli import engine_factory
from hearth.engine.config import EngineConfig
from hearth.engine.data_parallel.replicated_engine import replica_configs
from hearth.engine.data_parallel.router import Router


@dataclass
class _Hit:
    num_tokens: int


class _Cache:
    """A prefix cache that holds whole prompts' first `held` tokens."""

    def __init__(self, *prompts: list[int]) -> None:
        self.prompts = prompts

    def match_prefix(self, seq) -> _Hit:
        best = 0
        for p in self.prompts:
            n = 0
            while n < min(len(p), seq.num_tokens) and p[n] == seq.token_ids[n]:
                n += 1
            best = max(best, n // 16 * 16)
        return _Hit(best)


def test_router_prefers_the_replica_holding_the_prefix():
    first_turn = list(range(100))
    router = Router([_Cache(), _Cache(first_turn)])
    decision = router.route("turn2", first_turn + [7, 8, 9], max_tokens=10)
    assert (decision.replica, decision.reason, decision.cached_tokens) == (1, "prefix", 96)


def test_router_balances_by_outstanding_work_and_forgets_finished_requests():
    router = Router([_Cache(), _Cache()])
    assert router.route("a", [1] * 50, 100).replica == 0
    assert router.route("b", [2] * 10, 10).replica == 1  # replica 0 owes 150 tokens
    assert router.route("c", [3] * 10, 10).replica == 1  # 20 < 150
    assert router.work == [150, 40]
    router.finish("a")
    assert router.work == [0, 40] and router.replica_of("a") is None
    assert router.route("d", [4], 1).replica == 0


def test_router_leaves_a_cache_hit_behind_an_overloaded_replica():
    prompt = list(range(64))
    router = Router([_Cache(prompt), _Cache()], max_imbalance_tokens=100)
    router.route("busy", [9] * 500, 500)  # replica 0 (tie, lowest index)
    decision = router.route("x", prompt, 10)
    assert (decision.replica, decision.reason) == (1, "load")


def test_replica_devices_follow_the_first_card():
    cpu = EngineConfig(device="cpu")
    assert [c.device for c in replica_configs(cpu, 2)] == ["cpu", "cpu"]
    two = replica_configs(EngineConfig(device="cuda:1"), 2, cuda_count=lambda: 3)
    assert [c.device for c in two] == ["cuda:1", "cuda:2"]
    assert [c.device for c in replica_configs(EngineConfig(device="cuda"), 2,
                                              cuda_count=lambda: 2)] == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="needs 3 GPUs; 2 are visible"):
        replica_configs(EngineConfig(device="cuda:1"), 2, cuda_count=lambda: 2)


def test_settings_refuse_tp_and_dp_together():
    with pytest.raises(ValueError, match="not both"):
        Settings(tensor_parallel_size=2, data_parallel_size=2)


def _replica_metric(text: str, name: str, replica: int) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'replica="{replica}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for replica {replica} missing:\n{text}")


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("dp") / "llama", "llama")
    settings = Settings(model=str(path), device="cpu", dtype="float32", no_ui=True,
                        data_parallel_size=2, kv_cache_gib=0.03)
    with running_server(settings, engine_factory(settings)) as running:
        yield running


def _chat(url: str, messages: list[dict]) -> str:
    body = {"model": "llama", "messages": messages, "max_tokens": 8, "temperature": 0}
    response = httpx.post(url + "v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _prompt_tokens(url: str) -> list[float]:
    text = httpx.get(url + "metrics", timeout=30).text
    return [_replica_metric(text, "hearth_replica_prompt_tokens_total", r) for r in (0, 1)]


def _running(url: str) -> float:
    text = httpx.get(url + "metrics", timeout=30).text
    return sum(_replica_metric(text, "hearth_replica_requests_running", r) for r in (0, 1))


def test_second_chat_turn_lands_on_the_first_turns_replica(dp_server):
    """Turn 1 goes to replica 1 because replica 0 is busy; turn 2 arrives when both are idle (a
    tie on work would pick replica 0) and still goes to replica 1, where its prefix is cached."""
    url = dp_server.url
    _chat(url, [{"role": "user", "content": "Hello there, how are you?"}])  # replica 0 (tie)
    long_body = {"model": "llama", "messages": [{"role": "user", "content": "x" * 40}],
                 "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    busy = threading.Thread(target=httpx.post, args=(url + "v1/chat/completions",),
                            kwargs={"json": long_body, "timeout": 300})
    busy.start()
    deadline = time.monotonic() + 60
    while _running(url) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 2}
    turn1 = [system, {"role": "user", "content": "Name three colours."}]
    answer = _chat(url, turn1)  # replica 1: replica 0 owes the long request's tokens
    busy.join()
    idle = _prompt_tokens(url)
    assert idle[1] > 0
    turn2 = [*turn1, {"role": "assistant", "content": answer},
             {"role": "user", "content": "And three more?"}]
    _chat(url, turn2)
    after = _prompt_tokens(url)
    assert after[1] > idle[1] and after[0] == idle[0]
    text = httpx.get(url + "metrics", timeout=30).text
    assert _replica_metric(text, "hearth_replica_prefix_cache_hits_total", 1) > 0
    assert 'device="cpu"' in text
    assert metric(text, "hearth_replica_kv_cache_blocks_total") > 0
