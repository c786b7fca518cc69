"""`clipsnail clip train|eval|summary`: train CLIP on a caption corpus, retrieval recall@k, the model table."""

from __future__ import annotations

import argparse
import dataclasses

from clipsnail.cli.common import (
    add_batch_size_flag,
    add_caption_flags,
    add_runtime_flags,
    add_train_flags,
    add_train_split_flag,
    caption_values,
    print_metrics,
    rounded,
    task_config,
    train_and_report,
)
from clipsnail.core.safeio import atomic_write_json

# Each handler imports what it runs (torch, the models, the tasks) so that `clipsnail --help` starts at once.


def add_clip(parser: argparse.ArgumentParser) -> None:
    clip = parser.add_subparsers(dest="clip_command", required=True)
    p = clip.add_parser("train", help="train CLIP on a caption corpus (runs data-parallel under torchrun)")
    add_caption_flags(p, required=False)
    p.add_argument("--shards", help='stream WebDataset tar shards, e.g. "data/{000000..000099}.tar" (see `data '
                   'shards`); --captions/--images then only serve validation')
    add_train_split_flag(p)
    p.add_argument("--init", metavar="RUN", help="start from this CLIP run's architecture, tokenizer and weights "
                   "(fine-tuning, e.g. a run made by `clipsnail convert`, or hf-hub:ORG/NAME)")
    add_train_flags(p)
    p.set_defaults(func=cmd_clip_train)

    p = clip.add_parser("eval", help="retrieval recall@k on a split (clip_benchmark definitions); prints JSON")
    p.add_argument("--model", required=True, help="a CLIP run directory or model name (conse:..., hf-hub:ORG/NAME)")
    add_caption_flags(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which captioned images to score (default test; the split file or the run's split rule)")
    add_batch_size_flag(p, "images")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_clip_eval)

    p = clip.add_parser("summary", help="print the model summary table (of a run, or of a config)")
    p.add_argument("--model", help="run directory (default: build from --config/--set)")
    p.add_argument("--config", help="a YAML config file of the model to describe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable), e.g. model.head.embed_dim=256")
    p.add_argument("--depth", type=int, default=2, help="levels of nested modules in the table (default 2)")
    p.set_defaults(func=cmd_clip_summary)


def clip_config(args: argparse.Namespace):
    from clipsnail.apps.model_names import resolve_name
    from clipsnail.families.clip import ClipConfig

    values = caption_values(args, (("shards", "data.shards"), ("init", "finetune.init")))
    config = task_config(ClipConfig, args, values, getattr(args, "config", None))
    # Settled here, once: hf-hub:ORG/NAME -> its run (the task reads folders); a new config, not a written-back one.
    finetune = dataclasses.replace(config.finetune, init=resolve_name(config.finetune.init))
    return dataclasses.replace(config, finetune=finetune)


def cmd_clip_train(args: argparse.Namespace) -> None:
    from clipsnail.tasks.clip import ClipTask

    task = ClipTask(clip_config(args), run_dir=args.out)

    def example_inputs() -> tuple:
        example = task.example_batch()
        return example["images"], example["tokens"]

    train_and_report(task, args, example_inputs)


def cmd_clip_summary(args: argparse.Namespace) -> None:
    import torch

    from clipsnail.apps.hub import load
    from clipsnail.core.summary import model_summary
    from clipsnail.models.clip import CLIP

    if args.model:
        model = load(args.model)
        cfg = model.cfg
    else:
        config = clip_config(args)
        cfg = config.model.with_changes(text={"vocab_size": config.model.text.vocab_size or config.data.vocab_size})
        model = CLIP(cfg)
    images = torch.zeros(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.full((2, cfg.text.context_length), cfg.text.eot_id)
    print(model_summary(model, (images, tokens), depth=args.depth))


def cmd_clip_eval(args: argparse.Namespace) -> None:
    from clipsnail.apps.hub import load
    from clipsnail.inference.evaluate import evaluate_caption_split

    model = load(args.model, device=args.device)
    metrics, _ = evaluate_caption_split(model, args.captions, args.images, args.split, args.split_file, args.format,
                                        args.batch_size, progress=not args.no_progress, strict=args.strict,
                                        follow_links=args.follow_links)
    metrics = rounded(metrics)  # the file and the output alike
    atomic_write_json(model.run_dir / f"eval_{args.split}.json", metrics)
    print_metrics(metrics)
