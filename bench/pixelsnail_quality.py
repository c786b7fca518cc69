#!/usr/bin/env python
"""Benchmark: PixelSNAIL likelihood on real data within a CPU budget, next to a PixelCNN baseline without attention.

For each data set (--datasets, default mnist and cifar) and each model (PixelSNAIL `small`, and the same preset with
`model.attention=false`: gated causal convolutions only, same width, trained the same way):
  train   `clipsnail pixelsnail train` through the Python API: --epochs fixed epochs (default 5 MNIST, 3 CIFAR-10)
          and a --budget wall-clock guard (default 30m, the issue's "within 30 CPU-minutes"), data-dependent init,
          the official Adam betas (0.95, 0.9995), and RECIPE: a short-run version of the official schedule.
  data    the bench data folder (BENCH_DATA, bench/_common.py): MNIST t10k (mnist_test/, the IDX files), first
          9,000 images train, last 1,000 test; CIFAR-10 test set as an image folder (cifar10_test/<class>/), per
          class the first 900 files train and the last 100 test.
  report  test bits/dim of the EMA weights (what is sampled) and of the raw weights, epochs done, wall time, the
          median logged training speed, and a 4x4 sample grid (cached sampler) saved next to the results.
Goals (issue): the small config within 30 CPU-minutes reaches MNIST < 1.2 and CIFAR-10 < 4.5 bits/dim. For scale:
the paper's CIFAR-10 result is 2.85 bits/dim after days of GPU training of a 46M-parameter model.

    .venv/bin/python bench/pixelsnail_quality.py                      # ~2 h on 2 cores: 4 runs of up to 30 min
    .venv/bin/python bench/pixelsnail_quality.py --datasets mnist --epochs-mnist 1 --budget 2m --max-train 512 \\
        --out runs/psq.json --runs runs/psq                           # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _common

_common.use_source_tree()
say = _common.say

DATA = _common.BENCH_DATA
DATASETS = {
    "mnist": {"spec": f"mnist:{DATA / 'mnist_test'}", "split": "t10k: first 9,000 images train, last 1,000 test",
              "goal": 1.2},
    "cifar": {"spec": f"folder:{DATA / 'cifar10_test'}", "split": "per class: first 900 files train, last 100 test",
              "goal": 4.5},
}
MODELS = {"pixelsnail_small": [], "pixelcnn_small_no_attention": ["model.attention=false"]}
# The official recipe (lr 1e-3 decayed by 0.999998 per step, EMA 0.9995, dropout 0.5/0.1) is made for hundreds of
# thousands of steps; in a 30-minute run the lr barely moves and the test bits/dim wanders +-0.05 from one epoch
# to the next. Measured on MNIST after one epoch (bits/dim EMA / raw): official 1.449 / 1.426; lr 2e-3, no dropout,
# EMA 0.999, decay 0.9985: 1.397 / 1.575; same at lr 1e-3: 1.411 / 1.470; and at batch 16 (decay 0.99925): 1.414 /
# 1.426, with more updates for the same time. So: batch 16, no dropout (nothing overfits in 5 epochs), a shorter
# EMA, and the lr annealed to 0 over the fixed epochs (cosine) so the last epoch is not noisy.
RECIPE = ["train.batch_size=16", "model.dropout=0", "train.ema_decay=0.999", "optim.schedule=cosine",
          "optim.warmup_steps=0"]



def recorded_spec(spec: str) -> str:
    """A data spec as the results record it: "mnist:mnist_test", never a path of the machine that ran it."""
    kind, _, path = spec.partition(":")
    return f"{kind}:{_common.data_name(Path(path))}"


def train_one(dataset: str, model: str, epochs: int, args) -> dict:
    from clipsnail.apps.hub import load
    from clipsnail.core.config import load_config
    from clipsnail.families.pixelsnail import PixelSNAILTaskConfig, evaluate_bits_per_dim, preset_overrides
    from clipsnail.inference.sampling import sample, save_sample_grid
    from clipsnail.tasks.pixelsnail import PixelSNAILTask, read_images
    from clipsnail.train.checkpoints import load_state
    from clipsnail.train.data_order import steps_per_epoch
    from clipsnail.train.engine import fit

    spec = DATASETS[dataset]
    overrides = preset_overrides("small") + [
        f"data.data={spec['spec']}", "data.val_fraction=0", "data.test_fraction=0.1", "data.samples_per_epoch=0",
        f"train.epochs={epochs}", f"train.time_budget={args.budget}", "train.log_every=20",
        f"train.seed={args.seed}", *RECIPE, *MODELS[model], *args.set]
    cfg = load_config(PixelSNAILTaskConfig, None, overrides)
    run = Path(args.runs) / f"{dataset}_{model}"
    if run.exists():  # a benchmark starts from scratch: never resume an older run's checkpoint
        shutil.rmtree(run)
    task = PixelSNAILTask(cfg)
    if args.max_train:
        task.train_dataset.data = task.train_data = task.train_data.subset(range(args.max_train))
    say(f"training {model} on {dataset} for {epochs} epochs (budget {args.budget}) -> {run}")
    started = time.monotonic()
    result = fit(task, run, progress=False)
    seconds = time.monotonic() - started
    cfg = task.config  # as the task settled it from the data (channels, image size)
    test = read_images(cfg, "test")
    ema = load(run)
    raw = load(run)
    raw.load_state_dict(load_state(run / "checkpoint" / "state.safetensors")["model"])
    row = {"epochs_done": round(result.step / steps_per_epoch(task), 2), "epochs_asked": epochs,
           "steps": result.step, "completed": result.completed, "train_seconds": round(seconds, 1),
           "median_logged_images_per_s": _common.median_logged_speed(run),
           "params": sum(p.numel() for p in ema.parameters()), "test_images": len(test)}
    for label, m in (("ema", ema), ("raw", raw)):
        row[f"test_bits_per_dim_{label}"] = round(evaluate_bits_per_dim(m, test, task.transform, cfg), 4)
    started = time.monotonic()
    images = sample(ema, 16, cfg.data.image_size, seed=0)
    row["sample_seconds_16"] = round(time.monotonic() - started, 1)
    grid = Path(args.out).with_name(f"pixelsnail_{dataset}_{model}_samples.png")
    save_sample_grid(images, grid, title=f"{model}, {dataset}: {row['test_bits_per_dim_ema']:.3f} bits/dim")
    row["samples_png"] = str(grid.relative_to(_common.ROOT)) if grid.is_relative_to(_common.ROOT) else str(grid)
    say(f"  {dataset} {model}: {row['test_bits_per_dim_ema']} bits/dim (EMA), {row['test_bits_per_dim_raw']} (raw), "
        f"{row['epochs_done']} epochs, {seconds / 60:.1f} min")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist,cifar")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs-mnist", type=int, default=5)
    p.add_argument("--epochs-cifar", type=int, default=3)
    p.add_argument("--budget", default="30m", help="wall-clock guard per run (train.time_budget)")
    p.add_argument("--max-train", type=int, default=0, help="use only this many training images (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(_common.ROOT / "runs" / "bench_pixelsnail"))
    p.add_argument("--out", default=str(_common.RESULTS / "pixelsnail_quality.json"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results, goals = {}, {}
    for dataset in args.datasets.split(","):
        if not Path(DATASETS[dataset]["spec"].split(":", 1)[1]).exists():
            say(f"skipping {dataset}: {DATASETS[dataset]['spec']} not found")
            continue
        epochs = args.epochs_mnist if dataset == "mnist" else args.epochs_cifar
        for model in args.models.split(","):
            results[f"{dataset}/{model}"] = train_one(dataset, model, epochs, args)
        snail = results.get(f"{dataset}/pixelsnail_small")
        if snail:
            goals[f"small_{dataset}<{DATASETS[dataset]['goal']}_bits_per_dim_within_30_cpu_min"] = {
                "bits_per_dim": snail["test_bits_per_dim_ema"], "target": DATASETS[dataset]["goal"],
                "train_minutes": round(snail["train_seconds"] / 60, 1),
                "met": snail["test_bits_per_dim_ema"] < DATASETS[dataset]["goal"] and snail["train_seconds"] <= 1800}
    report = _common.envelope(
        benchmark="pixelsnail_quality",
        data={k: {"spec": recorded_spec(v["spec"]), "split": v["split"]} for k, v in DATASETS.items()},
        results=results, goals=goals,
        paper={"cifar10_bits_per_dim": 2.85, "note": "h12_noup_smallkey, 46M parameters, days on GPUs"},
        config={"recipe": RECIPE},
        notes=["bits/dim on the test split of the EMA weights (evaluated and sampled) and of the raw weights",
               "train_seconds is wall-clock including per-epoch evaluation and the engine's checkpoints"],
    )
    _common.write_json(args.out, report)
    say(_common.format_table(
        ["run", "bits/dim EMA", "bits/dim raw", "epochs", "minutes", "img/s", "params"],
        [[k, r["test_bits_per_dim_ema"], r["test_bits_per_dim_raw"], r["epochs_done"],
          round(r["train_seconds"] / 60, 1), r["median_logged_images_per_s"], r["params"]]
         for k, r in results.items()]))
    for name, g in goals.items():
        say(f"goal {name}: {'met' if g['met'] else 'not met'} ({g})")


if __name__ == "__main__":
    main()
