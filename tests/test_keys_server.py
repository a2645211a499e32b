"""Named keys through a real server over the fake engine: 401/403/429 with Retry-After at the gate,
per-key /metrics, the audit log, reload without dropping streams, fair share under overload
(300 streams across 3 keys), TLS with a real client, and SIGHUP in a real process."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine
from server_harness import metric, running_server
from test_keys import write_key

from hearth.appliance.auth.keys import dump_keys, load_keys
from hearth.appliance.settings import Settings
from hearth.cli import main

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "secret words"}],
        "max_tokens": 4}


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    path = state / "keys.toml"
    keys = {
        "kiosk": write_key(path, "kiosk", endpoints=frozenset({"chat"}), max_concurrent=1),
        "metered": write_key(path, "metered", requests_per_minute=2),
        "spare": write_key(path, "spare"),
        "tokens": write_key(path, "tokens", tokens_per_minute=20),
    }
    settings = Settings(api_keys_file=str(path), api_key="plain-admin", state_dir=str(state),
                        max_num_seqs=4, max_queued_requests=64, no_ui=True)
    engine = FakeEngine(max_num_seqs=4, step_delay_s=0.01)
    with running_server(settings, lambda: engine) as server:
        yield server, keys, state, path


def _audit(state: Path, server) -> list[dict]:
    server.context.auth.audit.flush()  # writes happen on the listener thread
    return [json.loads(line) for line in (state / "audit" / "audit.jsonl").read_text().splitlines()]


def test_gate_statuses(keyed):
    server, keys, _, _ = keyed
    url = server.url
    assert httpx.post(url + "v1/chat/completions", json=CHAT).status_code == 401
    assert httpx.post(url + "v1/chat/completions", json=CHAT,
                      headers=_headers(keys["kiosk"] + "x")).status_code == 401
    refused = httpx.post(url + "v1/completions", json={"model": "fake-model", "prompt": "hi"},
                         headers=_headers(keys["kiosk"]))
    assert refused.status_code == 403 and "may not call" in refused.json()["error"]["message"]
    ollama = httpx.post(url + "api/generate", json={"model": "fake-model", "prompt": "hi"},
                        headers=_headers(keys["kiosk"]))
    assert ollama.status_code == 403 and "error" in ollama.json()  # Ollama's format
    assert httpx.post(url + "v1/chat/completions", json=CHAT,
                      headers=_headers(keys["kiosk"])).status_code == 200
    assert httpx.post(url + "v1/chat/completions", json=CHAT,
                      headers=_headers("plain-admin")).status_code == 200  # --api-key too
    assert httpx.get(url + "health").status_code == 200  # open


def test_a_named_key_cannot_jump_ahead_with_the_body_priority(keyed, monkeypatch):
    """Priority comes before fair share: a negative `priority` in the body would put a key's
    requests ahead of every other key's. Under a named key it counts as 0; the single
    `--api-key` keeps it."""
    server, keys, _, _ = keyed
    engine = server.context.engine
    seen = []
    submit = engine.submit

    def spy(request_id, request, priority=0):
        seen.append((request.share_key, priority))
        return submit(request_id, request, priority)

    monkeypatch.setattr(engine, "submit", spy)
    for key in (keys["spare"], "plain-admin"):
        for priority in (-1000, 3):
            answer = httpx.post(server.url + "v1/chat/completions",
                                json={**CHAT, "priority": priority}, headers=_headers(key))
            assert answer.status_code == 200
    assert seen == [("spare", 0), ("spare", 3), ("default", -1000), ("default", 3)]


def test_request_quota_gives_429_with_retry_after(keyed):
    server, keys, _, _ = keyed
    answers = [httpx.post(server.url + "v1/chat/completions", json=CHAT,
                          headers=_headers(keys["metered"])) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 60
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"


def test_token_quota_gives_429_once_the_minute_is_spent(keyed):
    server, keys, _, _ = keyed
    first = httpx.post(server.url + "v1/chat/completions", json=CHAT,
                       headers=_headers(keys["tokens"]))
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 20
    second = httpx.post(server.url + "v1/chat/completions", json=CHAT,
                        headers=_headers(keys["tokens"]))
    assert second.status_code == 429 and "tokens quota" in second.json()["error"]["message"]
    assert 55 <= int(second.headers["Retry-After"]) <= 60  # when the first request's tokens expire


def test_concurrency_limit(keyed):
    server, keys, _, _ = keyed
    slow = {**CHAT, "max_tokens": 200, "stream": True}  # 2 s at least
    with httpx.stream("POST", server.url + "v1/chat/completions", json=slow,
                      headers=_headers(keys["kiosk"])) as first:
        lines = first.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        second = httpx.post(server.url + "v1/chat/completions", json=CHAT,
                            headers=_headers(keys["kiosk"]))
        assert second.status_code == 429 and "concurrency" in second.json()["error"]["message"]
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"


def test_metrics_and_audit_log_per_key(keyed):
    server, keys, state, _ = keyed
    httpx.post(server.url + "v1/chat/completions", json=CHAT, headers=_headers(keys["spare"]))
    text = httpx.get(server.url + "metrics").text
    assert metric(text, 'vllm:key_requests_total{key="spare",status="200"}') >= 1
    assert metric(text, 'vllm:key_generation_tokens_total{key="spare"}') >= 1
    assert metric(text, 'vllm:key_requests_rejected_total{key="kiosk",reason="endpoint"}') >= 1
    lines = _audit(state, server)
    spare = [line for line in lines if line["key"] == "spare"][-1]
    assert spare["endpoint"] == "/v1/chat/completions" and spare["status"] == 200
    assert spare["prompt_tokens"] > 0 and spare["completion_tokens"] == 4
    assert spare["finish_reason"] == "length" and spare["latency_s"] > 0
    assert spare["model"] == "fake-model"
    assert {401, 403} <= {line["status"] for line in lines}
    assert "secret words" not in (state / "audit" / "audit.jsonl").read_text()
    rows = {row.key: row for row in server.context.auth.rows()}
    assert rows["spare"].num_generation_tokens >= 4 and rows["kiosk"].num_rejected >= 1


def test_reload_revokes_without_dropping_streams(keyed):
    server, keys, _, path = keyed
    slow = {**CHAT, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", server.url + "v1/chat/completions", json=slow,
                      headers=_headers(keys["spare"])) as stream:
        lines = stream.iter_lines()
        next(lines)
        kept = tuple(e for e in load_keys(path) if e.name != "spare")
        path.write_text(dump_keys(kept))
        assert server.context.auth.reload_keys()
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the stream in progress ran to its end
    again = httpx.post(server.url + "v1/chat/completions", json=CHAT,
                       headers=_headers(keys["spare"]))
    assert again.status_code == 401


def test_log_prompts_and_rotation(tmp_path):
    settings = Settings(state_dir=str(tmp_path), log_prompts=True, audit_log_max_mib=0.001,
                        no_ui=True)
    with running_server(settings, lambda: FakeEngine(step_delay_s=0.001)) as server:
        for _ in range(12):
            httpx.post(server.url + "v1/chat/completions", json=CHAT)
        server.context.auth.audit.flush()
    files = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert "audit.jsonl" in files and "audit.jsonl.1" in files  # rotated at ~1 KiB
    line = json.loads((tmp_path / "audit" / "audit.jsonl.1").read_text().splitlines()[0])
    assert line["prompt"]["messages"][0]["content"] == "secret words" and line["key"] is None


# -- overload: 300 streams, 3 keys ---------------------------------------------------------------

async def _stream(client: httpx.AsyncClient, key: str, name: str) -> tuple[str, int, float]:
    body = {**CHAT, "max_tokens": 6, "stream": True}
    async with client.stream("POST", "v1/chat/completions", json=body,
                             headers=_headers(key)) as response:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            return name, 429, time.monotonic()
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and events[-1] == "data: [DONE]"
        return name, 200, time.monotonic()


async def _overload(server, engine: FakeEngine, keys: dict[str, str]) -> list:
    """300 streams, arrivals interleaved; the engine starts once all are queued (or refused), so
    that the shares are measured under saturation however slowly this machine sends them."""
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    engine.paused.set()
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        order = [name for _ in range(100) for name in keys]
        load = asyncio.gather(*(_stream(client, keys[n], n) for n in order))
        deadline = time.monotonic() + 60
        while server.context.engine.num_in_flight < 220 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # 100 + 100 + the metered key's 20 (80 get 429)
        engine.paused.clear()
        return await load


def test_three_keys_under_overload_share_by_weight_and_quota(tmp_path):
    path = tmp_path / "keys.toml"
    keys = {"heavy": write_key(path, "heavy", weight=1.0),
            "double": write_key(path, "double", weight=2.0),
            "metered": write_key(path, "metered", requests_per_minute=20)}
    settings = Settings(api_keys_file=str(path), max_num_seqs=4, max_queued_requests=400,
                        no_ui=True)
    engine = FakeEngine(max_num_seqs=4, step_delay_s=0.004)
    with running_server(settings, lambda: engine) as server:
        results = asyncio.run(_overload(server, engine, keys))
        statuses = Counter((name, status) for name, status, _ in results)
        assert statuses[("heavy", 200)] == 100 and statuses[("double", 200)] == 100
        assert statuses[("metered", 200)] == 20 and statuses[("metered", 429)] == 80
        # While both were busy, "double" got twice the tokens of "heavy": when its last request
        # ended, about half of heavy's had. Counted in the engine's finishing order (the clients'
        # clocks on a loaded machine read completions late and in bursts: 68 was seen once).
        order = engine.finished_keys
        double_end = max(i for i, key in enumerate(order) if key == "double")
        heavy_done = sum(1 for key in order[:double_end] if key == "heavy")
        assert heavy_done == pytest.approx(50, rel=0.10)
        # Nothing is held afterwards.
        assert server.context.engine.num_in_flight == 0
        assert not engine.has_unfinished_requests()
        assert all(n == 0 for n in server.context.auth.quotas.running().values())
        text = httpx.get(server.url + "metrics").text
        assert metric(text, 'vllm:key_requests_running{key="heavy"}') == 0


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])
def test_light_key_finishes_while_heavy_key_floods(tmp_path, engine_process):
    """Also with the engine in its own process: the key's share travels with the request."""
    path = tmp_path / "keys.toml"
    keys = {"heavy": write_key(path, "heavy"), "light": write_key(path, "light")}
    settings = Settings(api_keys_file=str(path), max_num_seqs=2, max_queued_requests=400,
                        no_ui=True, engine_process=engine_process)
    factory = functools.partial(FakeEngine, max_num_seqs=2, step_delay_s=0.01)
    with running_server(settings, factory) as srv:

        async def scenario() -> tuple[list, list]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                         limits=httpx.Limits(max_connections=300)) as client:
                flood = [asyncio.ensure_future(_stream(client, keys["heavy"], "heavy"))
                         for _ in range(200)]
                await asyncio.sleep(0.5)
                light = await asyncio.gather(*(_stream(client, keys["light"], "light")
                                               for _ in range(2)))
                pending = sum(not task.done() for task in flood)
                await asyncio.gather(*flood)
                return light, pending

        light, pending = asyncio.run(scenario())
        assert all(status == 200 for _, status, _ in light)
        assert pending > 100  # the light key did not wait for the heavy key's queue


