"""Where one decode step's time goes: the quantised matmul kernels against everything else (attention, norms,
rotary, sampling, Python).

    python benchmarks/profile_decode.py [--streams 1] [--context 523] [--steps 64]

Runs the demo model with `streams` sequences decoding together after a `context`-token prompt, times `steps`
engine steps, and splits each step's wall time into the kernel calls (timed around every call) and the rest.
Then prints the top operators of one step from torch.profiler. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from qwen_engine import LLM, SamplingParams
from qwen_engine.models import quant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file (default: the demo model)")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--context", type=int, default=523)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()

    llm = LLM(args.model, progress=False)
    native = quant.kernels.native()
    if native is None:
        raise SystemExit("the native kernels are not available; nothing to profile")
    timings: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    original = quant.QuantLinear.forward

    def timed(self, x):
        start = time.perf_counter()
        y = original(self, x)
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

    quant.QuantLinear.forward = timed
    try:
        start = time.perf_counter()
        for _ in range(args.steps):
            llm.engine.step()
        total = (time.perf_counter() - start) / args.steps
    finally:
        quant.QuantLinear.forward = original
    kernel = sum(timings.values()) / args.steps
    print(f"{args.streams} stream(s), context {args.context}, {torch.get_num_threads()} threads: "
          f"{total * 1e3:.1f} ms per step ({args.streams / total:.1f} tok/s)")
    print(f"  quantised matmul kernels: {kernel * 1e3:.1f} ms ({kernel / total:.0%})")
    for key in sorted(timings, key=timings.get, reverse=True):
        print(f"    {key:>12}: {timings[key] / args.steps * 1e3:6.2f} ms, {calls[key] // args.steps} calls per step")
    print(f"  everything else (attention, norms, rotary, sampling, Python): {(total - kernel) * 1e3:.1f} ms "
          f"({(total - kernel) / total:.0%})")

    with torch.profiler.profile() as prof:
        llm.engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
