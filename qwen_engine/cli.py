"""The `qwen-engine` command: generate, chat, models, pull-demo.

Every error the package raises on purpose becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from .errors import InputError, QwenEngineError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except QwenEngineError as e:
        print(f"qwen-engine: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): nothing left to say to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-engine", description="Run Qwen models locally.")
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="answer one prompt, streaming to stdout")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--raw", action="store_true", help="complete the prompt as is, without the chat template")
    gen.add_argument("--think", choices=["on", "off"], help="enable_thinking for models whose template has it")
    gen.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                     help="an image to ask about: path, file://, http(s):// or data: URL (repeatable)")
    gen.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video to ask about: mp4/webm/mov/mkv file (repeatable)")
    gen.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    gen.add_argument("--max-frames", type=int, help="most frames sampled from a video")
    gen.add_argument("--max-pixels", type=int, help="largest image / frame size in pixels (resized down to it)")
    gen.add_argument("--draw-boxes", metavar="OUT.png",
                     help="draw the boxes and points of the answer onto the (single) image into this PNG")
    gen.add_argument("prompt", help="the question or instruction")
    gen.set_defaults(run=_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (also reads turns from piped stdin)")
    _model_args(chat)
    _sampling_args(chat)
    chat.add_argument("--think", choices=["on", "off"], help="enable_thinking for models whose template has it")
    chat.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                      help="an image to talk about, attached to the first message (repeatable)")
    chat.add_argument("--video", action="append", default=[], metavar="PATH",
                      help="a video to talk about, attached to the first message (repeatable)")
    chat.set_defaults(run=_chat)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    serve.add_argument("--served-model-name", help="the model name clients use (default: derived from --model)")
    serve.add_argument("--kv-cache-memory", default="1GiB", help="KV cache size, e.g. 512MiB, 2GiB (default 1GiB)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    serve.add_argument("--max-num-seqs", type=int, default=32, help="most sequences decoded together")
    serve.add_argument("--max-waiting", type=int, default=256, help="most queued requests before 429")
    serve.add_argument("--max-body-bytes", type=int, default=10 << 20, help="largest request body (413 above)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    serve.add_argument("--max-stored-responses", type=int, default=1000,
                       help="Responses API: most responses kept in memory for previous_response_id (0: none)")
    serve.add_argument("--max-images-per-request", type=int, default=8, help="vision models: most images (400)")
    serve.add_argument("--max-videos-per-request", type=int, default=2, help="vision models: most videos (400)")
    serve.add_argument("--max-image-pixels", type=int,
                       help="vision models: largest image or video frame; bigger ones are resized down to it")
    serve.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds allowed to fetch an image URL")
    serve.set_defaults(run=_serve)

    pull = sub.add_parser("pull-demo", help="assemble and verify the bundled demo model now")
    pull.set_defaults(run=_pull_demo)

    models = sub.add_parser("models", help="list the models found: demo model, ollama store, Hugging Face cache")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models.set_defaults(run=_models)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF file, Hugging Face folder, ollama:NAME[:TAG] or ORG/NAME from the "
                   "Hugging Face cache (default: the bundled demo model; see `qwen-engine models`)")
    p.add_argument("--mmproj", help="vision projector (llama.cpp's mmproj GGUF) for a vision-language GGUF model "
                   "(default: an ollama model's own, or the only mmproj*.gguf beside the model file)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--quantization", choices=["a8", "w8a8", "w8a8-vision"], help="optional lossy modes with int8 "
                   "products: a8 keeps a GGUF's own weights and rounds only the activations to int8, as llama.cpp "
                   "does; w8a8 also re-quantises the weights to int8 (any model but mixtures of experts); "
                   "w8a8-vision: a vision tower too, with bf16 attention products (see docs/usage.md)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="type the KV cache stores (default auto: the model's); float16 holds twice the tokens in "
                   "the same memory, bfloat16 also speeds long contexts; lossy (see docs/usage.md)")
    p.add_argument("--max-model-len", type=int, help="context length to allow (default: the model's)")
    p.add_argument("--system", "-s", help="system message")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (default: until the model stops)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation config)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--dry-multiplier", type=float,
                   help="DRY: penalise tokens that would extend a repetition (0.8 is a common choice; default off)")
    p.add_argument("--dry-base", type=float)
    p.add_argument("--dry-allowed-length", type=int)
    p.add_argument("--seed", type=int, help="same seed, same answer")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _params(args: argparse.Namespace):
    from .engine.sampling_params import SamplingParams

    # The flags are named after SamplingParams' fields (--top-p → top_p).
    names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop", "dry_multiplier", "dry_base", "dry_allowed_length")
    return SamplingParams(**{name: getattr(args, name) for name in names})


def _load(args: argparse.Namespace):
    from .api import LLM

    params = _params(args)  # validate flags before spending seconds on loading
    if sys.stderr.isatty():
        print(f"loading {args.model or 'the demo model'} …", file=sys.stderr, flush=True)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, mmproj=args.mmproj)
    return llm, params


def _thinking(args: argparse.Namespace) -> dict:
    return {} if args.think is None else {"enable_thinking": args.think == "on"}


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    if args.raw and args.system:
        raise InputError("--system has no meaning with --raw")
    vision = args.image or args.video
    if args.raw and vision:
        raise InputError("--image and --video need the chat template; drop --raw")
    if args.draw_boxes and len(args.image) != 1:
        raise InputError("--draw-boxes needs exactly one --image")
    if args.draw_boxes and not args.draw_boxes.lower().endswith(".png"):
        raise InputError(f"--draw-boxes writes a PNG; give a name ending in .png, not {args.draw_boxes!r}")
    llm, params = _load(args)
    if vision:
        return _generate_vision(args, llm, params)
    if args.raw:
        if args.json:
            print(json.dumps(llm.generate(args.prompt, params)[0].to_dict(), ensure_ascii=False))
            return 0
        stream = llm.generate_stream(args.prompt, params)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        if args.json:
            out = llm.chat(messages, params, **_thinking(args))
            print(json.dumps(out.to_dict(), ensure_ascii=False))
            return 0
        stream = llm.chat_stream(messages, params, **_thinking(args))
    for delta in stream:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_vision(args: argparse.Namespace, llm, params) -> int:
    """Ask about images and videos; with --draw-boxes, draw the answer's boxes onto the image."""
    if llm.vision is None:
        raise InputError(f"{args.model or 'the demo model'} takes text only; --image and --video need a "
                         "Qwen2-VL, Qwen2.5-VL or Qwen3-VL model")
    image_options = {k: v for k, v in (("max_pixels", args.max_pixels),) if v is not None}
    video_options = {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames),
                                       ("max_pixels", args.max_pixels)) if v is not None}
    content = [{"type": "image", "image": source, **image_options} for source in args.image]
    content += [{"type": "video", "video": source, **video_options} for source in args.video]
    content.append({"type": "text", "text": args.prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    family = llm.config.vision.family
    if args.draw_boxes and family == "qwen2_vl":
        params.skip_special_tokens = False  # Qwen2-VL writes its boxes with special tokens; keep them
    out = llm.chat(messages, params, **_thinking(args))
    result = None
    if args.draw_boxes:
        from .vision.grounding import draw_groundings, ground_answer

        prompt_image = out.prompt.images[0]
        result = ground_answer(out.text, family, prompt_image.original_size, prompt_image.resized_size)
        draw_groundings(args.image[0], result.groundings, args.draw_boxes)
        print(f"drew {len(result.groundings)} box(es)/point(s) into {args.draw_boxes}", file=sys.stderr)
    if args.json:
        data = out.to_dict()
        if result is not None:
            data["grounding"] = result.to_dict()
        print(json.dumps(data, ensure_ascii=False))
    else:
        print(out.text)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .text.parsers import prompt_opens_thinking, split_reasoning

    llm, params = _load(args)
    media = [{"type": "image", "image": s} for s in args.image] + [{"type": "video", "video": s} for s in args.video]
    if media and llm.vision is None:
        raise InputError(f"{args.model or 'the demo model'} takes text only; --image and --video need a "
                         "Qwen2-VL, Qwen2.5-VL or Qwen3-VL model")
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print("Type a message; /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if media and not history:  # the images and videos go with the first message (and /reset re-attaches)
            history.append({"role": "user", "content": [*media, {"type": "text", "text": text}]})
        else:
            history.append({"role": "user", "content": text})
        pieces = []
        prompt = llm.apply_chat_template(system + history, **_thinking(args))
        try:
            for delta in llm.chat_stream(system + history, params, **_thinking(args)):
                pieces.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            history.pop()  # the interrupted turn is forgotten; the chat goes on
            print("\n(interrupted)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        # Keep only the answer in the history, not the reasoning, as Qwen's templates expect.
        history.append({"role": "assistant", "content": split_reasoning("".join(pieces), prompt_opens_thinking(prompt))[1]})
    return 0


def _pull_demo(args: argparse.Namespace) -> int:
    from .weights.demo import demo_model_path

    print(demo_model_path(progress=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import LLM
    from .server.app import ServerConfig, create_app

    if args.system:
        raise InputError("--system is not a server option; send a system message in the request")
    memory = parse_size(args.kv_cache_memory)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=memory,
              mmproj=args.mmproj, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=not args.no_prefix_caching)
    name = args.served_model_name or _default_served_name(args.model, llm)
    app = create_app(llm, ServerConfig(name, api_key=args.api_key, max_waiting=args.max_waiting,
                                       max_body_bytes=args.max_body_bytes,
                                       max_stored_responses=args.max_stored_responses,
                                       max_images_per_request=args.max_images_per_request,
                                       max_videos_per_request=args.max_videos_per_request,
                                       max_image_pixels=args.max_image_pixels, fetch_timeout=args.fetch_timeout))
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # uvicorn catches SIGINT/SIGTERM, stops accepting, lets in-flight requests finish (30 s at most), then
    # re-raises the signal to the handler it found; ours turns that into a clean exit with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _default_served_name(model: str | None, llm) -> str:
    if model is None:
        return "qwen2.5-coder-0.5b-instruct"
    from pathlib import Path

    return Path(str(model)).name.removesuffix(".gguf") if Path(str(model)).exists() else str(model)


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' → bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.I)
    if not m:
        raise InputError(f"cannot read the size {text!r}; write e.g. 512MiB or 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3).lower().startswith("i")
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(number * (1024 if binary or not unit else 1000) ** power)


def _models(args: argparse.Namespace) -> int:
    from .weights.catalog import format_table, list_models, searched

    entries = list_models()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], ensure_ascii=False, indent=2))
        return 0
    print(format_table(entries))
    print("\nsearched:\n" + "\n".join(f"  {line}" for line in searched()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
