"""Vision towers at real sizes: qwen-engine against transformers (eager and sdpa), same random weights.

    python benchmarks/vision_tower.py                   # both towers, 3 runs each, 2 threads
    python benchmarks/vision_tower.py --models qwen3_vl --runs 1 --image-size 448 --no-video   # a quick look

Two towers with the dimensions of released checkpoints: Qwen2.5-VL-3B (depth 32, width 1280, 16 heads, SwiGLU
3420, window 112 px with full attention in blocks 7/15/23/31, out 2048) and Qwen3-VL-2B (depth 24, width 1024,
16 heads, MLP 4096, patch 16, 48x48 learned positions, DeepStack after blocks 5/11/17, out 2048). transformers'
own Qwen3VLVisionConfig defaults are the 8B's (27 x 1152), so the 2B values are spelled out here.

Every measurement is one forward pass in a fresh subprocess, and the systems alternate run by run (so load from
other jobs on the machine falls on all of them alike). transformers builds the tower with its seeded default
initialisation; for qwen-engine the same tensors are copied into ours, so all systems compute the same function
(the parent reports max|Δ| of the merged tokens against ours). The input is one synthetic 1024x1024 image put
through our preprocessing with the released checkpoints' pixel limits (Qwen2.5-VL: 1036x1036 -> 5476 patches;
Qwen3-VL: 1024x1024 -> 4096 patches), float32. "peak" is the resident-memory high-water mark during the pass
above what the process held after building the tower (VmHWM reset through /proc/self/clear_refs): activations
and workspace, not weights. qwen-engine also encodes a 10-second video: 20 frames at 2 fps, 448x448 (10
temporal patches; --video-runs, default 1), and so does "qwen-engine w8a8" when it is listed. The 1-minute load
average is printed: other jobs sharing the cores add noise. --systems may add "qwen-engine w8a8" (the w8a8-vision
mode, w8a8.convert_tower: every linear layer of our tower in int8 and its attention with int8 scores),
"qwen-engine bf16-attention" (the float32 tower with lossy_attention("bf16")) and "qwen-engine bf16" /
"transformers sdpa bf16" (the towers cast to bfloat16; max|Δ| is taken in float32). Not a test: nothing is
asserted.

--bf16-weights rounds every weight to bfloat16 first, in all systems: the towers of released checkpoints, which
are bfloat16, run in float32. qwen-engine then keeps its linear weights in bfloat16 for the native kernels
(weights/bf16_layers.py, as its loader does for such a checkpoint), exact as float32; transformers widens them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TOWERS = {
    "qwen2_5_vl": {
        "label": "Qwen2.5-VL-3B tower",
        "max_pixels": 12845056,  # the released checkpoints' preprocessor_config.json (the class default is lower)
        "hf_config": "Qwen2_5_VLVisionConfig",
        "hf_model": "Qwen2_5_VisionTransformerPretrainedModel",
        "vision_config": dict(
            depth=32,
            hidden_size=1280,
            hidden_act="silu",
            intermediate_size=3420,
            num_heads=16,
            in_channels=3,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        ),
    },
    "qwen3_vl": {
        "label": "Qwen3-VL-2B tower",
        "max_pixels": None,  # the family default is the released value
        "hf_config": "Qwen3VLVisionConfig",
        "hf_model": "Qwen3VLVisionModel",
        "vision_config": dict(
            depth=24,
            hidden_size=1024,
            hidden_act="gelu_pytorch_tanh",
            intermediate_size=4096,
            num_heads=16,
            in_channels=3,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
    },
}
SYSTEMS = ("qwen-engine", "transformers sdpa", "transformers eager")
# Ask for these with --systems: the lossy mode (models/w8a8.py), and towers in bfloat16 (products on AMX where the
# CPU has it, through oneDNN; the merged tokens are compared in float32).
OPTIONAL = ("qwen-engine w8a8", "qwen-engine bf16-attention", "qwen-engine bf16", "transformers sdpa bf16")


def _torchvision_shim() -> None:
    """transformers imports torchvision when it is installed; the PyPI wheel is a CUDA build whose ops do not
    load beside the CPU torch, and its import fails unless the two op schemas exist (oracle.md; as in
    tests/video_helpers.py). Nothing here uses torchvision itself."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (a working build)
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(library)  # the schemas live as long as the Library object


