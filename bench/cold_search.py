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

The web app the same way (--serve-runs, alternating): `clipsnail serve --index IDX` started in a fresh process on
the index (ONNX) and on a copy of it without its query encoder (PyTorch, as before an index carried one): seconds
until /api/info answers (`serve_ready_s`), the server's resident memory then (VmRSS, `serve_rss_after_start_mib`),
the wall time of the first /api/search (`serve_first_query_s`) and the resident memory after it; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

CONSE_SPEC = _common.CONSE_SPEC
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
    _common.convert_conse(run)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 120.0) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read()


def serve_once(index_dir: Path) -> dict:
    """Start `clipsnail serve --index index_dir`, time its start and its first query, read its memory."""
    import urllib.error
    import urllib.parse

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    proc = subprocess.Popen([*cli(), "serve", "--index", str(index_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"clipsnail serve exited with {proc.returncode}")
            try:
                get(base + "/api/info", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        ready = time.perf_counter() - t
        rss_start = _common.proc_status_mib("VmRSS", proc.pid)
        t = time.perf_counter()
        hits = json.loads(get(base + "/api/search?" + urllib.parse.urlencode({"q": QUERY, "k": 10})))["hits"]
        first = time.perf_counter() - t
        assert len(hits) == 10, hits
        return {"ready_s": ready, "rss_after_start_mib": rss_start, "first_query_s": first,
                "rss_after_first_query_mib": _common.proc_status_mib("VmRSS", proc.pid)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def serve_rows(index_dir: Path, runs: int) -> dict:
    """serve_once on the index (ONNX) and on a copy without its query encoder (PyTorch), alternating; medians."""
    from clipsnail.inference.index import QUERY_ENCODER

    torch_index = index_dir.with_name(index_dir.name + "_torch")
    shutil.copytree(index_dir, torch_index, ignore=shutil.ignore_patterns(QUERY_ENCODER))
    rows: dict[str, list[dict]] = {"onnx": [], "torch": []}
    for _ in range(runs):
        rows["onnx"].append(serve_once(index_dir))
        rows["torch"].append(serve_once(torch_index))
    out = {}
    for path, suffix in (("onnx", ""), ("torch", "_torch")):
        for key in rows[path][0]:
            out[f"serve_{key}{suffix}"] = _common.median([r[key] for r in rows[path]], 3)
    out["serve_memory_ratio_torch_over_onnx"] = round(out["serve_rss_after_start_mib_torch"]
                                                      / out["serve_rss_after_start_mib"], 2)
    out["serve_first_query_speedup_vs_torch"] = round(out["serve_first_query_s_torch"] / out["serve_first_query_s"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--serve-runs", type=int, default=3, help="web-app starts per path (0: none)")
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
        serve = serve_rows(index_dir, args.serve_runs) if args.serve_runs else {}
    results = {"cold_search_s": _common.median(onnx, 3), "cold_search_torch_s": _common.median(torch_, 3),
               "torch_imported": torch_imported, "runs_onnx_s": [round(s, 3) for s in onnx],
               "runs_torch_s": [round(s, 3) for s in torch_], **serve}
    results["speedup_vs_torch"] = round(results["cold_search_torch_s"] / results["cold_search_s"], 2)
    targets = {**TARGETS, "met": {"cold_search_s": results["cold_search_s"] <= TARGETS["cold_search_s"],
                                  "speedup_vs_torch": results["speedup_vs_torch"] >= TARGETS["speedup_vs_torch"]}}
    notes = (f"`clipsnail search --index IDX {QUERY!r}` (ONNX: the index's query encoder) and the same with "
             "`--model RUN` (PyTorch), alternating, each in a fresh process, after one warm-up call of each; "
             f"{args.photos} empty files, synthetic vectors, the ConSE model.")
    config = {"photos": args.photos, "runs": args.runs, "serve_runs": args.serve_runs}
    config.update(query=QUERY, model=CONSE_SPEC)
    _common.write_json(args.out, _common.envelope(benchmark="cold_search", config=config,
                                                  results=results, notes=notes, machine=machine, git_commit=commit,
                                                  date=started, targets=targets))
    _common.say(json.dumps(results))


if __name__ == "__main__":
    main()
