"""The endpoints' logic: OpenAI requests -> worker jobs -> events -> OpenAI response bodies or SSE."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tinytitan.engine import SamplingParams
from tinytitan.errors import TinyTitanError, first_line
from tinytitan.runtime import Model
from tinytitan.serve import schemas
from tinytitan.serve.json_grammar import start
from tinytitan.serve.json_schema import Node, SchemaError, compile_schema, object_node
from tinytitan.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest
from tinytitan.serve.worker import Busy, Delta, Failure, Finish, Handle, Job, TokenLogprob, Worker
from tinytitan.version import __version__

if TYPE_CHECKING:
    from tinytitan.serve.app import ServeConfig

FINGERPRINT = f"tinytitan-{__version__}"
POLL_S = 0.25  # how often a waiting request checks whether its client is still there
EventStream = AsyncIterator[Delta | Finish]


@dataclass
class _Choice:
    """What one choice has produced so far (non-streaming responses)."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    reason: str | None = None
    completion_tokens: int = 0


class Endpoints:
    """The endpoints' logic: requests -> jobs -> events -> OpenAI response bodies."""

    def __init__(self, model: Model, config: ServeConfig, worker: Worker) -> None:
        self.model, self.config, self.worker = model, config, worker

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_id,
            "object": "model",
            "created": self.config.created,
            "owned_by": "tinytitan",
        }

    def check_model(self, name: str) -> None:
        if name != self.config.model_id:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.config.model_id!r}",
                param="model",
                code="model_not_found",
            )

    # -- request -> jobs ----------------------------------------------------------------------------
    def _check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty (no tokens)", param=param)
        if len(ids) > self.model.ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {self.model.ctx} tokens, but the prompt has"
                f" {len(ids)} tokens. Please shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )

    def _schema(self, req: schemas.GenerationRequest) -> Node | None:
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        if isinstance(fmt, schemas.JsonObjectFormat):
            return object_node()
        try:
            return compile_schema(fmt.json_schema.schema_)
        except RecursionError:
            problem = "it is nested too deeply"
        except SchemaError as e:
            problem = str(e)
        except Exception as e:  # a shape compile_schema does not foresee: still the client's schema
            problem = first_line(e)
        raise APIError(400, f"unsupported JSON schema: {problem}", param="response_format")

    def _jobs(
        self,
        req: schemas.GenerationRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
    ) -> list[Job]:
        limit = self.config.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(
                400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens"
            )
        stop, schema = req.stop_list(), self._schema(req)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p <= 0.0:  # the nucleus of mass 0 is the single most likely token
            temperature, top_p = 0.0, 1.0
        jobs = []
        for p, ids in enumerate(prompts):
            self._check_prompt(ids, "prompt" if isinstance(req, CompletionRequest) else "messages")
            budget = min(max_tokens or limit, self.model.ctx - len(ids) + 1)
            if schema is not None and start(schema).est() > budget:
                raise APIError(
                    400,
                    f"max_tokens ({budget} here) is too small for the response format: its shortest"
                    f" valid JSON is {start(schema).est()} bytes, and one token per byte is kept in"
                    " reserve to close it",
                    param="max_tokens",
                )
            for j in range(req.n):
                index = p * req.n + j
                seed = None if req.seed is None else req.seed + index
                params = SamplingParams(temperature, req.top_k or 0, top_p, seed)
                jobs.append(Job(index, ids, budget, params, stop, logprobs, schema))
        return jobs

    def _submit(self, jobs: list[Job]) -> Handle:
        handle = Handle(asyncio.get_running_loop())
        try:
            self.worker.submit(jobs, handle)
        except Busy as e:
            raise APIError(503, str(e), type="server_error", code="server_busy") from None
        return handle

    def _completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        p, tok = req.prompt, self.model.tokenizer
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [tok.encode(x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompts) > schemas.MAX_N or len(prompts) * req.n > schemas.MAX_N:
            raise APIError(400, f"at most {schemas.MAX_N} prompts x n per request", param="prompt")
        vocab = min(self.model.config.vocab_size, tok.vocab_size)
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        texts = [tok.decode(ids) for ids in prompts] if req.echo else [""] * len(prompts)
        return prompts, texts

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The chat's prompt ids, rendered and tokenized on a worker thread: the model's template may be
        slow (it is stopped after 2 s) and a long prompt takes a while, and /health must not wait."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        try:
            return await asyncio.to_thread(self.model.chat_prompt_ids, messages, self.config.parse_special)
        except TinyTitanError as e:
            raise APIError(400, str(e), param="messages") from None

    # -- endpoints ----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        req.check_supported()
        prompts, echo = await asyncio.to_thread(self._completion_prompts, req)  # tokenizing takes time
        jobs = self._jobs(req, prompts, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model_id,
            "system_fingerprint": FINGERPRINT,
        }
        prefix = {job.index: echo[job.index // req.n] for job in jobs}
        usage = _Usage(sum(len(ids) for ids in prompts))
        if req.stream:
            return self._stream(jobs, request, lambda h: self._completion_chunks(h, head, prefix, req, usage))
        choices = await self._collect(jobs, request, prefix)
        if choices is None:
            return Response(status_code=499)
        usage.add(choices.values())
        out = []
        for i, c in sorted(choices.items()):
            lp = self._completion_logprobs(c.tokens, c.offsets) if req.logprobs is not None else None
            out.append({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.reason})
        return JSONResponse({**head, "choices": out, "usage": usage.body()})

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        req.check_supported()
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        ids = await self._chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        jobs = self._jobs(req, [ids], max_tokens, logprobs)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model_id,
            "system_fingerprint": FINGERPRINT,
        }
        usage = _Usage(len(ids))
        if req.stream:
            return self._stream(jobs, request, lambda h: self._chat_chunks(h, head, len(jobs), req, usage))
        choices = await self._collect(jobs, request, {})
        if choices is None:
            return Response(status_code=499)
        usage.add(choices.values())
        out = []
        for i, c in sorted(choices.items()):
            lp = (
                {"content": [self._chat_logprob(t) for t in c.tokens], "refusal": None}
                if req.logprobs
                else None
            )
            message = {"role": "assistant", "content": c.text, "refusal": None}
            out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": c.reason})
        return JSONResponse({**head, "choices": out, "usage": usage.body()})

    # -- events -> responses ------------------------------------------------------------------------
    async def _events(self, handle: Handle, n_jobs: int, request: Request) -> AsyncIterator[Delta | Finish]:
        """The request's events until every job has finished; stops early if the client leaves.

        The client is checked every POLL_S seconds whether or not events keep coming."""
        loop, finished = asyncio.get_running_loop(), 0
        next_check = loop.time() + POLL_S
        while finished < n_jobs:
            if loop.time() >= next_check:
                if await request.is_disconnected():
                    handle.cancel()
                    return
                next_check = loop.time() + POLL_S
            try:
                event = handle.events.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    event = await asyncio.wait_for(handle.events.get(), max(0.01, next_check - loop.time()))
                except TimeoutError:
                    continue
            if isinstance(event, Failure):
                raise APIError(
                    503 if "shutting down" in event.message else 500, event.message, type="server_error"
                )
            finished += isinstance(event, Finish)
            yield event

    async def _collect(
        self, jobs: list[Job], request: Request, prefix: dict[int, str]
    ) -> dict[int, _Choice] | None:
        handle = self._submit(jobs)
        choices = {job.index: _Choice(text=prefix.get(job.index, "")) for job in jobs}
        try:
            async for event in self._events(handle, len(jobs), request):
                c = choices[event.index]
                if isinstance(event, Delta):
                    for t in event.logprobs:
                        c.tokens.append(t)
                        c.offsets.append(len(c.text))
                    c.text += event.text
                else:
                    c.reason, c.completion_tokens = event.reason, event.completion_tokens
        finally:
            handle.cancel()  # no-op when done; frees the work if the client left or an error struck
        left = any(c.reason is None for c in choices.values())  # the client went away
        return None if left else choices

    def _stream(
        self, jobs: list[Job], request: Request, chunks: Callable[[EventStream], AsyncIterator[dict]]
    ) -> Response:
        handle = self._submit(jobs)

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks(self._events(handle, len(jobs), request)):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except APIError as e:  # after the headers went out, errors travel as an event
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return _EventStream(body(), handle)

    async def _completion_chunks(
        self, events: EventStream, head: dict, prefix: dict[int, str], req: CompletionRequest, usage: _Usage
    ) -> AsyncIterator[dict]:
        extra = {"usage": None} if _include_usage(req) else {}
        offsets = {i: len(p) for i, p in prefix.items()}
        for i, text in sorted(prefix.items()):
            if text:
                yield {
                    **head,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}],
                    **extra,
                }
        async for event in events:
            if isinstance(event, Delta):
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(
                        event.logprobs, [offsets[event.index]] * len(event.logprobs)
                    )
                offsets[event.index] += len(event.text)
                choice = {"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": None}
            else:
                usage.completion += event.completion_tokens
                choice = {"index": event.index, "text": "", "logprobs": None, "finish_reason": event.reason}
            yield {**head, "choices": [choice], **extra}
        if extra:
            yield {**head, "choices": [], "usage": usage.body()}

    async def _chat_chunks(
        self, events: EventStream, head: dict, n: int, req: ChatCompletionRequest, usage: _Usage
    ) -> AsyncIterator[dict]:
        head = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if _include_usage(req) else {}

        def chunk(index: int, delta: dict, logprobs: Any = None, reason: str | None = None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {**head, "choices": [choice], **extra}

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
        async for event in events:
            if isinstance(event, Delta):
                lp = None
                if req.logprobs:
                    lp = {"content": [self._chat_logprob(t) for t in event.logprobs], "refusal": None}
                yield chunk(event.index, {"content": event.text}, lp)
            else:
                usage.completion += event.completion_tokens
                yield chunk(event.index, {}, None, event.reason)
        if extra:
            yield {**head, "choices": [], "usage": usage.body()}

    # -- log-probabilities --------------------------------------------------------------------------
    def _token_text(self, token: int) -> str:
        data = self.model.tokenizer.token_to_bytes(token)
        try:
            return data.decode()
        except UnicodeDecodeError:  # part of a multi-byte character: OpenAI's spelling for raw bytes
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _completion_logprobs(self, tokens: list[TokenLogprob], offsets: list[int]) -> dict[str, Any]:
        return {
            "tokens": [self._token_text(t.token) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self._token_text(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": offsets,
        }

    def _chat_logprob(self, t: TokenLogprob) -> dict[str, Any]:
        tok = self.model.tokenizer

        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {
                "token": self._token_text(token),
                "logprob": logprob,
                "bytes": list(tok.token_to_bytes(token)),
            }

        return {**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}


@dataclass
class _Usage:
    prompt: int
    completion: int = 0

    def add(self, choices: Any) -> None:
        self.completion += sum(c.completion_tokens for c in choices)

    def body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }


def _include_usage(req: schemas.GenerationRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


class _EventStream(StreamingResponse):
    """Server-sent events; however the response ends (done, client gone, error), its work is freed."""

    def __init__(self, content: AsyncIterator[str], handle: Handle) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()
