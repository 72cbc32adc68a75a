"""The w8a8 mode's int8 products (AMX tiles, or units of 8 rows on AVX2 and of 16 on AVX-512 VNNI: the layout the mode
keeps on such CPUs) against the default float32 products on GGUF blocks.

    python benchmarks/int8_kernels.py [--layer 3] [--rows 1,8,32,523]

Times one layer's q/k/v, gate+up and down products and the LM head of the demo model at several numbers of rows
of x, minimum of 7 calls (3 for the LM head) with 2 threads. A layer called in a loop stays in the L3 cache, so
the one-row figures of the layer products overstate streaming from memory (the LM head does not fit). Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from qwen_engine import LLM, kernels
from qwen_engine.models import w8a8


def best_of(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--rows", default="1,8,32,523")
    args = p.parse_args()
    native = kernels.native()
    if native is None or not hasattr(native, "int8_linear_units"):
        raise SystemExit("no int8 kernels in this build; nothing to compare")
    layout = w8a8.weight_layout()  # "amx", "units16" (AVX-512 VNNI) or "units" (AVX2)
    packed_linear = getattr(native, "int8_linear_amx" if layout == "amx" else "int8_linear_units")
    llm = LLM(progress=False)
    layer = llm.model.model.layers[args.layer]
    products = {"qkv": layer.self_attn.qkv_proj, "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj,
                "lm_head": llm.model.lm_head}
    print(f"{torch.get_num_threads()} threads; ms per call | product | M | float32 on GGUF blocks | "
          f"int8 {layout} | {layout} × float32")
    for name, q in products.items():
        int8 = w8a8.W8A8Linear(q.dequantized(), q.bias)
        repeats = 3 if name == "lm_head" else 7
        for m in (int(r) for r in args.rows.split(",")):
            if name == "lm_head" and m > 64:
                continue
            x = torch.randn(m, q.in_features)
            base = best_of(partial(native.linear, x, q.blocks, q._type_ids, q.bias, 64), repeats)
            t = best_of(partial(packed_linear, x, int8.packed, int8.out_features, int8.weight_scales, int8.bias,
                                int8.group), repeats)
            print(f"| {name} {q.out_features}×{q.in_features} | {m} | {base * 1e3:.3f} | {t * 1e3:.3f} | "
                  f"{base / t:.2f}× |")

if __name__ == "__main__":
    main()
