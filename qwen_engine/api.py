"""The public Python surface: `LLM` and `SamplingParams`.

    llm = LLM()                                   # the bundled demo model
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))
    print(out.text)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import kernels
from .engine.engine import DEFAULT_KV_CACHE_MEMORY, Engine, EngineConfig
from .engine.sampling_params import SamplingParams
from .errors import InputError
from .outputs import RequestOutput, StreamDelta, Usage
from .text.parsers import parse_answer, prompt_opens_thinking, split_reasoning
from .threads import on_a_passing_thread
from .vision.prompt import Prompt, VisionLimits
from .weights.loader import DTYPES, load_model


class LLM:
    """A loaded model ready to chat, complete raw prompts, or return logits.

    `model` is a GGUF file, a Hugging Face folder (config.json + safetensors), `ollama:NAME[:TAG]` (a model in
    ollama's store), a Hugging Face id `ORG/NAME[@REVISION]` (a model in the Hugging Face cache), or None for
    the demo model. An ollama model's system message and parameters become this LLM's defaults.

    A GGUF on CPU keeps its quantised blocks, memory-mapped, and runs on native kernels that dequantise inside
    the matrix products (same numbers as float32 up to summation order); `quantized=False` dequantises the whole
    model to float32 at load instead (the reference path). `quantization="w8a8"` is the optional lossy mode
    (models/w8a8.py): int8 weights and activations, faster for many sequences and long prompts, with a measured
    accuracy cost (docs/benchmarks.md); "w8a8-vision" converts a vision tower too; "a8" (models/a8.py, GGUF
    only) keeps the GGUF's weights exactly and rounds only the activations to int8, as llama.cpp does.
    `kv_cache_dtype="float16"` (or "bfloat16") stores the KV cache of a float32 model in half the memory (twice the tokens in
    kv_cache_memory), read back as float32: lossy, ~1e-6 nats for float16 on the demo model; bfloat16 (~1e-4)
    also multiplies decode attention in bf16 where the CPU can, faster at long contexts (docs/usage.md).
    `mmproj` is llama.cpp's vision projector file for a vision-language GGUF (by default an ollama model's
    projector layer, or the only `mmproj*.gguf` beside the model file; docs/vision.md).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY,
        max_num_seqs: int = 32,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        progress: bool = True,
        vision_limits: VisionLimits | None = None,
        quantized: bool | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str | torch.dtype | None = None,
        mmproj: str | Path | None = None,
    ):
        kv_dtype = parse_kv_cache_dtype(kv_cache_dtype)  # checked before seconds are spent loading
        # Built on a thread that ends, taking its OpenMP workers along: whichever thread then runs the model holds
        # the process's only pool (threads.py; a model run on another thread than its loader's decoded ~25 % slower).
        def build() -> None:
            loaded = load_model(model, dtype=dtype, device=device, progress=progress, quantized=quantized,
                                quantization=quantization, mmproj=mmproj)
            self.path = loaded.path
            self.config = loaded.config
            self.model = loaded.model
            self.tokenizer = loaded.tokenizer
            self.chat_template = loaded.chat_template
            self.default_params = loaded.defaults
            self.eos_token_ids = loaded.eos_token_ids
            self.source = loaded.source
            self.system_prompt = loaded.system_prompt  # used only when a conversation has no system message
            limit = self.config.max_position_embeddings
            if max_model_len is not None and not 0 < max_model_len <= limit:
                raise InputError(f"max_model_len must be in 1..{limit} for this model, got {max_model_len}")
            self.max_model_len = max_model_len or min(loaded.max_model_len or limit, limit)
            self._guides = None  # engine.guided.GuideFactory, built on first use of structured output
            self.vision = None  # vision.prompt.PromptBuilder for vision-language models
            if self.config.vision is not None:
                from .vision.image import ImageProcessorConfig
                from .vision.prompt import PromptBuilder, VisionLimits

                family = self.config.vision.family
                settings = loaded.vision_processor  # a GGUF's projector: its settings; a folder: its config files
                self.vision = PromptBuilder(
                    self.config.vision,
                    self.tokenizer,
                    ImageProcessorConfig.from_dict(settings, family) if settings else ImageProcessorConfig.from_dir(self.path, family),
                    _video_config(self.path, family, settings),
                    vision_limits or VisionLimits(),
                )
            self.engine = Engine(
                self.model,
                self.tokenizer,
                self.eos_token_ids,
                EngineConfig(
                    max_model_len=self.max_model_len,
                    kv_cache_memory=kv_cache_memory,
                    block_size=block_size,
                    max_num_seqs=max_num_seqs,
                    enable_prefix_caching=enable_prefix_caching,
                    kv_cache_dtype=kv_dtype,
                ),
            )

        on_a_passing_thread(build)
        kernels.use_available_cores()  # the loader set its own thread's count; each thread has its own

    # -- prompts ---------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text the model's own chat template makes of `messages` (for a vision-language model,
        with one pad token per image or video, before they are expanded; see encode_chat)."""
        messages = self._with_default_system(messages)
        if self.vision is not None:
            from .vision.prompt import split_messages

            messages = split_messages(messages)[0]
        return self.chat_template.render(
            _normalise_messages(messages, allow_vision=self.vision is not None),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Prompt:
        """The model's input for `messages`: token ids, and for images and videos their processed pixels,
        grids and the prompt's M-RoPE positions (see vision/prompt.py)."""
        if self.vision is None:
            text = self.apply_chat_template(messages, tools, add_generation_prompt, **kwargs)
            return Prompt(self.tokenizer.encode(text), text=text)
        from .vision.prompt import split_messages

        requests = split_messages(self._with_default_system(messages))[1]
        text = self.apply_chat_template(messages, tools, add_generation_prompt, **kwargs)
        return self.vision.build(text, requests, max_tokens=self.max_model_len - 1)

    # -- generation ------------------------------------------------------------------------------------------

    def chat(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        structured_output: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> RequestOutput:
        """Answer a conversation; reasoning and tool calls are split out of the text.

        `tool_choice` is OpenAI's: "auto" (default with tools), "none", "required" or
        {"type": "function", "function": {"name": …}} — the last two force a call by constrained decoding.
        `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": …}})
        constrains the answer to JSON; `structured_output` to one of a list of strings, a regular expression, a
        JSON schema or a Lark grammar ({"choice": [...]}, {"regex": ...}, {"json": ...}, {"grammar": ...}).
        """
        request = self.prepare_chat(messages, tools, tool_choice, response_format, enable_thinking,
                                    structured_output=structured_output, **template_kwargs)
        out = self._complete_ids(request.prompt_ids, params, request.make_guide(), request.vision)
        out.prompt = request.vision
        if request.parse_tools:
            parsed = parse_answer(out.raw_text, request.starts_in_think, request.tool_names)
            out.text, out.reasoning, out.tool_calls = parsed.content, parsed.reasoning, parsed.tool_calls
        else:
            out.reasoning, out.text = split_reasoning(out.raw_text, request.starts_in_think)
        return out

    def chat_stream(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        enable_thinking: bool | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        structured_output: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> Iterator[StreamDelta]:
        """Stream the answer as raw text deltas; the last delta carries finish_reason and usage.
        (`text.stream_parser.StreamParser` splits such a stream into reasoning, content and tool calls.)"""
        request = self.prepare_chat(messages, tools, tool_choice, response_format, enable_thinking,
                                    structured_output=structured_output, **template_kwargs)
        return self._stream(request.prompt_ids, self._resolve(params), request.make_guide(), request.vision)

    def prepare_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        response_format: dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
        structured_output: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> ChatRequest:
        """Everything a chat request needs before generation: prompt, ids, how to parse and constrain the answer."""
        choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        if not (choice in ("none", "auto", "required") or isinstance(choice, dict)):
            raise InputError(f"tool_choice must be none, auto, required or a function, got {choice!r}", "tool_choice")
        active_tools = tools if tools and choice != "none" else None
        make_guide = _no_guide
        if structured_output is not None:
            if (response_format and response_format.get("type", "text") != "text") or choice == "required" \
                    or isinstance(choice, dict):
                raise InputError("a structured output cannot be combined with response_format or a forced tool call",
                                 "structured_outputs")
            make_guide = self.structured_guide_maker(structured_output)
        elif response_format and response_format.get("type", "text") != "text":
            make_guide = self._guide_maker(lambda g: g.for_response_format(response_format), "response_format")
        elif choice == "required" or isinstance(choice, dict):
            if not tools:
                raise InputError(f"tool_choice {choice!r} needs tools", "tool_choice")
            name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
            names = {(t.get("function") or {}).get("name") for t in tools if isinstance(t, dict)}
            if isinstance(choice, dict) and name not in names:
                raise InputError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
            make_guide = self._guide_maker(lambda g: g.for_tool_call(tools, name), "tools")
        encoded = self.encode_chat(messages, tools=active_tools, enable_thinking=enable_thinking, **template_kwargs)
        return ChatRequest(
            prompt=encoded.text,
            prompt_ids=encoded.token_ids,
            starts_in_think=prompt_opens_thinking(encoded.text),
            parse_tools=active_tools is not None,
            tool_names=_tool_names(active_tools),
            make_guide=make_guide,
            vision=encoded if encoded.items else None,
        )

    def guide_factory(self):
        """The structured-output compiler for this model (built on first use; ~1.5 s for a 150k vocabulary)."""
        if self._guides is None:
            from .engine.guided import GuideFactory

            self._guides = GuideFactory(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
            self._guides.prepare()
        return self._guides

    def structured_guide_maker(self, spec: dict[str, Any]) -> Callable[[], Any]:
        """A maker of fresh guides for a structured output (see chat); raises InputError for a bad one now."""
        return self._guide_maker(lambda g: g.for_structured_output(spec), "structured_outputs")

    def _guide_maker(self, build, param: str):
        factory = self.guide_factory()
        try:
            build(factory)  # compile (and cache) once now, so a bad schema fails before anything is queued
        except InputError as e:
            e.param = e.param or param
            raise
        return lambda: build(factory)

    def generate(
        self, prompts: str | list[str], params: SamplingParams | None = None,
        structured_output: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Complete raw prompts (no chat template), batched together; one output per prompt, in order.
        `structured_output` constrains each completion as in chat."""
        if isinstance(prompts, str):
            prompts = [prompts]
        resolved = self._resolve(params)
        ids = [self._encode(prompt) for prompt in prompts]
        for prompt_ids in ids:
            self.engine.check_prompt(prompt_ids, resolved)  # all or nothing: validate before queueing any
        make_guide = _no_guide if structured_output is None else self.structured_guide_maker(structured_output)
        seqs = [self.engine.add_request(prompt_ids, resolved, guide=make_guide()) for prompt_ids in ids]
        texts = {seq.seq_id: [] for seq in seqs}
        try:
            while not all(seq.finished for seq in seqs):
                for seq in self.engine.step():
                    if seq.seq_id in texts:
                        texts[seq.seq_id].append(_take_delta(seq).text)
        finally:
            for seq in seqs:
                self.engine.abort(seq)
        return [_output(seq, "".join(texts[seq.seq_id])) for seq in seqs]

    def generate_stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Stream the completion of one raw prompt (no chat template)."""
        return self._stream(self._encode(prompt), self._resolve(params))

    def logits(self, prompt: list[int] | Prompt) -> torch.Tensor:
        """float32 [tokens, vocab]: the next-token logits at every position of token ids or of a Prompt
        from encode_chat (with its images, videos and positions)."""
        if isinstance(prompt, Prompt):
            return self.engine.logits(prompt)
        return self.engine.logits([int(t) for t in prompt])

    # -- internals -------------------------------------------------------------------------------------------

    def _with_default_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The source's system message (ollama's system layer) stands in only when the caller gives none.
        if not self.system_prompt or not isinstance(messages, list) or not messages:  # keep errors for bad input
            return messages
        if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _resolve(self, params: SamplingParams | None) -> SamplingParams:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        return params.with_defaults(self.default_params)

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt)

    def _complete(self, prompt: str, params: SamplingParams | None) -> RequestOutput:
        return self._complete_ids(self._encode(prompt), params)

    def _complete_ids(
        self, prompt_ids: list[int], params: SamplingParams | None, guide=None, vision: Prompt | None = None
    ) -> RequestOutput:
        pieces, token_ids, final = [], [], None
        for delta in self._stream(prompt_ids, self._resolve(params), guide, vision):
            pieces.append(delta.text)
            token_ids.extend(delta.token_ids)
            final = delta
        text = "".join(pieces)
        return RequestOutput(text, token_ids, final.finish_reason, final.usage, raw_text=text)

    def _stream(
        self, prompt_ids: list[int], params: SamplingParams, guide=None, vision: Prompt | None = None
    ) -> Iterator[StreamDelta]:
        seq = self.engine.add_request(prompt_ids, params, guide=guide, vision=vision)  # raises before iterating
        return self._deltas(seq)

    def _deltas(self, seq) -> Iterator[StreamDelta]:
        try:
            while not seq.finished:
                if seq in self.engine.step() and (seq.pending_ids or seq.finished):
                    yield _take_delta(seq)
            if seq.pending_ids or seq.pending_text:
                yield _take_delta(seq)
        finally:
            self.engine.abort(seq)  # a consumer that stops early cancels the request and frees its blocks


@dataclass
class ChatRequest:
    prompt: str
    prompt_ids: list[int]
    starts_in_think: bool  # the prompt ends inside an open <think>: the answer begins with reasoning
    parse_tools: bool
    tool_names: frozenset[str]  # the offered tools: an answer that is only untagged calls to them is parsed
    make_guide: Callable[[], Any]  # a fresh constraint for each generated choice (None: unconstrained)
    vision: Prompt | None = None  # the images and videos in the prompt, with its M-RoPE positions


def _tool_names(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    # OpenAI's {"type": "function", "function": {...}} or, as transformers also takes, the function itself.
    functions = (t.get("function", t) for t in tools or () if isinstance(t, dict))
    names = (f.get("name") for f in functions if isinstance(f, dict))
    return frozenset(name for name in names if isinstance(name, str) and name)


def _no_guide() -> None:
    return None


def _take_delta(seq) -> StreamDelta:
    text, ids = seq.pending_text, seq.pending_ids
    seq.pending_text, seq.pending_ids = "", []
    usage = Usage(len(seq.prompt_ids), len(seq.output_ids)) if seq.finished else None
    return StreamDelta(text, ids, seq.finish_reason if seq.finished else None, usage)


def _output(seq, text: str) -> RequestOutput:
    usage = Usage(len(seq.prompt_ids), len(seq.output_ids))
    return RequestOutput(text, list(seq.output_ids), seq.finish_reason, usage, raw_text=text)


def _video_config(path: Path, family: str, settings: dict | None = None) -> Any:
    try:
        from .vision.video import VideoProcessorConfig
    except ImportError:  # video support not installed
        return None
    return VideoProcessorConfig.from_dict(settings, family) if settings else VideoProcessorConfig.from_dir(path, family)


def _normalise_messages(messages: list[dict[str, Any]], allow_vision: bool = False) -> list[dict[str, Any]]:
    """Bring OpenAI-style messages into the shape Qwen's text templates read.

    Tool-call arguments arrive as a JSON string, but the templates print them with `tojson`, which would quote
    the string a second time: hand them the object, as vLLM does. Content given as a list of text parts becomes
    one string (joined by newlines); any other part (an image, a video) cannot go to a text-only model.
    """
    if not isinstance(messages, list):
        return messages
    result = []
    for n, message in enumerate(messages):
        if isinstance(message, dict):
            calls = message.get("tool_calls")
            if calls:
                message = dict(message, tool_calls=[_parse_arguments(call) for call in calls])
            content = message.get("content")
            if isinstance(content, list) and not allow_vision:
                message = dict(message, content=_text_of_parts(content, n))
        result.append(message)
    return result


def _text_of_parts(parts: list[Any], n: int) -> str:
    texts = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and (kind in ("image", "image_url", "video", "video_url") or "image" in part):
            raise InputError(
                f"messages[{n}].content[{k}] is a {kind or 'image'} part, but this model takes text only"
            )
        else:
            raise InputError(f"messages[{n}].content[{k}] is not a text part ({{'type': 'text', 'text': …}})")
    return "\n".join(texts)


def parse_kv_cache_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The KV cache's element type from a name ("auto" or None: the model's own)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InputError(f"unsupported kv_cache_dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")


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
