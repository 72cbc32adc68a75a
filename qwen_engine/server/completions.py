"""POST /v1/completions: raw prompts (text or token ids), echo with the prompt's own log-probs, fill in the
middle (suffix), structured outputs; streamed or whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..api import LLM
from ..errors import InputError, QwenEngineError
from .app import (
    ApiError,
    ServerConfig,
    _check_body_size,
    _check_model,
    _close,
    _collect,
    _Collected,
    _input_error,
    _merged,
    _sse,
    _submit,
    _token_text,
    _Usage,
)
from .async_engine import AsyncEngine, EngineDeadError
from .metrics import Metrics
from .protocol import CompletionRequest, error_body


def register(app: FastAPI, llm: LLM, engine: AsyncEngine, config: ServerConfig, metrics: Metrics) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, config)
        await _check_body_size(request, config)
        prompts = body.prompt_list()
        if not prompts:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of is not supported: ask for n choices (with logprobs) and pick among them",
                           param="best_of")
        if body.suffix is not None and body.echo:
            raise ApiError(400, "echo cannot be combined with suffix", param="echo")
        generate = body.max_tokens != 0
        if not generate and not body.echo:
            raise ApiError(400, "max_tokens 0 needs echo (it returns the prompt, and with logprobs its scores)",
                           param="max_tokens")
        try:
            encoded = [(p, _completion_prompt(p, body.suffix, llm)) for p in prompts]
            structured = body.structured_output()
            make_guide = (lambda: None) if structured is None else llm.structured_guide_maker(structured)
            jobs = [(p, ids, llm._resolve(body.to_sampling_params(i)) if generate else None)
                    for p, ids in encoded for i in range(body.n)]
            for _, ids in encoded:
                llm.engine.check_prompt(ids)
        except QwenEngineError as e:
            raise _input_error(e, "prompt") from None
        # echo with logprobs scores the prompt too, as OpenAI's API did (evaluation harnesses rely on it).
        echo_logprobs: list[dict | None] = [None] * len(jobs)
        if body.echo and body.logprobs is not None:
            try:
                scored = [await engine.prompt_logprobs(ids, body.logprobs) for _, ids in encoded]
            except EngineDeadError as e:
                raise ApiError(503, str(e), kind="internal_error") from None
            except QwenEngineError as e:
                raise _input_error(e, "prompt") from None
            echo_logprobs = [_completion_logprobs(scored[j // body.n], jobs[j][1], llm) for j in range(len(jobs))]
        streams = []
        if generate:
            streams = _submit(engine, [ids for _, ids, _ in jobs], [sp for _, _, sp in jobs],
                              [make_guide() for _ in jobs], many_prompts=True)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        # Token-id prompts were checked against the vocabulary above, so they decode.
        echo = [(p if isinstance(p, str) else llm.tokenizer.decode(p, skip_special_tokens=False)) if body.echo
                else "" for p, _, _ in jobs]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _completion_chunks(streams, echo, echo_logprobs, [len(ids) for _, ids, _ in jobs], request_id,
                                        created, config.served_model_name, body.logprobs is not None, include_usage,
                                        engine, metrics, llm)
            return StreamingResponse(chunks, media_type="text/event-stream")
        choices, usage = [], _Usage()
        try:
            for index, (_, ids, _) in enumerate(jobs):
                if generate:
                    collected = await _collect(streams[index], metrics)
                else:
                    collected = _Collected(token_ids=[], logprobs=[], finish_reason="length", prompt_tokens=len(ids))
                usage.add(collected)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _join_logprobs(echo_logprobs[index], _completion_logprobs(
                        collected.logprobs, collected.token_ids, llm, len(echo[index])))
                choices.append({"index": index, "text": echo[index] + collected.text, "logprobs": logprobs,
                                "finish_reason": collected.finish_reason})
        finally:
            _close(streams, engine)
        metrics.requests.labels("completions", "200").inc()
        return {"id": request_id, "object": "text_completion", "created": created,
                "model": config.served_model_name, "choices": choices, "usage": usage.to_dict()}


def _completion_prompt(prompt: str | list[int], suffix: str | None, llm: LLM) -> list[int]:
    if suffix is None:
        return llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not isinstance(prompt, str):
        raise InputError("suffix needs the prompt as text", param="suffix")
    tokens = [llm.tokenizer.token_to_id(t) for t in _FIM_TOKENS]
    if None in tokens:
        raise InputError("this model has no fill-in-the-middle tokens, so it cannot take a suffix", param="suffix")
    # Qwen2.5-Coder's prefix-suffix-middle order; the answer is the middle.
    prefix, middle_start, middle = tokens
    return [prefix, *llm.tokenizer.encode(prompt), middle_start, *llm.tokenizer.encode(suffix), middle]


_FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def _completion_logprobs(entries, token_ids, llm: LLM, start: int = 0) -> dict:
    """OpenAI's completion logprobs; text_offset counts from the start of the choice's text (`start` for
    what came before these tokens: the echoed prompt, earlier chunks). A prompt's first token has no
    log-prob: null, and null for its alternatives."""
    tokens = [_token_text(llm, t) for t in token_ids]
    offsets = [start + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [None if lp is None else {_token_text(llm, t): p for t, p in top} for lp, top in entries],
            "text_offset": offsets}


def _join_logprobs(first: dict | None, then: dict) -> dict:
    if first is None:
        return then
    return {key: first[key] + then[key] for key in then}


async def _completion_chunks(streams, echo, echo_logprobs, prompt_tokens, request_id, created, model, want_logprobs,
                             include_usage, engine, metrics, llm) -> AsyncIterator[str]:
    usage = _Usage()
    status = "200"

    def chunk(index: int, text: str, finish: str | None, logprobs=None) -> str:
        return _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    offsets = [len(prefix) for prefix in echo]
    try:
        for i, prefix in enumerate(echo):
            if not streams:  # max_tokens 0: the echo is the whole answer
                usage.add(_Collected(prompt_tokens=prompt_tokens[i]))
                yield chunk(i, prefix, "length", echo_logprobs[i])
            elif prefix:
                yield chunk(i, prefix, None, echo_logprobs[i])
        async for i, update in _merged(streams, metrics):
            logprobs = None
            if want_logprobs:
                logprobs = _completion_logprobs(update.logprobs, update.token_ids, llm, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            if update.text or update.finish_reason or logprobs:
                yield chunk(i, update.text, update.finish_reason, logprobs)
            if update.finish_reason:
                usage.add(update)
        if include_usage:
            yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": usage.to_dict()})
        yield "data: [DONE]\n\n"
    except EngineDeadError as e:
        status = "500"
        yield _sse(error_body(str(e), "internal_error"))
    finally:
        _close(streams, engine)
        metrics.requests.labels("completions", status).inc()
