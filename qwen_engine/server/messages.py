"""Anthropic's Messages API (POST /v1/messages) over the chat machinery, for clients built on Anthropic's SDK.

Content blocks become chat messages (tool_use and tool_result as the template's tool turns, images as image
parts), tools the template's tools; the answer comes back as thinking, text and tool_use blocks with
Anthropic's stop reasons, or streamed as its events (message_start, content_block_start / _delta / _stop,
message_delta, message_stop). Errors on this path have Anthropic's shape ({"type": "error", "error": ...}).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..api import LLM, ChatRequest
from ..engine.sampling_params import SamplingParams
from ..errors import InputError, QwenEngineError
from ..text.parsers import ToolCall
from ..text.stream_parser import StreamParser
from ..threads import prepare
from .app import (
    ServerConfig,
    _check_body_size,
    _check_model,
    _close,
    _collect,
    _input_error,
    _submit,
    _timed,
)
from .async_engine import AsyncEngine, EngineDeadError
from .metrics import Metrics
from .protocol import ANTHROPIC_PATH
from .responses import _split


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # metadata, service_tier, ...: accepted, not acted on

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    stream: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=self.stop_sequences or None)


def register(app: FastAPI, llm: LLM, engine: AsyncEngine, config: ServerConfig, metrics: Metrics) -> None:
    @app.post(ANTHROPIC_PATH)
    async def messages(body: MessagesRequest, request: Request):
        _check_model(body.model, config)
        await _check_body_size(request, config)
        try:
            chat_messages = _messages(body)
            tools, tool_choice = _tools(body.tools), _tool_choice(body.tool_choice, body.tools)
            thinking = None if body.thinking is None else body.thinking.get("type") == "enabled"
            chat = await prepare(llm.prepare_chat, chat_messages, tools, tool_choice, None, thinking)
            params = llm._resolve(body.sampling_params())
        except QwenEngineError as e:
            raise _input_error(e, "messages") from None
        (stream,) = _submit(engine, chat.prompt_ids, [params], [chat.make_guide()], vision=chat.vision)
        message_id, model = f"msg_{uuid.uuid4().hex}", config.served_model_name
        if body.stream:
            events = _events(stream, message_id, model, chat, body.stop_sequences or [], llm, engine, metrics)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            c = await _collect(stream, metrics)
        finally:
            _close([stream], engine)
        reasoning, content, calls = _split(c.text, chat)
        blocks = ([_thinking(reasoning)] if reasoning else []) + ([_text(content)] if content or not calls else [])
        blocks += [_tool_use(call) for call in calls]
        reason, sequence = _stop(c.finish_reason, calls, c.token_ids, c.text, body.stop_sequences or [], llm)
        metrics.requests.labels("messages", "200").inc()
        return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
                "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(c)}


# -- request → chat ------------------------------------------------------------------------------------------

def _messages(body: MessagesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(
            block.get("text", "") for block in body.system if isinstance(block, dict))
        out.append({"role": "system", "content": system})
    for n, message in enumerate(body.messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise InputError(f"messages[{n}].role must be user or assistant, got {role!r}", param="messages")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"messages[{n}].content must be a string or a list of blocks", param="messages")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for k, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            where = f"messages[{n}].content[{k}]"
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), where)}})
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                result = block.get("content", "")
                if isinstance(result, list):
                    result = "".join(b.get("text", "") for b in result if isinstance(b, dict))
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": str(result)})
            elif kind in ("thinking", "redacted_thinking"):
                continue  # the templates drop earlier turns' reasoning anyway
            else:
                raise InputError(f"{where} has type {kind!r}; this server takes text, image, tool_use (assistant), "
                                 f"tool_result (user) and thinking blocks", param="messages")
        if parts or calls:
            text_only = all(p["type"] == "text" for p in parts)
            message_out: dict[str, Any] = {"role": role, "content": (
                "".join(p["text"] for p in parts) if text_only else parts) if parts else None}
            if calls:
                message_out["tool_calls"] = calls
            out.append(message_out)
    return out


def _image_url(source: Any, where: str) -> str:
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise InputError(f"{where}.source must be {{'type': 'base64', 'media_type', 'data'}} or {{'type': 'url', 'url'}}",
                     param="messages")


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for n, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str) or not tool["name"] or tool.get("type", "custom") != "custom":
            raise InputError(f"tools[{n}] must be a tool with a name and an input_schema (server tools are not run "
                             f"here)", param="tools")
        function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if mapped is None:
        raise InputError("tool_choice must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}",
                         param="tool_choice")
    return mapped if tools or mapped == "none" else None


# -- answer → blocks -----------------------------------------------------------------------------------------

def _thinking(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": ""}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def _stop(finish: str | None, calls: list, token_ids: list[int], text: str, stops: list[str], llm: LLM
          ) -> tuple[str, str | None]:
    if finish == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
    ends = llm.engine.eos_token_ids
    if stops and token_ids and token_ids[-1] not in ends:
        # The answer was cut at a stop sequence: the one the generated text continues with.
        whole = llm.tokenizer.decode(token_ids)
        rest = whole[whole.find(text) + len(text):] if text and text in whole else whole[len(text):]
        return "stop_sequence", next((s for s in stops if rest.startswith(s)), stops[0])
    return "end_turn", None


def _usage(c) -> dict[str, int]:
    return {"input_tokens": c.prompt_tokens, "output_tokens": c.completion_tokens,
            "cache_read_input_tokens": c.cached_tokens}


async def _events(stream, message_id: str, model: str, chat: ChatRequest, stops: list[str], llm: LLM,
                  engine: AsyncEngine, metrics: Metrics) -> AsyncIterator[str]:
    def event(kind: str, **fields: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"

    index = -1
    open_kind: str | None = None  # "thinking" or "text": the block streaming now

    def open_block(kind: str) -> list[str]:
        nonlocal index, open_kind
        out = close_block()
        index, open_kind = index + 1, kind
        return out + [event("content_block_start", index=index,
                            content_block=_thinking("") if kind == "thinking" else _text(""))]

    def close_block() -> list[str]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [event("content_block_stop", index=index)]

    parser = StreamParser(chat.starts_in_think, parse_tools=chat.parse_tools, tool_names=chat.tool_names)
    pieces: list[str] = []
    token_ids: list[int] = []
    status = "200"
    try:
        yield event("message_start", message={
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}})
        async for update in _timed(stream, metrics):
            pieces.append(update.text)
            token_ids += update.token_ids
            parsed = parser.feed(update.text, last=bool(update.finish_reason))
            for piece, kind in ((parsed.reasoning, "thinking"), (parsed.content, "text")):
                if piece:
                    for line in open_block(kind) if open_kind != kind else []:
                        yield line
                    delta = {"type": "thinking_delta", "thinking": piece} if kind == "thinking" else \
                        {"type": "text_delta", "text": piece}
                    yield event("content_block_delta", index=index, delta=delta)
            for call in [parser.tool_calls[d.index] for d in parsed.tool_calls]:
                for line in close_block():
                    yield line
                index += 1
                yield event("content_block_start", index=index,
                            content_block={"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                yield event("content_block_delta", index=index,
                            delta={"type": "input_json_delta", "partial_json": call.arguments_json})
                yield event("content_block_stop", index=index)
            if update.finish_reason:
                if index < 0:  # an empty answer is still one (empty) text block
                    for line in open_block("text"):
                        yield line
                for line in close_block():
                    yield line
                reason, sequence = _stop(update.finish_reason, parser.tool_calls, token_ids, "".join(pieces), stops,
                                         llm)
                yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                            usage={"input_tokens": update.prompt_tokens, "output_tokens": update.completion_tokens})
                yield event("message_stop")
    except EngineDeadError as e:
        status = "500"
        yield event("error", error={"type": "api_error", "message": str(e)})
    finally:
        _close([stream], engine)
        metrics.requests.labels("messages", status).inc()