def test_a_full_queue_still_admits_a_key_below_its_part(tmp_path):
    """The in-flight limit (max_num_seqs + max_queued_requests) is shared: one key filling it
    must not turn another key away. Over the limit, a key holding less than an equal part of
    it among the keys in flight still gets in; the flooding key gets 429."""
    path = tmp_path / "keys.toml"
    keys = {"heavy": write_key(path, "heavy"), "light": write_key(path, "light")}
    settings = Settings(api_keys_file=str(path), max_num_seqs=2, max_queued_requests=8,
                        no_ui=True)
    engine = FakeEngine(max_num_seqs=2, step_delay_s=0.005)
    with running_server(settings, lambda: engine) as server:

        async def scenario() -> tuple[list, list]:
            limits = httpx.Limits(max_connections=100)
            engine.paused.set()
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
                flood = [asyncio.ensure_future(_stream(c, keys["heavy"], "heavy"))
                         for _ in range(30)]
                deadline = time.monotonic() + 30
                # the engine is paused: the admitted streams wait, the refused ones are done
                while ((server.context.engine.num_in_flight < 10
                        or sum(task.done() for task in flood) < 20)
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.02)
                light = [asyncio.ensure_future(_stream(c, keys["light"], "light"))
                         for _ in range(7)]
                while ((server.context.engine.num_in_flight < 15
                        or sum(task.done() for task in light) < 2)
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.02)
                engine.paused.clear()
                return await asyncio.gather(*flood), await asyncio.gather(*light)

        heavy, light = asyncio.run(scenario())
        assert Counter(status for _, status, _ in heavy) == {200: 10, 429: 20}
        # light's equal part of the limit of 10 between two keys: 5 in, the 2 beyond it refused
        assert Counter(status for _, status, _ in light) == {200: 5, 429: 2}
        assert server.context.engine.num_in_flight == 0


