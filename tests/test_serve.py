"""`raymoe serve`: an OpenAI-style HTTP API on Ray Serve, its replicas inference groups.
Through a real HTTP client (urllib) against Serve applications on the session's Ray
cluster, serving tiny models at EP 1 (dense) and EP 2 (4 experts) whose answers one
process computes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from conftest import session_ray_processes
from sentence_models import SENTENCES, save_sentence_model, sentence_config

from raymoe import cli, console
from raymoe.commands import serve as serve_command
from raymoe.data.tokenizers import ByteTokenizer
from raymoe.errors import RaymoeError
from raymoe.eval.loading import load_model
from raymoe.local_cluster import free_port
from raymoe.model import GPT
from raymoe.model.generation import Sampling, generate
from raymoe.serve import ServeOptions, serve_checkpoint
from raymoe.serve.batching import BatchWhenFree, Row, plan_calls
from raymoe.serve.text import TextStream

APP = "raymoe-test"
TIMEOUT_S = 15.0
"""The application's --timeout: a request that waits on a dead replica gets its 503 by then."""
PROMPT = "alice keeps"
PROMPTS = [" ".join(s.split()[:2]) for s in SENTENCES]
EOT = ByteTokenizer.eot_id


# ------------------------------------------------------------------ the parts without Ray


def _text(stop: tuple[str, ...] = ()) -> TextStream:
    tokenizer = ByteTokenizer()
    return TextStream(tokenizer.decode, tokenizer.eot_id, stop)


def test_text_is_released_once_no_stop_string_or_character_can_change_it():
    text = _text(stop=("kite",))
    assert text.push(list(b"a red k")) == "a red "  # "k" may begin "kite"
    assert text.push(list(b"i")) == ""
    assert text.push(list(b"te and more")) == "" and text.finish_reason == "stop"
    text = _text()
    euro = list("€".encode())
    assert text.push(list(b"5 ") + euro[:2]) == "5 "  # an incomplete character waits
    assert text.push(euro[2:] + [ByteTokenizer.eot_id] + list(b"after")) == "€"
    assert text.finish_reason == "stop" and text.end() == ""
    text = _text(stop=("\n",))
    assert text.push(list(b"ab")) + text.end() == "ab" and text.finish_reason == "length"


def test_rows_share_a_call_when_they_sample_alike_and_fit_the_context_together():
    rows = [Row((1,) * 10, 20), Row((1,) * 30, 5), Row((1,) * 3, 90),  # 30 + 90 > 100: apart
            Row((1,), 5, temperature=0.7), Row((1,), 5, temperature=0.7),  # alike: together
            Row((1,), 5, temperature=0.7, seed=1), Row((1,), 5, temperature=0.7, seed=1)]  # seeded: alone
    assert [c.rows for c in plan_calls(rows, seq_len=100)] == [[0, 1], [2], [3, 4], [5], [6]]
    assert [(c.longest, c.max_tokens) for c in plan_calls(rows, 100)][:2] == [(30, 20), (3, 90)]


