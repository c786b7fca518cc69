"""What the `clipsnail` commands share: the training and caption-data flags, how flags become config values, JSON
output, and the end of every `train` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from clipsnail.core.config import find_config, load_config
from clipsnail.core.devices import DEVICE_HELP
from clipsnail.core.display import json_text, print_lines

# The engine (torch) is imported where a command trains, so that `clipsnail --help` starts at once.

# ----------------------------------------------------------------------------------------------- flags


def add_train_flags(p: argparse.ArgumentParser,
                    config_help: str = "a YAML config file, or the name of a packaged one (lit_small, "
                                       "pretrained_small, ...); overridden by the flags below") -> None:
    p.add_argument("--out", required=True, help="run directory (resumes when it holds a checkpoint)")
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.head.embed_dim=256 (repeatable)")
    p.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    p.add_argument("--time-budget", help="stop cleanly after this long, e.g. 10m (train.time_budget)")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    add_runtime_flags(p, device=None)  # None: train.device decides (auto unless a YAML file or --set says)
    requires_extra(p, "train", "training")


def requires_extra(p: argparse.ArgumentParser, extra: str, what: str) -> None:
    """The command of `p` needs the extra `extra` (core.extras): `main` checks it before the command starts, and a
    missing one is the line "`what` needs the `extra` extra: pip install 'clipsnail[extra]'"."""
    p.set_defaults(required_extra=(extra, what))


class RenamedFlag(argparse.Action):
    """The old spelling of a flag (`--model NAME` for an architecture, now `--arch NAME`): it does what the new one
    does, and says so."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        say(f"note: {option_string} {values} is now {self.new} {values} (the old spelling still works)")
        setattr(namespace, self.dest, values)


def add_arch_flag(p: argparse.ArgumentParser, help: str) -> None:
    """--arch NAME, an architecture; --model always names a run, so its old use here is an alias that warns."""
    p.add_argument("--arch", help=help)
    p.add_argument("--model", dest="arch", action=RenamedFlag, new="--arch", metavar="ARCH",
                   help="the old spelling of --arch")


def add_runtime_flags(p: argparse.ArgumentParser, device: str | None = "auto", progress: bool = True) -> None:
    """--device and --no-progress, declared once for every command that runs a model, with one default: auto (CUDA,
    else MPS, else the CPU). device None: the flag only overrides the config's train.device (whose default is auto)."""
    p.add_argument("--device", default=device, help=DEVICE_HELP if device == "auto" else
                   f"{DEVICE_HELP.replace('; the default', '')} (train.device, default auto)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


TRAIN_FLAGS = (("epochs", "train.epochs"), ("time_budget", "train.time_budget"), ("seed", "train.seed"),
               ("device", "train.device"))


def add_caption_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--captions", required=required, help="caption file (Flickr8k CSV/token, Flickr30k, COCO, CSV/TSV)")
    p.add_argument("--images", required=required, help="folder the caption file's image names are relative to")
    p.add_argument("--format", default="auto", help="caption file format (default: detect)")
    p.add_argument("--split-file", help="Karpathy-style split JSON (default: 80/10/10 by image-name hash)")
    p.add_argument("--strict", action="store_true", help="a corrupt image is an error, not a skipped sample")
    add_follow_links_flag(p)


def add_follow_links_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow-links", action="store_true",
                   help="follow symbolic links to images (only links leading to a place inside the image folder; "
                        "default: links are skipped)")


CAPTION_FLAGS = (("captions", "data.captions"), ("images", "data.images"), ("format", "data.format"),
                 ("split_file", "data.split_file"), ("train_split", "data.train_split"))


def add_batch_size_flag(p: argparse.ArgumentParser, what: str) -> None:
    from clipsnail.core.config import ENCODE_BATCH

    p.add_argument("--batch-size", type=int, default=ENCODE_BATCH,
                   help=f"{what} encoded at once (default {ENCODE_BATCH}); the peak memory of encoding grows with it")


def add_train_split_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", dest="train_split", choices=["train", "all"],
                   help="what trains: the train split (default: the split file's, else 80%% of the photos by a hash "
                        "of each name; the rest held out for validation and testing), or all the captioned photos "
                        "(no validation during training)")


# ----------------------------------------------------------------------------------------------- flags -> config


def flag_values(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The flags of `flags` (flag -> config key pairs) given a non-empty value, by config key, typed as parsed."""
    return {key: getattr(args, flag) for flag, key in flags if getattr(args, flag, None)}


def caption_values(args: argparse.Namespace, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """The caption-data flags given (and the `extra` flag -> key pairs), by config key."""
    values = flag_values(args, CAPTION_FLAGS + extra)
    if getattr(args, "strict", False):
        values["data.strict"] = True
    if getattr(args, "follow_links", False):
        values["data.follow_links"] = True
    return values


def task_config(cls: type, args: argparse.Namespace, values: dict[str, Any], yaml_file: str | None = None,
                defaults: dict | None = None) -> Any:
    """A task's config from its command's flags, by one rule for every command: `defaults` (a preset) < the YAML
    file (--config) < the named flags (`values`: data and model flags; the training flags --epochs, --time-budget,
    --seed, --device) < `--set` strings, the most specific and so the last word."""
    training = {key: getattr(args, flag) for flag, key in TRAIN_FLAGS if getattr(args, flag, None) is not None}
    return load_config(cls, find_config(yaml_file), getattr(args, "overrides", []), defaults=defaults,
                       values={**values, **training})


# ----------------------------------------------------------------------------------------------- output


def print_json(obj) -> None:
    print(json_text(obj))  # never NaN or Infinity, which no JSON parser reads; ASCII, names escaped


def rounded(value, digits: int = 4):
    """Metrics as a user reads them: floats to `digits` decimals (0.1209, not float32's 0.12087912112474442)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def print_metrics(metrics) -> None:
    print_json(rounded(metrics))


def say(*lines: str, file=None) -> None:
    """Lines of text for the user (stderr unless `file`), each printed as one line with file names in it escaped
    (display.print_lines)."""
    print_lines(*lines, file=file or sys.stderr)


def train_and_report(task, args: argparse.Namespace, example_inputs: Callable[[], tuple] | None = None,
                     depth: int = 2) -> None:
    """Every `train` command ends the same way: fit (resuming when RUN holds a checkpoint), say how it ended.
    Before the first step, the table of the model the engine built (under torchrun from one process), with the
    output shapes of `example_inputs()` when given; the model is built once, by the engine."""
    from clipsnail.core import distributed as dist
    from clipsnail.core.summary import model_summary
    from clipsnail.train.engine import fit
    from clipsnail.train.placement import move_to

    def print_table(model) -> None:
        inputs = None
        if example_inputs is not None:
            device = next(model.parameters()).device
            inputs = tuple(move_to(x, device) for x in example_inputs())
        print(model_summary(model, inputs, depth=depth), file=sys.stderr)

    result = fit(task, args.out, progress=not args.no_progress, on_model=print_table)
    if not dist.is_main():  # under torchrun one process reports
        return
    state = "finished" if result.completed else "stopped by the time budget (run again to continue)"
    say(f"training {state} at step {result.step}; run directory: {args.out}")
    if result.metrics:
        print_metrics(result.metrics)
