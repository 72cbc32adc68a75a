"""One row of x against a Q4_K weight, the current build's native kernel alone: weights per second.

    python benchmarks/gemv_q4k.py [--threads 1] [--rows 512 --cols 2048]    # 0.6 MB of blocks: they stay in L2
    python benchmarks/gemv_q4k.py --threads 2 --rows 16384 --cols 4096      # 38 MB: streamed from memory

Random blocks (scales fixed, nibbles random); the product is checked against dequantise + matmul first. To time
another version, run this script from its tree (PYTHONPATH=<tree>) in turns with this one: the host drifts by
10-40 % from minute to minute, so single runs compare nothing. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qwen_engine import kernels

Q4_K = 12  # GGML's type number
BLOCK_BYTES = 144


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=2048, help="a multiple of 256")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    native = kernels.native()
    if native is None:
        raise SystemExit("no native kernels on this machine")
    N, K = args.rows, args.cols
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(N, K // 256, BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d
    blocks[:, :, 2:4] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)  # dmin
    w = torch.from_numpy(blocks.reshape(N, -1).copy())
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(0))
    reference = x @ native.dequantize(w, Q4_K, K).t()
    error = float((native.linear(x, [w], [Q4_K], None, 64) - reference).abs().max())
    calls = max(1, int(2e8 // (N * K)))
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for _ in range(calls):
            native.linear(x, [w], [Q4_K], None, 64)
        best = min(best, (time.perf_counter() - start) / calls)
    print(f"Q4_K {N}x{K}, {args.threads} thread(s): {best * 1e3:.3f} ms a call, {N * K / best / 1e9:.2f} G weights/s, "
          f"{N * K * BLOCK_BYTES / 256 / best / 1e9:.1f} GB/s of blocks (max |error| {error:.2e} against "
          f"dequantise + matmul, largest |y| {float(reference.abs().max()):.0f})")


if __name__ == "__main__":
    main()
