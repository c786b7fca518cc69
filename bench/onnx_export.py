#!/usr/bin/env python
"""Benchmark: `clipsnail export --onnx` (clipsnail.apps.export) on this CPU: PyTorch eager vs onnxruntime.

For each CLIP config (random weights, a byte-level BPE tokenizer trained on generated shapes-style captions,
saved as a run directory and exported with export_onnx exactly as the CLI does):
  shapes   the default CLIP config of `clipsnail clip train` (ClipModelConfig defaults: 32px ViT patch 4,
           width 192, depth 4; text width 192, depth 4, context 32; embed 128); vocab: the tokenizer's, 353 tokens
           (BPE on the generated captions reaches no more; data.vocab_size 2048 is a ceiling)
  vit_b32  ViT-B/32-sized: 224px ViT patch 32, width 768, depth 12, 12 heads; text width 512, depth 12, 8 heads,
           context 77, vocab 49408 (OpenAI's size; the tokenizer itself is smaller, only the table is that big);
           embed 512. ~151M parameters, as OpenAI's ViT-B/32.
measured:
  export   wall seconds of export_onnx (both encoders, the copy of the tokenizer, the onnxruntime self-check),
           per-encoder export seconds, file sizes, opset, and the self-check's max |onnx - torch|.
  latency  median milliseconds per call at batch 1 and 32 for the image encoder (a preprocessed float batch) and the
           text encoder (token ids of generated captions, 11-14 tokens with <sot>/<eot>). Sides, called
           alternately within each repetition so that load from other processes hits both alike:
             torch       model.encode_image / encode_text (eager, torch.no_grad; encode_text runs the tower only up
                         to the longest caption's <eot>, which is what users get from clipsnail.load)
             torch_full  text only: the exported module itself in eager mode (the whole context, <eot> gathered),
                         the like-for-like graph of the ONNX file
             onnx        OnnxClip (onnxruntime CPUExecutionProvider, graph optimisations on), fed numpy arrays;
                         encode_text drops the padding columns past the last <eot> first (as torch does)
             onnx_full   text only: OnnxClip.encode_text(trim=False), the whole context (compare with torch_full)
           Both libraries use --threads intra-op threads (default 2). speedup = torch median / onnx median.

    .venv/bin/python bench/onnx_export.py             # ~4.5 min on 2 cores; writes bench/results/onnx_export.json
    .venv/bin/python bench/onnx_export.py --smoke     # the shapes config only, 3 repetitions; not written
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

import _common

_common.use_source_tree()
say = _common.say

CONFIGS = {
    "shapes": {"model": {}, "vocab_size": 2048, "context_length": 32, "table_vocab": None},
    "vit_b32": {"model": {"vision": {"image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12},
                          "text": {"width": 512, "depth": 12, "heads": 8}, "head": {"embed_dim": 512}},
                "vocab_size": 4096, "context_length": 77, "table_vocab": 49408},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "grey"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
RELATIONS = ["above", "below", "to the left of", "to the right of", "next to"]


def captions() -> list[str]:
    out = []
    for (c1, s1), rel, (c2, s2) in itertools.product(itertools.product(COLOURS, SHAPES), RELATIONS,
                                                     itertools.product(COLOURS[::-1], SHAPES[::-1])):
        out.append(f"a small {c1} {s1} {rel} a large {c2} {s2}")
    return out


def make_run(name: str, spec: dict, run_dir: Path) -> int:
    import torch

    from clipsnail.core.config import from_dict
    from clipsnail.core.runs import save_run
    from clipsnail.data.tokenizers import train_bpe
    from clipsnail.families.clip import ClipConfig, ClipDataConfig
    from clipsnail.models.clip import CLIP, ClipModelConfig

    texts = captions()
    tokenizer = train_bpe(texts[::7], vocab_size=spec["vocab_size"], context_length=spec["context_length"])
    m = from_dict(ClipModelConfig, spec["model"]).with_changes(text={
        "vocab_size": spec["table_vocab"] or tokenizer.vocab_size, "context_length": tokenizer.context_length,
        "pad_id": tokenizer.pad_id, "eot_id": tokenizer.eot_id})
    cfg = ClipConfig(model=m, data=ClipDataConfig(vocab_size=spec["vocab_size"],
                                                  context_length=spec["context_length"]))
    torch.manual_seed(0)
    model = CLIP(m)
    save_run(run_dir, "clip", cfg, model, tokenizer)
    return sum(p.numel() for p in model.parameters())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def measure(model, onnx_clip, text_module, batch: int, reps: int, warmup: int, rng) -> list[dict]:
    import numpy as np
    import torch

    size = model.image_size
    images = torch.from_numpy(rng.standard_normal((batch, 3, size, size), dtype=np.float32))
    images_np = images.numpy()
    texts = [captions()[i] for i in rng.choice(len(captions()), batch, replace=False)]
    tokens = model.tokenizer(texts)
    tokens_np = tokens.numpy()
    sides = {
        "image": {"torch": lambda: model.encode_image(images), "onnx": lambda: onnx_clip.encode_image(images_np)},
        "text": {"torch": lambda: model.encode_text(tokens), "torch_full": lambda: text_module(tokens),
                 "onnx": lambda: onnx_clip.encode_text(tokens_np),
                 "onnx_full": lambda: onnx_clip.encode_text(tokens_np, trim=False)},
    }
    rows = []
    with torch.no_grad():
        for encoder, fns in sides.items():
            times = {side: [] for side in fns}
            for i in range(warmup + reps):
                for side, fn in fns.items():  # alternating: noise from other processes falls on every side
                    t = timed(fn)
                    if i >= warmup:
                        times[side].append(t)
            row = {"encoder": encoder, "batch": batch, "reps": reps}
            for side, ts in times.items():
                row[f"{side}_ms"] = round(_common.median(ts), 2)
                row[f"{side}_ms_min"] = round(min(ts), 2)
            row["speedup"] = round(row["torch_ms"] / row["onnx_ms"], 2)
            if "torch_full_ms" in row:
                row["speedup_full"] = round(row["torch_full_ms"] / row["onnx_full_ms"], 2)
            say(f"  {encoder:5s} batch {batch:3d}: " + "  ".join(
                f"{side} {row[side + '_ms']:.2f} ms (min {row[side + '_ms_min']:.2f})" for side in fns)
                + f"  speedup {row['speedup']:.2f}")
            rows.append(row)
    return rows


def bench_config(name: str, spec: dict, args, workdir: Path) -> dict:
    import numpy as np

    from clipsnail.apps.export import OnnxClip, _encoders, export_onnx
    from clipsnail.apps.hub import load

    run_dir, out_dir = workdir / f"{name}_run", workdir / f"{name}_onnx"
    n_params = make_run(name, spec, run_dir)
    say(f"{name}: {n_params / 1e6:.1f}M parameters; exporting ...")
    t = time.perf_counter()
    report = export_onnx(run_dir, out_dir)
    export_s = round(time.perf_counter() - t, 2)
    say(f"  export {export_s} s (image {report['image_export_s']} s, text {report['text_export_s']} s), files "
        + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in report["files"].items())
        + f"; max |onnx - torch| image {report['check']['image_max_abs_diff']:.2g}, "
          f"text {report['check']['text_max_abs_diff']:.2g}")
    model = load(run_dir)
    onnx_clip = OnnxClip(out_dir, threads=args.threads, spinning=args.spin)
    text_module = _encoders(model)[1]
    rng = np.random.default_rng(0)
    latency = []
    for batch in args.batches:
        latency += measure(model, onnx_clip, text_module, batch, args.reps, args.warmup, rng)
    return {
        "parameters": n_params,
        "model": {"vision": {k: getattr(model.cfg.vision, k) for k in
                             ("encoder", "image_size", "patch_size", "width", "depth", "heads")},
                  "text": {k: getattr(model.cfg.text, k) for k in
                           ("width", "depth", "heads", "context_length", "vocab_size")},
                  "embed_dim": model.embed_dim},
        "export": {"total_s": export_s, "image_export_s": report["image_export_s"],
                   "text_export_s": report["text_export_s"], "opset": report["opset"],
                   "file_bytes": report["files"], "check": {k: v for k, v in report["check"].items() if k != "texts"}},
        "latency": latency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--reps", type=int, default=9, help="timed calls per side (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--spin", action="store_true",
                        help="let idle worker threads spin (onnxruntime's and OpenMP's default); by default both "
                             "sleep, as the sides alternate on shared cores and a spinning pool slows the other side")
    parser.add_argument("--smoke", action="store_true", help="shapes config, batches 1,4, 3 reps; nothing written")
    parser.add_argument("--out", default=str(_common.RESULTS / "onnx_export.json"))
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.batches, args.reps, args.warmup = "shapes", "1,4", 3, 1
    args.batches = [int(b) for b in args.batches.split(",")]
    names = args.configs.split(",")
    if unknown := set(names) - set(CONFIGS):
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    logging.basicConfig(level=logging.WARNING)
    if not args.spin:  # before torch loads libgomp
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    torch.set_num_threads(args.threads)
    machine = _common.machine_info()
    machine.update({p: _common.package_version(p) for p in ("onnx", "onnxruntime", "onnxscript")})
    commit = _common.git_commit()
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnx_bench_") as tmp:
        for name in names:
            results[name] = bench_config(name, CONFIGS[name], args, Path(tmp))
    rows = [[name, r["encoder"], r["batch"], r["torch_ms"], r["onnx_ms"], r["speedup"], r.get("torch_full_ms"),
             r.get("onnx_full_ms"), r.get("speedup_full")] for name, res in results.items() for r in res["latency"]]
    say(_common.format_table(["config", "encoder", "batch", "torch ms", "onnx ms", "speedup", "torch full ms",
                              "onnx full ms", "speedup full"], rows))
    if args.smoke:
        return
    report = _common.envelope(
        benchmark="onnx_export", machine=machine, git_commit=commit, date=_common.now_iso(),
        config={"configs": {n: CONFIGS[n] for n in names}, "batches": args.batches, "reps": args.reps,
                "warmup": args.warmup, "threads": args.threads,
                "spinning": args.spin, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "peak_rss_mib": _common.peak_rss_mib()},
        results=results,
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
        notes="Random weights (latency and exactness do not depend on training). Medians over alternating calls; "
              "the machine is shared with other processes (see load_average_at_start and load_average_at_end), so "
              "absolute times are noisy, the ratios less so; *_ms_min are the fastest calls. torch encode_text "
              "and OnnxClip.encode_text both run only up to the longest caption's <eot>; the *_full sides run "
              "the whole context (the work of a fixed-shape graph).",
    )
    say(f"wrote {_common.write_json(args.out, report)}")


if __name__ == "__main__":
    main()
