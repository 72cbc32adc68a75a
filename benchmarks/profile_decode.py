"""Where one decode step's time goes: the matrix kernels against everything else (attention, norms, rotary,
sampling, Python).

    python benchmarks/profile_decode.py [--streams 1] [--context 523] [--steps 64] [--python] [--quantization w8a8]
        [--kv-cache-dtype float16]

Runs the demo model with `streams` sequences decoding together after a `context`-token prompt and times
`steps` engine steps. By default the decoder layers run as one native call per step (models/decode_step.py),
which times its own parts; `--python` runs the PyTorch layers instead, timing each quantised matmul call from
Python, and prints the top operators of one step from torch.profiler. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from qwen_engine import LLM, SamplingParams
from qwen_engine.models import quant, w8a8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: the demo model)")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--context", type=int, default=523)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--python", action="store_true", help="profile the PyTorch layers, not the native step")
    p.add_argument("--quantization", choices=["w8a8", "a8"], help="an optional lossy mode (models/w8a8.py, models/a8.py)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="the KV cache's type (float16/bfloat16: lossy, half the bytes)")
    args = p.parse_args()

    llm = LLM(args.model, progress=False, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    if quant.kernels.native() is None:
        raise SystemExit("the native kernels are not available; nothing to profile")
    model = llm.engine.model
    model.native_decode = not args.python
    step = model.decode_step() if not args.python else None
    if not args.python and step is None:
        raise SystemExit("the native decode step does not apply to this model")

    timings: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    originals = {cls: cls.forward for cls in (quant.QuantLinear, w8a8.W8A8Linear)}

    def timed(self, x):
        start = time.perf_counter()
        y = originals[quant.QuantLinear if isinstance(self, quant.QuantLinear) else w8a8.W8A8Linear](self, x)
        key = f"{self.out_features}x{self.in_features}"
        timings[key] += time.perf_counter() - start
        calls[key] += 1
        return y

    prompt = [1000 + i % 5000 for i in range(args.context)]
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True).with_defaults(SamplingParams())
    seqs = [llm.engine.add_request(list(prompt), params) for _ in range(args.streams)]
    while not all(s.output_ids for s in seqs):
        llm.engine.step()
    for _ in range(3):
        llm.engine.step()

    for cls in originals:
        cls.forward = timed
    if step is not None:
        step.set_profiling(True)
    try:
        start = time.perf_counter()
        for _ in range(args.steps):
            llm.engine.step()
        total = (time.perf_counter() - start) / args.steps
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
    print(f"{args.streams} stream(s), context {args.context}, {torch.get_num_threads()} threads, "
          f"{'PyTorch layers' if args.python else 'native decode step'}: "
          f"{total * 1e3:.1f} ms per step ({args.streams / total:.1f} tok/s)")
    accounted = 0.0
    if step is not None:
        phases = {name: seconds / args.steps for name, seconds in step.profile().items()}
        step.set_profiling(False)
        layers = sum(phases.values())
        accounted += layers
        print(f"  decoder layers (one native call): {layers * 1e3:.1f} ms ({layers / total:.0%})")
        for name in sorted(phases, key=phases.get, reverse=True):
            print(f"    {name:>18}: {phases[name] * 1e3:6.2f} ms")
    kernel = sum(timings.values()) / args.steps
    accounted += kernel
    print(f"  matmul calls from Python: {kernel * 1e3:.1f} ms ({kernel / total:.0%})")
    for key in sorted(timings, key=timings.get, reverse=True):
        print(f"    {key:>12}: {timings[key] / args.steps * 1e3:6.2f} ms, {calls[key] // args.steps} calls per step")
    print(f"  everything else (embedding, rotary tables, sampling, scheduling, Python): "
          f"{(total - accounted) * 1e3:.1f} ms ({(total - accounted) / total:.0%})")

    if args.python:
        with torch.profiler.profile() as prof:
            llm.engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
