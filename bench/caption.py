#!/usr/bin/env python
"""Benchmark: image captioning (`clipsnail caption`) with the frozen ImageNet EfficientNet-Lite0 (the packaged
weights) and a small Transformer decoder, on generated shapes and on COCO-mini, on the CPU.

What it does
1. Shapes: `generate_shapes` (3000 scenes of 1-3 shapes, 32 px, 3 captions each, seed 0; its own 80/10/10
   split), the decoder trained on the train split's tokens of the encoder at 128 px (a 4x4 grid), scored on the
   test split: colour_shape_accuracy (the caption names a colour and a shape, and every colour and shape it names
   is one shape of the scene), caption_true (everything it states is true of the scene), BLEU-4, CIDEr-D; greedy
   and beam 3, against the nearest-neighbour caption baseline (Devlin et al. 2015: the consensus caption of the 5
   nearest training images under the same encoder's pooled features).
2. COCO-mini (coco_val_mini of the bench data folder, bench/_common.py: 159 COCO val2017 photos, 795 captions),
   5-fold cross-validation by image with the folds of bench/coco_pretrained.py (images sorted by name, fold k tests
   index % 5 == k). Per fold the decoder trains on the 127 training images' captions (encoder at 224 px, a 7x7
   grid) and captions the 32 test images: greedy, beam 3, beam 3 reranked by CLIP (the packaged pretrained preset
   pretrained_small.yaml fine-tuned on the same fold's training images, as in bench/coco_pretrained.py), and the
   nearest-neighbour baseline. BLEU-4 and CIDEr-D (pycocoevalcap) per fold, and their mean.
3. Writes bench/results/caption.json and prints tables.

    .venv/bin/python bench/caption.py                      # both parts (about 45 min on 2 CPU cores)
    .venv/bin/python bench/caption.py --skip-coco --shapes-steps 50 --out runs/c.json   # checks it works
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common

_common.use_source_tree()

import coco_pretrained  # noqa: E402  (bench/coco_pretrained.py: its folds and its CLIP fine-tuning)

from clipsnail.apps.hub import load  # noqa: E402
from clipsnail.cli import main as cli  # noqa: E402
from clipsnail.data.shapes import generate_shapes  # noqa: E402
from clipsnail.inference.captioner import evaluate_captioner  # noqa: E402

COCO = coco_pretrained.DATA
DECODER = ["model.width=256", "model.depth=3", "model.heads=4", "train.log_every=50", "train.eval_every=0",
           "train.checkpoint_every=0", "optim.lr=5e-4", "optim.warmup_steps=50"]


def train_captioner(out: Path, captions: Path, images: Path, split: Path, settings: list[str]) -> float:
    argv = ["caption", "train", "--encoder", "efficientnet-lite0", "--captions", str(captions), "--images",
            str(images), "--split-file", str(split), "--out", str(out), "--no-progress"]
    for s in [*DECODER, *settings]:
        argv += ["--set", s]
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if cli(argv) != 0:
            raise SystemExit(f"caption training failed: {' '.join(argv)}")
    return time.perf_counter() - t


def score(run: Path, captions: Path, images: Path, split: Path, clip=None) -> dict:
    """Greedy, beam 3 (and beam 3 reranked by `clip`), and the nearest-neighbour baseline on the test split."""
    captioner = load(run)
    out = {}
    for name, beam, rerank in (("greedy", 1, None), ("beam3", 3, None), ("beam3_clip_rerank", 3, clip)):
        if name.endswith("rerank") and clip is None:
            continue
        t = time.perf_counter()
        metrics, rows = evaluate_captioner(captioner, captions, images, "test", split_file=str(split),
                                           beam_size=beam, rerank_clip=rerank, baseline=name == "greedy",
                                           progress=False)
        seconds = time.perf_counter() - t
        out[name] = {k: round(v, 4) for k, v in metrics.items() if not k.startswith("baseline_") and k != "images"}
        out[name]["seconds_per_image"] = round(seconds / metrics["images"], 3)
        if name == "greedy":
            out["nearest_neighbour"] = {k.removeprefix("baseline_"): round(v, 4) for k, v in metrics.items()
                                        if k.startswith("baseline_")}
            out["images"] = metrics["images"]
            out["examples"] = [{k: r[k] for k in ("image", "caption", "baseline", "references")} for r in rows[:4]]
    return out


def shapes_part(work: Path, steps: int) -> dict:
    data = work / "shapes"
    generate_shapes(data, n=3000, size=32, seed=0, captions_per_image=3)
    _common.say(f"shapes: training the decoder for {steps} steps")
    seconds = train_captioner(work / "shapes_run", data / "captions.csv", data / "images", data / "split.json",
                              ["data.image_size=128", "train.batch_size=64", f"train.max_steps={steps}"])
    result = score(work / "shapes_run", data / "captions.csv", data / "images", data / "split.json")
    result["train_seconds"] = round(seconds, 1)
    return result


def coco_part(work: Path, folds: int, steps: int, clip_steps: int) -> dict:
    names = sorted(p.name for p in (COCO / "images").iterdir() if p.suffix.lower() == ".jpg")
    captions = COCO / "captions_val2017.json"
    per_fold = []
    for fold in range(folds):
        split = work / f"fold{fold}.json"
        sizes = coco_pretrained.write_split(names, fold, 5, split)
        _common.say(f"coco fold {fold}: {sizes}; decoder {steps} steps; CLIP for reranking {clip_steps} steps")
        seconds = train_captioner(work / f"coco{fold}", captions, COCO / "images", split,
                                  ["data.image_size=224", "train.batch_size=32", f"train.max_steps={steps}"])
        clip = None
        if clip_steps:
            clip_run = work / f"clip{fold}"
            coco_pretrained.train("pretrained", clip_run, split, clip_steps, 32, 160, work / f"clip{fold}.log")
            clip = load(clip_run)
        result = score(work / f"coco{fold}", captions, COCO / "images", split, clip)
        result["train_seconds"] = round(seconds, 1)
        per_fold.append(result)
        _common.say(f"  greedy {result['greedy']}  nn {result['nearest_neighbour']}")
    systems = [k for k in ("greedy", "beam3", "beam3_clip_rerank", "nearest_neighbour") if k in per_fold[0]]
    mean = {s: {m: round(statistics.mean(f[s][m] for f in per_fold), 4) for m in ("bleu4", "cider")}
            for s in systems}
    return {"folds": per_fold, "mean": mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes-steps", type=int, default=500)
    ap.add_argument("--coco-steps", type=int, default=200)
    ap.add_argument("--clip-steps", type=int, default=40, help="fine-tuning steps of the reranking CLIP (0: none)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-coco", action="store_true")
    ap.add_argument("--out", default=str(_common.RESULTS / "caption.json"))
    args = ap.parse_args()
    results, notes = {}, []
    machine, commit, started, t0 = _common.machine_info(), _common.git_commit(), _common.now_iso(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipsnail-caption-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_shapes:
            results["shapes"] = shapes_part(work, args.shapes_steps)
            s = results["shapes"]
            print(_common.format_table(
                ["shapes (test split)", "colour+shape", "caption true", "BLEU-4", "CIDEr-D"],
                [[k, s[k].get("colour_shape_accuracy"), s[k].get("caption_true"), s[k]["bleu4"], s[k]["cider"]]
                 for k in ("greedy", "beam3", "nearest_neighbour")]))
        if not args.skip_coco:
            if not COCO.is_dir():
                notes.append(f"COCO-mini skipped: {COCO} not found")
                print(notes[-1], file=sys.stderr)
            else:
                results["coco_mini"] = coco_part(work, args.folds, args.coco_steps, args.clip_steps)
                m = results["coco_mini"]["mean"]
                print(_common.format_table(["COCO-mini (5-fold mean)", "BLEU-4", "CIDEr-D"],
                                           [[k, v["bleu4"], v["cider"]] for k, v in m.items()]))
    config = {"encoder": "efficientnet-lite0 (packaged ImageNet weights, frozen)", "decoder": DECODER,
              "shapes": {"n": 3000, "size": 32, "captions_per_image": 3, "image_size": 128,
                         "steps": args.shapes_steps, "batch_size": 64},
              "coco_mini": {"folds": args.folds, "fold_rule": "images sorted by name; fold k tests index % 5 == k",
                            "image_size": 224, "steps": args.coco_steps, "batch_size": 32,
                            "rerank_clip": f"src/clipsnail/configs/pretrained_small.yaml fine-tuned {args.clip_steps} "
                                           "steps at batch 32, 160 px, on the fold's training images"},
              "metrics": "pycocoevalcap BLEU-4 (corpus) and CIDEr-D; captions lower-cased, punctuation removed"}
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _common.write_json(args.out, _common.envelope(benchmark="caption", machine=machine, git_commit=commit,
                                                  date=started, config=config, results=results, notes=notes))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
