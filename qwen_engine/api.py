"""The public Python surface: `LLM` and `SamplingParams`.

    llm = LLM()                                   # the bundled demo model
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))
    print(out.text)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .engine.generator import Generator
from .engine.sampling_params import SamplingParams
from .errors import InputError
from .outputs import RequestOutput, StreamDelta, Usage
from .text.parsers import parse_answer, prompt_opens_thinking
from .weights.loader import load_model


class LLM:
    """A loaded model ready to chat, complete raw prompts, or return logits.

    `model` is a GGUF file, a Hugging Face folder (config.json + safetensors), or None for the demo model.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        progress: bool = True,
    ):
        loaded = load_model(model, dtype=dtype, device=device, progress=progress)
        self.path = loaded.path
        self.config = loaded.config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.default_params = loaded.defaults
        self.eos_token_ids = loaded.eos_token_ids
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise InputError(f"max_model_len must be in 1..{limit} for this model, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self.generator = Generator(self.model, self.tokenizer, self.eos_token_ids, self.max_model_len)

    # -- prompts ---------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text the model's own chat template makes of `messages`."""
        return self.chat_template.render(
            _normalise_tool_call_arguments(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    # -- generation ------------------------------------------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> RequestOutput:
        """Answer a conversation; reasoning and tool calls are split out of the text."""
        prompt = self.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs)
        out = self._complete(prompt, params)
        parsed = parse_answer(out.raw_text, starts_in_think=prompt_opens_thinking(prompt))
        out.text, out.reasoning, out.tool_calls = parsed.content, parsed.reasoning, parsed.tool_calls
        return out

    def chat_stream(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        **template_kwargs: Any,
    ) -> Iterator[StreamDelta]:
        """Stream the answer as raw text deltas; the last delta carries finish_reason and usage."""
        prompt = self.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs)
        return self._stream(self.tokenizer.encode(prompt), self._resolve(params))

    def generate(
        self, prompts: str | list[str], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete raw prompts (no chat template), one output per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return [self._complete(prompt, params) for prompt in prompts]

    def generate_stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Stream the completion of one raw prompt (no chat template)."""
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
        return self._stream(self.tokenizer.encode(prompt), self._resolve(params))

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [len(token_ids), vocab]: the next-token logits at every position."""
        token_ids = [int(t) for t in token_ids]
        self.generator.check_prompt(token_ids[:-1] or token_ids)
        cache = self.generator.new_cache(len(token_ids))
        return self.generator.prefill(token_ids, cache, all_logits=True)

    # -- internals -------------------------------------------------------------------------------------------

    def _resolve(self, params: SamplingParams | None) -> SamplingParams:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        return params.with_defaults(self.default_params)

    def _complete(self, prompt: str, params: SamplingParams | None) -> RequestOutput:
        pieces, token_ids = [], []
        final: StreamDelta | None = None
        for delta in self.generate_stream(prompt, params):
            pieces.append(delta.text)
            token_ids.extend(delta.token_ids)
            final = delta
        text = "".join(pieces)
        return RequestOutput(text, token_ids, final.finish_reason, final.usage, raw_text=text)

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamDelta]:
        self.generator.check_prompt(prompt_ids)  # raise before the caller starts iterating
        return self._steps(prompt_ids, params)

    def _steps(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamDelta]:
        count = 0
        for step in self.generator.stream(prompt_ids, params):
            count += 1
            usage = Usage(len(prompt_ids), count) if step.finish_reason else None
            yield StreamDelta(step.text, [step.token_id], step.finish_reason, usage)


def _normalise_tool_call_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # OpenAI clients send tool-call arguments as a JSON string; Qwen's templates print them with `tojson`,
    # which would quote the string a second time. Hand templates the object, as vLLM does.
    if not isinstance(messages, list):
        return messages
    result = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = dict(message, tool_calls=[_parse_arguments(call) for call in calls])
        result.append(message)
    return result


def _parse_arguments(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            return call
        if isinstance(arguments, dict):
            return dict(call, function=dict(function, arguments=arguments))
    return call
