"""`clipsnail classify train|eval`: image classifiers (LeMeViT or any timm model) on folders, MNIST or CIFAR."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipsnail.cli.common import (
    add_arch_flag,
    add_runtime_flags,
    add_train_flags,
    flag_values,
    print_metrics,
    requires_extra,
    rounded,
    say,
    task_config,
    train_and_report,
)
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.safeio import atomic_write_json, atomic_write_text

# Each handler imports what it runs (torch, the models, the tasks) so that `clipsnail --help` starts at once.


def add_classify(parser: argparse.ArgumentParser) -> None:
    classify = parser.add_subparsers(dest="classify_command", required=True)
    p = classify.add_parser("train", help="train a classifier on an image folder, MNIST idx or CIFAR batches")
    p.add_argument("--data", help="folder:ROOT | mnist:DIR | cifar:DIR | ROOT (data.data)")
    add_arch_flag(p, "the architecture: a timm model name, e.g. lemevit_tiny, lemevit_tiny_cifar, resnet18 "
                     "(model.name)")
    p.add_argument("--pretrained", help="'timm' (download timm's weights) or a checkpoint file (model.pretrained)")
    add_train_flags(p)
    p.set_defaults(func=cmd_classify_train)

    p = classify.add_parser("eval", help="accuracy, macro precision/recall/F1 on a split; prints JSON and writes a "
                                         "per-class report, a confusion matrix and the training curves")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("--data", help="data spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which part of the data to score (default test)")
    p.add_argument("--weights", default="auto", choices=["auto", "best", "model"],
                   help="best.safetensors (best validation accuracy) or model.safetensors; auto: best when present")
    p.add_argument("--batch-size", type=int, default=256, help="images scored at once (default 256)")
    add_runtime_flags(p)
    requires_extra(p, "train", "classify eval (its report and figures)")
    p.set_defaults(func=cmd_classify_eval)


def classify_config(args: argparse.Namespace):
    from clipsnail.families.classify import ClassifyConfig

    values = flag_values(args, (("data", "data.data"), ("arch", "model.name"), ("pretrained", "model.pretrained")))
    return task_config(ClassifyConfig, args, values, args.config)


def cmd_classify_train(args: argparse.Namespace) -> None:
    import torch

    from clipsnail.tasks.classify import ClassifyTask

    task = ClassifyTask(classify_config(args), run_dir=args.out)
    cfg = task.config
    train_and_report(task, args, lambda: (torch.zeros(2, cfg.model.in_chans, cfg.data.image_size,
                                                      cfg.data.image_size),))


def cmd_classify_eval(args: argparse.Namespace) -> None:
    from clipsnail.apps.hub import load
    from clipsnail.data.classes import read_class_data
    from clipsnail.families.classify import predict
    from clipsnail.inference.evaluate import classification_report
    from clipsnail.inference.plots import plot_confusion_matrix, plot_training_curves

    run = Path(args.model)
    weights = args.weights
    if weights == "auto":
        weights = "best" if (run / "best.safetensors").is_file() else "model"
    model = load(run, device=args.device, weights=weights)
    cfg = model.config
    data = read_class_data(args.data or cfg.data.data, args.split, cfg.data.val_fraction, cfg.data.test_fraction)
    if data.classes != model.class_names:
        raise ClipsnailError(f"{data.source}: classes {data.classes[:6]} do not match the model's "
                             f"{model.class_names[:6]} (same names, same order needed)")
    logits, labels = predict(model, data, model.preprocess, args.batch_size, progress=not args.no_progress)
    metrics, per_class, report = classification_report(logits, labels, data.classes)
    metrics = rounded({**metrics, "split": args.split, "weights": weights})
    out = run / f"eval_{args.split}"
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "per_class.json", per_class)
    atomic_write_text(out / "classification_report.txt", f"{data.source} split {args.split}: {data.split_rule}\n\n"
                                                         f"{report}")
    plot_confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), data.classes, out / "confusion_matrix.png",
                          title=f"{cfg.model.name} on {args.split} (acc1 {metrics['acc1']:.3f})")
    if (run / "metrics.jsonl").is_file():
        plot_training_curves(run / "metrics.jsonl", out / "curves.png")
    print_metrics(metrics)
    say(f"wrote {out}/: metrics.json, per_class.json, classification_report.txt, confusion_matrix.png, curves.png")
