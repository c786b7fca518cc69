#!/usr/bin/env python
"""Benchmark: photos/s of `clipsnail index build` on 12-Mpx camera JPEGs against a plain encoding loop.

Photos   the first --photos (default 48) COCO-mini photos (coco_val_mini/images in the bench data folder, by name),
         upscaled bicubically to 4000x3000 (portrait ones to 3000x4000) and saved as JPEG quality 90 in a temp
         folder; every fourth is stored sideways with EXIF orientation 6, as phones store photos taken upright, so
         both paths must rotate it. Upscaled photos are smoother than a camera's, so their files are smaller
         (the mean size is in the JSON) and Huffman decoding, which no draft skips, is cheaper than on real ones.
Systems  vit_b32: open_clip's ViT-B-32 with random weights (torch seed 0), saved as safetensors and converted by
         `clipsnail convert --from open_clip:FILE`; conse: `clipsnail convert --from
         conse:efficientnet-lite0+all-minilm-l6-v2` (skipped with a message where this clipsnail has no such
         source). Both take 224 px inputs.
Measured per system, side by side in one process, alternating which goes first, --repeats times (median):
  index  clipsnail.inference.index.build_index(model, folder, out) with its defaults (batch 64, default_workers()
         decoding processes, JPEGs drafted to the model's input size), including its file hashing and faiss build;
  plain  the loop written the plain way: Image.open(p), ImageOps.exif_transpose, convert("RGB") (full decode),
         the model's own preprocess, model.encode_image on batches of 64, all in this process.
  photos/s = photos / wall seconds; speedup = index / plain. Also the cosine between each photo's two embeddings
  (draft-decoded vs fully decoded) and, with --sweep-workers, index build photos/s for each worker count (the
  measurement behind clipsnail.inference.index.default_workers).
Backends (per system unless --no-backends, in rotation, --repeats times, median): index build photos/s with the
  image encoder in PyTorch fp32 ("torch"), in ONNX Runtime fp32 ("onnx": the run's export) and in ONNX Runtime
  int8 ("onnx-int8": that export quantised by clipsnail.apps.quantize, calibrated on these photos, the time to
  quantise reported apart); `onnx_speedup_vs_torch` and `int8_speedup_vs_torch` are the conse system's.
  Retrieval cost of int8: the 159 COCO-mini photos indexed through the fp32 and the int8 export, the 795 captions
  encoded by each export's text encoder; `int8_t2i_r5_drop` = text->image R@5 fp32 - int8 (conse), with the
  image-only and text-only drops and the cosines between the fp32 and int8 vectors.
Results: bench/results/index_photos.json; `speedup_vs_plain_loop` is the conse system's when it ran, else
vit_b32's (`speedup_system` says which). The machine's load average is recorded at the start and the end: other
work on the shared cores slows both paths alike, so the side-by-side ratio is the figure that counts.

    .venv/bin/python bench/index_photos.py                          # both systems, 3 repeats, sweep 0,1,2,3
    .venv/bin/python bench/index_photos.py --systems conse --sweep-workers ''
    .venv/bin/python bench/index_photos.py --photos 8 --repeats 1 --out runs/p.json   # checks that it works
    .venv/bin/python bench/index_photos.py --systems conse --sweep-workers '' --no-plain   # backends only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

_common.use_source_tree()

DATA = _common.BENCH_DATA / "coco_val_mini" / "images"
CLI = [sys.executable, "-m", "clipsnail"]
SYSTEMS = ("vit_b32", "conse")
CONSE_SOURCE = "conse:efficientnet-lite0+all-minilm-l6-v2"
SIZE, QUALITY, BATCH = (4000, 3000), 90, 64
RCLIP_NOTE = ("for information: rclip publishes about 160-180 photos/s indexing on an Apple M1 Max (other hardware, "
              "other model sizes; not measured here)")


env = _common.source_env


def make_photos(out: Path, n: int) -> dict:
    from PIL import Image

    sources = sorted(p for p in DATA.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and not p.name.startswith("."))
    if len(sources) < n:
        raise SystemExit(f"{DATA}: {len(sources)} photos, --photos {n} asked for")
    out.mkdir(parents=True)
    sideways = 0
    for i, src in enumerate(sources[:n]):
        with Image.open(src) as im:
            im = im.convert("RGB")
        size = SIZE if im.width >= im.height else SIZE[::-1]
        big = im.resize(size, Image.Resampling.BICUBIC)
        exif = Image.Exif()
        if i % 4 == 3:  # stored as a phone held upright stores it: pixels turned, orientation 6 turns them back
            big = big.transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = 6
            sideways += 1
        big.save(out / f"{i:03d}.jpg", format="JPEG", quality=QUALITY, exif=exif.tobytes())
    sizes = [p.stat().st_size for p in out.iterdir()]
    return {"photos": n, "pixels": f"{SIZE[0]}x{SIZE[1]}", "jpeg_quality": QUALITY, "stored_sideways_exif6": sideways,
            "mean_file_mib": round(sum(sizes) / len(sizes) / 2**20, 2)}


def convert(source: str, run: Path) -> str | None:
    """`clipsnail convert --from SOURCE --out RUN`; None when it worked, else why not (its last error line)."""
    proc = subprocess.run([*CLI, "convert", "--from", source, "--out", str(run)], cwd=_common.ROOT, env=env(),
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def make_run(system: str, work: Path) -> tuple[Path | None, str | None]:
    run = work / f"{system}_run"
    if system == "vit_b32":
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        weights = work / "vit_b32_random.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
        problem = convert(f"open_clip:{weights}", run)
    else:
        problem = convert(CONSE_SOURCE, run)
    return (None, problem) if problem else (run, None)


def plain_loop(model, paths: list[Path]):
    import torch
    from PIL import Image, ImageOps

    out = []
    with torch.no_grad():
        for i in range(0, len(paths), BATCH):
            images = []
            for p in paths[i: i + BATCH]:
                im = Image.open(p)
                images.append(ImageOps.exif_transpose(im).convert("RGB"))
            out.append(model.encode_image(torch.stack([model.preprocess(im) for im in images])))
    return torch.cat(out)


def rotated_rates(names: list, n: int, repeats: int, run) -> dict:
    """{name: photos/s of each repeat} of run(name, repeat) over n photos, the order of the names rotated between
    repeats (two names alternate which goes first)."""
    rates: dict = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            run(name, r)
            rates[name].append(n / (time.perf_counter() - t))
            _common.say(f"    repeat {r + 1} {name!s:9s} {rates[name][-1]:6.2f} photos/s  "
                        f"load {os.getloadavg()[0]:.2f}")
    return rates


def measure(model, photos: Path, work: Path, repeats: int) -> dict:
    from clipsnail.inference.index import build_index

    paths = sorted(photos.iterdir())
    vectors = {}

    def run(which: str, r: int) -> None:
        if which == "index":
            index, stats = build_index(model, photos, work / f"index_{r}", progress=False)
            assert stats["total"] == len(paths), stats
            vectors["index"] = index.vectors()
        else:
            vectors["plain"] = plain_loop(model, paths)

    rates = rotated_rates(["index", "plain"], len(paths), repeats, run)
    cosine = (vectors["index"] * vectors["plain"].float()).sum(dim=1)
    index_rate, plain_rate = _common.median(rates["index"]), _common.median(rates["plain"])
    return {"index_build_photos_per_s": round(index_rate, 2), "plain_loop_photos_per_s": round(plain_rate, 2),
            "ratio": round(index_rate / plain_rate, 2),
            "index_build_photos_per_s_each": [round(v, 2) for v in rates["index"]],
            "plain_loop_photos_per_s_each": [round(v, 2) for v in rates["plain"]],
            "cosine_draft_vs_full_decode": {"min": round(cosine.min().item(), 4),
                                            "median": round(cosine.median().item(), 4)}}


def sweep(model, photos: Path, work: Path, workers: list[int], repeats: int) -> dict:
    """index build photos/s for each worker count, the counts rotated between repeats (median)."""
    from clipsnail.inference.index import build_index

    rates = rotated_rates(workers, len(list(photos.iterdir())), repeats, lambda w, r: build_index(
        model, photos, work / f"sweep_{w}_{r}", progress=False, workers=w))
    return {str(w): round(_common.median(v), 2) for w, v in rates.items()}


BACKENDS = ("torch", "onnx", "onnx-int8")


def backend_models(run: Path, model, photos: Path, work: Path) -> tuple[dict, dict]:
    """{backend: model} for BACKENDS, and the seconds to export and to quantise."""
    from clipsnail.apps.export import OnnxImageModel, export_onnx
    from clipsnail.apps.quantize import quantize_for_photos
    from clipsnail.core.fingerprint import weights_fingerprint

    fp32, int8 = work / "export_fp32", work / "export_int8"
    t = time.perf_counter()
    export_onnx(run, fp32)
    export_s = time.perf_counter() - t
    shutil.copytree(fp32, int8)
    t = time.perf_counter()
    quantize_for_photos(int8, photos)
    quantize_s = time.perf_counter() - t
    weights = weights_fingerprint(run)
    models = {"torch": model, "onnx": OnnxImageModel(fp32, run, weights),
              "onnx-int8": OnnxImageModel(int8, run, weights)}
    return models, {"export_s": round(export_s, 1), "quantize_s": round(quantize_s, 1)}


def measure_backends(models: dict, photos: Path, work: Path, repeats: int) -> dict:
    """index build photos/s of each backend, the order rotated between repeats (median)."""
    from clipsnail.inference.index import build_index

    rates = rotated_rates(list(models), len(list(photos.iterdir())), repeats, lambda b, r: build_index(
        models[b], photos, work / f"backend_{b}_{r}", progress=False))
    row = {f"{b}_photos_per_s": round(_common.median(v), 2) for b, v in rates.items()}
    row.update({f"{b}_photos_per_s_each": [round(x, 2) for x in v] for b, v in rates.items()})
    torch_rate = _common.median(rates["torch"])
    row["onnx_speedup_vs_torch"] = round(_common.median(rates["onnx"]) / torch_rate, 2)
    row["int8_speedup_vs_torch"] = round(_common.median(rates["onnx-int8"]) / torch_rate, 2)
    return row


def coco_captions() -> tuple[list[str], list[str], list[int]]:
    """(photo file names, captions, the photo of each caption) of COCO-mini."""
    coco = json.loads((DATA.parent / "captions_val2017.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"] if (DATA / im["file_name"]).is_file()}
    ids = sorted(names)
    position = {i: n for n, i in enumerate(ids)}
    pairs = [(a["caption"], position[a["image_id"]]) for a in coco["annotations"] if a["image_id"] in position]
    return [names[i] for i in ids], [c for c, _ in pairs], [p for _, p in pairs]


def t2i_r5(photo_vectors, text_vectors, truth) -> float:
    import numpy as np

    scores = text_vectors @ photo_vectors.T
    own = scores[np.arange(len(truth)), truth]
    return float(((scores > own[:, None]).sum(axis=1) < 5).mean())


def int8_retrieval(models: dict, work: Path) -> dict:
    """COCO-mini text->image R@5 through the fp32 export and through the int8 one (photos and captions)."""
    import numpy as np

    from clipsnail.inference.index import build_index

    files, captions, truth = coco_captions()
    photos, texts = {}, {}
    for b in ("onnx", "onnx-int8"):
        index, _ = build_index(models[b], DATA, work / f"coco_{b}", progress=False)
        by_name = dict(zip((p.name for p in index.paths), index.vectors().numpy()))
        photos[b] = np.stack([by_name[f] for f in files])
        onnx_clip = models[b].onnx
        texts[b] = np.concatenate([onnx_clip.encode_text(captions[i: i + 64]) for i in range(0, len(captions), 64)])
    fp32 = t2i_r5(photos["onnx"], texts["onnx"], truth)
    int8 = t2i_r5(photos["onnx-int8"], texts["onnx-int8"], truth)
    image_cos = (photos["onnx"] * photos["onnx-int8"]).sum(axis=1)
    text_cos = (texts["onnx"] * texts["onnx-int8"]).sum(axis=1)
    return {"t2i_r5_fp32": round(fp32, 4), "t2i_r5_int8": round(int8, 4), "int8_t2i_r5_drop": round(fp32 - int8, 4),
            "int8_t2i_r5_drop_image_only": round(fp32 - t2i_r5(photos["onnx-int8"], texts["onnx"], truth), 4),
            "int8_t2i_r5_drop_text_only": round(fp32 - t2i_r5(photos["onnx"], texts["onnx-int8"], truth), 4),
            "image_cosine_int8_vs_fp32": {"min": round(float(image_cos.min()), 4),
                                          "median": round(float(np.median(image_cos)), 4)},
            "text_cosine_int8_vs_fp32": {"min": round(float(text_cos.min()), 4),
                                         "median": round(float(np.median(text_cos)), 4)},
            "photos": len(files), "captions": len(captions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--photos", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep-workers", default="0,1,2,3",
                    help="index build photos/s for these worker counts too ('' for none)")
    ap.add_argument("--no-plain", action="store_true", help="skip the index-vs-plain-loop comparison")
    ap.add_argument("--no-backends", action="store_true", help="skip the torch / onnx / onnx-int8 comparison")
    ap.add_argument("--out", default=str(_common.RESULTS / "index_photos.json"))
    args = ap.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"--systems: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(SYSTEMS)}")
    sweep_workers = [int(w) for w in args.sweep_workers.split(",") if w.strip()]
    if not DATA.is_dir():
        _common.say(f"skipped: COCO-mini photos not found at {DATA} (the bench data folder: bench/_common.py)")
        return
    import clipsnail
    from clipsnail.inference.index import default_workers

    machine = _common.machine_info()
    commit = _common.git_commit()
    results, skipped = {}, {}
    with tempfile.TemporaryDirectory(prefix="clipsnail-bench-photos-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        photo_info = make_photos(work / "photos", args.photos)
        _common.say(f"{args.photos} photos of {photo_info['pixels']} ({photo_info['mean_file_mib']} MiB each on "
                    f"average) made in {time.perf_counter() - t:.0f} s")
        for system in systems:
            run, problem = make_run(system, work)
            if run is None:
                skipped[system] = problem
                _common.say(f"{system}: skipped ({problem})")
                continue
            model = clipsnail.load(run)
            _common.say(f"{system}: {model.image_size} px, default workers {default_workers()}")
            row = {} if args.no_plain else measure(model, work / "photos", work / system, args.repeats)
            row["image_size"] = model.image_size
            if not args.no_backends:
                models, costs = backend_models(run, model, work / "photos", work / system)
                row["backends"] = {**measure_backends(models, work / "photos", work / system, args.repeats),
                                   **costs, **int8_retrieval(models, work / system)}
                _common.say(f"  backends: {json.dumps(row['backends'])}")
            if sweep_workers:
                row["index_build_photos_per_s_by_workers"] = sweep(model, work / "photos", work / system,
                                                                   sweep_workers, args.repeats)
            results[system] = row
            if not args.no_plain:
                _common.say(f"  index build {row['index_build_photos_per_s']} photos/s, plain loop "
                            f"{row['plain_loop_photos_per_s']} photos/s: {row['ratio']}x")
            del model
    if not results:
        raise SystemExit("no system ran: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    speedup_system = "conse" if "conse" in results else next(iter(results))
    if not args.no_plain:
        header = ["system", "index_build_photos/s", "plain_loop_photos/s", "ratio", "cos_min"]
        _common.say("\n" + _common.format_table(header, [
            [s, r["index_build_photos_per_s"], r["plain_loop_photos_per_s"], r["ratio"],
             r["cosine_draft_vs_full_decode"]["min"]] for s, r in results.items()]))
    summary = {}
    if not args.no_backends:
        header = ["system", *(f"{b} photos/s" for b in BACKENDS), "onnx/torch", "int8/torch", "int8 R@5 drop"]
        _common.say("\n" + _common.format_table(header, [
            [s, *(r["backends"][f"{b}_photos_per_s"] for b in BACKENDS), r["backends"]["onnx_speedup_vs_torch"],
             r["backends"]["int8_speedup_vs_torch"], r["backends"]["int8_t2i_r5_drop"]] for s, r in results.items()]))
        keys = ("onnx_speedup_vs_torch", "int8_speedup_vs_torch", "int8_t2i_r5_drop")
        summary = {k: results[speedup_system]["backends"][k] for k in keys}
        summary["targets"] = {"onnx_speedup_vs_torch": 1.5, "int8_speedup_vs_torch": 2.5, "int8_t2i_r5_drop": 0.01}
    load_end = [round(x, 2) for x in os.getloadavg()]
    report = _common.envelope(
        benchmark="index_photos", machine={**machine, "load_average_at_end": load_end},
        git_commit=commit, date=_common.now_iso(),
        config={**photo_info, "source": _common.data_name(DATA), "repeats": args.repeats,
                "batch_size": BATCH, "index_workers_default": default_workers(), "systems": systems,
                "sweep_workers": sweep_workers},
        speedup_vs_plain_loop=results[speedup_system].get("ratio"), speedup_system=speedup_system,
        target_speedup=3.0, **summary, results=results, skipped=skipped,
        notes=[
            "photos/s = photos / wall seconds, median over repeats; index and plain measured alternately in one "
            "process on the same photos and model",
            "the machine's cores are shared with other work (load averages in machine); the ratio, measured side "
            "by side, is the figure that counts",
            "vit_b32 has random weights: its cosine agreement and its int8 retrieval figures say little about a "
            "trained model's",
            "backends: the int8 image encoder is calibrated on the photos it then indexes, as `index build "
            "--quantize int8` does (a sample of at most 64 of the folder's photos)",
            RCLIP_NOTE,
        ],
    )
    path = _common.write_json(args.out, report)
    _common.say(f"speedup ({speedup_system}): {report['speedup_vs_plain_loop']}x; wrote {path}")


if __name__ == "__main__":
    main()