class HeldModel:
    """A model whose batches run until the test lets them go: what each batch held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, rows: list[Row]) -> list[list[int]]:
        self.batches.append([row.prompt[0] for row in rows])
        await self.release.wait()
        self.release.clear()
        if any(row.prompt[0] < 0 for row in rows):
            raise ValueError("a bad row")
        return [[row.prompt[0] * 10] for row in rows]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_batch_takes_every_row_that_queued_while_the_model_was_busy():
    async def scenario() -> None:
        model = HeldModel()
        batcher = BatchWhenFree(model.run, max_rows=8, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(Row((1,), 4)))
        await settle()
        assert model.batches == [[1]]  # an idle model with no wait runs the first row at once
        later = [asyncio.ensure_future(batcher.submit(Row((i,), 4))) for i in range(2, 12)]
        await settle()
        model.release.set()
        assert await first == [10]
        await settle()
        assert model.batches == [[1], list(range(2, 10))]  # all that queued, up to max_rows
        model.release.set()
        await settle()
        model.release.set()
        assert await asyncio.gather(*later) == [[i * 10] for i in range(2, 12)]
        assert model.batches == [[1], list(range(2, 10)), [10, 11]]

    asyncio.run(scenario())


def test_a_stopped_batcher_leaves_no_request_waiting():
    async def scenario() -> None:
        model = HeldModel()
        batcher = BatchWhenFree(model.run, max_rows=1, wait_s=0.0)
        running, queued = (asyncio.ensure_future(batcher.submit(Row((i,), 4))) for i in (1, 2))
        await settle()
        assert model.batches == [[1]]
        assert batcher.worker is not None
        batcher.worker.cancel()  # as when the replica stops
        await settle()
        assert running.cancelled() and queued.cancelled()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="max_rows=0: expected at least 1"):
        BatchWhenFree(HeldModel().run, max_rows=0, wait_s=0.0)


def test_rows_answered_by_a_batch_can_join_the_next_within_the_wait():
    async def scenario() -> None:
        model = HeldModel()
        batcher = BatchWhenFree(model.run, max_rows=8, wait_s=0.3)

        async def client(first: int) -> list[int]:  # sends its next row once answered
            answer = await batcher.submit(Row((first,), 4))
            return answer + await batcher.submit(Row((first + 100,), 4))

        one = asyncio.ensure_future(client(1))
        await asyncio.sleep(0.4)  # the wait ran out: [1] runs
        two = asyncio.ensure_future(client(2))
        await settle()
        model.release.set()  # [1] answered: [2] waits, and client 1's next row joins it
        await asyncio.sleep(0.4)
        assert model.batches == [[1], [2, 101]]
        model.release.set()
        await asyncio.sleep(0.4)
        model.release.set()
        assert (await one, await two) == ([10, 1010], [20, 1020])
        assert model.batches == [[1], [2, 101], [102]]

    asyncio.run(scenario())


def test_an_idle_model_waits_for_a_batch_to_fill_and_a_failed_batch_fails_only_its_rows():
    async def scenario() -> None:
        model = HeldModel()
        batcher = BatchWhenFree(model.run, max_rows=3, wait_s=30.0)
        rows = [asyncio.ensure_future(batcher.submit(Row((i,), 4))) for i in (-1, 2)]
        await settle()
        assert model.batches == []  # waiting for a third row (or 30 s)
        gone = asyncio.ensure_future(batcher.submit(Row((3,), 4)))
        queued = [asyncio.ensure_future(batcher.submit(Row((i,), 4))) for i in (4, 5, 6, 7)]
        await settle()
        assert model.batches == [[-1, 2, 3]]  # full: runs without waiting out the 30 s
        gone.cancel()
        queued[0].cancel()  # its client left while it queued: no row of the next batch
        model.release.set()
        with pytest.raises(ValueError, match="a bad row"):
            await rows[0]
        with pytest.raises(ValueError, match="a bad row"):
            await rows[1]
        await settle()
        model.release.set()
        assert await asyncio.gather(*queued[1:]) == [[50], [60], [70]]
        assert model.batches == [[-1, 2, 3], [5, 6, 7]]

    asyncio.run(scenario())


@pytest.mark.parametrize("argv,message", [
    (["--ep", "3"], "--ep 3: must divide the checkpoint's 4 experts"),
    (["--max-batch-size", "0"], "--max-batch-size 0: expected at least 1"),
    (["--detach"], "--detach: needs --address")])
def test_bad_options_are_refused_before_ray_starts(varied_runs, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(console, "connect_ray", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["serve", str(varied_runs[4]), *argv]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ over HTTP


def post(url: str, body: Any, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.load(reply)


@pytest.fixture(scope="module")
def varied_runs(tmp_path_factory) -> dict[int, Path]:
    """Sentence-model checkpoints (dense, 4 experts), randomly initialised with their weight
    matrices scaled up 10x, so that greedy text differs from prompt to prompt (at the
    initial scale every prompt gets one byte repeated): a row answered with another's
    tokens shows, and nothing trains."""
    runs = {}
    for experts in (0, 4):
        torch.manual_seed(experts)
        cfg = sentence_config(experts)
        model = GPT(cfg.model)
        with torch.no_grad():
            for weight in (p for p in model.parameters() if p.dim() > 1):
                weight.mul_(10)
        runs[experts] = tmp_path_factory.mktemp(f"varied-{experts}")
        save_sentence_model(model, cfg, runs[experts])
    return runs


def one_process(run: Path, prompts: list[str], max_tokens: int) -> list[tuple[str, str, int]]:
    """Each prompt's greedy (text, finish_reason, tokens) in this process, one at a time."""
    loaded = load_model(str(run))
    answers = []
    for prompt in loaded.tokenizer.encode_batch(prompts):
        tokens = generate(loaded.model, [prompt], max_tokens, Sampling(), is_done=lambda new: new[-1] == EOT)[0]
        answers.append((loaded.tokenizer.decode(t for t in tokens if t != EOT),
                        "stop" if EOT in tokens else "length", len(tokens)))
    return answers


