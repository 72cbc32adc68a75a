"""The OpenAI-compatible HTTP API: the app, its errors and limits, /v1/chat/completions, /v1/models, /tokenize,
/health, /metrics, and the helpers the other endpoints share (completions.py: /v1/completions; responses.py:
/v1/responses)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LLM, ChatRequest
from ..errors import ContextLengthError, QwenEngineError
from ..text.parsers import parse_answer, split_reasoning
from ..text.stream_parser import StreamParser
from ..threads import prepare
from ..vision.prompt import VisionLimits
from .async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream, Update
from .metrics import Metrics
from .protocol import (
    ANTHROPIC_PATH,
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    anthropic_error,
    error_body,
)


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_waiting: int = 256
    max_body_bytes: int = 10 << 20
    # Vision requests: most images / videos per request, largest image or frame (resized down to it),
    # and the time and size allowed for fetching an image URL.
    max_images_per_request: int = 8
    max_videos_per_request: int = 2
    max_image_pixels: int | None = None
    fetch_timeout: float = 10.0
    max_fetch_bytes: int = 64 << 20
    max_stored_responses: int = 1000  # the Responses API's stored responses (previous_response_id), in memory


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    engine = AsyncEngine(llm.engine, max_waiting=config.max_waiting)
    if llm.vision is not None:
        llm.vision.limits = VisionLimits(
            max_images=config.max_images_per_request,
            max_videos=config.max_videos_per_request,
            max_pixels=config.max_image_pixels,
            fetch_timeout=config.fetch_timeout,
            max_fetch_bytes=config.max_fetch_bytes,
        )
    metrics = Metrics(engine)

    async def lifespan(app: FastAPI):
        engine.start()
        await prepare(llm.guide_factory)  # so the first structured-output request is not slow
        yield
        engine.shutdown()

    app = FastAPI(title="qwen-engine", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    # -- errors, auth and limits -----------------------------------------------------------------------------

    def count(request: Request, status: int) -> None:
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                    "/v1/responses": "responses", ANTHROPIC_PATH: "messages"}.get(request.url.path)
        if endpoint:
            metrics.requests.labels(endpoint, str(status)).inc()

    def error(request: Request, status: int, message: str, kind: str, param: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        # Anthropic's clients read their own error shape on their endpoint; everyone else gets OpenAI's.
        body = anthropic_error(status, message) if request.url.path == ANTHROPIC_PATH else \
            error_body(message, kind, param)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        count(request, e.status)
        return error(request, e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg')}"
            param = None
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}"
        count(request, 400)
        return error(request, 400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(request, e.status_code, str(e.detail), kind)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") or request.url.path in ("/tokenize", "/detokenize"):
            if config.api_key is not None:
                # OpenAI's clients send a bearer token, Anthropic's an x-api-key header.
                bearer = request.headers.get("authorization", "") == f"Bearer {config.api_key}"
                if not bearer and request.headers.get("x-api-key") != config.api_key:
                    return error(request, 401, "invalid or missing API key", "authentication_error")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                return error(request, 413, f"request body exceeds {config.max_body_bytes} bytes",
                             "invalid_request_error")
        return await call_next(request)

    # -- plain endpoints -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(config.served_model_name, llm)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(name, config)
        return _model_card(name, llm)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            _check_model(body.model, config)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        try:
            if body.prompt is not None:
                tokens = llm.tokenizer.encode(body.prompt)
            else:  # as a chat request would see them: images and videos count as their tokens
                encoded = await prepare(llm.encode_chat, body.messages, body.add_generation_prompt,
                                        body.tools, **(body.chat_template_kwargs or {}))
                tokens = list(encoded.token_ids)
        except QwenEngineError as e:
            raise _input_error(e, "messages") from None
        return {"count": len(tokens), "max_model_len": llm.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            _check_model(body.model, config)
        vocab = llm.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # -- chat ------------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, config)
        await _check_body_size(request, config)
        try:
            # Off the event loop: images may be fetched over the network, videos decoded.
            structured = body.structured_output()
            chat = await prepare(llm.prepare_chat, body.messages, body.tools, body.tool_choice,
                                 body.response_format, structured_output=structured,
                                 **(body.chat_template_kwargs or {}))
            params = [llm._resolve(body.to_sampling_params(i)) for i in range(body.n)]
            guide_list = [chat.make_guide() for _ in range(body.n)]
        except QwenEngineError as e:
            raise _input_error(e, "messages") from None
        streams = _submit(engine, chat.prompt_ids, params, guide_list, vision=chat.vision)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _chat_chunks(streams, request_id, created, config.served_model_name, chat,
                                  body.logprobs, include_usage, engine, metrics, llm)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return await _chat_response(streams, request_id, created, config.served_model_name, chat,
                                    body.logprobs, engine, metrics, llm)

    from . import completions, messages, responses  # here, not at the top: they import this module's helpers

    completions.register(app, llm, engine, config, metrics)
    responses.register(app, llm, engine, config, metrics)
    messages.register(app, llm, engine, config, metrics)
    return app


# -- helpers -------------------------------------------------------------------------------------------------

async def _check_body_size(request: Request, config: ServerConfig) -> None:
    if len(await request.body()) > config.max_body_bytes:
        raise ApiError(413, f"request body exceeds {config.max_body_bytes} bytes")


def _check_model(name: str, config: ServerConfig) -> None:
    if name != config.served_model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {config.served_model_name!r}",
                       kind="not_found_error", param="model")


_STARTED = int(time.time())


def _model_card(name: str, llm: LLM) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "qwen-engine",
            "max_model_len": llm.max_model_len}


def _input_error(e: QwenEngineError, param: str) -> ApiError:
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param=None)
    return ApiError(400, str(e), param=getattr(e, "param", None) or param)


def _submit(engine: AsyncEngine, prompt_ids, params, guides, many_prompts: bool = False,
            vision=None) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for i, sp in enumerate(params):
            ids = prompt_ids[i] if many_prompts else prompt_ids
            streams.append(engine.submit(ids, sp, guides[i], vision))
    except QueueFullError as e:
        _close(streams, engine)
        raise ApiError(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except EngineDeadError as e:
        _close(streams, engine)
        raise ApiError(503, str(e), kind="internal_error") from None
    except QwenEngineError as e:
        _close(streams, engine)
        raise _input_error(e, "prompt") from None
    return streams


def _close(streams: list[RequestStream], engine: AsyncEngine) -> None:
    for stream in streams:
        engine.abort(stream)  # a no-op for finished ones; cancels the rest (client gone, error elsewhere)
        engine.finished(stream)


@dataclass
class _Collected:
    text: str = ""
    token_ids: list | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class _Usage:
    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = 0
        self.seen_prompts: set[int] = set()

    def add(self, c: _Collected | Update, prompt_key: int | None = None) -> None:
        if prompt_key is None or prompt_key not in self.seen_prompts:
            self.prompt += c.prompt_tokens
            self.cached += c.cached_tokens
            if prompt_key is not None:
                self.seen_prompts.add(prompt_key)
        self.completion += c.completion_tokens

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


async def _timed(stream: RequestStream, metrics: Metrics) -> AsyncIterator[Update]:
    last = None
    async for update in stream:
        now = time.monotonic()
        if update.token_ids:
            if last is None:
                metrics.ttft.observe(now - stream.created)
            else:
                metrics.itl.observe((now - last) / len(update.token_ids))
            last = now
            metrics.generation_tokens.inc(len(update.token_ids))
        if update.finish_reason:
            metrics.prompt_tokens.inc(update.prompt_tokens)
        yield update


async def _collect(stream: RequestStream, metrics: Metrics) -> _Collected:
    c = _Collected(token_ids=[], logprobs=[])
    pieces = []
    try:
        async for u in _timed(stream, metrics):
            pieces.append(u.text)
            c.token_ids += u.token_ids
            c.logprobs += u.logprobs
            c.finish_reason = u.finish_reason
            c.prompt_tokens, c.completion_tokens, c.cached_tokens = u.prompt_tokens, u.completion_tokens, u.cached_tokens
    except EngineDeadError as e:
        raise ApiError(500, str(e), kind="internal_error") from None
    c.text = "".join(pieces)
    return c


def _chat_logprobs(entries, token_ids, llm: LLM) -> dict:
    content = []
    for (lp, top), token in zip(entries, token_ids, strict=False):
        content.append({
            "token": _token_text(llm, token), "logprob": lp, "bytes": list(llm.tokenizer.token_bytes(token)),
            "top_logprobs": [{"token": _token_text(llm, t), "logprob": p,
                              "bytes": list(llm.tokenizer.token_bytes(t))} for t, p in top],
        })
    return {"content": content}


def _token_text(llm: LLM, token: int) -> str:
    return llm.tokenizer.token_bytes(token).decode("utf-8", errors="replace")


async def _chat_response(streams, request_id, created, model, chat: ChatRequest, want_logprobs,
                         engine, metrics, llm) -> dict:
    choices, usage = [], _Usage()
    try:
        for index, stream in enumerate(streams):
            c = await _collect(stream, metrics)
            usage.add(c, prompt_key=0)
            if chat.parse_tools:
                parsed = parse_answer(c.text, chat.starts_in_think, chat.tool_names)
                reasoning, content, calls = parsed.reasoning, parsed.content, parsed.tool_calls
            else:
                (reasoning, content), calls = split_reasoning(c.text, chat.starts_in_think), []
            message = {"role": "assistant", "content": content if (content or not calls) else None}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            choices.append({"index": index, "message": message, "finish_reason": finish,
                            "logprobs": _chat_logprobs(c.logprobs, c.token_ids, llm) if want_logprobs else None})
    finally:
        _close(streams, engine)
    metrics.requests.labels("chat", "200").inc()
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage.to_dict()}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _merged(streams: list[RequestStream], metrics: Metrics) -> AsyncIterator[tuple[int, Update]]:
    """Updates of several streams (n > 1) as they come, tagged with their choice index."""
    iterators = {i: _timed(s, metrics).__aiter__() for i, s in enumerate(streams)}
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in iterators.items()}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    update = task.result()
                except StopAsyncIteration:
                    continue
                yield i, update
                pending[asyncio.ensure_future(iterators[i].__anext__())] = i
    finally:
        for task in pending:
            task.cancel()


async def _chat_chunks(streams, request_id, created, model, chat: ChatRequest, want_logprobs,
                       include_usage, engine, metrics, llm) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [choice]})

    parsers = [StreamParser(chat.starts_in_think, parse_tools=chat.parse_tools, tool_names=chat.tool_names)
               for _ in streams]
    saw_call = [False] * len(streams)
    usage = _Usage()
    status = "200"
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, update in _merged(streams, metrics):
            delta = parsers[i].feed(update.text, last=bool(update.finish_reason))
            body: dict = {}
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.content:
                body["content"] = delta.content
            if delta.tool_calls:
                saw_call[i] = True
                body["tool_calls"] = [_tool_call_delta(d) for d in delta.tool_calls]
            logprobs = _chat_logprobs(update.logprobs, update.token_ids, llm) if want_logprobs else None
            if body or (want_logprobs and update.logprobs):
                yield chunk(i, body, logprobs=logprobs)
            if update.finish_reason:
                usage.add(update, prompt_key=0)
                finish = "tool_calls" if saw_call[i] and update.finish_reason == "stop" else update.finish_reason
                yield chunk(i, {}, finish)
        if include_usage:
            yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage.to_dict()})
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        status = "500"
        yield _sse(error_body(str(e), "internal_error"))
    finally:  # also runs when the client disconnects: the requests are cancelled and their blocks freed
        _close(streams, engine)
        metrics.requests.labels("chat", status).inc()


def _tool_call_delta(d) -> dict:
    out: dict = {"index": d.index}
    if d.id is not None:
        out["id"], out["type"] = d.id, "function"
    function = {}
    if d.name is not None:
        function["name"] = d.name
    function["arguments"] = d.arguments
    out["function"] = function
    return out
