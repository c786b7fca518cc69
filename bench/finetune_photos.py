#!/usr/bin/env python
"""Benchmark: fine-tuning CLIP on real captioned photos as a user does, each recipe inside the same time budget.

Data: flickr8k_dev (3,000 Flickr8k photos, 5 captions each, a Karpathy-style split.json: 2,400 train / 300 val /
300 test). Every row trains on the 2,400 train photos (12,000 captions) and is scored on the 300-photo test gallery
(1,500 captions), and on CIFAR-10 zero-shot (the last 100 files of each class of cifar10_test, CLIP's prompt
ensemble): what fine-tuning on captions costs the model of things it knew.

Rows (each `clipsnail clip train --config NAME [--init CONSE] --time-budget B` through the Python API, in its own
child process; the budget counts from before the locked tower's one-time encoding of the training photos):
- conse:      the ConSE CLIP as converted (`clipsnail convert --from conse:efficientnet-lite0+all-minilm-l6-v2`),
              untrained: the starting point;
- conse_ft:   that run fine-tuned with the packaged conse_finetune.yaml (image body locked and encoded once; the
              ConSE classifier, label embeddings, MiniLM and the text projection train);
- lit_siglip: the packaged lit_small.yaml with loss.kind=siglip: LiT (Zhai et al., CVPR 2022), a locked
              EfficientNet-Lite0 and MiniLM with new projection heads, the sigmoid loss of SigLIP (Zhai et al., ICCV
              2023);
- conse_lit:  the packaged conse_lit.yaml from the converted run: the ConSE pair and a new LiT pair of projections
              over the same towers, scored as one model by a learned mix of the two cosines, trained together.
Speed rows (left out by `--no-speed`; a shorter budget, `--speed-budget`, and no scoring): preset
(pretrained_small.yaml: both towers train, augmentation on) and lit (lit_small.yaml):
`steps_per_s_locked_over_unlocked`, stepping alone (1 / the median time between consecutive steps).

Per row: steps done, the budget plan's log lines (seconds encoding, steps that fit), text->image and image->text
R@1/5/10 (the function behind `clipsnail clip eval --split test`), CIFAR-10 zero-shot accuracy, peak resident memory
(VmHWM) of the training process. Then `clipsnail clip eval` of the best row's run in a process of its own:
`eval_peak_rss_mib`.

    CLIPSNAIL_BENCH_DATA=DATA .venv/bin/python bench/finetune_photos.py                # 3 x 10 min + speed, ~45 min
    CLIPSNAIL_BENCH_DATA=DATA .venv/bin/python bench/finetune_photos.py --rows conse_lit --budget 120 --no-speed \\
        --out runs/x.json                                                               # checks it works
"""

from __future__ import annotations

import argparse
import csv
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

import _common

DATA = _common.BENCH_DATA / "flickr8k_dev"
CIFAR = _common.BENCH_DATA / "cifar10_test"
CIFAR_PER_CLASS = 100  # the last files of each class, by name
CONFIGS = _common.ROOT / "src" / "clipsnail" / "configs"
ROWS = ("conse", "conse_ft", "lit_siglip", "conse_lit")
SPEED_ROWS = ("preset", "lit")
# (packaged config, --set strings, starts from the converted ConSE run)
ROW_SETUP = {
    "conse_ft": (CONFIGS / "conse_finetune.yaml", [], True),
    "lit_siglip": (CONFIGS / "lit_small.yaml", ["loss.kind=siglip"], False),
    "conse_lit": (CONFIGS / "conse_lit.yaml", [], True),
    "preset": (CONFIGS / "pretrained_small.yaml", [], False),
    "lit": (CONFIGS / "lit_small.yaml", [], False),
}
# No evaluation during training (the benchmark scores the saved run), no step checkpoints, every step logged.
COMMON = ["train.seed=0", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=1000000",
          "train.device=cpu"]
METRICS = {f"{way}_R@{k}": f"{name}_recall@{k}" for way, name in (("t2i", "image_retrieval"),
                                                                   ("i2t", "text_retrieval")) for k in (1, 5, 10)}
CHILD_TAG = "FINETUNE_PHOTOS "