_KEEP: list[object] = []


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(family: str, system: str, video: bool, args: argparse.Namespace, out: Path) -> None:
    """One forward pass of one (tower, system) in this process; writes out.json (and out.pt: merged tokens)."""
    _torchvision_shim()
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from qwen_engine.models.vision import VisionConfig, VisionTransformer
    from qwen_engine.vision import ImageProcessorConfig, preprocess_image

    torch.set_num_threads(args.threads)
    spec = TOWERS[family]
    hf_config = getattr(transformers, spec["hf_config"])(**spec["vision_config"])
    attn = "eager" if system == "transformers eager" else "sdpa"
    torch.manual_seed(0)
    hf = getattr(transformers, spec["hf_model"])._from_config(
        hf_config, attn_implementation=attn, dtype=torch.float32
    )
    hf.eval()
    if args.bf16_weights:
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.bfloat16().float())
    dtype = torch.bfloat16 if system.endswith(" bf16") else torch.float32
    system = system.removesuffix(" bf16")

    if video:
        # 20 frames at 2 fps, 448x448: temporal patches of 2 frames, each frame its own attention segment.
        p = spec["vision_config"]["patch_size"]
        grid = torch.tensor([[args.video_frames // 2, 448 // p, 448 // p]])
        patch_dim = 3 * 2 * p * p
        pixels = torch.randn(int(grid.prod()), patch_dim, generator=torch.Generator().manual_seed(0))
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
        config = ImageProcessorConfig.for_family(family)
        processed = preprocess_image(image, config, max_pixels=spec["max_pixels"] or config.max_pixels)
        pixels, grid = processed.pixel_values, torch.tensor([processed.grid_thw])

    if system.startswith("qwen-engine"):
        model = VisionTransformer(VisionConfig.from_dict(spec["vision_config"], family))
        model.load_state_dict(hf.state_dict(), strict=True)
        model.eval()
        del hf
        if system == "qwen-engine w8a8":
            from qwen_engine.models import w8a8

            w8a8.convert_tower(model)  # the w8a8-vision mode: int8 linear layers and int8 attention scores
        elif system == "qwen-engine bf16-attention":
            model.lossy_attention("bf16")
        model.to(dtype)
        if args.bf16_weights and dtype == torch.float32 and system == "qwen-engine":
            from qwen_engine.weights import bf16_layers

            bf16_layers.keep_linears(model)
            # Hand the freed float32 weights back to the system, or the pass would reuse their resident pages
            # and "peak" would miss its activations.
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)

        def run():
            return model(pixels.to(dtype), grid)
    else:
        hf.to(dtype)

        def run():
            return hf(pixels.to(dtype), grid_thw=grid).pooler_output

    with torch.inference_mode():
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        base = _rss_kib("VmRSS")
        start = time.perf_counter()
        merged = run()
        seconds = time.perf_counter() - start
        peak = (_rss_kib("VmHWM") - base) / 1024
    torch.save(merged.float(), out.with_suffix(".pt"))
    out.with_suffix(".json").write_text(
        json.dumps({"patches": int(pixels.shape[0]), "seconds": seconds, "peak_mib": peak})
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="qwen2_5_vl,qwen3_vl", help="comma-separated: qwen2_5_vl, qwen3_vl"
    )
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated, from " + ", ".join(SYSTEMS + OPTIONAL)
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=1024, help="side of the square test image, pixels")
    parser.add_argument("--video-frames", type=int, default=20)
    parser.add_argument("--video-runs", type=int, default=1, help="qwen-engine only, so one run by default")
    parser.add_argument("--no-video", action="store_true")
    parser.add_argument("--bf16-weights", action="store_true", help="weights rounded to bfloat16 (see above)")
    parser.add_argument(
        "--worker", nargs=4, metavar=("FAMILY", "SYSTEM", "KIND", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        family, system, kind, out = args.worker
        worker(family, system, kind == "video", args, Path(out))
        return

    import torch

    families = args.models.split(",")
    systems = args.systems.split(",")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    forwarded = ["--threads", str(args.threads), "--image-size", str(args.image_size)]
    forwarded += ["--video-frames", str(args.video_frames)] + (["--bf16-weights"] if args.bf16_weights else [])
    load = [os.getloadavg()[0]]

    def measure(family: str, system: str, kind: str, run: int, tmp: Path) -> dict:
        print(f"{family} / {system} / {kind} run {run + 1} ...", file=sys.stderr, flush=True)
        out = tmp / f"{family}-{system}-{kind}-{run}"
        cmd = [sys.executable, __file__, *forwarded, "--worker", family, system, kind, str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        load.append(os.getloadavg()[0])
        return {**json.loads(out.with_suffix(".json").read_text()), "out": out.with_suffix(".pt")}

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        results = {(f, s): [] for f in families for s in systems}
        for family in families:
            for run in range(args.runs):
                rotated = systems[run % len(systems) :] + systems[: run % len(systems)]
                for system in rotated:
                    results[family, system].append(measure(family, system, "image", run, tmp))
        videos = {}
        video_systems = [s for s in ("qwen-engine", "qwen-engine w8a8") if s in systems and not args.no_video]
        for family in families:
            for system in video_systems:
                videos[family, system] = [
                    measure(family, system, "video", r, tmp) for r in range(args.video_runs)
                ]

        print(
            f"\n{args.threads} threads, float32, median of {args.runs} runs (each a fresh process, systems alternating)"
            + (", weights rounded to bfloat16" if args.bf16_weights else "")
        )
        print(
            f"1-minute load average over the runs: {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} cores\n"
        )
        print(
            "| tower | system | patches | median s | runs s | peak MiB | time × qwen-engine | max\\|Δ\\| vs qwen-engine |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for family in families:
            ours = results.get((family, "qwen-engine"))
            ours_median = statistics.median(r["seconds"] for r in ours) if ours else None
            ours_out = torch.load(ours[0]["out"]) if ours else None
            for system in systems:
                rs = results[family, system]
                median = statistics.median(r["seconds"] for r in rs)
                ratio = f"{median / ours_median:.2f}×" if ours else "—"
                diff = "—"
                if ours and system != "qwen-engine":
                    delta = (torch.load(rs[0]["out"]) - ours_out).abs().max().item()
                    diff = f"{delta:.1e} ({delta / ours_out.abs().max().item():.1e} of the largest)"
                spread = ", ".join(f"{r['seconds']:.0f}" for r in rs)
                peak = max(r["peak_mib"] for r in rs)
                print(
                    f"| {TOWERS[family]['label']} | {system} | {rs[0]['patches']} | {median:.1f} | {spread} | "
                    f"{peak:.0f} | {ratio} | {diff} |"
                )
        if videos:
            print(f"\n{args.video_frames} frames of 448x448 ({args.video_frames // 2} temporal patches):\n")
            print("| tower | system | patches | median s | peak MiB |")
            print("|---|---|---|---|---|")
            for (family, system), rs in videos.items():
                median = statistics.median(r["seconds"] for r in rs)
                peak = max(r["peak_mib"] for r in rs)
                print(f"| {TOWERS[family]['label']} | {system} | {rs[0]['patches']} | {median:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
