#!/usr/bin/env python
"""Benchmark: text to image on the shapes data, judged by a classifier that never saw a generated image.

Steps (all on this CPU, one command):
  data      single large shapes at 16x16 (`data shapes --max-shapes 1 --sizes large`): 8 colours x 4 kinds, of which
            HOLDOUT (4 colour:kind pairs) never appear in training; 3 captions per image.
  judge     a small CNN with a colour head and a kind head, trained on separate real renders (another seed, every
            pair included), and, as a cross-check, a deterministic analysis: the foreground's mean colour nearest to
            the palette, and the kind whose mean (fill ratio, aspect, vertical mass) over real renders is nearest.
  CLIP      the demo recipe at 16x16 (conv stem, patch 4), trained on the training split.
  retrieve  models.text2feat: a char-level Transformer predicts the CLIP image embedding of the prompt's image; the
            answer is the nearest training image. It cannot show a held-out pair: none is in its bank.
  pixelsnail  PixelSNAIL `small` conditioned on CLIP's text embedding, caption dropout 0.1 to a learned null
            vector, trained for --t2i-minutes.
  generate  for every prompt "a COLOUR KIND" (28 seen pairs, 4 held out), --samples images under SETTINGS:
            plain; guidance 3; rerank (best --samples of 4x as many by CLIP score); guidance 3 + rerank; and
            plain and guidance 3 + rerank at temperature 0.8.
  report    colour / kind / both accuracy by the judge (and by the deterministic analysis), CLIP R-precision
            (the true prompt ranked first among 10: itself and 9 other pair prompts), for seen and held-out
            pairs, next to the same figures for real renders of those prompts; retrieval top-1 accuracy.
Goal (issue): colour accuracy >= 0.9 and kind accuracy >= 0.8 on seen pairs, well above chance (1/8, 1/4) on
held-out ones; guidance + rerank measurably better than plain sampling.

    .venv/bin/python bench/text_to_image.py                      # ~50 min on 2 cores
    .venv/bin/python bench/text_to_image.py --smoke              # ~2 min: tiny everything, checks the plumbing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import _common

_common.use_source_tree()
say = _common.say

HOLDOUT = [("purple", "triangle"), ("yellow", "star"), ("cyan", "circle"), ("orange", "square")]
# name -> (guidance scale, rerank?, temperature). Temperature < 1 is the usual remedy for an autoregressive model
# whose samples drift (one unlikely pixel, and the rest of the image follows it); see `sample_from_discretized_...`.
SETTINGS = {"plain": (1.0, False, 1.0), "guidance": (3.0, False, 1.0), "rerank": (1.0, True, 1.0),
            "guidance+rerank": (3.0, True, 1.0), "plain T0.8": (1.0, False, 0.8),
            "guidance+rerank T0.8": (3.0, True, 0.8)}
RERANK_POOL = 4  # rerank draws this many times the kept samples
# The goals are judged on guided + reranked samples, at temperature 1 (the model's own distribution) and 0.8.
GOAL_SETTINGS = ("guidance+rerank", "guidance+rerank T0.8")
GRID_RIGHT = "guidance+rerank T0.8"


# ----------------------------------------------------------------------------------------------- data


def make_shapes(out: Path, n: int, size: int, seed: int, holdout) -> Path:
    from clipsnail.data.shapes import generate_shapes

    if not (out / "scenes.json").exists():  # kept only with --reuse
        generate_shapes(out, n, size=size, seed=seed, captions_per_image=3, holdout=holdout, max_shapes=1,
                        sizes=["large"], overwrite=True)
    return out


def image_tensors(paths):
    """RGB image files -> (N, 3, S, S) in [-1, 1], the sampler's output range."""
    import numpy as np
    import torch

    from clipsnail.data.images import load_image

    images = np.stack([np.asarray(load_image(p)) for p in paths])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def scene_tensors(folder: Path):
    """Images (N, 3, S, S) in [-1, 1] and their colour / kind indices, from a single-shape folder."""
    import torch

    from clipsnail.data.shapes import COLORS, SHAPES, load_scenes

    scenes = load_scenes(folder)
    names = sorted(scenes)
    x = image_tensors([folder / "images" / n for n in names])
    colours = torch.tensor([list(COLORS).index(scenes[n].shapes[0].color) for n in names])
    kinds = torch.tensor([SHAPES.index(scenes[n].shapes[0].kind) for n in names])
    return x, colours, kinds