# -- TLS and SIGHUP in real use ------------------------------------------------------------------

def test_tls_with_a_real_client(tmp_path, capsys):
    assert main(["cert", "--out-dir", str(tmp_path), "--name", "localhost",
                 "--name", "127.0.0.1"]) == 0
    capsys.readouterr()
    trusted = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    settings = Settings(ssl_certfile=str(tmp_path / "cert.pem"),
                        ssl_keyfile=str(tmp_path / "key.pem"), no_ui=True)
    sock_server = running_server(settings, FakeEngine, wait_ready=False)
    with sock_server as server:
        assert server.url.startswith("https://")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = httpx.get(server.url + "health", verify=trusted)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        answer = httpx.post(server.url + "v1/chat/completions", json=CHAT,
                            verify=trusted)
        assert answer.status_code == 200
        with pytest.raises(httpx.ConnectError):  # an unpinned client refuses the self-signed cert
            httpx.get(server.url + "health")
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https", "http") + "health")


_SERVE = """
import sys
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from hearth.appliance.settings import Settings
from hearth.cli import serve
settings = Settings(api_keys_file={keys!r}, port=0, no_ui=True, log_level="warning")
sys.exit(serve(settings, lambda: FakeEngine(step_delay_s=0.02)))
"""


def test_sighup_reloads_keys_in_a_real_process(tmp_path):
    path = tmp_path / "keys.toml"
    old = write_key(path, "old")
    code = _SERVE.format(tests=str(Path(__file__).parent), keys=str(path))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = next(line.split()[3] for line in process.stdout if line.startswith("Hearth is ready"))
        slow = {**CHAT, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", url + "v1/chat/completions", json=slow,
                          headers=_headers(old), timeout=60) as stream:
            lines = stream.iter_lines()
            next(lines)
            path.write_text(dump_keys(()))
            new = write_key(path, "new")
            process.send_signal(signal.SIGHUP)
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while httpx.post(url + "v1/chat/completions", json=CHAT,
                         headers=_headers(new)).status_code != 200:
            assert time.monotonic() < deadline, "SIGHUP did not reload the keys file"
            time.sleep(0.1)
        assert httpx.post(url + "v1/chat/completions", json=CHAT,
                          headers=_headers(old)).status_code == 401
        assert process.poll() is None  # SIGHUP did not stop the server
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_ui_login_takes_a_named_key(tmp_path):
    pytest.importorskip("gradio")
    import threading

    from server_harness import RunningServer, wait_healthy

    from hearth.appliance.lifecycle import bind, make_server
    from hearth.appliance.routes import create_app
    from hearth.ui.app import mount_ui

    path = tmp_path / "keys.toml"
    key = write_key(path, "kiosk", endpoints=frozenset({"chat"}))
    settings = Settings(api_keys_file=str(path))
    sock = bind("127.0.0.1", 0)
    app = create_app(settings, FakeEngine)
    mount_ui(app, app.state.hearth)
    server = make_server(app, app.state.hearth, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_healthy(RunningServer(server.url, server, app.state.hearth, thread), 60)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/config").status_code == 401  # keys file alone: the UI is closed
            wrong = client.post("/login", data={"username": "kiosk", "password": key + "x"})
            assert wrong.status_code == 400
            # with a keys file the user name is the key's name: the session's chats are its
            other = client.post("/login", data={"username": "me", "password": key})
            assert other.status_code == 400
            right = client.post("/login", data={"username": "kiosk", "password": key})
            assert right.status_code == 200 and client.get("/config").status_code == 200
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def test_ui_chats_are_their_session_keys_calls(tmp_path):
    """A UI chat is admitted, charged and audited as its login key's chat call: endpoints (403),
    quotas (429), a key revoked since the login (401), one audit line with endpoint ui/chat."""
    pytest.importorskip("gradio")
    from hearth.ui.chat import ChatOptions, reply
    from hearth.ui.conversation import Turn

    path = tmp_path / "keys.toml"
    write_key(path, "kiosk", endpoints=frozenset({"chat"}), requests_per_minute=1)
    write_key(path, "lister", endpoints=frozenset({"models"}))
    settings = Settings(api_keys_file=str(path), state_dir=str(tmp_path), no_ui=True)
    options = ChatOptions("", 0.0, 1.0, 4)
    with running_server(settings, lambda: FakeEngine(step_delay_s=0.001)) as server:

        def chat(username: str) -> str:
            async def last() -> str:
                updates = [u async for u in reply(server.context, [Turn("user", "hi")], options,
                                                  username)]
                return updates[-1][0][-1].content

            loop = server.context.engine._loop  # the server's event loop: the engine's home
            return asyncio.run_coroutine_threadsafe(last(), loop).result(30)

        assert "may not call" in chat("lister")
        first = chat("kiosk")
        assert first and "API key" not in first
        assert "requests quota: 1 per minute; retry in" in chat("kiosk")
        assert "no longer valid" in chat("nobody")
        audit = _audit(tmp_path, server)
        ui = [line for line in audit if line["endpoint"] == "ui/chat"]
        assert [(line["key"], line["status"]) for line in ui] == [
            ("lister", 403), ("kiosk", 200), ("kiosk", 429), (None, 401)]
        assert ui[1]["completion_tokens"] > 0 and ui[1]["method"] == "UI"
        text = httpx.get(server.url + "metrics").text
        assert metric(text, 'vllm:key_requests_total{key="kiosk",status="200"}') == 1
        assert server.context.auth.quotas.running().get("kiosk", 0) == 0


def test_sighup_without_a_keys_file_keeps_serving():
    code = _SERVE.format(tests=str(Path(__file__).parent), keys=None)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = next(line.split()[3] for line in process.stdout if line.startswith("Hearth is ready"))
        process.send_signal(signal.SIGHUP)  # `systemctl reload hearth` must not stop it
        time.sleep(0.5)
        assert process.poll() is None
        assert httpx.post(url + "v1/chat/completions", json=CHAT).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