# ----------------------------------------------------------------------------------------------- child process


def child(row: str, run: Path, budget: float, conse: Path, score: bool) -> dict:
    """Train one row through the engine (or take the converted run, row "conse"), then score the saved run."""
    _common.use_source_tree()
    from clipsnail.core.config import load_config
    from clipsnail.families.clip import ClipConfig
    from clipsnail.tasks.clip import ClipTask
    from clipsnail.train import engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out: dict = {}
    if row != "conse":
        path, sets, from_conse = ROW_SETUP[row]
        values = {"data.captions": str(DATA / "captions.csv"), "data.images": str(DATA / "images"),
                  "data.split_file": str(DATA / "split.json"), "finetune.init": str(conse) if from_conse else ""}
        config = load_config(ClipConfig, path, [*COMMON, f"train.time_budget={budget:g}s", *sets], values=values)
        task = ClipTask(config, run_dir=run)
        step_times: list[float] = []
        plan = PlanLines()
        logging.getLogger("clipsnail").addHandler(plan)
        t = time.perf_counter()
        result = engine.fit(task, run, progress=False, on_step=lambda step: step_times.append(time.monotonic()))
        intervals = [b - a for a, b in zip(step_times, step_times[1:])]
        out.update(steps=result.step, completed=result.completed, fit_s=round(time.perf_counter() - t, 1),
                   steps_per_s=round(1 / statistics.median(intervals), 4) if intervals else None,
                   peak_rss_mib_train=_common.proc_status_mib("VmHWM"), plan=plan.lines, **logged_figures(run))
    if score:
        out.update(scores(run if row != "conse" else conse))
    out["peak_rss_mib"] = _common.proc_status_mib("VmHWM")
    return out


class PlanLines(logging.Handler):
    """The engine's log lines of the time budget's plan (what was prepared in how long, the steps that fit)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(("time budget", "prepared in")):
            self.lines.append(message)


def logged_figures(run: Path) -> dict:
    """What the run's metrics.jsonl says of its first and last steps."""
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "loss" in ln]
    out = {}
    if steps:
        out.update(first_loss=round(steps[0]["loss"], 4), final_loss=round(statistics.mean(
            ln["loss"] for ln in steps[-20:]), 4), final_logit_scale=round(steps[-1]["logit_scale"], 3))
        for key in ("first_share", "logit_bias"):
            if key in steps[-1]:
                out[f"final_{key}"] = round(steps[-1][key], 4)
    return out


def scores(run: Path) -> dict:
    """Test-gallery retrieval (as `clip eval --split test`) and CIFAR-10 zero-shot accuracy of a saved run."""
    import torch

    import clipsnail
    from clipsnail.inference.evaluate import (
        classification_metrics,
        default_templates,
        encode_image_paths,
        evaluate_caption_split,
        zero_shot_logits,
        zero_shot_weights,
    )

    model = clipsnail.load(run, device="cpu")
    t = time.perf_counter()
    metrics, _ = evaluate_caption_split(model, DATA / "captions.csv", DATA / "images", "test", DATA / "split.json",
                                        progress=False)
    out = {k: round(metrics[v], 4) for k, v in METRICS.items()}
    out.update(num_images=metrics["num_images"], num_captions=metrics["num_captions"],
               eval_s=round(time.perf_counter() - t, 1))
    classes, paths, labels = _common.last_files_per_class(CIFAR, CIFAR_PER_CLASS)
    with torch.no_grad():
        images, readable = encode_image_paths(model, paths, progress=False)
        weights = zero_shot_weights(model, classes, default_templates())
    assert readable.all()
    zeroshot = classification_metrics(zero_shot_logits(images, weights), torch.tensor(labels))
    out.update(cifar_zeroshot=round(zeroshot["acc1"], 4), cifar_images=len(paths))
    return out


def eval_memory_child(run: Path) -> None:
    """`clipsnail clip eval --model RUN --split test` in this fresh process, then its peak resident memory."""
    _common.use_source_tree()
    from clipsnail.cli import main

    status = main(["clip", "eval", "--model", str(run), "--captions", str(DATA / "captions.csv"), "--images",
                   str(DATA / "images"), "--split-file", str(DATA / "split.json"), "--split", "test",
                   "--no-progress"])
    _common.print_mem({"status": status, "peak_rss_mib": _common.proc_status_mib("VmHWM")})


