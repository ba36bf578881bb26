"""The HTTP side: an OpenAI-style API in front of the model's replicas (replica.py).

It checks and tokenizes each request (400 naming the field), sends each prompt to the
replicas as a row, and turns the rows' tokens into a completion, or into a stream of
server-sent events (each row generated ``stream_tokens`` at a time). A replica that died,
hung or did not answer within the timeout is a 503 with the reason, never a hang.

Serve pickles the deployment class, by value, when ``@serve.deployment`` runs: what its
methods use is defined above it, and its annotations are objects, not strings (no
``from __future__ import annotations``), for FastAPI to read them on the replicas."""

import asyncio
import dataclasses
import itertools
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from raymoe.errors import find_cause
from raymoe.serve.batching import Row
from raymoe.serve.protocol import BadRequest, CompletionRequest, check_context, parse_completion
from raymoe.serve.replica import ModelUnavailable
from raymoe.serve.responses import DONE, Choice, Completion, error, event, model_list
from raymoe.serve.served_model import ServedModel
from raymoe.serve.text import TextStream

api = FastAPI(title="raymoe")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpOptions:
    tokenizer: str | None = None
    timeout_s: float = 300.0
    """For a row's answer, from the moment it is sent (queueing included)."""
    stream_tokens: int = 16
    """New tokens per step of a stream."""


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as err:
        raise BadRequest("body", f"not JSON: {err}") from None


async def _merge(streams: list[AsyncIterator[Choice]]) -> AsyncGenerator[Choice, None]:
    """The items of several streams as they come; the first error ends it."""
    queue: asyncio.Queue[Choice | BaseException | None] = asyncio.Queue()

    async def drain(stream: AsyncIterator[Choice]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(None)
        except Exception as err:
            await queue.put(err)

    tasks = [asyncio.create_task(drain(s)) for s in streams]
    try:
        for _ in range(len(streams)):
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _failure(err: Exception, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """503 and the reason when the model could not answer (a retry may succeed); else 500."""
    unavailable = find_cause(err, ModelUnavailable)
    if unavailable is not None:
        reason = str(unavailable).splitlines()[0]
    elif isinstance(err, TimeoutError):
        reason = f"no answer from the model within {timeout_s:g} s (--timeout); retry later"
    elif find_cause(err, ray.exceptions.RayActorError) is not None:
        reason = "the model replica serving this request died; Serve is replacing it, retry shortly"
    elif isinstance(err, RayServeException):
        reason = f"the model is unavailable: {err}"
    else:
        logger.error("a completion failed", exc_info=err)
        return 500, error(f"{type(err).__name__}: {err}", "server_error")
    return 503, error(reason, "service_unavailable")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class CompletionsServer:
    def __init__(self, replicas: DeploymentHandle, served: ServedModel, options: HttpOptions):
        self.replicas, self.served, self.options = replicas, served, options
        self.tokenizer = served.tokenizer(options.tokenizer)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return model_list(self.served.id, self.served.created)

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """The counters of the replica that answers (the only one, with one replica)."""
        return await self.replicas.stats.remote()

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            parsed = parse_completion(await _json(request), self.served.id)
            prompts = [ids or [self.tokenizer.eot_id] for ids in self.tokenizer.encode_batch(list(parsed.prompts))]
            check_context(prompts, parsed.max_tokens, self.served.seq_len)
        except BadRequest as err:
            return JSONResponse(error(str(err), "invalid_request_error", err.field), status_code=400)
        rows = [Row(tuple(p), parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.seed) for p in prompts]
        completion = Completion(self.served.id)
        try:
            if parsed.stream:
                return await self._stream(completion, rows, parsed)
            return JSONResponse(await self._complete(completion, rows, parsed))
        except Exception as err:
            status, body = _failure(err, self.options.timeout_s)
            return JSONResponse(body, status_code=status)

    async def _complete(self, completion: Completion, rows: list[Row], parsed: CompletionRequest) -> dict[str, Any]:
        outputs = await asyncio.gather(*(self._generate(row) for row in rows))
        choices = []
        for index, tokens in enumerate(outputs):
            text = self._text(parsed)
            choices.append(Choice(index, text.push(tokens) + text.end(), text.finish_reason))
        return completion.body(choices, sum(len(r.prompt) for r in rows), sum(map(len, outputs)))

    async def _stream(self, completion: Completion, rows: list[Row], parsed: CompletionRequest) -> Response:
        pieces = _merge([self._pieces(index, row, parsed) for index, row in enumerate(rows)])
        first = await anext(pieces)  # before the response starts: a failure is still a 503

        async def events() -> AsyncIterator[str]:
            yield completion.chunk(first)
            try:
                async for choice in pieces:
                    yield completion.chunk(choice)
            except Exception as err:  # the status is sent: the error goes in the stream
                yield event(_failure(err, self.options.timeout_s)[1])
            finally:
                await pieces.aclose()  # the client may have gone: stop generating
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _pieces(self, index: int, row: Row, parsed: CompletionRequest) -> AsyncIterator[Choice]:
        """A row's text, ``stream_tokens`` new tokens a call (a seeded row: seed + step)."""
        text, produced = self._text(parsed), 0
        for step in itertools.count():
            left = row.max_tokens - produced
            tokens = await self._generate(dataclasses.replace(
                row, prompt=row.prompt + tuple(text.tokens), max_tokens=min(self.options.stream_tokens, left),
                seed=None if row.seed is None else row.seed + step))
            produced += len(tokens)
            new = text.push(tokens)
            if produced >= row.max_tokens or not tokens:
                new += text.end()
            if new or text.finish_reason:
                yield Choice(index, new, text.finish_reason)
            if text.finish_reason:
                return

    def _text(self, parsed: CompletionRequest) -> TextStream:
        return TextStream(self.tokenizer.decode, self.tokenizer.eot_id, parsed.stop)

    async def _generate(self, row: Row) -> list[int]:
        response = self.replicas.generate.remote(row)
        try:
            return await asyncio.wait_for(response, self.options.timeout_s)
        except TimeoutError:
            response.cancel()
            raise
