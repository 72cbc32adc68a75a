"""OpenAI's Responses API (POST /v1/responses) over the chat machinery.

Input items become chat messages (function calls and their outputs as the template's tool turns), function
tools the template's tools, `text.format` a response_format; the answer is parsed as a chat answer is, and its
reasoning, text and tool calls come back as output items. Streaming sends the API's typed events
(response.created, output items, text and argument deltas, response.completed).

Responses are stored (unless `store` is false) in memory, the most recent `ServerConfig.max_stored_responses`:
a request naming `previous_response_id` continues that conversation (its input items are added after the stored
turns; `instructions` are the new request's, as OpenAI does), GET / DELETE /v1/responses/{id} read and remove
them, and GET /v1/responses/{id}/input_items lists a request's input. They are lost when the server stops.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..api import LLM, ChatRequest
from ..engine.sampling_params import SamplingParams
from ..errors import InputError, QwenEngineError
from ..text.parsers import ToolCall, parse_answer, split_reasoning
from ..text.stream_parser import StreamParser
from ..threads import prepare
from .app import (
    ApiError,
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


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # store, metadata, user, truncation, ...: accepted, not acted on

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    # Not in OpenAI's API; the chat endpoint's extras (as vLLM also takes them here).
    seed: int | None = None
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    ignore_eos: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=self.stop or None, ignore_eos=self.ignore_eos,
        )


@dataclass
class _Stored:
    conversation: list[dict[str, Any]]  # the turns so far as chat messages, this response's answer included
    response: dict[str, Any]  # the response object, as it was sent
    input_items: list[dict[str, Any]] = field(default_factory=list)  # the request's own input, as items with ids


class ResponseStore:
    """Responses by id, least recently used dropped first past `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: OrderedDict[str, _Stored] = OrderedDict()

    def put(self, response_id: str, conversation: list[dict[str, Any]], response: dict[str, Any],
            input_items: list[dict[str, Any]] | None = None) -> None:
        if self.capacity <= 0:
            return
        self.items[response_id] = _Stored(conversation, response, input_items or [])
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, response_id: str) -> _Stored | None:
        stored = self.items.get(response_id)
        if stored is not None:
            self.items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self.items.pop(response_id, None) is not None


def register(app: FastAPI, llm: LLM, engine: AsyncEngine, config: ServerConfig, metrics: Metrics) -> None:
    store = ResponseStore(config.max_stored_responses)

    def stored(response_id: str, param: str | None = None) -> _Stored:
        found = store.get(response_id)
        if found is None:
            raise ApiError(404, f"no stored response {response_id!r}: this server keeps the last "
                                f"{config.max_stored_responses} in memory, until it stops", param=param)
        return found

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        return stored(response_id).response

    @app.get("/v1/responses/{response_id}/input_items")
    async def get_input_items(response_id: str, request: Request, order: Literal["asc", "desc"] = "desc",
                              limit: int = Query(20, ge=1, le=100), after: str | None = None):
        items = stored(response_id).input_items
        items = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise ApiError(400, f"after={after!r} names no input item of {response_id!r}", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        stored(response_id)
        store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        _check_model(body.model, config)
        await _check_body_size(request, config)
        history = stored(body.previous_response_id, "previous_response_id").conversation \
            if body.previous_response_id is not None else []
        try:
            turns = history + _messages(body)
            messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + turns
            tools, tool_choice = _tools(body.tools), _tool_choice(body.tool_choice)
            response_format = _response_format(body.text)
            chat = await prepare(llm.prepare_chat, messages, tools, tool_choice, response_format)
            params = llm._resolve(body.sampling_params())
        except QwenEngineError as e:
            raise _input_error(e, "input") from None
        (stream,) = _submit(engine, chat.prompt_ids, [params], [chat.make_guide()], vision=chat.vision)
        shell = _Shell(body, f"resp_{uuid.uuid4().hex}", int(time.time()), config.served_model_name)

        def keep(response: dict[str, Any]) -> None:
            if body.store:
                store.put(shell.id, turns + [_assistant_turn(response["output"])], response, _input_items(body))

        if body.stream:
            return StreamingResponse(_events(stream, shell, chat, engine, metrics, keep),
                                     media_type="text/event-stream")
        try:
            c = await _collect(stream, metrics)
        finally:
            _close([stream], engine)
        reasoning, content, calls = _split(c.text, chat)
        metrics.requests.labels("responses", "200").inc()
        response = shell.response(_items(reasoning, content, calls), c.finish_reason, c)
        keep(response)
        return response


# -- request → chat ------------------------------------------------------------------------------------------

_TEXT_PARTS = ("input_text", "output_text", "text")


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input items as chat messages (its instructions are added by the caller)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    for n, item in enumerate(body.input):
        kind = item.get("type", "message")
        where = f"input[{n}]"
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # the templates drop earlier turns' reasoning anyway
        else:
            raise InputError(f"{where} has type {kind!r}; this server takes message, function_call, "
                             f"function_call_output and reasoning items", param="input")
    return messages


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise InputError(f"{where}.content must be a string or a list of parts", param="input")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise InputError(f"{where}.content[{k}] needs an image_url (a URL or a data URL)", param="input")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise InputError(f"{where}.content[{k}] has type {kind!r}; this server takes input_text and "
                             f"input_image parts", param="input")
    return parts


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for n, tool in enumerate(tools):
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InputError(f"tools[{n}] must be a function tool with a name (the only kind this server runs)",
                             param="tools")
        function = {"name": tool["name"]}
        for key in ("description", "parameters"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise InputError("tool_choice must be none, auto, required or {'type': 'function', 'name': ...}",
                             param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    spec = (text or {}).get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise InputError("text.format must be an object such as {'type': 'json_object'}", param="text")
    if spec.get("type") == "json_schema":
        schema = {key: spec[key] for key in ("name", "schema", "strict") if key in spec}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": spec.get("type", "text")}


def _input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as the API lists it back: items, each with an id (a string input is one message)."""
    if isinstance(body.input, str):
        items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": body.input}]}]
    else:
        items = [dict(item) for item in body.input]
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
    for item in items:
        item.setdefault("type", "message")
        item.setdefault("id", _item_id(prefixes.get(item["type"], "item")))
        if item["type"] == "message" and isinstance(item.get("content"), str):  # listed as parts, as OpenAI does
            kind = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": kind, "text": item["content"]}]
    return items


def _assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output items as the assistant message a later turn's template renders."""
    turn: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "reasoning":
            turn["reasoning_content"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "message":
            turn["content"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "function_call":
            turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return turn


# -- answer → output items -----------------------------------------------------------------------------------

def _split(text: str, chat: ChatRequest) -> tuple[str | None, str, list[ToolCall]]:
    if chat.parse_tools:
        parsed = parse_answer(text, chat.starts_in_think, chat.tool_names)
        return parsed.reasoning, parsed.content, parsed.tool_calls
    reasoning, content = split_reasoning(text, chat.starts_in_think)
    return reasoning, content, []


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call: ToolCall, arguments: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments_json if arguments is None else arguments, "status": "completed"}


def _items(reasoning: str | None, content: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
    items = []
    if reasoning:
        items.append(_reasoning_item(_item_id("rs"), reasoning))
    if content or not calls:
        items.append(_message_item(_item_id("msg"), content))
    items += [_call_item(_item_id("fc"), call) for call in calls]
    return items


class _Shell:
    """The fields every response object of one request repeats."""

    def __init__(self, body: ResponsesRequest, response_id: str, created: int, model: str):
        self.body, self.id, self.created, self.model = body, response_id, created, model

    def response(self, output: list[dict[str, Any]], finish_reason: str | None, usage=None) -> dict[str, Any]:
        body = self.body
        status = "in_progress" if finish_reason is None else "incomplete" if finish_reason == "length" else "completed"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls,
            "text": body.text or {"format": {"type": "text"}}, "metadata": {}, "store": body.store,
            "previous_response_id": body.previous_response_id, "reasoning": None,
            "usage": None if usage is None else {
                "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }


async def _events(stream, shell: _Shell, chat: ChatRequest, engine: AsyncEngine, metrics: Metrics,
                  keep=None) -> AsyncIterator[str]:
    """The answer as the Responses API's typed events; items open as their first text arrives."""
    number = 0
    output: list[dict[str, Any]] = []
    open_kind: str | None = None  # "reasoning" or "message": the item whose text is streaming
    text = ""

    def event(kind: str, **fields: Any) -> str:
        nonlocal number
        payload = {"type": kind, "sequence_number": number, **fields}
        number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def open_item(kind: str) -> list[str]:
        nonlocal open_kind, text
        out = close_item()
        open_kind, text = kind, ""
        if kind == "reasoning":
            item = _reasoning_item(_item_id("rs"), "")
            item["content"] = []
            output.append(item)
            out.append(event("response.output_item.added", output_index=len(output) - 1, item=item))
        else:
            item = _message_item(_item_id("msg"), "", status="in_progress")
            output.append(item)
            out.append(event("response.output_item.added", output_index=len(output) - 1, item=item))
            out.append(event("response.content_part.added", item_id=item["id"], output_index=len(output) - 1,
                             content_index=0, part=_text_part("")))
        return out

    def delta(piece: str) -> str:
        nonlocal text
        text += piece
        kind = "response.reasoning_text.delta" if open_kind == "reasoning" else "response.output_text.delta"
        extra = {} if open_kind == "reasoning" else {"logprobs": []}
        return event(kind, item_id=output[-1]["id"], output_index=len(output) - 1, content_index=0, delta=piece,
                     **extra)

    def close_item() -> list[str]:
        nonlocal open_kind
        if open_kind is None:
            return []
        index, item = len(output) - 1, output[-1]
        if open_kind == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": text}]
            out = [event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                         text=text)]
        else:
            item.update(_message_item(item["id"], text))
            out = [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                         text=text, logprobs=[]),
                   event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                         part=_text_part(text))]
        open_kind = None
        return out + [event("response.output_item.done", output_index=index, item=item)]

    parser = StreamParser(chat.starts_in_think, parse_tools=chat.parse_tools, tool_names=chat.tool_names)
    status = "200"
    try:
        yield event("response.created", response=shell.response([], None))
        yield event("response.in_progress", response=shell.response([], None))
        async for update in _timed(stream, metrics):
            parsed = parser.feed(update.text, last=bool(update.finish_reason))
            for piece, kind in ((parsed.reasoning, "reasoning"), (parsed.content, "message")):
                if piece:
                    for line in open_item(kind) if open_kind != kind else []:
                        yield line
                    yield delta(piece)
            for call in [parser.tool_calls[d.index] for d in parsed.tool_calls]:
                for line in close_item():
                    yield line
                item = _call_item(_item_id("fc"), call, arguments="")
                item["status"] = "in_progress"
                output.append(item)
                index = len(output) - 1
                yield event("response.output_item.added", output_index=index, item=dict(item))
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=call.arguments_json)
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=call.arguments_json)
                item.update(arguments=call.arguments_json, status="completed")
                yield event("response.output_item.done", output_index=index, item=item)
            if update.finish_reason:
                if not any(item["type"] in ("message", "function_call") for item in output):
                    for line in open_item("message"):  # an empty answer is still one (empty) message
                        yield line
                for line in close_item():
                    yield line
                final = shell.response(output, update.finish_reason, update)
                if keep is not None:
                    keep(final)
                yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                            response=final)
    except EngineDeadError as e:
        status = "500"
        yield event("error", code="internal_error", message=str(e), param=None)
    finally:
        _close([stream], engine)
        metrics.requests.labels("responses", status).inc()