@pytest.fixture(scope="module")
def served(ray_cluster, varied_runs):
    from ray import serve

    options = ServeOptions(cpus_per_rank=0.5, port=free_port(), batch_wait_s=0.05, stream_tokens=4,
                           timeout_s=TIMEOUT_S, app_name=APP)
    yield serve_checkpoint(str(varied_runs[0]), options, log=lambda _: None)
    serve.shutdown()


def test_a_greedy_completion_is_what_raymoe_generate_prints(served, varied_runs, capsys):
    assert cli.main(["generate", str(varied_runs[0]), PROMPT, "--greedy", "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    [(text, finish, count)] = one_process(varied_runs[0], [PROMPT], 40)
    assert printed == PROMPT + text + "\n" and len(set(text)) > 5  # not one byte repeated
    status, body = post(served.url, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0})
    assert status == 200, body
    assert {k: body[k] for k in ("object", "model")} == {"object": "text_completion", "model": served.model_id}
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert body["choices"] == [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]
    assert body["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": count,
                             "total_tokens": len(PROMPT) + count}


def test_a_completion_of_several_prompts_ends_at_its_stop_strings(served, varied_runs):
    answers = one_process(varied_runs[0], PROMPTS[:3], 40)
    stop = answers[0][0][6:9]  # the first answer has it; the others may

    def at_stop(text: str, finish: str) -> tuple[str, str]:
        return (text[:text.find(stop)], "stop") if stop in text else (text, finish)

    status, body = post(served.url, {"prompt": PROMPTS[:3], "max_tokens": 40, "temperature": 0,
                                     "stop": [stop, "never in it"], "model": served.model_id})
    assert status == 200, body
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (i, *at_stop(text, finish)) for i, (text, finish, _) in enumerate(answers)]
    assert len(body["choices"][0]["text"]) < 9
    assert body["usage"]["prompt_tokens"] == sum(map(len, PROMPTS[:3]))


def test_a_stream_carries_the_same_text_and_ends_with_done(served, varied_runs):
    [(text, finish, _)] = one_process(varied_runs[0], [PROMPT], 30)
    request = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": True}
    reply = urllib.request.urlopen(urllib.request.Request(
        f"{served.url}/v1/completions", json.dumps(request).encode()), timeout=60)
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = [line.removeprefix(b"data: ").decode() for line in reply.read().split(b"\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # 4 tokens a step
    heads = {(c["id"], c["object"], c["model"]) for c in chunks}
    assert heads == {(chunks[0]["id"], "text_completion", served.model_id)}
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [finish]


def test_concurrent_requests_are_answered_in_batches(served, varied_runs):
    answers = dict(zip(PROMPTS, one_process(varied_runs[0], PROMPTS, 30), strict=True))
    assert len({text for text, _, _ in answers.values()}) == len(PROMPTS)
    before = get(f"{served.url}/v1/stats")
    prompts = PROMPTS * 4
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: post(served.url, {"prompt": p, "max_tokens": 30, "temperature": 0}),
                                prompts))
    after = get(f"{served.url}/v1/stats")
    assert [status for status, _ in replies] == [200] * 32
    assert [body["choices"][0]["text"] for _, body in replies] == [answers[p][0] for p in prompts]
    assert after["rows"] - before["rows"] == 32
    assert after["calls"] - before["calls"] < 32 and after["largest_call"] > 1