def run_child(row: str, run: Path, budget: float, conse: Path, score: bool, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, str(run), "--budget", str(budget),
           "--conse", str(conse)] + ([] if score else ["--no-score"])
    load = [round(x, 2) for x in os.getloadavg()]
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=_common.ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode or not lines:
        raise SystemExit(f"{row} failed (exit {proc.returncode}); log: {log}\n" + log.read_text()[-3000:])
    return {**json.loads(lines[-1][len(CHILD_TAG):]), "load_average_at_start": load}


# ----------------------------------------------------------------------------------------------- parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=600, help="seconds per row, encoding included (--time-budget)")
    p.add_argument("--speed-budget", type=float, default=150, help="seconds per speed row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="leave out the speed rows")
    p.add_argument("--out", default=str(_common.RESULTS / "finetune_photos.json"))
    p.add_argument("--keep", help="keep the runs and logs in this folder instead of a temporary one")
    p.add_argument("--child", nargs=2, metavar=("ROW", "RUN"), help=argparse.SUPPRESS)
    p.add_argument("--eval-memory-child", metavar="RUN", help=argparse.SUPPRESS)
    p.add_argument("--conse", help=argparse.SUPPRESS)
    p.add_argument("--no-score", dest="score", action="store_false", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.eval_memory_child:
        eval_memory_child(Path(args.eval_memory_child))
        return
    if args.child:
        row, run = args.child
        print(CHILD_TAG + json.dumps(child(row, Path(run), args.budget, Path(args.conse), args.score)), flush=True)
        return
    rows = [s.strip() for s in args.rows.split(",") if s.strip()]
    if not rows or any(r not in ROWS for r in rows):
        raise SystemExit(f"--rows: choose from {', '.join(ROWS)}")
    for need in (DATA / "captions.csv", DATA / "split.json", CIFAR):
        if not need.exists():
            _common.say(f"skipped: {need} not found (set CLIPSNAIL_BENCH_DATA)")
            return
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="finetune_photos_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        results = run_all(work, rows, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _common.write_json(args.out, _common.envelope(
        benchmark="finetune_photos", machine=machine, git_commit=commit, date=started,
        config=run_config(rows, args), results=results,
        notes=("Each row is one `clip train` with --time-budget (train.budget_schedule fit: the cosine schedule "
               "spans the steps that fit, the locked tower's one-time encoding of the 2,400 training photos "
               "included in the budget), on the packaged config as a user runs it; a row whose configured epochs "
               "end first stops early (steps, fit_s). Scores are on the 300-photo test gallery of flickr8k_dev "
               "(1,500 captions; chance text->image R@5 = 5/300) and CIFAR-10 zero-shot on the last 100 files of "
               "each class, CLIP's prompt ensemble. peak_rss_mib_<row> is the training process's VmHWM (training, "
               "then scoring); eval_peak_rss_mib that of a fresh `clipsnail clip eval` of the best row's run "
               "(default --batch-size). One run and one seed per row: "
               "no seed-to-seed spread is measured here.")))
    print_table(results, rows)
    _common.say(f"wrote {args.out}")


