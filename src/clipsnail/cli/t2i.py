"""`clipsnail t2i train` and `clipsnail t2i generate`: text to image, by a feature predictor that retrieves known images
or by a PixelSNAIL conditioned on CLIP's text embedding."""

from __future__ import annotations

import argparse
import math

from clipsnail.cli.common import (
    add_caption_flags,
    add_runtime_flags,
    add_train_flags,
    caption_values,
    print_json,
    say,
    task_config,
    train_and_report,
)
from clipsnail.cli.pixelsnail import preset_or_yaml
from clipsnail.core.errors import ClipsnailError

# Each handler imports what it runs (torch, the models, the tasks) so that `clipsnail --help` starts at once.


def add_t2i(parser: argparse.ArgumentParser) -> None:
    t2i = parser.add_subparsers(dest="t2i_command", required=True)
    p = t2i.add_parser("train", help="train on a caption corpus (e.g. the shapes data)")
    p.add_argument("--kind", choices=["retrieve", "pixelsnail"], default="pixelsnail",
                   help="retrieve: predict the image encoder's feature of the prompt's image and return the nearest "
                        "known images; pixelsnail: PixelSNAIL conditioned on CLIP's text embedding")
    p.add_argument("--encoder", help="kind retrieve: a CLIP run directory or timm:NAME (encoder)")
    p.add_argument("--clip", help="kind pixelsnail: the CLIP run directory whose text tower conditions (clip)")
    add_caption_flags(p, required=False)
    add_train_flags(p, config_help="kind pixelsnail: a preset (small, tiny, ...; default small); or a YAML config "
                                   "file")
    p.set_defaults(func=cmd_t2i_train)
    add_generate(t2i.add_parser("generate", help="images for a prompt from a text-to-image run; writes a grid PNG"))


def add_generate_alias(p: argparse.ArgumentParser) -> None:
    """`clipsnail generate`, the old name of `clipsnail t2i generate`: the same flags, and a note."""
    add_generate(p)
    p.set_defaults(func=cmd_generate_alias)


def cmd_generate_alias(args: argparse.Namespace) -> None:
    say("note: `clipsnail generate` is now `clipsnail t2i generate` (the old name still works)")
    cmd_generate(args)


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="t2i run directory")
    p.add_argument("prompt", help="the text, e.g. 'a red circle above a blue square'")
    p.add_argument("-n", type=int, default=16, help="samples to draw (kind retrieve: nearest images to show)")
    p.add_argument("--rerank", type=int, default=0, help="keep the k samples CLIP scores highest (0: keep all)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none; try 3)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature: below 1 safer, above 1 more varied images (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the same seed draws the same images (default 0)")
    p.add_argument("--out", required=True, help="grid PNG")
    add_runtime_flags(p)
    p.set_defaults(func=cmd_generate)


def t2i_config(args: argparse.Namespace):
    from clipsnail.apps.model_names import resolve_name
    from clipsnail.families.t2i_pixelsnail import TextPixelSNAILConfig
    from clipsnail.families.t2i_retrieve import RetrieveConfig

    # A CLIP named hf-hub:ORG/NAME becomes its cached run: the tasks, and the configs saved with their runs, hold
    # folders.
    if args.kind == "pixelsnail":
        defaults, yaml_file = preset_or_yaml(args.config)
        config = task_config(TextPixelSNAILConfig, args, caption_values(args, (("clip", "clip"),)), yaml_file,
                             defaults)
        config.clip = resolve_name(config.clip)
        return config
    config = task_config(RetrieveConfig, args, caption_values(args, (("encoder", "encoder"),)), args.config)
    config.encoder = resolve_name(config.encoder)
    return config


def cmd_t2i_train(args: argparse.Namespace) -> None:
    from clipsnail.tasks.t2i_pixelsnail import TextPixelSNAILTask
    from clipsnail.tasks.t2i_retrieve import RetrieveTask

    cfg = t2i_config(args)
    if args.kind == "pixelsnail":
        task = TextPixelSNAILTask(cfg, run_dir=args.out)
    else:
        task = RetrieveTask(cfg, run_dir=args.out, progress=not args.no_progress)
    train_and_report(task, args)


def cmd_generate(args: argparse.Namespace) -> None:
    from clipsnail.apps.hub import load
    from clipsnail.core.runs import read_run_config
    from clipsnail.data.images import load_image
    from clipsnail.inference.plots import image_grid, result_labels, save_png
    from clipsnail.inference.sampling import to_pil

    task, _ = read_run_config(args.model)
    if task not in ("t2i_retrieve", "t2i_pixelsnail"):
        raise ClipsnailError(f"{args.model}: not a text-to-image run (its task is {task!r}); train one with "
                             "`clipsnail t2i train`")
    generator = load(args.model, device=args.device)
    if task == "t2i_retrieve":
        matches = generator.generate(args.prompt, k=args.n)
        print_json([{"image": str(p), "distance": round(d, 4)} for p, d in matches])
        grid = image_grid([load_image(p) for p, _ in matches], title=f"nearest known images: {args.prompt}",
                          labels=result_labels(matches), cell=96)
    else:
        images, scores = generator.generate(args.prompt, n=args.n, guidance=args.guidance, rerank=args.rerank,
                                            temperature=args.temperature, seed=args.seed,
                                            progress=not args.no_progress)
        print_json({"prompt": args.prompt, "n": args.n, "kept": len(images), "guidance": args.guidance,
                    "clip_scores": [round(float(s), 4) for s in scores]})
        title = f"{args.prompt} (guidance {args.guidance:g}" + (f", best {args.rerank} of {args.n})" if args.rerank
                                                                else ")")
        grid = image_grid(to_pil(images), title=title, labels=[f"{float(s):.3f}" for s in scores], cell=64,
                          cols=max(1, math.ceil(math.sqrt(len(images)))))
    save_png(grid, args.out)
    say(f"wrote {args.out}")
