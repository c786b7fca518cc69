#!/usr/bin/env python
"""Benchmark: fine-tuning CLIP on real photos at equal wall-clock time. Four systems, each trained for the same time
budget per fold on COCO-mini (159 COCO val2017 photos, 795 captions), 5-fold cross-validation by image, on the CPU.

What it does
1. Folds as bench/coco_pretrained.py: images sorted by file name; fold k tests the images whose index % 5 == k and
   trains on the rest (Karpathy-style split files with train and test only: no validation split, so the engine
   logs "no validation during training" and never evaluates inside the budget).
2. Per fold, four rows, each trained in its own child process through the Python API (`clipsnail.train.engine.fit`
   with the ClipTask built from the config as `clipsnail clip train` builds it), stopped by `train.time_budget`
   (`--budget`, default 60 s; `train.epochs` 1000 so that the budget, not the schedule, ends training):
   - preset:     the packaged pretrained_small.yaml as it is (both towers train, augmentation on, 160 px);
   - lit:        the packaged lit_small.yaml: LiT (Zhai et al., CVPR 2022), the image tower locked, no augmentation,
                 224 px; the locked EfficientNet-Lite0 runs once over the training photos (RUN/feature_cache) and
                 a step runs only MiniLM and the heads;
   - lit_siglip: the same with `loss.kind=siglip`, the sigmoid loss of SigLIP (Zhai et al., ICCV 2023; learnable
                 bias from -10, temperature from log 10);
   - conse_lit:  the ConSE CLIP (`clipsnail convert --from conse:efficientnet-lite0+all-minilm-l6-v2`, made once
                 as bench/photo_search.py does) fine-tuned with the packaged conse_finetune.yaml: image body locked
                 and cached, the ConSE classifier / label embeddings and the text side train.
   All rows: data.sampling=pair, seed 0, batch 32 (the configs'), no evaluation or step checkpoints while training.
   The engine's budget clock starts before the task's `prepare`, so a locked tower's one-time encoding of the
   training photos is INSIDE the budget; so are the checkpoint and run save the engine writes at each epoch end.
3. Measures per row and fold: steps done; steps/s of stepping alone (1 / median time between consecutive steps,
   which leaves out the encoding and the epoch-end saves); encode_s (the task's `prepare`, timed by wrapping it);
   save_s (epoch-end checkpoints and saves inside the budget); step_s (the rest of the budget's time);
   cpu_per_wall_s (CPU seconds the process got per wall second: how much the shared cores let it run); then the
   fold's held-out photos scored by `evaluate_caption_split`, the function behind `clipsnail clip eval --split
   test`, on the saved run: text->image (image_retrieval_recall@k) and image->text (text_retrieval_recall@k) R@1/5/10.
4. Writes bench/results/finetune_photos.json: `steps_per_s_locked_over_unlocked` (median over folds of lit over
   preset stepping speed, both measured in this run), `<row>_t2i_r5` (mean over folds), `best_row`, `best_t2i_r5`,
   per row the mean and per-fold figures; prints a table.

    .venv/bin/python bench/finetune_photos.py                     # 5 folds x 4 rows x 60 s (about 30-40 min)
    .venv/bin/python bench/finetune_photos.py --rows lit,lit_siglip --out runs/lit.json
    .venv/bin/python bench/finetune_photos.py --folds 1 --budget 10 --out runs/x.json   # checks it works
"""

from __future__ import annotations

import argparse
import json
import logging
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
import coco_pretrained as coco

DATA = coco.DATA
CONFIGS = _common.ROOT / "src" / "clipsnail" / "configs"
ROWS = ("preset", "lit", "lit_siglip", "conse_lit")
# (config file, row-specific --set strings); conse_lit's finetune.init is the converted run, added at run time.
ROW_SETUP = {
    "preset": (CONFIGS / "pretrained_small.yaml", []),
    "lit": (CONFIGS / "lit_small.yaml", []),
    "lit_siglip": (CONFIGS / "lit_small.yaml", ["loss.kind=siglip"]),
    "conse_lit": (CONFIGS / "conse_finetune.yaml", []),
}
# Many epochs so that the time budget is what stops every row (cosine schedule over 1000 epochs: the learning rate
# stays within 0.1% of its peak over the few hundred steps a minute allows). No evaluation during training
# (eval_every 0 evaluates only at a finished schedule, which a budget stop is not) and no step checkpoints.
COMMON = ["data.sampling=pair", "train.seed=0", "train.eval_every=0", "train.log_every=1",
          "train.checkpoint_every=100000", "train.epochs=1000", "train.device=cpu"]
