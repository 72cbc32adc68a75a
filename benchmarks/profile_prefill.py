"""Where a prefill's time goes: one prompt prefilled through the engine until its first token, timed, and the
PyTorch operators of one more prefill from torch.profiler (the native kernels' own loops do not show there:
they are the wall time minus the operators' sum).

    python benchmarks/profile_prefill.py [--model FILE] [--tokens 523] [--runs 3] [--quantization a8] [--no-profile]

Each run's prompt differs from the others' (its ids shift), so the prefix cache cannot answer it. Prints each
run's time and the best run's tokens/s. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen_engine import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file or model folder (default: the demo model)")
    p.add_argument("--tokens", type=int, default=523, help="prompt length")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quantization", choices=["w8a8", "a8"], help="an optional lossy mode")
    p.add_argument("--no-profile", action="store_true", help="only the timings")
    args = p.parse_args()

    llm = LLM(args.model, progress=False, quantization=args.quantization)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True).with_defaults(SamplingParams())
    vocab = 9000

    def prefill(run: int) -> float:
        prompt = [1000 + (37 * i + 11 * run) % vocab for i in range(args.tokens)]
        start = time.perf_counter()
        llm.engine.add_request(prompt, params)
        while llm.engine.has_work():
            llm.engine.step()
        return time.perf_counter() - start

    prefill(0)  # warm-up: kernels loaded, buffers sized
    seconds = [prefill(run) for run in range(1, args.runs + 1)]
    print(f"{args.tokens}-token prefill, {torch.get_num_threads()} threads"
          f"{', ' + args.quantization if args.quantization else ''}: "
          f"{', '.join(f'{s:.3f}' for s in seconds)} s; best {args.tokens / min(seconds):.1f} tok/s")
    if args.no_profile:
        return
    with torch.profiler.profile() as prof:
        wall = prefill(args.runs + 1)
    operators = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    print(f"profiled prefill {wall:.3f} s: PyTorch operators {operators:.3f} s (with those the native kernels "
          f"call, such as the exact path's matrix products), the rest {wall - operators:.3f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
