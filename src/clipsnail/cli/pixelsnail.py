"""`clipsnail pixelsnail train|eval|sample`: the autoregressive image model on MNIST, CIFAR or image folders."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipsnail.cli.common import (
    add_runtime_flags,
    add_train_flags,
    flag_values,
    print_metrics,
    rounded,
    say,
    task_config,
    train_and_report,
)
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.safeio import atomic_write_json

# Each handler imports what it runs (torch, the models, the tasks) so that `clipsnail --help` starts at once.


def add_pixelsnail(parser: argparse.ArgumentParser) -> None:
    snail = parser.add_subparsers(dest="pixelsnail_command", required=True)
    p = snail.add_parser("train", help="train PixelSNAIL on MNIST idx, CIFAR batches or an image folder")
    p.add_argument("--data", help="mnist:DIR | cifar:DIR | folder:ROOT (data.data)")
    p.add_argument("--condition", choices=["class"], help="condition on the class label (data.condition)")
    add_train_flags(p, config_help="a preset (small, tiny, h12_noup_smallkey, h8_noup_smallkey, h12_pool2_smallkey; "
                                   "default small) or a YAML config file")
    p.set_defaults(func=cmd_pixelsnail_train)

    p = snail.add_parser("eval", help="negative log-likelihood in bits/dim on a split; prints JSON")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("--data", help="data spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which part of the data to score (default test)")
    p.add_argument("--batch-size", type=int, default=64, help="images scored at once (default 64)")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_pixelsnail_eval)

    p = snail.add_parser("sample", help="draw images and save them as a grid PNG")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("-n", type=int, default=16, help="number of images")
    p.add_argument("--out", required=True, help="grid PNG")
    p.add_argument("--class", dest="class_", help="class index or name (class-conditional runs)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature: below 1 safer, above 1 more varied (default 1)")
    p.add_argument("--method", choices=["cached", "naive"], default="cached",
                   help="cached: every layer computed once per pixel (default); naive: a full forward per pixel")
    p.add_argument("--seed", type=int, default=0, help="the same seed draws the same samples (default 0)")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_pixelsnail_sample)


def preset_or_yaml(config: str | None) -> tuple[dict, str | None]:
    """--config of a PixelSNAIL task: a preset name, or a YAML file over the default preset (small). Returns the
    preset as config defaults (`preset` and its `model` fields, which the YAML file and --set override) and the YAML
    file (None for a preset)."""
    from clipsnail.models.pixelsnail import CONFIGS

    preset, yaml_file = (config, None) if config in CONFIGS else ("small", config or None)
    return {"preset": preset, "model": dict(CONFIGS[preset])}, yaml_file


def pixelsnail_config(args: argparse.Namespace):
    from clipsnail.families.pixelsnail import PixelSNAILTaskConfig

    defaults, yaml_file = preset_or_yaml(args.config)
    values = flag_values(args, (("data", "data.data"), ("condition", "data.condition")))
    return task_config(PixelSNAILTaskConfig, args, values, yaml_file, defaults)


def cmd_pixelsnail_train(args: argparse.Namespace) -> None:
    import torch

    from clipsnail.tasks.pixelsnail import PixelSNAILTask

    task = PixelSNAILTask(pixelsnail_config(args), run_dir=args.out)
    cfg = task.config

    def example_inputs() -> tuple:
        size = cfg.data.image_size
        h = torch.zeros(2, cfg.model.cond_dim) if cfg.model.cond_dim else None
        return torch.zeros(2, cfg.model.channels, size, size), h

    train_and_report(task, args, example_inputs, depth=1)


def cmd_pixelsnail_eval(args: argparse.Namespace) -> None:
    from clipsnail.apps.hub import load
    from clipsnail.data.classes import read_class_data
    from clipsnail.families.pixelsnail import evaluate_bits_per_dim, image_transform

    model = load(args.model, device=args.device)
    cfg = model.config
    data = read_class_data(args.data or cfg.data.data, args.split, cfg.data.val_fraction, cfg.data.test_fraction)
    transform = image_transform(cfg.data.image_size, data.native_size)
    bpd = evaluate_bits_per_dim(model, data, transform, cfg, args.batch_size, progress=not args.no_progress)
    metrics = rounded({"bits_per_dim": bpd, "split": args.split, "num_images": len(data)})
    atomic_write_json(Path(args.model) / f"eval_{args.split}.json", metrics)
    print_metrics(metrics)


def cmd_pixelsnail_sample(args: argparse.Namespace) -> None:
    import torch

    from clipsnail.apps.hub import load
    from clipsnail.inference.sampling import sample, save_sample_grid

    model = load(args.model, device=args.device)
    cfg = model.config
    h = None
    if cfg.model.cond_dim:
        if args.class_ is None:
            raise ClipsnailError(f"{args.model} is class-conditional: give --class (0..{cfg.model.cond_dim - 1} or "
                                 f"one of {', '.join(cfg.class_names[:10])})")
        label = cfg.class_names.index(args.class_) if args.class_ in cfg.class_names else None
        if label is None:
            try:
                label = int(args.class_)
            except ValueError:
                label = -1
        if not 0 <= label < cfg.model.cond_dim:
            raise ClipsnailError(f"--class {args.class_!r}: expected 0..{cfg.model.cond_dim - 1} or one of "
                                 f"{', '.join(cfg.class_names)}")
        h = torch.nn.functional.one_hot(torch.full((args.n,), label), cfg.model.cond_dim).float()
    elif args.class_ is not None:
        raise ClipsnailError(f"{args.model} is unconditional: --class does not apply")
    started = time.monotonic()
    images = sample(model, args.n, cfg.data.image_size, h=h, temperature=args.temperature, seed=args.seed,
                    method=args.method, progress=not args.no_progress)
    seconds = time.monotonic() - started
    title = f"{args.n} samples" + (f", class {args.class_}" if h is not None else "") + f", T={args.temperature}"
    save_sample_grid(images, args.out, title=title)
    say(f"wrote {args.out} ({args.n} images in {seconds:.1f} s, {args.method} sampler)")
