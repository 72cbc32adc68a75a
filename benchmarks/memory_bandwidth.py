"""How fast this machine reads memory, and whether the quantised kernels are bound by it or by their arithmetic.

    PYTHONPATH=. python benchmarks/memory_bandwidth.py [--threads 2] [--model path.gguf]

Prints, best of five passes:
  * the read rate of a 1 GiB float32 buffer (torch's amax: one load per value, nothing written) and of the demo
    model's memory-mapped file (int64 sum; the first pass also brings the file into the page cache);
  * per GGUF block type, the native matrix-vector product (one row of x) over a slice of a real weight small
    enough to stay in L2: the rate its arithmetic allows when memory is no limit. A type whose L2 rate is not
    above the read rate cannot go faster from memory either;
  * the decode ceiling: one decode step's weight bytes (every layer and the LM head; not the embedding table,
    of which a step reads one row) divided by the mapped file's read rate.

benchmarks/kernels.py gives the same products streaming from memory, as in a decode step. Not a test.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from qwen_engine import kernels
from qwen_engine.weights.demo import demo_model_path


def best_rate(nbytes: int, fn, passes: int = 5) -> float:
    """GB/s of the fastest of `passes` calls of fn, which reads nbytes."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="GGUF file (default: the demo model under QWEN_ENGINE_HOME)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else demo_model_path()  # assembled on first use, as the engine does
    native = kernels.native()
    if native is None:
        raise SystemExit("the native kernels are not available")

    buffer = torch.ones(1 << 28)  # 1 GiB, written once so every page is resident
    print(f"threads {args.threads}")
    print(f"read, 1 GiB float32 buffer:      {best_rate(buffer.numel() * 4, buffer.amax):5.1f} GB/s")
    del buffer
    with warnings.catch_warnings():  # a read-only map given to torch: it is only read
        warnings.simplefilter("ignore")
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        words = torch.from_numpy(mapped[: mapped.size // 8 * 8].view(np.int64))
    file_rate = best_rate(words.numel() * 8, words.sum)
    print(f"read, the model's mapped file:   {file_rate:5.1f} GB/s  ({mapped.size / 1e6:.0f} MB)")

    reader = GGUFReader(path)
    step_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    if not any(t.name == "output.weight" for t in reader.tensors):  # tied: the LM head reads the embedding table
        step_bytes += sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    print(f"decode ceiling: {step_bytes / 1e6:.0f} MB of weights a step / {file_rate:.1f} GB/s = "
          f"{file_rate * 1e9 / step_bytes:.1f} tok/s")

    print("\nmatrix-vector product from L2 (one row of x, a slice of ~1 MB of a real weight)")
    seen: set[int] = set()
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        if qtype in seen or t.name == "token_embd.weight" or len(t.shape) != 2:
            continue
        if t.tensor_type not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0,
                                 GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K):
            continue
        seen.add(qtype)
        k = int(t.shape[0])  # gguf lists the row length first
        blocks = torch.from_numpy(np.array(t.data)).reshape(int(t.shape[1]), -1)
        rows = max(16, min(blocks.shape[0], (1 << 20) // blocks.shape[1]) // 16 * 16)
        part = blocks[:rows].contiguous()
        product = functools.partial(native.linear, torch.randn(1, k), [part], [qtype], None, 64)
        for _ in range(20):
            product()
        rate = best_rate(part.numel(), product, passes=200)
        print(f"  {t.tensor_type.name:5s} ({t.name}, {rows} rows): {rate:5.1f} GB/s")


if __name__ == "__main__":
    main()
