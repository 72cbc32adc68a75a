"""Products with bfloat16 weights, exact as float32: the native kernel (AMX tiles where the CPU has them) against
the same kernel with the tiles off and against MKL on the weights widened to float32.

    PYTHONPATH=. python benchmarks/bf16_linear.py [--repeat 5]

Shapes: the demo model's gate+up at 16-523 rows (decode steps of many streams, prefill), its down projection,
and the vision towers' layers at their patch counts (Qwen2.5-VL-3B: 5476 patches, width 1280; Qwen3-VL-2B:
4096, width 1024). Random weights; times are the minimum over --repeat calls, 2 threads. Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen_engine import kernels

BF16 = 30  # ggml's type number
SHAPES = [(8, 896, 9728), (16, 896, 9728), (24, 896, 9728), (32, 896, 9728), (64, 896, 9728), (523, 896, 9728), (523, 4864, 896),
          (5476, 1280, 3840), (5476, 1280, 6840), (5476, 3424, 1280), (4096, 1024, 3072), (4096, 4096, 1024)]


def best(fn, repeat: int) -> float:
    fn()  # the first call faults in the kernels' buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    native = kernels.native()
    if native is None:
        raise SystemExit("the native kernels are not available")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, min of {args.repeat}; AMX tiles available: {native.amx_prefill_available()}")
    print("| rows | K | N | kernel ms | tiles off ms | MKL float32 ms | × MKL | × tiles off |")
    print("|---|---|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        gen = torch.Generator().manual_seed(m + k + n)
        weight = torch.randn(n, k, generator=gen).bfloat16()
        raw, wide = weight.view(torch.uint8), weight.float()
        x = torch.randn(m, k, generator=gen)
        kernel = best(lambda x=x, raw=raw: native.linear(x, [raw], [BF16], None, 64), args.repeat)
        was = native.set_amx_prefill(False)
        try:
            off = best(lambda x=x, raw=raw: native.linear(x, [raw], [BF16], None, 64), args.repeat)
        finally:
            native.set_amx_prefill(was)
        mkl = best(lambda x=x, wide=wide: x @ wide.T, args.repeat)
        print(f"| {m} | {k} | {n} | {kernel * 1e3:.2f} | {off * 1e3:.2f} | {mkl * 1e3:.2f} | {mkl / kernel:.2f}× | "
              f"{off / kernel:.2f}× |")


if __name__ == "__main__":
    main()