def test_the_models_route_names_the_served_model(served, varied_runs):
    assert served.model_id == f"{varied_runs[0].name}/step-00000300"
    assert get(f"{served.url}/v1/models")["data"] == [
        {"id": served.model_id, "object": "model", "created": pytest.approx(time.time(), abs=600),
         "owned_by": "raymoe"}]


@pytest.mark.parametrize("body,field", [
    ({"prompt": PROMPT, "echo": True}, "echo"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": PROMPT, "max_tokens": "10"}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 128 - len(PROMPT) + 1}, "max_tokens"),
    ({"prompt": "x" * 128, "max_tokens": 1}, "prompt"),
    ({"prompt": PROMPT, "temperature": -0.5}, "temperature"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ({"prompt": PROMPT, "n": 2}, "n"),
    ({"prompt": PROMPT, "stop": 3}, "stop"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "seed": 1.5}, "seed"),
    ({"prompt": PROMPT, "model": "gpt-4"}, "model"),
    ([PROMPT], "body"),
    (b"{not json", "body")])
def test_a_bad_request_is_a_400_naming_the_field(served, body, field):
    status, reply = post(served.url, body)
    assert status == 400, reply
    assert reply["error"]["param"] == field and reply["error"]["message"].startswith(f"{field}: ")


def test_a_request_at_the_edge_of_the_context_is_answered(served):
    status, body = post(served.url, {"prompt": PROMPT, "max_tokens": 128 - len(PROMPT), "temperature": 0})
    assert status == 200 and body["usage"]["total_tokens"] == 128


def _kill_replica() -> None:
    """ray.kill on the model's Serve replica (a named actor of Serve's namespace)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{APP}#GroupReplica#" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"))


def _kill_rank() -> None:
    """The process of the replica's inference group's rank, killed."""
    pids = [pid for pid, line in session_ray_processes() if line.startswith("ray::InferenceWorker")]
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)


@pytest.mark.parametrize("victim", ["replica", "rank"])
def test_a_killed_actor_is_a_503_or_an_answer_never_a_hang(served, victim):
    """The model's Serve replica or its group's rank killed: requests get a 503 naming the
    reason, until Serve's replacement answers."""
    long_request = {"prompt": PROMPTS, "max_tokens": 100, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post, served.url, long_request)
        time.sleep(0.3)
        if victim == "replica":
            _kill_replica()
        else:
            _kill_rank()
        replies = [in_flight.result(timeout=TIMEOUT_S + 15)]
    deadline = time.monotonic() + 120
    while True:  # at least one request after the kill
        start = time.monotonic()
        replies.append(post(served.url, {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}))
        assert time.monotonic() - start < TIMEOUT_S + 10
        if replies[-1][0] == 200:
            break
        assert time.monotonic() < deadline, replies
    for status, body in replies:
        assert status == 200 or (status == 503 and "retry" in body["error"]["message"]), body
    if victim == "rank":  # the replica's next call at the latest found its group dead
        unavailable = [body["error"]["message"] for status, body in replies if status == 503]
        assert unavailable and "the inference group failed" in unavailable[0], replies


def test_an_ep_2_group_serves_the_moe_model(served, varied_runs, capsys):
    """Beside the first application, under another route."""
    [(text, finish, _)] = one_process(varied_runs[4], [PROMPT], 20)
    options = ServeOptions(ep=2, cpus_per_rank=0.5, port=urlsplit(served.url).port, route_prefix="/moe",
                           app_name="raymoe-moe", timeout_s=TIMEOUT_S)
    moe = serve_checkpoint(str(varied_runs[4]), options, log=lambda _: None)
    try:
        assert moe.url.endswith("/moe")
        status, body = post(moe.url, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
        assert status == 200, body
        assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == (text, finish)
        assert body["model"] == moe.model_id
    finally:
        threading.Timer(1.0, moe.shutdown).start()
    # what `raymoe serve` prints while it serves, until the application is deleted
    with pytest.raises(RaymoeError, match="the application 'raymoe-moe' was deleted"):
        serve_command.follow("raymoe-moe", every_s=0.2)
    assert "GroupReplica: HEALTHY (1 RUNNING); CompletionsServer: HEALTHY (1 RUNNING)" in capsys.readouterr().err
