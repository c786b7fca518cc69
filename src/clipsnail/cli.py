"""The `clipsnail` command. Library code logs; this module is the only place that prints."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from clipsnail.errors import ClipsnailError

log = logging.getLogger("clipsnail")


# ----------------------------------------------------------------------------------------------- shared flags


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (resumes when it holds a checkpoint)")
    p.add_argument("--config", help="YAML config file (overridden by the flags below)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.embed_dim=256 (repeatable)")
    p.add_argument("--epochs", type=int, help="training epochs (train.epochs)")
    p.add_argument("--time-budget", help="stop cleanly after this long, e.g. 10m (train.time_budget)")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (train.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_overrides(args) -> list[str]:
    extra = []
    for flag, key in (("epochs", "train.epochs"), ("time_budget", "train.time_budget"), ("seed", "train.seed"),
                      ("device", "train.device")):
        value = getattr(args, flag, None)
        if value is not None:
            extra.append(f"{key}={value}")
    return extra


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
                 ("split_file", "data.split_file"))


def flag_overrides(args, extra: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """The caption-data flags given (and `extra` flag -> key pairs) as `--set` overrides, which --set can override."""
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in CAPTION_FLAGS + extra if getattr(args, flag, None)]
    if getattr(args, "strict", False):
        overrides.append("data.strict=true")
    if getattr(args, "follow_links", False):
        overrides.append("data.follow_links=true")
    return overrides


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def print_summary(summary: Callable[[], str]) -> None:
    """The model table before training; under torchrun from one process only."""
    from clipsnail import distributed as dist

    if dist.is_main():
        print(summary(), file=sys.stderr)


def train_and_report(task, args) -> None:
    """Every `train` command ends the same way: fit (resuming when RUN holds a checkpoint), say how it ended."""
    from clipsnail import distributed as dist
    from clipsnail.engine import fit

    result = fit(task, args.out, progress=not args.no_progress)
    if not dist.is_main():  # under torchrun one process reports
        return
    state = "finished" if result.completed else "stopped by the time budget (run again to continue)"
    print(f"training {state} at step {result.step}; run directory: {args.out}", file=sys.stderr)
    if result.metrics:
        print_json(result.metrics)


# ----------------------------------------------------------------------------------------------- data


def cmd_data_shapes(args) -> None:
    from clipsnail.data.shapes import generate_shapes

    holdout = parse_holdout(args.holdout)
    summary = generate_shapes(args.out, n=args.n, size=args.size, seed=args.seed,
                              captions_per_image=args.captions_per_image, holdout=holdout, max_shapes=args.max_shapes,
                              sizes=args.sizes.split(","), overwrite=args.overwrite)
    print_json(summary)
    print(f"wrote {args.out}/captions.csv, {args.out}/images/, {args.out}/split.json, {args.out}/scenes.json",
          file=sys.stderr)


def cmd_data_shards(args) -> None:
    from clipsnail.data.shards import write_shards

    summary = write_shards(args.captions, args.images, args.out, split=args.split, shard_size=args.shard_size,
                           format=args.format, split_file=args.split_file,
                           seed=None if args.no_shuffle else args.seed, strict=args.strict, prefix=args.prefix,
                           progress=not args.no_progress, follow_links=args.follow_links)
    print_json(summary)
    print(f"wrote {summary['shards']} shards; stream them with the pattern '{summary['pattern']}'", file=sys.stderr)


def parse_holdout(text: str | None) -> list[tuple[str, str]]:
    from clipsnail.data.shapes import COLORS, SHAPES

    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        colour, sep, kind = item.strip().partition(":")
        if not sep or colour not in COLORS or kind not in SHAPES:
            raise ClipsnailError(f"--holdout {item!r}: expected COLOUR:SHAPE with colour in {', '.join(COLORS)} "
                                 f"and shape in {', '.join(SHAPES)}")
        pairs.append((colour, kind))
    return pairs


# ----------------------------------------------------------------------------------------------- clip


def clip_config(args):
    from clipsnail.config import load_config
    from clipsnail.tasks.clip import ClipConfig

    overrides = flag_overrides(args, (("shards", "data.shards"), ("init", "finetune.init")))
    overrides += list(getattr(args, "overrides", []))
    return load_config(ClipConfig, getattr(args, "config", None), overrides + train_overrides(args))


def cmd_clip_train(args) -> None:
    from clipsnail.summary import model_summary
    from clipsnail.tasks.clip import ClipTask

    task = ClipTask(clip_config(args), run_dir=args.out)

    def summary() -> str:
        example = next(iter(_example_batch(task)))
        return model_summary(task.build_model(), (example["images"], example["tokens"]))

    print_summary(summary)
    train_and_report(task, args)


def _example_batch(task):
    from torch.utils.data import IterableDataset

    dataset = task.train_dataset
    if isinstance(dataset, IterableDataset):  # a stream of shards
        dataset.set_epoch(0, batch_size=2)
        readable = iter(dataset)
    else:
        readable = (dataset[(i, i)] for i in range(len(dataset)))
    yield task.collate(list(itertools.islice((s for s in readable if s is not None), 2)))


def cmd_clip_summary(args) -> None:
    import torch

    from clipsnail.summary import model_summary

    if args.model:
        from clipsnail.hub import load

        model = load(args.model)
        cfg = model.cfg
    else:
        from clipsnail.models.clip import CLIP

        cfg = clip_config(args).model
        cfg.vocab_size = cfg.vocab_size or clip_config(args).data.vocab_size
        model = CLIP(cfg)
    images = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    tokens = torch.full((2, cfg.context_length), cfg.eot_id)
    print(model_summary(model, (images, tokens), depth=args.depth))


def cmd_clip_eval(args) -> None:
    from clipsnail.evaluate import evaluate_caption_split
    from clipsnail.hub import load

    model = load(args.model, device=args.device)
    metrics, _ = evaluate_caption_split(model, args.captions, args.images, args.split, args.split_file, args.format,
                                        args.batch_size, progress=not args.no_progress, strict=args.strict,
                                        follow_links=args.follow_links)
    out = Path(args.model) / f"eval_{args.split}.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print_json(metrics)


# ----------------------------------------------------------------------------------------------- classify


def classify_config(args):
    from clipsnail.config import load_config
    from clipsnail.tasks.classify import ClassifyConfig

    overrides = list(args.overrides)
    for flag, key in (("data", "data.data"), ("model", "model.name"), ("pretrained", "model.pretrained")):
        value = getattr(args, flag, None)
        if value:
            overrides.insert(0, f"{key}={value}")
    return load_config(ClassifyConfig, args.config, overrides + train_overrides(args))


def cmd_classify_train(args) -> None:
    import torch

    from clipsnail.summary import model_summary
    from clipsnail.tasks.classify import ClassifyTask

    task = ClassifyTask(classify_config(args), run_dir=args.out)
    cfg = task.config

    def summary() -> str:
        example = torch.zeros(2, cfg.model.in_chans, cfg.data.image_size, cfg.data.image_size)
        return model_summary(task.build_model().eval(), (example,))

    print_summary(summary)
    train_and_report(task, args)


def cmd_classify_eval(args) -> None:
    from clipsnail.data.classes import read_class_data
    from clipsnail.evaluate import classification_report
    from clipsnail.hub import load
    from clipsnail.plots import plot_confusion_matrix, plot_training_curves
    from clipsnail.tasks.classify import predict

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
    metrics.update({"split": args.split, "weights": weights})
    out = run / f"eval_{args.split}"
    out.mkdir(exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "per_class.json").write_text(json.dumps(per_class, indent=2) + "\n")
    (out / "classification_report.txt").write_text(f"{data.source} split {args.split}: {data.split_rule}\n\n"
                                                   f"{report}")
    plot_confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), data.classes, out / "confusion_matrix.png",
                          title=f"{cfg.model.name} on {args.split} (acc1 {metrics['acc1']:.3f})")
    if (run / "metrics.jsonl").is_file():
        plot_training_curves(run / "metrics.jsonl", out / "curves.png")
    print_json(metrics)
    print(f"wrote {out}/: metrics.json, per_class.json, classification_report.txt, confusion_matrix.png, curves.png",
          file=sys.stderr)


# ----------------------------------------------------------------------------------------------- pixelsnail


def pixelsnail_config(args):
    from clipsnail.config import load_config
    from clipsnail.models.pixelsnail import CONFIGS
    from clipsnail.tasks.pixelsnail import PixelSNAILTaskConfig, preset_overrides

    preset, yaml_file = "small", None
    if args.config in CONFIGS:
        preset = args.config
    elif args.config:
        yaml_file = args.config
    overrides = preset_overrides(preset) + list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.data={args.data}")
    if args.condition:
        overrides.insert(0, f"data.condition={args.condition}")
    return load_config(PixelSNAILTaskConfig, yaml_file, overrides + train_overrides(args))


def cmd_pixelsnail_train(args) -> None:
    import torch

    from clipsnail.summary import model_summary
    from clipsnail.tasks.pixelsnail import PixelSNAILTask

    task = PixelSNAILTask(pixelsnail_config(args), run_dir=args.out)
    cfg = task.config

    def summary() -> str:
        size = cfg.data.image_size
        h = torch.zeros(2, cfg.model.cond_dim) if cfg.model.cond_dim else None
        return model_summary(task.build_model().eval(), (torch.zeros(2, cfg.model.channels, size, size), h), depth=1)

    print_summary(summary)
    train_and_report(task, args)


def cmd_pixelsnail_eval(args) -> None:
    from clipsnail.data.classes import read_class_data
    from clipsnail.hub import load
    from clipsnail.tasks.pixelsnail import evaluate_bits_per_dim, image_transform

    model = load(args.model, device=args.device)
    cfg = model.config
    data = read_class_data(args.data or cfg.data.data, args.split, cfg.data.val_fraction, cfg.data.test_fraction)
    transform = image_transform(cfg.data.image_size, data.native_size)
    bpd = evaluate_bits_per_dim(model, data, transform, cfg, args.batch_size, progress=not args.no_progress)
    metrics = {"bits_per_dim": bpd, "split": args.split, "num_images": len(data)}
    (Path(args.model) / f"eval_{args.split}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_json(metrics)


def cmd_pixelsnail_sample(args) -> None:
    import time

    import torch

    from clipsnail.hub import load
    from clipsnail.sampling import sample, save_sample_grid

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
    print(f"wrote {args.out} ({args.n} images in {seconds:.1f} s, {args.method} sampler)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- zero-shot, search


def cmd_zeroshot(args) -> None:
    import torch

    from clipsnail.evaluate import (
        classification_metrics,
        default_templates,
        encode_image_paths,
        read_templates,
        zero_shot_logits,
        zero_shot_weights,
    )
    from clipsnail.hub import load

    model = load(args.model, device=args.device)
    templates = read_templates(args.templates) if args.templates else default_templates()
    if args.folder:
        from clipsnail.data.images import list_image_folder

        paths, labels, classes = list_image_folder(args.folder)
        if args.classes:  # user-given prompt names, in the sorted folder order
            names = [c.strip() for c in args.classes.split(",")]
            if len(names) != len(classes):
                raise ClipsnailError(f"--classes has {len(names)} names but {args.folder} has {len(classes)} "
                                     f"class folders ({', '.join(classes)})")
            classes = names
        image_emb, readable = encode_image_paths(model, paths, progress=not args.no_progress)
        logits = zero_shot_logits(image_emb[readable], zero_shot_weights(model, classes, templates))
        metrics = classification_metrics(logits, torch.tensor(labels)[readable])
        metrics.update({"num_images": int(readable.sum()), "num_classes": len(classes)})
        print_json(metrics)
        return
    if not args.images or not args.classes:
        raise ClipsnailError("zeroshot needs --classes and IMAGE files, or --folder ROOT")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    image_emb, readable = encode_image_paths(model, args.images, progress=False, strict=True)
    probs = zero_shot_logits(image_emb, zero_shot_weights(model, classes, templates)).softmax(dim=1)
    result = []
    for path, p in zip(args.images, probs):
        order = p.argsort(descending=True).tolist()
        result.append({"image": str(path), "label": classes[order[0]],
                       "probs": {classes[j]: round(p[j].item(), 4) for j in order}})
    print_json(result)


def cmd_search(args) -> None:
    from clipsnail.hub import load
    from clipsnail.index import ImageIndex, folder_index

    if args.query is not None and args.image:
        raise ClipsnailError("search needs exactly one of: a text query, or --image FILE (not both)")
    if args.query is None and not args.image:
        raise ClipsnailError("search needs a text query or --image FILE")
    if args.query is not None and not args.query.strip():
        raise ClipsnailError("the text query is empty")
    if args.k < 1:
        raise ClipsnailError(f"-k must be at least 1, got {args.k}")
    if bool(args.images) == bool(args.index):
        raise ClipsnailError("search needs exactly one of: --index INDEX, or --images DIR --model RUN")
    index = None
    if args.index:
        index = ImageIndex.load(args.index)
        model_dir = args.model or index.model_dir
        if model_dir is None:
            raise ClipsnailError(f"{args.index}: the index does not record its model; pass --model RUN")
    elif not args.model:
        raise ClipsnailError("search --images DIR needs --model RUN")
    else:
        model_dir = args.model
    model = load(model_dir, device=args.device)
    if index is not None and model.cfg.embed_dim != index.dim:
        raise ClipsnailError(f"dimension mismatch: {model_dir} makes dim-{model.cfg.embed_dim} embeddings, but "
                             f"{args.index} holds dim-{index.dim} vectors")
    # The query first: a bad query image must fail before minutes of encoding the folder.
    query = model.encode_image([args.image]) if args.image else model.encode_text([args.query])
    if index is None:
        index = folder_index(model, args.images, cache_dir=Path(args.model) / "embeddings",
                             progress=not args.no_progress, follow_links=args.follow_links)
    hits = index.search(query, args.k)[0]
    if args.grid:
        write_result_grid(args.grid, args.query or f"like {Path(args.image).name}", hits)
    print_json([{"path": str(h.path), "score": round(h.score, 4)} for h in hits])


def write_result_grid(path, title: str, hits) -> Path:
    """hits: `clipsnail.index.Hit`s (or (path, score) pairs)."""
    from clipsnail.data.images import load_image
    from clipsnail.plots import image_grid, save_png

    pairs = [(h.path, h.score) if hasattr(h, "path") else tuple(h) for h in hits]
    images = [load_image(p) for p, _ in pairs]
    return save_png(image_grid(images, title=title, labels=[f"{s:.3f}" for _, s in pairs]), path)


def cmd_index_build(args) -> None:
    from clipsnail.hub import load
    from clipsnail.index import DEFAULT_APPROX_THRESHOLD, build_index

    if args.batch_size < 1:
        raise ClipsnailError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load(args.model, device=args.device)
    threshold = args.approx_threshold if args.approx_threshold is not None else DEFAULT_APPROX_THRESHOLD
    index, stats = build_index(model, args.images, args.out, batch_size=args.batch_size,
                               progress=not args.no_progress, approx_threshold=threshold, approx_kind=args.approx,
                               follow_links=args.follow_links)
    print_json({"index": str(index.index_dir), **stats, "faiss": index.meta["faiss"]})


def cmd_index_update(args) -> None:
    from clipsnail.hub import load
    from clipsnail.index import ImageIndex, update_index

    if args.batch_size < 1:
        raise ClipsnailError(f"--batch-size must be at least 1, got {args.batch_size}")
    old = ImageIndex.load(args.index)
    model_dir = args.model or old.model_dir
    if model_dir is None:
        raise ClipsnailError(f"{args.index}: the index does not record its model; pass --model RUN")
    model = load(model_dir, device=args.device)
    index, stats = update_index(model, args.index, batch_size=args.batch_size, progress=not args.no_progress)
    print_json({"index": str(index.index_dir), **stats})


def cmd_serve(args) -> None:
    from clipsnail.serve import run_server

    run_server(index=args.index, generator=args.generator, host=args.host, port=args.port, device=args.device)


# ----------------------------------------------------------------------------------------------- text to image


def t2i_config(args):
    from clipsnail.config import load_config
    from clipsnail.models.pixelsnail import CONFIGS
    from clipsnail.tasks.pixelsnail import preset_overrides
    from clipsnail.tasks.t2i_pixelsnail import TextPixelSNAILConfig
    from clipsnail.tasks.t2i_retrieve import RetrieveConfig

    overrides, yaml_file = [], args.config
    if args.kind == "pixelsnail":
        preset = args.config if args.config in CONFIGS else "small"
        yaml_file = None if args.config in CONFIGS else args.config
        overrides += preset_overrides(preset)
        if args.clip:
            overrides.append(f"clip={args.clip}")
    elif args.encoder:
        overrides.append(f"encoder={args.encoder}")
    overrides += flag_overrides(args)
    config_class = TextPixelSNAILConfig if args.kind == "pixelsnail" else RetrieveConfig
    return load_config(config_class, yaml_file, overrides + list(args.overrides) + train_overrides(args))


def cmd_t2i_train(args) -> None:
    from clipsnail.tasks.t2i_pixelsnail import TextPixelSNAILTask
    from clipsnail.tasks.t2i_retrieve import RetrieveTask

    cfg = t2i_config(args)
    if args.kind == "pixelsnail":
        task = TextPixelSNAILTask(cfg, run_dir=args.out)
    else:
        task = RetrieveTask(cfg, run_dir=args.out, progress=not args.no_progress)
    train_and_report(task, args)


def cmd_generate(args) -> None:
    from clipsnail.hub import load
    from clipsnail.plots import image_grid, save_png
    from clipsnail.runs import read_run_config

    task, _ = read_run_config(args.model)
    if task not in ("t2i_retrieve", "t2i_pixelsnail"):
        raise ClipsnailError(f"{args.model}: not a text-to-image run (its task is {task!r}); train one with "
                             "`clipsnail t2i train`")
    generator = load(args.model, device=args.device)
    if task == "t2i_retrieve":
        from clipsnail.data.images import load_image

        matches = generator.generate(args.prompt, k=args.n)
        print_json([{"image": str(p), "distance": round(d, 4)} for p, d in matches])
        grid = image_grid([load_image(p) for p, _ in matches], title=f"nearest known images: {args.prompt}",
                          labels=[f"{d:.3f}" for _, d in matches], cell=96)
    else:
        from clipsnail.sampling import to_pil

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
    print(f"wrote {args.out}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- export


def cmd_export(args) -> None:
    from clipsnail.export import export_onnx

    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter logs every optimisation pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    print_json(export_onnx(args.model, args.onnx, opset=args.opset))


# ----------------------------------------------------------------------------------------------- convert


def cmd_convert(args) -> None:
    from clipsnail.convert import convert_lemevit, convert_open_clip, read_class_names

    kind, sep, path = args.source.partition(":")
    if not sep or not path:
        raise ClipsnailError(f"--from {args.source!r}: expected open_clip:PATH or lemevit:PATH")
    if kind == "open_clip":
        if args.model or args.class_names or args.num_classes is not None or args.weights != "ema":
            raise ClipsnailError("--model, --num-classes, --class-names and --weights apply to lemevit:PATH only")
        print_json(convert_open_clip(path, args.out, quick_gelu=args.quick_gelu))
    elif kind == "lemevit":
        if not args.model:
            raise ClipsnailError("lemevit:PATH needs --model (lemevit_tiny, lemevit_small or lemevit_base)")
        if args.quick_gelu is not None:
            raise ClipsnailError("--quick-gelu / --no-quick-gelu apply to open_clip:PATH only")
        names = read_class_names(args.class_names) if args.class_names else None
        print_json(convert_lemevit(path, args.out, args.model, num_classes=args.num_classes, weights=args.weights,
                                   class_names=names))
    else:
        raise ClipsnailError(f"--from {args.source!r}: unknown source {kind!r}; choose open_clip:PATH or "
                             "lemevit:PATH")


# ----------------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> None:
    from clipsnail.demo import DEMO_STEPS, run_demo

    run_demo(Path(args.out), steps=args.steps or (30 if args.quick else DEMO_STEPS), quick=args.quick,
             progress=not args.no_progress)


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipsnail",
        description="CLIP from scratch: train on captioned images, search images by text, classify with no labels; "
                    "LeMeViT and any timm model as image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate shapes data, train a small CLIP, evaluate and search (~10 min on a CPU)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--steps", type=int, help="training steps (default 1500: about 10 minutes on 2 CPU cores)")
    p.add_argument("--quick", action="store_true", help="600 images and 30 steps: a smoke test, not a model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="built-in datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("shapes", help="render the captioned shapes dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=5000, help="number of images")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions-per-image", type=int, default=3)
    p.add_argument("--holdout", default="", help="colour:shape combinations kept out of train/val, e.g. "
                                                 "purple:triangle,yellow:star")
    p.add_argument("--max-shapes", type=int, default=3, help="shapes per scene: 1 to this many")
    p.add_argument("--sizes", default="small,large", help="shape sizes to draw (e.g. 'large' for 16x16 images)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_shapes)
    p = data.add_parser("shards", help="write a caption corpus as WebDataset tar shards (open_clip/img2dataset "
                                       "format) for streaming training; prints JSON")
    add_caption_flags(p)
    p.add_argument("--out", required=True, help="folder for the shards, sizes.json and _info.json")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"], help="default: train")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle of the images across shards")
    p.add_argument("--no-shuffle", action="store_true", help="images in sorted name order instead of shuffled")
    p.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-' (default: none)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data_shards)

    clip = sub.add_parser("clip", help="train, evaluate and inspect CLIP models").add_subparsers(
        dest="clip_command", required=True)
    p = clip.add_parser("train", help="train CLIP on a caption corpus (runs data-parallel under torchrun)")
    add_caption_flags(p, required=False)
    p.add_argument("--shards", help='stream WebDataset tar shards, e.g. "data/{000000..000099}.tar" (see `data '
                   'shards`); --captions/--images then only serve validation')
    p.add_argument("--init", metavar="RUN", help="start from this CLIP run's architecture, tokenizer and weights "
                   "(fine-tuning, e.g. a run made by `clipsnail convert`)")
    add_train_flags(p)
    p.set_defaults(func=cmd_clip_train)

    p = clip.add_parser("eval", help="retrieval recall@k on a split (clip_benchmark definitions); prints JSON")
    p.add_argument("--model", required=True, help="run directory")
    add_caption_flags(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_clip_eval)

    p = clip.add_parser("summary", help="print the model summary table (of a run, or of a config)")
    p.add_argument("--model", help="run directory (default: build from --config/--set)")
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--depth", type=int, default=2)
    p.set_defaults(func=cmd_clip_summary)

    classify = sub.add_parser("classify", help="train and evaluate image classifiers (LeMeViT or any timm model)"
                              ).add_subparsers(dest="classify_command", required=True)
    p = classify.add_parser("train", help="train a classifier on an image folder, MNIST idx or CIFAR batches")
    p.add_argument("--data", help="folder:ROOT | mnist:DIR | cifar:DIR | ROOT (data.data)")
    p.add_argument("--model", help="timm model name, e.g. lemevit_tiny, lemevit_tiny_cifar, resnet18 (model.name)")
    p.add_argument("--pretrained", help="'timm' (download timm's weights) or a checkpoint file (model.pretrained)")
    add_train_flags(p)
    p.set_defaults(func=cmd_classify_train)

    p = classify.add_parser("eval", help="accuracy, macro precision/recall/F1 on a split; prints JSON and writes a "
                                         "per-class report, a confusion matrix and the training curves")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("--data", help="data spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--weights", default="auto", choices=["auto", "best", "model"],
                   help="best.safetensors (best validation accuracy) or model.safetensors; auto: best when present")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_classify_eval)

    snail = sub.add_parser("pixelsnail", help="autoregressive image model: train, bits/dim, sample").add_subparsers(
        dest="pixelsnail_command", required=True)
    p = snail.add_parser("train", help="train PixelSNAIL on MNIST idx, CIFAR batches or an image folder")
    p.add_argument("--data", help="mnist:DIR | cifar:DIR | folder:ROOT (data.data)")
    p.add_argument("--condition", choices=["class"], help="condition on the class label (data.condition)")
    add_train_flags(p)
    p.set_defaults(func=cmd_pixelsnail_train)
    for action in p._actions:  # --config also takes a preset name here
        if action.dest == "config":
            action.help = ("a preset (small, tiny, h12_noup_smallkey, h8_noup_smallkey, h12_pool2_smallkey; "
                           "default small) or a YAML config file")

    p = snail.add_parser("eval", help="negative log-likelihood in bits/dim on a split; prints JSON")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("--data", help="data spec (default: the run's training data)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pixelsnail_eval)

    p = snail.add_parser("sample", help="draw images and save them as a grid PNG")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("-n", type=int, default=16, help="number of images")
    p.add_argument("--out", required=True, help="grid PNG")
    p.add_argument("--class", dest="class_", help="class index or name (class-conditional runs)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--method", choices=["cached", "naive"], default="cached",
                   help="cached: every layer computed once per pixel (default); naive: a full forward per pixel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pixelsnail_sample)

    t2i = sub.add_parser("t2i", help="text to image: train a feature predictor or a text-conditioned PixelSNAIL"
                         ).add_subparsers(dest="t2i_command", required=True)
    p = t2i.add_parser("train", help="train on a caption corpus (e.g. the shapes data)")
    p.add_argument("--kind", choices=["retrieve", "pixelsnail"], default="pixelsnail",
                   help="retrieve: predict the image encoder's feature of the prompt's image and return the nearest "
                        "known images (seed 004); pixelsnail: PixelSNAIL conditioned on CLIP's text embedding")
    p.add_argument("--encoder", help="kind retrieve: a CLIP run directory or timm:NAME (encoder)")
    p.add_argument("--clip", help="kind pixelsnail: the CLIP run directory whose text tower conditions (clip)")
    add_caption_flags(p, required=False)
    add_train_flags(p)
    p.set_defaults(func=cmd_t2i_train)
    for action in p._actions:  # --config also takes a PixelSNAIL preset name here
        if action.dest == "config":
            action.help = "kind pixelsnail: a preset (small, tiny, ...; default small); or a YAML config file"

    p = sub.add_parser("generate", help="images for a prompt from a text-to-image run; writes a grid PNG")
    p.add_argument("--model", required=True, help="t2i run directory")
    p.add_argument("prompt", help="the text, e.g. 'a red circle above a blue square'")
    p.add_argument("-n", type=int, default=16, help="samples to draw (kind retrieve: nearest images to show)")
    p.add_argument("--rerank", type=int, default=0, help="keep the k samples CLIP scores highest (0: keep all)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none; try 3)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="grid PNG")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("zeroshot", help="zero-shot classification with prompt ensembles")
    p.add_argument("--model", required=True)
    p.add_argument("--classes", help="comma-separated class names")
    p.add_argument("--templates", help="file with one prompt template per line ('{}' = class name)")
    p.add_argument("--folder", help="image folder with one subfolder per class: prints acc1/acc5/mean_per_class_recall")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_zeroshot)

    index = sub.add_parser("index", help="a saved, searchable index of an image folder (faiss)").add_subparsers(
        dest="index_command", required=True)
    p = index.add_parser("build", help="encode every image under a folder (recursively) into an index; prints JSON")
    p.add_argument("--model", required=True, help="CLIP run directory")
    p.add_argument("--images", required=True, help="image folder (searched recursively)")
    p.add_argument("--out", required=True, help="index directory (replaced atomically when it exists)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--approx-threshold", type=int,
                   help="from this many images on, use an approximate faiss index (default 20000)")
    p.add_argument("--approx", default="ivf", choices=["ivf", "hnsw"], help="approximate index kind (default ivf)")
    add_follow_links_flag(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_index_build)
    p = index.add_parser("update", help="add new/changed images, drop deleted ones (the rest is not re-encoded)")
    p.add_argument("--index", required=True, help="index directory made by `clipsnail index build`")
    p.add_argument("--model", help="CLIP run directory (default: the one recorded in the index)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_index_update)

    p = sub.add_parser("search", help="search an index or an image folder by text (or by an image); prints JSON")
    p.add_argument("--index", help="an index made by `clipsnail index build`")
    p.add_argument("--model", help="CLIP run directory (with --index: default the one recorded in the index)")
    p.add_argument("--images", help="folder to search instead of an index (embeddings cached in the run directory)")
    add_follow_links_flag(p)
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="query image (image-to-image search)")
    p.add_argument("-k", type=int, default=9, help="number of results (default 9)")
    p.add_argument("--grid", help="write a result grid PNG here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export a CLIP run's image and text encoders to ONNX (runs on onnxruntime "
                                      "without PyTorch); prints JSON")
    p.add_argument("--model", required=True, help="CLIP run directory")
    p.add_argument("--onnx", required=True, metavar="DIR", help="output folder: image_encoder.onnx, "
                   "text_encoder.onnx, tokenizer.json, preprocess.json (replaced atomically when it exists)")
    p.add_argument("--opset", type=int, help="ai.onnx opset version (default: the exporter's; below 18 the "
                   "TorchScript exporter is used)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="the web app: text and image search over an index, zero-shot labels, generation")
    p.add_argument("--index", required=True, help="an index made by `clipsnail index build`")
    p.add_argument("--generator", help="a text-to-image run (t2i train --kind pixelsnail) for the prompt box")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="pretrained OpenAI/open_clip CLIP (ViT) or official LeMeViT weights -> a run "
                                       "directory; prints JSON")
    p.add_argument("--from", dest="source", required=True, metavar="KIND:PATH",
                   help="open_clip:FILE (.safetensors, or a .bin/.pt state dict) or lemevit:FILE (.pth)")
    p.add_argument("--out", required=True, help="run directory to create (must not exist, or be empty)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="open_clip: the weights use QuickGELU (OpenAI's models); default: open_clip_config.json "
                        "next to the file, else no")
    p.add_argument("--model", help="lemevit: the architecture (lemevit_tiny, lemevit_small, lemevit_base)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="lemevit: the EMA weights (state_dict_ema, default; the official evaluation's) or the raw ones")
    p.add_argument("--num-classes", type=int, help="lemevit: expected classes (default: the checkpoint's head)")
    p.add_argument("--class-names", help="lemevit: file with one class name per line (default class_0, class_1, ...)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    from clipsnail import distributed as dist

    owns_group = False
    try:
        # Under torchrun every process runs this command; joining the group before the task is built lets rank 0
        # train the tokenizer once and share it.
        owns_group = dist.init_from_env()
        args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
    except ClipsnailError as e:
        print(f"clipsnail: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training says where it stopped and how to resume (errors.Interrupted)
        print(f"clipsnail: {e}" if str(e) else "clipsnail: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        import os
        import select

        # The reader of stdout went away (`clipsnail search ... | head`): stop quietly, as `cat` does. Another
        # pipe (a worker's, a socket) breaking is a real error; a closed stdout polls as POLLERR.
        try:
            closed = True
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(sys.stdout.fileno(), select.POLLOUT)
                closed = any(events & select.POLLERR for _, events in poller.poll(0))
        except (AttributeError, ValueError, OSError):  # stdout replaced by an object without a file
            closed = False
        if not closed:
            raise
        # Python's recipe: point stdout at devnull, so that the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a program that SIGPIPE ended
    finally:
        if owns_group:
            dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
