"""`clipsnail demo`: the whole CLIP pipeline on the built-in shapes data, on a CPU, in a few minutes.

generate captioned shapes (purple triangles held out of training) -> train a small CLIP -> retrieval metrics on
the test split -> zero-shot colour and shape classification -> text queries answered with 3x3 grids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from clipsnail.config import load_config
from clipsnail.data.images import list_image_folder
from clipsnail.data.shapes import generate_attribute_folder, generate_shapes
from clipsnail.engine import fit
from clipsnail.evaluate import (
    classification_metrics,
    encode_image_paths,
    evaluate_caption_split,
    zero_shot_logits,
    zero_shot_weights,
)
from clipsnail.hub import load
from clipsnail.index import folder_index
from clipsnail.plots import write_result_grid
from clipsnail.safeio import atomic_write_text
from clipsnail.tasks.clip import ClipConfig, ClipTask

log = logging.getLogger(__name__)

QUERIES = ["a red circle", "a blue square", "two green triangles", "a large yellow star",
           "a small orange circle", "a purple triangle"]
HOLDOUT = [("purple", "triangle")]
DEMO_STEPS = 1500


def demo_config(data_dir: Path, steps: int) -> ClipConfig:
    data_dir = Path(data_dir)
    return load_config(ClipConfig, values={
        "data.captions": str(data_dir / "captions.csv"), "data.images": str(data_dir / "images"),
        "data.split_file": str(data_dir / "split.json"), "train.batch_size": 128, "train.log_every": 10,
        "train.checkpoint_every": 100, "optim.lr": 1e-3, "optim.weight_decay": 0.2, "optim.warmup_steps": 50,
        "model.patch_size": 8,
        # A convolutional stem: with a plain patchify stem a ViT this small learns colour at once but not the
        # outlines of the shapes within minutes (BENCHMARKS.md).
        "model.vision_stem": "conv", "data.context_length": 24, "train.eval_every": 0,
        "train.max_steps": steps,
    })


def run_demo(out: Path, steps: int = DEMO_STEPS, quick: bool = False, progress: bool = True) -> dict:
    """quick: a few hundred images and `steps` as given (for smoke tests)."""
    out.mkdir(parents=True, exist_ok=True)
    data_dir, run_dir = out / "shapes", out / "run"
    n_images = 600 if quick else 6000
    if not (data_dir / "captions.csv").exists():
        say(f"[1/5] rendering {n_images} captioned shape scenes into {data_dir} (purple triangles held out) ...")
        generate_shapes(data_dir, n=n_images, size=32, seed=0, captions_per_image=3, holdout=HOLDOUT)
    else:
        say(f"[1/5] using the shapes data already in {data_dir}")

    say(f"[2/5] training a small CLIP into {run_dir} (CPU; re-running continues from the checkpoint) ...")
    cfg = demo_config(data_dir, steps)
    result = fit(ClipTask(cfg, run_dir=run_dir), run_dir, progress=progress)
    model = load(run_dir)

    say("[3/5] retrieval on the held-out test split (includes the never-seen purple triangles) ...")
    metrics, names = evaluate_caption_split(model, data_dir / "captions.csv", data_dir / "images", "test",
                                            data_dir / "split.json", progress=False)
    metrics = {k: v for k, v in metrics.items() if "recall" in k}

    say("[4/5] zero-shot classification of single shapes by colour and by kind ...")
    for attribute in ("color", "kind"):
        folder = out / f"zeroshot_{attribute}"
        if not folder.exists():
            generate_attribute_folder(folder, attribute, n_per_class=20 if quick else 50, size=32, seed=1)
        paths, labels, classes = list_image_folder(folder)
        emb, _ = encode_image_paths(model, paths, progress=False)
        prompts = [f"{article(c)} {c} shape" if attribute == "color" else f"{article(c)} {c}" for c in classes]
        logits = zero_shot_logits(emb, zero_shot_weights(model, prompts, ["{}", "a photo of {}"]))
        metrics[f"zeroshot_{attribute}_acc1"] = classification_metrics(logits, torch.tensor(labels))["acc1"]

    say("[5/5] answering text queries over the test images ...")
    test_dir = out / "test_images"
    test_dir.mkdir(exist_ok=True)
    for n in names:  # a folder of just the test images, so searches show images the model never trained on
        copy = test_dir / n
        if copy.is_symlink():  # made by earlier versions; folders are now searched without following links
            copy.unlink()
        if not copy.exists():
            try:  # a hard link costs no space and, unlike a symbolic one, is an ordinary file
                os.link(data_dir / "images" / n, copy)
            except OSError:
                shutil.copyfile(data_dir / "images" / n, copy)
    index = folder_index(model, test_dir, cache_dir=run_dir / "embeddings", progress=False)
    grids = []
    for q in QUERIES:
        hits = index.search(model.encode_text([q]), k=9)[0]
        grids.append(write_result_grid(out / "queries" / (q.replace(" ", "_") + ".png"), q,
                                       [(h.path, h.score) for h in hits]))

    summary = {k: round(v, 4) for k, v in metrics.items() if "rank" not in k}
    atomic_write_text(out / "demo_metrics.json", json.dumps(summary, indent=2) + "\n")
    say("")
    say(json.dumps(summary, indent=2))
    say("")
    say(f"trained {result.step} steps; model: {run_dir} (config.json, model.safetensors, tokenizer.json, "
        f"metrics.jsonl, curves.png)")
    say("query grids:\n" + "\n".join(f"  {g}" for g in grids))
    say(f"try: clipsnail search --model {run_dir} --images {test_dir} \"a large blue star\" --grid star.png")
    return summary


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
