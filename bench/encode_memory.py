#!/usr/bin/env python
"""Benchmark: the peak memory of encoding photos with the ConSE CLIP, command by command.

Each command runs in a fresh process of its own through `clipsnail.cli.main`, which then reads its peak resident
memory (VmHWM, /proc/self/status); `model` only loads the model, the floor under every other figure:
- clip_eval:   `clipsnail clip eval --split test` over 500 flickr8k_dev photos (a split file whose test part is the
               first 500 photos by name) and their 2,500 captions;
- zeroshot:    `clipsnail zeroshot --folder` over 500 CIFAR-10 test images (the last 50 files of each class, copied
               into a class folder);
- index_build: `clipsnail index build --backend torch` over the same 500 flickr8k_dev photos (copied).
Each at the default encoding batch (32) and at 64 (`--batch-size`), to show what bounds the peak.

    CLIPSNAIL_BENCH_DATA=DATA .venv/bin/python bench/encode_memory.py   # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common

FLICKR = _common.BENCH_DATA / "flickr8k_dev"
CIFAR = _common.BENCH_DATA / "cifar10_test"
PHOTOS = 500
BATCHES = (32, 64)
TARGET_MIB = 2048


def child(argv: list[str]) -> None:
    """Run one CLI command (or `model RUN`: only load that run) in this process, then say its peak memory."""
    _common.use_source_tree()
    if argv[0] == "model":
        import clipsnail

        clipsnail.load(argv[1], device="cpu")
        status = 0
    else:
        from clipsnail.cli import main

        status = main(argv)
    _common.print_mem({"status": status, "peak_rss_mib": _common.proc_status_mib("VmHWM")})


def prepare(work: Path) -> dict[str, Path]:
    """The ConSE run, a split file naming 500 photos test, a copy of those photos, a 500-image class folder."""
    conse = _common.convert_conse(work / "conse")
    names = sorted(p.name for p in (FLICKR / "images").iterdir() if p.suffix.lower() == ".jpg")[:PHOTOS]
    (work / "split.json").write_text(json.dumps({"images": [{"filename": n, "split": "test"} for n in names]}))
    photos = work / "photos"
    photos.mkdir()
    for n in names:
        shutil.copyfile(FLICKR / "images" / n, photos / n)
    classes = work / "classes"
    names, files, labels = _common.last_files_per_class(CIFAR, PHOTOS // 10)
    for f, label in zip(files, labels):
        (classes / names[label]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, classes / names[label] / f.name)
    return {"conse": conse, "split": work / "split.json", "photos": photos, "classes": classes}


def commands(paths: dict[str, Path], work: Path, batch: int) -> dict[str, list[str]]:
    size = ["--batch-size", str(batch)]
    return {
        "clip_eval": ["clip", "eval", "--model", str(paths["conse"]), "--captions", str(FLICKR / "captions.csv"),
                      "--images", str(FLICKR / "images"), "--split-file", str(paths["split"]), "--split", "test",
                      "--no-progress", *size],
        "zeroshot": ["zeroshot", "--model", str(paths["conse"]), "--folder", str(paths["classes"]), *size],
        "index_build": ["index", "build", "--model", str(paths["conse"]), "--images", str(paths["photos"]), "--out",
                        str(work / f"index_{batch}"), "--backend", "torch", "--no-progress", *size],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(_common.RESULTS / "encode_memory.json"))
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    if not (FLICKR / "captions.csv").is_file() or not CIFAR.is_dir():
        _common.say(f"skipped: flickr8k_dev or cifar10_test not found under {_common.BENCH_DATA}")
        return
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    work = Path(tempfile.mkdtemp(prefix="encode_memory_"))
    t0 = time.perf_counter()
    figures: dict[str, dict] = {}
    try:
        paths = prepare(work)
        me = [sys.executable, str(Path(__file__).resolve()), "--child"]
        figures["model"] = _common.run_mem_child([*me, "model", str(paths["conse"])])
        for batch in BATCHES:
            for name, argv in commands(paths, work, batch).items():
                figures[f"{name}_b{batch}"] = r = _common.run_mem_child([*me, *argv])
                _common.say(f"{name} --batch-size {batch}: {r.get('peak_rss_mib')} MiB peak, {r.get('seconds')} s"
                            + (f" ({r['error']})" if "error" in r else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {f"peak_rss_mib_{key}": value.get("peak_rss_mib") for key, value in figures.items()}
    default = [results[f"peak_rss_mib_{name}_b{BATCHES[0]}"] for name in ("clip_eval", "zeroshot", "index_build")]
    results.update(max_default_peak_rss_mib=max(v or 1e9 for v in default),
                   target_default_at_most_2048_met=all(v is not None and v <= TARGET_MIB for v in default),
                   runs=figures, wall_seconds=round(time.perf_counter() - t0, 1))
    _common.write_json(args.out, _common.envelope(
        benchmark="encode_memory", machine=machine, git_commit=commit, date=started,
        config={"photos": PHOTOS, "flickr": _common.data_name(FLICKR), "cifar": _common.data_name(CIFAR),
                "model": _common.CONSE_SPEC, "batches": list(BATCHES), "command": _common.command_line()},
        results=results,
        notes=("VmHWM of a fresh process per command (the CLI in-process, then /proc/self/status): everything it "
               "held at its peak, the model, libraries and the encoding batch's activations included. 'model' only "
               "loads the ConSE CLIP.")))
    _common.say(f"default batch: clip eval {default[0]}, zeroshot {default[1]}, index build {default[2]} MiB; wrote "
                f"{args.out}")


if __name__ == "__main__":
    main()