def run_all(work: Path, rows: list[str], args) -> dict:
    conse = work / "conse"
    if not (conse / "model.safetensors").is_file():
        _common.say(f"converting {_common.CONSE_SPEC}")
        _common.convert_conse(conse)
    figures = {}
    for row in rows:
        _common.say(f"{row}: {'as converted' if row == 'conse' else f'{args.budget:g} s'}")
        figures[row] = run_child(row, work / row, args.budget, conse, True, work / f"{row}.log")
        r = figures[row]
        _common.say(f"  t2i R@5 {r['t2i_R@5']:.4f}, CIFAR-10 zero-shot {r['cifar_zeroshot']:.4f}, "
                    f"{r.get('steps', 0)} steps, peak {r['peak_rss_mib']:.0f} MiB")
    speed = {}
    for row in SPEED_ROWS if args.speed else ():
        _common.say(f"speed {row}: {args.speed_budget:g} s")
        speed[row] = run_child(row, work / f"speed_{row}", args.speed_budget, conse, False, work / f"speed_{row}.log")
    trained = [r for r in rows if r != "conse"] or rows
    best = max(trained, key=lambda r: figures[r]["t2i_R@5"])
    _common.say(f"clip eval of {best}: peak memory")
    memory = _common.run_mem_child([sys.executable, str(Path(__file__).resolve()), "--eval-memory-child",
                                    str(conse if best == "conse" else work / best)])
    results = {f"{key}_{row}": figures[row][name] for row in rows
               for key, name in (("dev_t2i_r5", "t2i_R@5"), ("dev_t2i_r1", "t2i_R@1"), ("dev_t2i_r10", "t2i_R@10"),
                                 ("dev_i2t_r1", "i2t_R@1"), ("dev_i2t_r5", "i2t_R@5"), ("dev_i2t_r10", "i2t_R@10"),
                                 ("cifar_zeroshot", "cifar_zeroshot"), ("peak_rss_mib", "peak_rss_mib"))}
    base = figures["conse"]["cifar_zeroshot"] if "conse" in figures else None
    results.update(best_row=best, best_dev_t2i_r5=figures[best]["t2i_R@5"],
                   best_cifar_zeroshot_drop=None if base is None else round(base - figures[best]["cifar_zeroshot"], 4),
                   eval_peak_rss_mib=memory.get("peak_rss_mib"), eval_memory=memory)
    if speed:
        ratio = speed["lit"]["steps_per_s"] / speed["preset"]["steps_per_s"]
        results["steps_per_s_locked_over_unlocked"] = round(ratio, 2)
    results["targets"] = {"best_dev_t2i_r5_at_least_0.6": results["best_dev_t2i_r5"] >= 0.6,
                          "best_cifar_zeroshot_drop_at_most_0.01": None if base is None
                          else results["best_cifar_zeroshot_drop"] <= 0.01,
                          "eval_peak_rss_mib_at_most_2048": (results["eval_peak_rss_mib"] or 1e9) <= 2048}
    if speed:
        results["targets"]["steps_per_s_locked_over_unlocked_at_least_5"] = results[
            "steps_per_s_locked_over_unlocked"] >= 5
    results["rows"] = figures
    results["speed_rows"] = speed
    return results


def print_table(results: dict, rows: list[str]) -> None:
    header = ["row", "steps", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "CIFAR-10 zs", "peak MiB"]
    table = [[row, r.get("steps", 0), *(r[m] for m in METRICS), r["cifar_zeroshot"], r["peak_rss_mib"]]
             for row, r in ((row, results["rows"][row]) for row in rows)]
    _common.say(_common.format_table(header, table))
    _common.say(f"best {results['best_row']}: t2i R@5 {results['best_dev_t2i_r5']}, CIFAR-10 zero-shot drop "
                f"{results['best_cifar_zeroshot_drop']}; clip eval peak {results['eval_peak_rss_mib']} MiB; "
                f"locked/unlocked steps/s {results.get('steps_per_s_locked_over_unlocked')}")


def run_config(rows: list[str], args) -> dict:
    with (DATA / "captions.csv").open(newline="") as f:
        captions = sum(1 for _ in csv.DictReader(f))
    return {"data": _common.data_name(DATA), "captions_in_file": captions, "split": "split.json: train / test",
            "cifar": f"{_common.data_name(CIFAR)}, last {CIFAR_PER_CLASS} files per class",
            "budget_s_per_row": args.budget, "speed_budget_s": args.speed_budget if args.speed else None,
            "rows": rows, "row_configs": {row: {"config": str(ROW_SETUP[row][0].relative_to(_common.ROOT)),
                                                "set": ROW_SETUP[row][1], "init": "converted ConSE" if ROW_SETUP[
                                                    row][2] else None} for row in ROW_SETUP},
            "common_set": COMMON, "conse": f"clipsnail convert --from {_common.CONSE_SPEC}",
            "command": " ".join([".venv/bin/python", "bench/finetune_photos.py", *map(shlex.quote, sys.argv[1:])])}


if __name__ == "__main__":
    main()