METRICS = coco.METRICS
CHILD_TAG = "FINETUNE_PHOTOS "


def overrides(row: str, budget: float, conse: Path | None) -> list[str]:
    sets = [*COMMON, f"train.time_budget={budget:g}s", *ROW_SETUP[row][1]]
    if row == "conse_lit":
        sets.append(f"finetune.init={conse}")
    return sets


# ----------------------------------------------------------------------------------------------- child process


def child(row: str, split: Path, run: Path, budget: float, conse: Path | None) -> dict:
    """Train one row on one fold through the engine, timing its parts, then score the saved run on the test photos."""
    _common.use_source_tree()
    import clipsnail.apps.hub as hub
    from clipsnail.core.config import load_config
    from clipsnail.families.clip import ClipConfig
    from clipsnail.inference.evaluate import evaluate_caption_split
    from clipsnail.tasks.clip import ClipTask
    from clipsnail.train import engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {"data.captions": str(DATA / "captions_val2017.json"), "data.images": str(DATA / "images"),
              "data.split_file": str(split)}
    config = load_config(ClipConfig, ROW_SETUP[row][0], overrides(row, budget, conse), values=values)
    task = ClipTask(config, run_dir=run)
    marks: dict[str, float] = {}
    step_times: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds (all threads) at the loop's start and after each step
    saves: list[tuple[float, float]] = []  # (start, seconds) of each checkpoint / run save

    prepare = task.prepare

    def timed_prepare(*args, **kwargs):
        # The engine starts its budget clock just before this call: the encoding is spent out of the budget.
        marks["loop_start"] = time.monotonic()
        cpu.append(time.process_time())
        prepare(*args, **kwargs)
        marks["prepare_end"] = time.monotonic()

    task.prepare = timed_prepare

    def timed(method):
        def wrapper(*args, **kwargs):
            t = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                saves.append((t, time.monotonic() - t))
        return wrapper

    save = task.save
    task.save = timed(save)
    t = time.perf_counter()
    with mock.patch.object(engine.Training, "checkpoint", timed(engine.Training.checkpoint)):
        result = engine.fit(task, run, progress=False,
                            on_step=lambda step: (step_times.append(time.monotonic()), cpu.append(time.process_time())))
    fit_s = time.perf_counter() - t
    end = step_times[-1] if step_times else marks["prepare_end"]
    # Saves that started before the last step were epoch ends, inside the budget; the ones after it close the run.
    save_in = sum(s for start, s in saves if start < end)
    intervals = [b - a for a, b in zip(step_times, step_times[1:])]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    encode_s = marks["prepare_end"] - marks["loop_start"]
    loop_s = end - marks["loop_start"]
    out = {"steps": result.step, "completed": result.completed,
           "steps_per_s": round(1 / statistics.median(intervals), 4) if intervals else None,
           "steps_per_s_overall": round(result.step / loop_s, 4) if loop_s > 0 else None,
           "encode_s": round(encode_s, 2), "save_s": round(save_in, 2),
           "step_s": round(loop_s - encode_s - save_in, 2), "budget_loop_s": round(loop_s, 2),
           "fit_s": round(fit_s, 1), "epochs_started": result.epoch + 1,
           # CPU seconds per wall second in the budget: about the torch thread count on an idle machine, less
           # when other work takes the cores
           "cpu_per_wall_s": round((cpu[-1] - cpu[0]) / loop_s, 2) if loop_s > 0 else None,
           "cached_towers": list(task.towers.cached()),
           "first_loss": round(lines[0]["loss"], 4) if lines else None,
           "final_loss": round(statistics.mean(ln["loss"] for ln in lines[-5:]), 4) if lines else None}
    if lines and "logit_bias" in lines[-1]:
        out["final_logit_bias"] = round(lines[-1]["logit_bias"], 3)
    if lines:
        out["final_logit_scale"] = round(lines[-1]["logit_scale"], 3)
    t = time.perf_counter()
    model = hub.load(run, device="cpu")  # what `clip eval --model RUN` loads
    metrics, _ = evaluate_caption_split(model, DATA / "captions_val2017.json", DATA / "images", "test", split,
                                        progress=False)
    out["eval_s"] = round(time.perf_counter() - t, 1)
    out.update({k: round(metrics[v], 4) for k, v in METRICS.items()})
    out.update(num_images=metrics["num_images"], num_captions=metrics["num_captions"])
    return out


