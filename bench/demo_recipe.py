"""The demo's recipe against variants of it: training time and quality on the demo's shapes, one variant at a time.

    python bench/demo_recipe.py [--variant NAME ...] [--work DIR]

Each variant is the demo's config (`clipsnail.apps.demo.demo_config`) with a number of steps and `--set` overrides. It
trains on the demo's 6000 shapes (rendered once into --work), then measures what the demo prints: semantic
text->image R@5 and R@1 on the test split, and zero-shot colour and kind accuracy, the kind over 50 and over 250
shapes a class (how much the figure moves with the number of shapes). Writes bench/results/demo_recipe.json.
Run nothing else meanwhile: the variants are compared by their wall time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common

_common.use_source_tree()

# name: (steps, --set overrides of the demo's config)
VARIANTS = {
    "text_192x4_steps1500": (1500, ["model.text.width=192", "model.text.heads=3", "model.text.depth=4"]),
    "text_192x4_steps1000_lr2e-3": (1000, ["model.text.width=192", "model.text.heads=3", "model.text.depth=4",
                                           "optim.lr=2e-3"]),
    "both_128x4_steps1500": (1500, ["model.vision.width=128", "model.vision.heads=4", "model.text.width=128",
                                    "model.text.heads=4", "model.text.depth=4"]),
    "text_128x2_steps1000": (1000, []),
    "text_128x2_steps1200 (the demo)": (1200, []),
    "text_128x2_steps1300": (1300, []),
}
ZEROSHOT = (("color", 50), ("kind", 50), ("kind", 250))


def zero_shot(model, work: Path) -> dict:
    from clipsnail.apps.demo import shape_zero_shot_acc1  # what the demo prints, over these shape counts

    return {f"zeroshot_{attribute}_acc1_{per_class}_a_class": round(shape_zero_shot_acc1(model, work, attribute,
                                                                                         per_class), 4)
            for attribute, per_class in ZEROSHOT}


def run_variant(name: str, work: Path) -> dict:
    from clipsnail.apps.demo import demo_config
    from clipsnail.apps.hub import load
    from clipsnail.core.config import load_config, to_dict
    from clipsnail.families.clip import ClipConfig
    from clipsnail.inference.evaluate import evaluate_caption_split
    from clipsnail.tasks.clip import ClipTask
    from clipsnail.train.engine import fit

    steps, overrides = VARIANTS[name]
    data, run = work / "shapes", work / "runs" / name.split()[0]
    shutil.rmtree(run, ignore_errors=True)
    config = load_config(ClipConfig, None, overrides, defaults=to_dict(demo_config(data, steps)))
    start = time.perf_counter()
    fit(ClipTask(config, run_dir=run), run, progress=False)
    train_s = time.perf_counter() - start
    model = load(run)
    metrics, _ = evaluate_caption_split(model, data / "captions.csv", data / "images", "test", data / "split.json",
                                        progress=False)
    return {"variant": name, "steps": steps, "overrides": overrides, "train_s": round(train_s, 1),
            "steps_per_s": round(steps / train_s, 3),
            "semantic_image_retrieval_recall@5": round(metrics["semantic_image_retrieval_recall@5"], 4),
            "semantic_image_retrieval_recall@1": round(metrics["semantic_image_retrieval_recall@1"], 4),
            **zero_shot(model, work)}


def main() -> None:
    from clipsnail.apps.demo import HOLDOUT
    from clipsnail.data.shapes import generate_shapes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: every variant")
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", default=str(_common.RESULTS / "demo_recipe.json"))
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="clipsnail_demo_recipe_"))
    if not (work / "shapes" / "captions.csv").exists():
        generate_shapes(work / "shapes", n=6000, size=32, seed=0, captions_per_image=3, holdout=HOLDOUT)
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    rows = []
    for name in args.variant or list(VARIANTS):
        rows.append(run_variant(name, work))
        _common.say(str(rows[-1]))
    notes = ("One run per variant, one after another, on the demo's data (6000 shapes at 32 px, purple triangles "
             "held out). train_s: the whole fit (training, the end-of-run evaluation, the curves). The demo itself "
             "evaluates zero-shot accuracy over 200 shapes a class.")
    _common.write_json(args.out, _common.envelope(benchmark="demo_recipe", config={"variants": VARIANTS},
                                                  results=rows, notes=notes, machine=machine, git_commit=commit,
                                                  date=started))


if __name__ == "__main__":
    main()
