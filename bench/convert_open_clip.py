"""A full-size open_clip CLIP converted to ours: how close the embeddings are, and how fast each runs.

open_clip's ViT-B-32 (QuickGELU, as OpenAI's weights) and ViT-B-16 architectures are built with random weights
(no pretrained file can be downloaded here), saved as safetensors, converted with `clipsnail.apps.convert`, and both
models embed the same random images and real captions: max |ours - open_clip| of the L2-normalised embeddings,
and the median time of `encode_image` / `encode_text` on each side, called alternately (batch 16, 2 threads).

    python bench/convert_open_clip.py        # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import (
    RESULTS,
    envelope,
    format_table,
    git_commit,
    machine_info,
    median,
    now_iso,
    say,
    use_source_tree,
    write_json,
)

use_source_tree()

CAPTIONS = ["a photo of a dog playing in the snow", "two people riding bicycles along a river at sunset",
            "a red double-decker bus on a busy street", "a bowl of ramen with an egg and green onions"]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def compare(name: str, quick_gelu: bool, batch: int, repeats: int) -> dict:
    import open_clip
    import torch
    from safetensors.torch import save_file

    import clipsnail
    from clipsnail.apps.convert import convert_open_clip

    torch.manual_seed(0)
    source = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # open_clip zero-initialises some tensors; every weight must matter in the comparison
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
        t = time.perf_counter()
        info = convert_open_clip(path, Path(tmp) / "run", quick_gelu=quick_gelu)
        convert_s = time.perf_counter() - t
        ours = clipsnail.load(Path(tmp) / "run")
    size = ours.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = (CAPTIONS * batch)[:batch]
    tokens = open_clip.tokenize(texts)
    with torch.inference_mode():
        image_diff = (ours.encode_image(images) - source.encode_image(images, normalize=True)).abs().max().item()
        text_diff = (ours.encode_text(texts) - source.encode_text(tokens, normalize=True)).abs().max().item()
        sides = {
            "image_ours": lambda: ours.encode_image(images),
            "image_open_clip": lambda: source.encode_image(images, normalize=True),
            "text_ours": lambda: ours.encode_text(texts),  # tokenising included, as users call it
            "text_open_clip": lambda: source.encode_text(open_clip.tokenize(texts), normalize=True),
        }
        for fn in sides.values():  # warm-up
            fn()
        times = {k: [] for k in sides}
        for _ in range(repeats):  # alternate, so that a noisy moment hits both sides
            for k, fn in sides.items():
                times[k] += timed(fn, 1)
    medians = {k: round(median(v) * 1000, 1) for k, v in times.items()}
    return {
        "model": name, "quick_gelu": quick_gelu, "parameters": info["parameters"],
        "architecture": info["architecture"], "convert_s": round(convert_s, 2),
        "max_abs_diff": {"image": image_diff, "text": text_diff},
        "median_ms": medians,
        "speedup_ours": {"image": round(medians["image_open_clip"] / medians["image_ours"], 3),
                         "text": round(medians["text_open_clip"] / medians["text_ours"], 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="ViT-B-32,ViT-B-16")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    results = []
    for name in args.models.split(","):
        say(f"{name}: building, converting, comparing")
        results.append(compare(name, quick_gelu=True, batch=args.batch, repeats=args.repeats))
        say(f"  {results[-1]}")
    rows = [[r["model"], r["parameters"], f"{r['max_abs_diff']['image']:.1e}", f"{r['max_abs_diff']['text']:.1e}",
             r["median_ms"]["image_ours"], r["median_ms"]["image_open_clip"], r["speedup_ours"]["image"],
             r["median_ms"]["text_ours"], r["median_ms"]["text_open_clip"], r["speedup_ours"]["text"]]
            for r in results]
    say(format_table(["model", "params", "image diff", "text diff", "image ms ours", "open_clip", "x",
                      "text ms ours", "open_clip", "x"], rows))
    write_json(RESULTS / "convert_open_clip.json", envelope(
        benchmark="convert_open_clip", machine=machine_info(), git_commit=git_commit(), date=now_iso(),
        config={"batch": args.batch, "repeats": args.repeats, "threads": 2, "weights": "random (seed 0)"},
        results=results,
        notes="Random weights: pretrained files cannot be downloaded here. Times are medians of alternating "
              "calls; the text side includes tokenisation on both sides (ours: HF tokenizers; open_clip: its "
              "Python SimpleTokenizer).",
    ))
    say(f"wrote {RESULTS / 'convert_open_clip.json'}")


if __name__ == "__main__":
    main()
