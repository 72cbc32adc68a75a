"""A Hugging Face checkpoint in bfloat16 run in float32: qwen-engine against transformers, same folder and prompt.

    python benchmarks/hf_checkpoint.py --runs 3        # makes the folder on first use (~1 min), then measures

Qwen publishes its checkpoints in bfloat16, and on CPU both systems run them in float32 by default. The folder
is the demo GGUF's weights rounded to bfloat16 and saved by transformers (config, tokenizer, safetensors), kept
in --folder. Systems, each run in a fresh process, alternating run by run:
  * qwen-engine: the default load, linear weights kept in bfloat16 for the native kernels (weights/bf16_layers.py),
    exact as float32;
  * qwen-engine float32: `quantized=False`, every weight widened to float32 (the path before bf16_layers);
  * transformers: `from_pretrained(folder, dtype=float32)` (sdpa), with its own KV cache.
Same ~516-token chat prompt as compare.py, load time, prefill tokens/s, decode tokens/s over 128 greedy tokens,
peak RSS, and whether the greedy tokens equal transformers'. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from compare import (  # noqa: E402
    DECODE_TOKENS,
    peak_rss_mib,
    prompt_messages,
    run_qwen_engine,
    transformers_greedy,
)

SYSTEMS = ("qwen-engine", "qwen-engine float32", "transformers")


def make_folder(gguf_path: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    # transformers will not save a model it read from a GGUF: write the tensors and the config directly.
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)


def run(system: str, folder: str, ids: list[int]) -> dict:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if system.startswith("qwen-engine"):
        return run_qwen_engine(folder, ids, quantized=system == "qwen-engine")
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {"load_s": time.perf_counter() - start, **transformers_greedy(hf, ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "qwen-engine-bench-hf-bf16"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--child", nargs=3, metavar=("SYSTEM", "FOLDER", "IDS_FILE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        # transformers imports torchvision, which needs a shim beside this torch (tests/video_helpers.py)
        from video_helpers import define_torchvision_ops

        define_torchvision_ops()
        system, folder, ids_file = args.child
        result = run(system, folder, json.loads(Path(ids_file).read_text()))
        print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))
        return

    from qwen_engine.weights.demo import demo_model_path

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        print(f"making {folder} from the demo GGUF (bfloat16) ...", file=sys.stderr)
        code = ("import sys; sys.path.insert(0, 'tests'); from video_helpers import define_torchvision_ops; "
                "define_torchvision_ops(); sys.path.insert(0, 'benchmarks'); from hf_checkpoint import make_folder; "
                f"from pathlib import Path; make_folder(Path({str(demo_model_path())!r}), Path({str(folder)!r}))")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)

    from qwen_engine import LLM

    ids = LLM(folder, progress=False).encode_chat(prompt_messages(), add_generation_prompt=True).token_ids
    ids_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen-engine-bench-hf-{os.getpid()}.json"
    ids_file.write_text(json.dumps(list(ids)))
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    try:
        for r in range(args.runs):
            for system in systems[r % len(systems):] + systems[: r % len(systems)]:
                proc = subprocess.run([sys.executable, __file__, "--child", system, str(folder), str(ids_file)],
                                      capture_output=True, text=True, env=env, cwd=ROOT)
                if proc.returncode != 0:
                    print(f"{system} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                results[system].append(out)
                print(f"run {r + 1} {system}: prefill {len(ids) / out['prefill_s']:.1f} tok/s, decode "
                      f"{(DECODE_TOKENS - 1) / out['decode_s']:.1f} tok/s, rss {out['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr)
    finally:
        ids_file.unlink(missing_ok=True)

    rows = {s: {"load": statistics.median(r["load_s"] for r in rs),
                "prefill": statistics.median(len(ids) / r["prefill_s"] for r in rs),
                "decode": statistics.median((DECODE_TOKENS - 1) / r["decode_s"] for r in rs),
                "rss": statistics.median(r["peak_rss_mib"] for r in rs), "tokens": rs[0]["tokens"]}
            for s, rs in results.items() if rs}
    base = rows.get("transformers")
    print(f"bfloat16 checkpoint in float32; prompt {len(ids)} tokens; {DECODE_TOKENS} greedy tokens; {args.threads} "
          f"threads; medians of {args.runs} runs")
    print("| system | load s | prefill tok/s | decode tok/s | peak RSS MiB | prefill × transformers | "
          "decode × transformers | RSS × transformers | same tokens as transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for system, r in rows.items():
        ratios = [f"{r[k] / base[k]:.2f}×" if base else "–" for k in ("prefill", "decode", "rss")]
        same = "–" if not base else "yes" if r["tokens"] == base["tokens"] else next(
            f"differs from token {i}" for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"], strict=False))
            if a != b)
        print(f"| {system} | {r['load']:.1f} | {r['prefill']:.1f} | {r['decode']:.1f} | {r['rss']:.0f} | "
              f"{' | '.join(ratios)} | {same} |")


if __name__ == "__main__":
    main()