# ----------------------------------------------------------------------------------------------- judges


def build_judge():
    from torch import nn

    class Judge(nn.Module):
        """A small CNN: colour (8) and kind (4) heads over a shared trunk."""

        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.colour, self.kind = nn.Linear(64, 8), nn.Linear(64, 4)

        def forward(self, x):
            z = self.trunk(x)
            return self.colour(z), self.kind(z)

    return Judge()


def train_judge(x, colours, kinds, epochs: int, seed: int = 0):
    """-> (judge, accuracy on the held-back 20% of the real renders)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    n_train = int(0.8 * len(x))
    judge = build_judge()
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(n_train)
        for i in range(0, n_train, 128):
            idx = order[i:i + 128]
            c, k = judge(x[idx])
            loss = F.cross_entropy(c, colours[idx]) + F.cross_entropy(k, kinds[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    judge.eval()
    c, k = judge_predict(judge, x[n_train:])
    return judge, {"colour": (c == colours[n_train:]).float().mean().item(),
                   "kind": (k == kinds[n_train:]).float().mean().item(), "images": len(x) - n_train}


def judge_predict(judge, x):
    import torch

    with torch.no_grad():
        c, k = judge(x)
    return c.argmax(1), k.argmax(1)


class Analysis:
    """The deterministic cross-check. Foreground: pixels brighter than a quarter of full scale on any channel.
    Colour: the palette colour nearest to the foreground's mean colour. Kind: nearest class mean (in units of
    each feature's spread) of three shape features measured on real renders: fill ratio of the bounding box,
    its aspect ratio, and where the mass sits vertically (a triangle is bottom-heavy)."""

    def __init__(self, x, kinds):
        import torch

        from clipsnail.data.shapes import COLORS

        self.palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1
        feats, ok = self.features(x)
        feats, kinds = feats[ok], kinds[ok]
        self.mean = torch.stack([feats[kinds == k].mean(0) for k in range(4)])
        self.scale = feats.std(0).clamp(min=1e-6)

    @staticmethod
    def features(x):
        import torch

        fg = (x > -0.5).any(1)  # (N, S, S)
        n, size = x.shape[0], x.shape[-1]
        out, ok = torch.zeros(n, 3), torch.zeros(n, dtype=torch.bool)
        for i in range(n):
            rows, cols = fg[i].nonzero(as_tuple=True)
            if len(rows) < 3:
                continue
            h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
            out[i, 0] = len(rows) / (h * w)
            out[i, 1] = w / h
            out[i, 2] = ((rows.float() - rows.min()).mean() / max(h - 1, 1)).item()
            ok[i] = True
        del size
        return out, ok

    def predict(self, x):
        import torch

        fg = (x > -0.5).any(1, keepdim=True).float()
        mean_colour = (x * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)
        colours = torch.cdist(mean_colour, self.palette).argmin(1)
        feats, ok = self.features(x)
        kinds = torch.cdist(feats / self.scale, self.mean / self.scale).argmin(1)
        return torch.where(ok, colours, -1), torch.where(ok, kinds, -1)


# ----------------------------------------------------------------------------------------------- models


def train_clip(data: Path, run: Path, steps: int) -> None:
    from clipsnail.apps.demo import demo_config
    from clipsnail.tasks.clip import ClipTask
    from clipsnail.train.engine import fit

    if (run / "model.safetensors").exists():  # kept only with --reuse
        return
    cfg = demo_config(data, steps)
    # the demo's CLIP as these results were measured with it: its text tower before the demo's was made smaller
    vision, text = {"image_size": data_size(data), "patch_size": 4}, {"width": 192, "heads": 3, "depth": 4}
    cfg = dataclasses.replace(cfg, model=cfg.model.with_changes(vision=vision, text=text))
    fit(ClipTask(cfg, run_dir=run), run, progress=False)


def data_size(data: Path) -> int:
    import json

    return json.loads((data / "scenes.json").read_text())["size"]


def caption_overrides(data: Path) -> list[str]:
    return [f"data.captions={data / 'captions.csv'}", f"data.images={data / 'images'}",
            f"data.split_file={data / 'split.json'}"]


def train_retrieve(data: Path, clip_run: Path, run: Path, steps: int) -> dict:
    from clipsnail.core.config import load_config
    from clipsnail.families.t2i_retrieve import RetrieveConfig
    from clipsnail.tasks.t2i_retrieve import RetrieveTask
    from clipsnail.train.engine import fit

    cfg = load_config(RetrieveConfig, overrides=caption_overrides(data) + [
        f"encoder={clip_run}", "model.width=128", "model.depth=2", "model.loss=cosine", "model.distance=cosine",
        f"train.max_steps={steps}", "train.log_every=20", "train.eval_every=0"])
    result = fit(RetrieveTask(cfg, run_dir=run, progress=False), run, progress=False)
    return result.metrics


def train_t2i(data: Path, clip_run: Path, run: Path, minutes: float, smoke: bool) -> dict:
    from clipsnail.core.config import load_config
    from clipsnail.families.pixelsnail import preset_overrides
    from clipsnail.families.t2i_pixelsnail import TextPixelSNAILConfig
    from clipsnail.tasks.t2i_pixelsnail import TextPixelSNAILTask
    from clipsnail.train.engine import fit

    cfg = load_config(TextPixelSNAILConfig, overrides=preset_overrides("tiny" if smoke else "small")
                      + caption_overrides(data) + [
        f"clip={clip_run}", f"data.image_size={data_size(data)}", "cond_dropout=0.1", "model.dropout=0.0",
        "train.epochs=1000", f"train.time_budget={minutes}m", "train.log_every=20", "data.max_eval_images=300"])
    started = time.monotonic()
    result = fit(TextPixelSNAILTask(cfg, run_dir=run), run, progress=False)
    return {"steps": result.step, "train_minutes": round((time.monotonic() - started) / 60, 1), **result.metrics}


# ----------------------------------------------------------------------------------------------- evaluation


def r_precision(clip, images, prompt: str, others: list[str]) -> float:
    """Share of images whose CLIP score ranks `prompt` first among [prompt] + others."""
    import torch

    from clipsnail.inference.sampling import to_pil

    with torch.no_grad():
        image_emb = clip.encode_image(to_pil(images)).float()
        text_emb = clip.encode_text([prompt, *others]).float()
    return ((image_emb @ text_emb.T).argmax(1) == 0).float().mean().item()


def score(images, colour: int, kind: int, judge, analysis, clip, prompt, others) -> dict:
    c, k = judge_predict(judge, images)
    ac, ak = analysis.predict(images)
    return {"colour": (c == colour).float().mean().item(), "kind": (k == kind).float().mean().item(),
            "both": ((c == colour) & (k == kind)).float().mean().item(),
            "analysis_colour": (ac == colour).float().mean().item(),
            "analysis_kind": (ak == kind).float().mean().item(),
            "r_precision": r_precision(clip, images, prompt, others)}


def mean_rows(rows: list[dict]) -> dict:
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]} if rows else {}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(_common.ROOT / "runs" / "bench_t2i"))
    p.add_argument("--n", type=int, default=8000, help="shapes images (train/val/test 80/10/10 + held-out pairs)")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--retrieve-steps", type=int, default=600)
    p.add_argument("--t2i-minutes", type=float, default=40, help="training time of the text-conditioned PixelSNAIL "
                   "(BENCHMARKS.md: 40 reaches colour 0.91, 20 only 0.61)")
    p.add_argument("--samples", type=int, default=8, help="images kept per prompt and setting")
    p.add_argument("--judge-images", type=int, default=4000)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing, not the quality")
    p.add_argument("--reuse", action="store_true", help="keep the data and the CLIP run of an earlier run in --work "
                                                        "(the text-to-image models are always trained afresh)")
    p.add_argument("--eval-only", action="store_true", help="train nothing: judge the models of an earlier run "
                                                            "in --work again (e.g. with new sampling settings)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(_common.RESULTS / "text_to_image.json"))
    args = p.parse_args()
    args.reuse = args.reuse or args.eval_only
    if args.smoke:
        args.n, args.clip_steps, args.retrieve_steps, args.t2i_minutes = 600, 30, 20, 0.3
        args.samples, args.judge_images = 2, 400
    return args


def main() -> None:
    args = parse_args()
    import torch

    from clipsnail.apps.hub import load
    from clipsnail.inference.plots import image_grid, save_png
    from clipsnail.inference.sampling import to_pil

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    for stale in [] if args.eval_only else ([] if args.reuse else [work]) + [work / "retrieve", work / "t2i"]:
        if stale.exists():  # never resume an older run's checkpoint
            shutil.rmtree(stale)
    timings = {}
    started = time.monotonic()
    data = make_shapes(work / "shapes", args.n, args.size, 0, HOLDOUT)
    judge_data = make_shapes(work / "judge_shapes", args.judge_images, args.size, 1, [])
    timings["data_s"] = round(time.monotonic() - started, 1)

    started = time.monotonic()
    judge, analysis, judge_acc = train_judges(judge_data, args.smoke)
    timings["judge_s"] = round(time.monotonic() - started, 1)
    say(f"judge on held-back real renders: {judge_acc}")

    started = time.monotonic()
    clip_run = work / "clip"
    train_clip(data, clip_run, args.clip_steps)
    clip = load(clip_run)
    timings["clip_s"] = round(time.monotonic() - started, 1)

    retrieve_metrics, t2i_train = train_generators(data, clip_run, work, args, timings)
    say(f"retrieve: {retrieve_metrics}")
    say(f"text-conditioned PixelSNAIL: {t2i_train}")
    retriever = load(work / "retrieve")
    models = {"t2i": load(work / "t2i"), "retriever": retriever, "judge": judge, "analysis": analysis, "clip": clip}

    started = time.monotonic()
    rows, grid_images, grid_labels = generate_and_score(data, models, args.samples)
    timings["generate_and_judge_s"] = round(time.monotonic() - started, 1)

    results = {group: {name: mean_rows(r) for name, r in by.items()} for group, by in rows.items()}
    grid = Path(args.out).with_name("text_to_image_samples.png")
    save_png(image_grid(to_pil(torch.cat(grid_images)), labels=grid_labels, cols=2 * min(4, args.samples), cell=64,
                        title=f"left: plain samples; right: {GRID_RIGHT}"), grid)
    goals = {setting: goals_for(results, setting) for setting in GOAL_SETTINGS}
    report = _common.envelope(
        benchmark="text_to_image",
        config={"images": args.n, "size": args.size, "holdout": HOLDOUT, "samples_per_prompt": args.samples,
                "rerank_pool": RERANK_POOL, "settings": SETTINGS, "clip_steps": args.clip_steps,
                "retrieve_steps": args.retrieve_steps, "t2i_minutes": args.t2i_minutes},
        judge_on_real_renders=judge_acc, retrieve_training=retrieve_metrics, t2i_training=t2i_train,
        results=results, goals=goals, timings=timings,
        samples_png=str(grid.relative_to(_common.ROOT)) if grid.is_relative_to(_common.ROOT) else str(grid),
        notes=["colour/kind/both: judge CNN accuracy; analysis_*: the deterministic cross-check",
               "r_precision uses the same CLIP that reranks, so it favours the rerank settings",
               "retrieve returns a training image: it cannot show a held-out pair"],
    )
    _common.write_json(args.out, report)
    for group in ("seen", "held_out"):
        say(f"{group} pairs")
        say(_common.format_table(["setting", *results[group]["plain"].keys()],
                                 [[name, *r.values()] for name, r in results[group].items()]))
    for setting, by_goal in goals.items():
        for name, g in by_goal.items():
            say(f"goal {name} ({setting}): {'met' if g['met'] else 'not met'} ({g})")


def train_judges(judge_data: Path, smoke: bool):
    """The judge CNN and the deterministic analysis, fitted on the first 80% of the judge's real renders:
    (judge, analysis, both accuracies on the other 20%)."""
    x, colours, kinds = scene_tensors(judge_data)
    judge, judge_acc = train_judge(x, colours, kinds, epochs=2 if smoke else 15)
    analysis = Analysis(x[: int(0.8 * len(x))], kinds[: int(0.8 * len(x))])
    ac, ak = analysis.predict(x[int(0.8 * len(x)):])
    judge_acc.update({"analysis_colour": (ac == colours[int(0.8 * len(x)):]).float().mean().item(),
                      "analysis_kind": (ak == kinds[int(0.8 * len(x)):]).float().mean().item()})
    return judge, analysis, judge_acc


def train_generators(data: Path, clip_run: Path, work: Path, args, timings: dict) -> tuple[dict, dict]:
    """The retrieval model and the text-conditioned PixelSNAIL, trained (or with --eval-only, what an earlier run
    measured when it trained them): (retrieve metrics, t2i training figures); their times go into `timings`."""
    from clipsnail.core.safeio import atomic_write_text

    training_json = work / "training.json"  # what the training steps measured, for --eval-only
    if args.eval_only:
        trained = json.loads(training_json.read_text())
        timings.update(trained["timings"])
        return trained["retrieve"], trained["t2i"]
    started = time.monotonic()
    retrieve_metrics = train_retrieve(data, clip_run, work / "retrieve", args.retrieve_steps)
    timings["retrieve_s"] = round(time.monotonic() - started, 1)
    t2i_train = train_t2i(data, clip_run, work / "t2i", args.t2i_minutes, args.smoke)
    atomic_write_text(training_json, json.dumps({"retrieve": retrieve_metrics, "t2i": t2i_train,
                                                 "timings": timings}))
    return retrieve_metrics, t2i_train


def generate_and_score(data: Path, models: dict, samples: int) -> tuple[dict, list, list[str]]:
    """Every (colour, kind) prompt under every setting, the real renders of it and the retrieved image, scored:
    (score rows by group and setting, the sample grid's images and labels). R-precision distractors are 9 other
    pair prompts, fixed per prompt."""
    from clipsnail.data.shapes import COLORS, SHAPES

    pairs = [(c, k) for c in COLORS for k in SHAPES]
    prompts = {pair: f"a {pair[0]} {pair[1]}" for pair in pairs}
    real = scene_tensors(data)
    rows = {group: {s: [] for s in [*SETTINGS, "real", "retrieve"]} for group in ("seen", "held_out")}
    grid: tuple[list, list[str]] = ([], [])
    for i, pair in enumerate(pairs):
        others = random.Random(i).sample([prompts[q] for q in pairs if q != pair], 9)
        target = (prompts[pair], list(COLORS).index(pair[0]), SHAPES.index(pair[1]))
        by_setting = rows["held_out" if pair in set(HOLDOUT) else "seen"]
        for name, scores in score_prompt(i, target, others, models, samples, real, grid).items():
            by_setting[name].append(scores)
    return rows, *grid


def score_prompt(i: int, target: tuple[str, int, int], others: list[str], models: dict, samples: int, real,
                 grid: tuple[list, list[str]]) -> dict[str, dict]:
    """One prompt's scores: each setting's samples, its real renders (when the data has any) and the retrieved
    image, by setting name. Every other prompt adds its plain and GRID_RIGHT samples to the grid."""
    prompt, colour, kind = target
    real_x, real_c, real_k = real
    grid_images, grid_labels = grid

    def judged(images):
        return score(images, colour, kind, models["judge"], models["analysis"], models["clip"], prompt, others)

    scores = {}
    for name, (guidance, rerank, temperature) in SETTINGS.items():
        n = samples * (RERANK_POOL if rerank else 1)
        images, _ = models["t2i"].generate(prompt, n=n, guidance=guidance, rerank=samples if rerank else 0,
                                           temperature=temperature, seed=1000 + i)
        scores[name] = judged(images)
        if i % 2 == 0 and name in ("plain", GRID_RIGHT):  # a row: 4 plain, then 4 guided + reranked
            shown = images[:4]
            grid_images.append(shown)
            grid_labels += [prompt[2:] if name == "plain" else "guided+rr"] + [""] * (len(shown) - 1)
    chosen = ((real_c == colour) & (real_k == kind)).nonzero()[:, 0][:samples]
    if len(chosen):
        scores["real"] = judged(real_x[chosen])
    (path, _), = models["retriever"].generate(prompt, k=1)
    scores["retrieve"] = judged(image_tensors([path]))
    return scores


def goals_for(results: dict, setting: str) -> dict:
    """The issue's goals for one setting. "Well above chance" on held-out pairs is read as > 0.5 on both (chance is
    1/8 for colour and 1/4 for kind)."""
    seen, held = results["seen"][setting], results["held_out"][setting]
    return {
        "seen_colour>=0.9": {"value": seen["colour"], "met": seen["colour"] >= 0.9},
        "seen_kind>=0.8": {"value": seen["kind"], "met": seen["kind"] >= 0.8},
        "held_out_above_chance": {"colour": held["colour"], "kind": held["kind"],
                                  "chance": {"colour": 1 / 8, "kind": 1 / 4},
                                  "met": held["colour"] > 0.5 and held["kind"] > 0.5},
        "beats_plain": {"plain_both": results["seen"]["plain"]["both"], "both": seen["both"],
                        "met": seen["both"] > results["seen"]["plain"]["both"]},
    }

if __name__ == "__main__":
    main()