def run_child(row: str, split: Path, run: Path, budget: float, conse: Path | None, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, str(split), str(run),
           "--budget", str(budget)]
    if conse is not None:
        cmd += ["--conse", str(conse)]
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=_common.ROOT, env=coco.env(), stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode or not lines:
        raise SystemExit(f"{row} failed (exit {proc.returncode}); log: {log}\n{proc.stdout[-1000:]}\n"
                         + log.read_text()[-3000:])
    return {**json.loads(lines[-1][len(CHILD_TAG):]), "load_average_at_start": load}


# ----------------------------------------------------------------------------------------------- parent


ROW_FIGURES = (*METRICS, "steps", "steps_per_s", "steps_per_s_overall", "encode_s", "save_s", "step_s",
               "cpu_per_wall_s")


def row_mean(folds: list[dict], row: str) -> dict:
    mean = {}
    for key in ROW_FIGURES:
        values = [f[row][key] for f in folds if f[row].get(key) is not None]
        mean[key] = round(statistics.mean(values), 4) if values else None
    return mean


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=60, help="training seconds per row per fold (train.time_budget)")
    p.add_argument("--folds", type=int, default=5, help="how many of the 5 folds to run (0..N-1)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--out", default=str(_common.RESULTS / "finetune_photos.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs, split files)")
    p.add_argument("--child", nargs=3, metavar=("ROW", "SPLIT", "RUN"), help=argparse.SUPPRESS)
    p.add_argument("--conse", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        row, split, run = args.child
        out = child(row, Path(split), Path(run), args.budget, Path(args.conse) if args.conse else None)
        print(CHILD_TAG + json.dumps(out), flush=True)
        return
    rows = [s.strip() for s in args.rows.split(",") if s.strip()]
    if not rows or any(r not in ROWS for r in rows):
        raise SystemExit(f"--rows: choose from {', '.join(ROWS)}")
    if not (DATA / "images").is_dir() or not (DATA / "captions_val2017.json").is_file():
        _common.say(f"skipped: COCO-mini not found at {DATA} (needs images/ and captions_val2017.json)")
        return
    names = sorted(n for n in os.listdir(DATA / "images") if not n.startswith("."))
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    t0 = time.perf_counter()
    folds, conse_s = run_all(names, rows, args)
    results = summary(folds, rows)
    results["conse_convert_s"] = conse_s
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result = _common.envelope(
        benchmark="finetune_photos", machine=machine, git_commit=commit, date=started,
        config=run_config(names, rows, machine, args), results=results,
        notes=("Equal wall-clock per row: train.time_budget counts from the start of the engine's training loop, "
               "before the task's prepare, so a locked tower's one-time encoding of the training photos (encode_s) "
               "and the checkpoint + run save the engine writes at every epoch end (save_s) are spent out of the "
               "budget; step_s is the rest. The budget is checked after each step, so a row overruns it by at most "
               "one step (budget_loop_s). steps_per_s is stepping alone: 1 / the median time between consecutive "
               "steps (data loading, forward, backward, optimiser), which leaves out encoding and the epoch-end "
               "saves; steps_per_s_overall = steps / budget_loop_s. Recall is against each fold's 31-32 test "
               "photos (chance text->image R@5 = 5 / test photos), scored on the saved run by "
               "evaluate_caption_split (clip eval --split test). The cores are shared with other work: speeds "
               "move with the load (load_average_at_start per fold and row)."),
    )
    _common.write_json(args.out, result)
    mean = {row: results["rows"][row]["mean"] for row in rows}
    header = ["row", "steps", "steps/s", "encode s", "save s", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10"]
    table = [[row, mean[row]["steps"], mean[row]["steps_per_s"], mean[row]["encode_s"], mean[row]["save_s"],
              *(mean[row][m] for m in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"))]
             for row in rows]
    _common.say(_common.format_table(header, table))
    best_row = results["best_row"]
    _common.say(f"lit / preset steps/s (median over folds): {results['steps_per_s_locked_over_unlocked']}; best t2i "
                f"R@5: {best_row} {mean[best_row]['t2i_R@5']}; wrote {args.out}")


def run_all(names: list[str], rows: list[str], args) -> tuple[list[dict], float | None]:
    """Every fold of every row, in a work folder removed after unless --keep: (one dict per fold, the seconds
    the ConSE conversion took or None)."""
    work = Path(tempfile.mkdtemp(prefix="finetune_photos_"))
    conse_s = None
    try:
        conse = None
        if "conse_lit" in rows:
            import photo_search

            _common.say(f"converting {photo_search.CONSE_SPEC}")
            t = time.perf_counter()
            conse = photo_search.convert_conse(work / "conse")
            conse_s = round(time.perf_counter() - t, 1)
        folds = []
        for k in range(args.folds):
            split = work / f"split_fold{k}.json"
            fold = {"fold": k, **coco.write_split(names, k, 5, split)}
            for row in rows:
                fold[row] = run_row(work, k, row, split, conse, args)
            folds.append(fold)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return folds, conse_s


def run_row(work: Path, k: int, row: str, split: Path, conse: Path | None, args) -> dict:
    _common.say(f"fold {k}: {row}, {args.budget:g} s")
    run = work / f"fold{k}_{row}"
    r = run_child(row, split, run, args.budget, conse, work / f"fold{k}_{row}.log")
    # The checkpoint holds the optimiser state (hundreds of MB); --keep keeps the rest of the run.
    shutil.rmtree(run / "checkpoint" if args.keep else run, ignore_errors=True)
    _common.say(f"  {r['steps']} steps, {r['steps_per_s']} steps/s stepping, encode {r['encode_s']} s, "
                f"saves {r['save_s']} s, CPU/wall {r['cpu_per_wall_s']}; t2i R@5 {r['t2i_R@5']:.4f}  "
                f"i2t R@5 {r['i2t_R@5']:.4f}")
    return r


def summary(folds: list[dict], rows: list[str]) -> dict:
    """The results section but the ConSE conversion and wall time: the locked-over-unlocked speed ratio, each
    row's mean t2i R@5, the best row, the targets, chance R@5, each row's mean and per-fold figures."""
    mean = {row: row_mean(folds, row) for row in rows}
    keys = {f"{row}_t2i_r5": mean[row]["t2i_R@5"] if row in rows else None for row in ROWS}
    ratios = [f["lit"]["steps_per_s"] / f["preset"]["steps_per_s"] for f in folds
              if {"lit", "preset"} <= set(rows) and f["lit"]["steps_per_s"] and f["preset"]["steps_per_s"]]
    ratio = round(statistics.median(ratios), 2) if ratios else None
    best_row = max(rows, key=lambda r: mean[r]["t2i_R@5"])
    n_test = statistics.mean(f["test"] for f in folds)
    return {
        "steps_per_s_locked_over_unlocked": ratio,
        "steps_per_s_locked_over_unlocked_per_fold": [round(r, 2) for r in ratios],
        **keys,
        "best_row": best_row, "best_t2i_r5": mean[best_row]["t2i_R@5"],
        "target_ratio_5x_met": None if ratio is None else ratio >= 5,
        "target_best_above_preset_met": None if "preset" not in rows or len(rows) == 1 else best_row != "preset",
        "chance_t2i_R@5": round(5 / n_test, 4),
        "rows": {row: {"mean": mean[row], "folds": [{"fold": f["fold"], **f[row]} for f in folds]} for row in rows},
    }


def run_config(names: list[str], rows: list[str], machine: dict, args) -> dict:
    command = " ".join([".venv/bin/python", "bench/finetune_photos.py", *map(shlex.quote, sys.argv[1:])])
    return {"data": _common.data_name(DATA), "images": len(names), "folds_run": args.folds,
            "fold_rule": "sorted image index % 5 == k is test, the rest train; no validation split",
            "budget_s_per_row_per_fold": args.budget, "rows": rows,
            "row_configs": {row: {"config": str(ROW_SETUP[row][0].relative_to(_common.ROOT)),
                                  "set": ROW_SETUP[row][1] + (["finetune.init=<converted ConSE run>"]
                                                              if row == "conse_lit" else [])} for row in rows},
            "common_set": [*COMMON, f"train.time_budget={args.budget:g}s"],
            "conse": "clipsnail convert --from conse:efficientnet-lite0+all-minilm-l6-v2 (once, all folds)",
            "machine_note": f"{machine.get('cores_usable')} usable CPU cores, torch threads "
                            f"{machine.get('torch_threads')}, shared with other work",
            "command": command}


if __name__ == "__main__":
    main()
