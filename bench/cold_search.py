"""A cold text search, as a user types it: `clipsnail search --index IDX "a dog"` in a fresh process, through the
index's ONNX query encoder and through PyTorch, side by side.

    python bench/cold_search.py [--photos 10000] [--runs 7] [--work DIR]

The ConSE model (`convert --from conse:efficientnet-lite0+all-minilm-l6-v2`; no training) and an index of N real
(empty) files, 1,000 per folder, whose vectors are synthetic unit vectors written by the index's own writer: the
cost measured is the command's (imports, loading the encoder, one query, the search, the output), not the
encoding of photos. The index's query encoder is written as `index build` writes it. Then, alternating, a search
that uses it (`cold_search_s`) and one that loads the run in PyTorch (`--model RUN`, what an index without one
does: `cold_search_torch_s`), each the median wall time of --runs fresh processes; `torch_imported` says whether
the ONNX path imported torch. Targets (2 cores): cold_search_s at most 1.0 s, speedup_vs_torch at least 4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

CONSE_SPEC = "conse:efficientnet-lite0+all-minilm-l6-v2"
QUERY = "a dog"
TARGETS = {"cold_search_s": 1.0, "speedup_vs_torch": 4.0}
MODULES = """
import json, sys
from clipsnail.cli import main
main(["search", "--index", sys.argv[1], sys.argv[2]])
print(json.dumps("torch" in sys.modules))
"""


def cli() -> list[str]:
    return [sys.executable, "-m", "clipsnail"]


def make_index(work: Path, n: int) -> tuple[Path, Path]:
    """The ConSE run, and an index of n empty files (synthetic vectors) made by it, with its query encoder."""
    _common.use_source_tree()
    from clipsnail.apps.export import ensure_query_encoder

    run = work / "conse"
    proc = subprocess.run([*cli(), "convert", "--from", CONSE_SPEC, "--out", str(run)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"conversion failed: {proc.stderr[-2000:]}")
    root, index_dir = work / "photos", work / "index"
    dim = json.loads((run / "config.json").read_text())["model"]["head"]["embed_dim"]
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    _common.synthetic_index(root, index_dir, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), model_dir=run)
    t = time.perf_counter()
    written = ensure_query_encoder(index_dir)
    if written != "written":
        raise SystemExit(f"no query encoder: {written}")
    _common.say(f"query encoder written in {time.perf_counter() - t:.1f} s")
    return run, index_dir


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if proc.returncode or not json.loads(proc.stdout):
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--work", help="scratch folder (default: a new temporary one, removed after)")
    p.add_argument("--out", default=str(_common.RESULTS / "cold_search.json"))
    args = p.parse_args()
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    with tempfile.TemporaryDirectory(prefix="clipsnail_cold_search_", dir=args.work) as work:
        run, index_dir = make_index(Path(work), args.photos)
        onnx_argv = [*cli(), "search", "--index", str(index_dir), QUERY]
        torch_argv = [*onnx_argv, "--model", str(run)]
        timed(onnx_argv), timed(torch_argv)  # warm the page cache for both, as a second search of a day is
        onnx, torch_ = [], []
        for _ in range(args.runs):
            onnx.append(timed(onnx_argv))
            torch_.append(timed(torch_argv))
        probe = subprocess.run([sys.executable, "-c", MODULES, str(index_dir), QUERY], capture_output=True,
                               text=True, check=True)
        torch_imported = json.loads(probe.stdout.strip().splitlines()[-1])
    results = {"cold_search_s": _common.median(onnx, 3), "cold_search_torch_s": _common.median(torch_, 3),
               "torch_imported": torch_imported, "runs_onnx_s": [round(s, 3) for s in onnx],
               "runs_torch_s": [round(s, 3) for s in torch_]}
    results["speedup_vs_torch"] = round(results["cold_search_torch_s"] / results["cold_search_s"], 2)
    targets = {**TARGETS, "met": {"cold_search_s": results["cold_search_s"] <= TARGETS["cold_search_s"],
                                  "speedup_vs_torch": results["speedup_vs_torch"] >= TARGETS["speedup_vs_torch"]}}
    notes = (f"`clipsnail search --index IDX {QUERY!r}` (ONNX: the index's query encoder) and the same with "
             "`--model RUN` (PyTorch), alternating, each in a fresh process, after one warm-up call of each; "
             f"{args.photos} empty files, synthetic vectors, the ConSE model.")
    _common.write_json(args.out, _common.envelope(benchmark="cold_search", config={"photos": args.photos,
                                                  "runs": args.runs, "query": QUERY, "model": CONSE_SPEC},
                                                  results=results, notes=notes, machine=machine, git_commit=commit,
                                                  date=started, targets=targets))
    _common.say(json.dumps(results))


if __name__ == "__main__":
    main()
