"""Request bodies of the OpenAI-compatible API, validated by pydantic, and the error shape OpenAI clients expect."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.sampling_params import SamplingParams
from ..errors import InputError


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI-compatible servers do: clients send extras freely.
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    dry_multiplier: float | None = None  # DRY, with llama.cpp's names (engine/dry.py)
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=16)
    user: str | None = None
    # vLLM's structured outputs: {"choice": [...]} | {"regex": ...} | {"json": ...} | {"grammar": <Lark>},
    # or the older guided_* fields.
    structured_outputs: dict[str, Any] | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_grammar: str | None = None

    def structured_output(self) -> dict[str, Any] | None:
        given = {key: value for key, value in (
            ("choice", self.guided_choice), ("regex", self.guided_regex), ("json", self.guided_json),
            ("grammar", self.guided_grammar)) if value is not None}
        if self.structured_outputs is not None:
            if given:
                raise InputError("give structured_outputs or a guided_* field, not both", "structured_outputs")
            given = {k: v for k, v in self.structured_outputs.items() if v is not None}
        if not given:
            return None
        if isinstance(given.get("json"), str):  # vLLM takes the schema as a JSON string too
            try:
                given["json"] = json.loads(given["json"])
            except ValueError as e:
                raise InputError(f"the json schema is not valid JSON: {e}", "structured_outputs") from None
        return given

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, seed_offset: int) -> SamplingParams:
        seed = self.seed
        if seed is not None and seed_offset:
            # Choice i of n draws with seed + i; past the largest 64-bit seed it wraps round, as the seed does.
            seed = seed + seed_offset - (2**64 if seed <= 2**64 - 1 < seed + seed_offset else 0)
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=seed,
            stop=self.stop or None,
            stop_token_ids=self.stop_token_ids,
            logit_bias=self.logit_bias or None,
            dry_multiplier=self.dry_multiplier,
            dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length,
            dry_penalty_last_n=self.dry_penalty_last_n,
            dry_sequence_breakers=self.dry_sequence_breakers,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _openai_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        # Checked, not converted: the template prints each tool as given (key order included).
        for n, tool in enumerate(tools or ()):
            function = tool.get("function")
            if tool.get("type", "function") != "function" or not isinstance(function, dict):
                raise ValueError(f"tools[{n}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise ValueError(f"tools[{n}].function needs a 'name'")
            if not isinstance(function.get("parameters", {}), dict):
                raise ValueError(f"tools[{n}].function.parameters must be a JSON schema object")
        return tools

    def to_sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, logprobs, seed_offset)


class CompletionRequest(_Sampling):
    # Text, several texts, token ids, or several lists of token ids (as OpenAI's API takes them).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default; 0 with echo: only score the prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # fill in the middle, between prompt and suffix (models with FIM tokens)
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        def ids(value: Any) -> bool:
            return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

        if isinstance(prompt, str) or ids(prompt):
            return prompt
        if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(ids(p) for p in prompt)):
            return prompt
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")

    def prompt_list(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def to_sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs, seed_offset)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages rendered by the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


ANTHROPIC_PATH = "/v1/messages"  # Anthropic's Messages API (messages.py), whose errors have Anthropic's shape


def anthropic_error(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
