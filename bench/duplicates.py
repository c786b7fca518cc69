"""Near-copy detection: which perceptual-hash distance separates altered copies of a photo from other photos.

    CLIPSNAIL_BENCH_DATA=DIR python bench/duplicates.py [--model conse:efficientnet-lite0+all-minilm-l6-v2]

Each COCO-mini photo (BENCH_DATA/coco_val_mini/images, 159 photos) is indexed with three altered copies: recompressed
(JPEG quality 50), resized to half its size, and cropped by 5% (2.5% off each side). A pair of indexed images is a
near copy when both come from one photo. Every pair is scored against that truth by the Hamming distance of the
perceptual hashes the catalogue keeps: pair precision and recall at `clipsnail.inference.duplicates.DEFAULT_MAX_BITS`
and over a sweep. The same is measured for the cosine similarity of the model's embeddings (the packaged zero-shot
photo model by default, what `demo --photos` searches with), which is why duplicates are not judged by it.
`index duplicates`' groups are checked too: each should hold the copies of one photo. Writes
bench/results/duplicates.json. Target: pair precision and recall both at least 0.95 at the default.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _common
import numpy as np
from PIL import Image

_common.use_source_tree()

COCO = _common.BENCH_DATA / "coco_val_mini" / "images"
ALTERATIONS = ("recompressed", "half_size", "cropped_5pct")
COSINES = [round(float(t), 3) for t in np.arange(0.80, 1.0001, 0.005)]
BITS = list(range(0, 21))


def altered(image: Image.Image, kind: str) -> Image.Image:
    if kind == "half_size":
        return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.BICUBIC)
    if kind == "cropped_5pct":
        dx, dy = round(image.width * 0.025), round(image.height * 0.025)
        return image.crop((dx, dy, image.width - dx, image.height - dy))
    return image


def write_photos(out: Path) -> list[str]:
    """The originals and their copies under `out`; returns each file's source photo, in the index's path order."""
    sources = sorted(COCO.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no photos in {COCO}: set CLIPSNAIL_BENCH_DATA to the folder holding coco_val_mini/")
    for path in sources:
        image = Image.open(path).convert("RGB")
        image.save(out / f"{path.stem}.jpg", quality=95)
        for kind in ALTERATIONS:
            altered(image, kind).save(out / f"{path.stem}__{kind}.jpg", quality=50 if kind == "recompressed" else 95)
    return [p.stem for p in sources]


def pair_scores(thresholds: list, same: np.ndarray, flag) -> list[dict]:
    """Pair precision and recall of `flag(threshold)` (a boolean per pair) against `same`."""
    rows = []
    for t in thresholds:
        flagged = flag(t)
        true_positives = int((flagged & same).sum())
        precision = true_positives / max(1, int(flagged.sum()))
        recall = true_positives / max(1, int(same.sum()))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"threshold": t, "pair_precision": round(precision, 4), "pair_recall": round(recall, 4),
                     "f1": round(f1, 4), "flagged_pairs": int(flagged.sum())})
    return rows


def main() -> None:
    from clipsnail.apps.hub import load
    from clipsnail.inference.duplicates import DEFAULT_MAX_BITS, find_duplicates
    from clipsnail.inference.index import build_index

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="conse:efficientnet-lite0+all-minilm-l6-v2")
    p.add_argument("--out", default=str(_common.RESULTS / "duplicates.json"))
    args = p.parse_args()
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    with tempfile.TemporaryDirectory(prefix="clipsnail_duplicates_") as work:
        photos = Path(work) / "photos"
        photos.mkdir()
        write_photos(photos)
        model = load(args.model)
        index, _ = build_index(model, photos, Path(work) / "index", progress=False)
        source = np.array([p.stem.split("__")[0] for p in index.paths])
        hashes = dict(index.catalogue.db.execute("SELECT id, phash FROM photos"))
        codes = np.array([int(hashes[i], 16) for i in range(len(source))], dtype=np.uint64)
        upper = np.triu_indices(len(source), k=1)
        bits = np.array([bin(int(x)).count("1") for x in (codes[upper[0]] ^ codes[upper[1]])])
        vectors = index.vectors().numpy()
        cosine = (vectors @ vectors.T)[upper]
        same = (source[:, None] == source[None, :])[upper]
        by_bits = pair_scores(BITS, same, lambda t: bits <= t)
        by_cosine = pair_scores(COSINES, same, lambda t: cosine >= t)
        at_default = by_bits[DEFAULT_MAX_BITS]
        kinds = np.array([p.stem.split("__")[1] if "__" in p.stem else "original" for p in index.paths])
        per_kind = {}
        for kind in ALTERATIONS:  # recall of (original, this copy) pairs at the default
            rows, cols = upper
            chosen = same & (((kinds[rows] == "original") & (kinds[cols] == kind)) |
                             ((kinds[cols] == "original") & (kinds[rows] == kind)))
            per_kind[kind] = round(float((bits[chosen] <= DEFAULT_MAX_BITS).mean()), 4)
        found = find_duplicates(index, DEFAULT_MAX_BITS)
        pure = sum(len({Path(p).stem.split("__")[0] for p in g["paths"]}) == 1 for g in found["near"])
        results = {
            "photos": int(len(set(source))), "indexed": len(source), "pairs": int(len(bits)),
            "near_copy_pairs": int(same.sum()), "default_max_bits": DEFAULT_MAX_BITS,
            **{k: at_default[k] for k in ("pair_precision", "pair_recall", "f1", "flagged_pairs")},
            "recall_original_vs": per_kind,
            "index_duplicates": {"near_groups": found["near_groups"], "groups_of_one_photo": pure,
                                 "exact_groups": found["exact_groups"]},
            "cosine_best_f1": max(by_cosine, key=lambda r: (r["f1"], r["threshold"])),
            "distinct_pairs_cosine_quantiles": {q: round(float(np.quantile(cosine[~same], q)), 4)
                                                for q in (0.5, 0.99, 0.999, 1.0)},
            "near_pairs_cosine_quantiles": {q: round(float(np.quantile(cosine[same], q)), 4)
                                            for q in (0.0, 0.01, 0.05, 0.5)},
            "sweep_bits": by_bits, "sweep_cosine": by_cosine,
        }
    targets = {"pair_precision_at_least": 0.95, "pair_recall_at_least": 0.95,
               "met": results["pair_precision"] >= 0.95 and results["pair_recall"] >= 0.95}
    notes = ("COCO-mini photos, each with three altered copies (JPEG q50; half size; 2.5% cropped off each side), "
             "indexed together with the model; a pair is a near copy when both images come from one photo. "
             f"Model: {args.model}.")
    _common.write_json(args.out, _common.envelope(benchmark="duplicates", config={"model": args.model,
                                                                                   "alterations": ALTERATIONS},
                                                  results=results, notes=notes, machine=machine, git_commit=commit,
                                                  date=started, targets=targets))
    _common.say(str({k: v for k, v in results.items() if not k.startswith("sweep")}))


if __name__ == "__main__":
    main()
