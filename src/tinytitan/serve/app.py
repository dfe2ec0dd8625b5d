"""The FastAPI app: OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions and /health.

`create_app(model, ServeConfig(...))` builds it around a loaded Model; a `Worker` thread does the
generating (`worker.py`), `Endpoints` turns requests into jobs and events into responses
(`endpoints.py`). Every failure becomes an OpenAI-style error body: {"error": {message, type, param,
code}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinytitan.runtime import Model
from tinytitan.serve import schemas
from tinytitan.serve.endpoints import Endpoints
from tinytitan.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest
from tinytitan.serve.worker import Worker
from tinytitan.version import __version__


@dataclass
class ServeConfig:
    model_id: str  # the name clients put in "model"
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_tokens_limit: int = 1024  # the most tokens one choice may ask for
    max_active: int = 8  # sequences generated at once (one batch: continuous batching)
    max_queue: int = 64  # choices waiting for a slot; beyond that requests get 503
    max_request_bytes: int = 1 << 20  # larger bodies get 413 (before they are read, when sized)
    body_timeout_s: float = 30.0  # a body still incomplete after this gets 408 and the connection closes
    parse_special: bool = False  # special-token texts in chat messages become tokens: clients may forge turns
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(model: Model, config: ServeConfig) -> FastAPI:
    worker = Worker(model, max_active=config.max_active, max_queue=config.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="tinytitan", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    api = Endpoints(model, config, worker)
    _add_error_handlers(app)

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401, "Incorrect or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key"
            )

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, **worker.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> dict[str, Any]:
        api.check_model(model_id)
        return api.model_card()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        body = schemas.parse(CompletionRequest, await _read_json(request, config))
        return await api.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        body = schemas.parse(ChatCompletionRequest, await _read_json(request, config))
        return await api.chat(body, request)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    def reply(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status == 408:  # the rest of the body may still come: this connection cannot be reused
            headers = {"Connection": "close"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def api_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, APIError)
        return reply(e)

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        kind = "not_found" if e.status_code == 404 else None
        return reply(APIError(e.status_code, str(e.detail), code=kind))

    async def validation_error(_: Request, e: Exception) -> JSONResponse:
        return reply(APIError(400, f"invalid request: {e}"))

    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        return reply(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, config: ServeConfig) -> Any:
    """The body as JSON, refusing bodies over the size limit before reading them where possible, and
    bodies that do not arrive within the body timeout (a stalled client must not hold the connection)."""
    limit, length = config.max_request_bytes, request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(config.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise APIError(
                        413, f"the request body is larger than {limit} bytes", code="request_too_large"
                    )
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {config.body_timeout_s:g} s", code="request_timeout"
        ) from None
    try:
        data = json.loads(body, parse_constant=_reject_constant)
        json.dumps(data, ensure_ascii=False).encode()  # refuse lone surrogates: all text must be UTF-8
        return data
    except (ValueError, RecursionError) as e:
        raise APIError(
            400, f"We could not parse the JSON body of your request: {e}", code="invalid_json"
        ) from None
