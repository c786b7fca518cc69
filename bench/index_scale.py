"""How an index's upkeep grows with the library: adding 10 photos, an update when nothing changed, a cold search.

    python bench/index_scale.py [--sizes 10000,100000,1000000] [--work DIR]

For each N: N real files (empty, named .jpg, 1,000 per folder, so the folder walk and the stats are real) and
synthetic clustered 512-d unit vectors, written through the index's own writer (as `index build` writes them, the
faiss structure chosen and calibrated as there). Then, each in a fresh process (its own peak memory and write
counter):
- add10: 10 new decodable photos, `update_index` with a stand-in model (random unit vectors: the cost measured is
  the index's, not a network's); `add10_s`, `add10_peak_rss_mib`, `add10_bytes_written` (the process's write_bytes);
- nochange: `update_index` with nothing changed (`nochange_s`);
- search_load: `ImageIndex.load` and one search (`search_load_s`).
The walk of the folder is timed inside nochange (`nochange_walk_s`). At the first N with an inverted file, ten
rounds of 1% adds through `update_index` (vectors from the same mixture), then recall@10 against exact search of
the updated index and of a fresh build of the same vectors (`recall_at_10_after_adds`, `recall_at_10_fresh_build`).
Writes bench/results/index_scale.json with the log-log slope of each cost over N. Targets at 1M (2 cores): add10 at
most 10 s, 1,536 MiB, 50 MB written; nochange at most 30 s; search_load at most 1 s; recall after adds within 0.01
of a fresh build.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

DIM = 512
TARGETS_AT_1M = {"add10_s": 10.0, "add10_peak_rss_mib": 1536.0, "add10_bytes_written": 50e6, "nochange_s": 30.0,
                 "search_load_s": 1.0}

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
import clipsnail.inference.index as index_module
from clipsnail.inference.index import ImageIndex, update_index

class StandIn:
    embed_dim, image_size, run_dir = 512, 32, None
    def eval(self): return self
    def preprocess(self, image):
        return torch.zeros(3, 32, 32)
    def encode_image(self, images):
        v = torch.randn(len(images), 512, generator=torch.Generator().manual_seed(len(images)))
        return torch.nn.functional.normalize(v, dim=-1)

def peak_rss_mib():
    # VmHWM: the peak of this process image. getrusage's ru_maxrss would also count the parent's resident pages,
    # copied into the child by the fork before the exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)

def written():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0

walk = {"seconds": 0.0}
scan = index_module._scan
def timed_scan(*args, **kwargs):
    t = time.perf_counter()
    try:
        return scan(*args, **kwargs)
    finally:
        walk["seconds"] += time.perf_counter() - t
index_module._scan = timed_scan

case, index_dir = sys.argv[2], sys.argv[3]
before, t = written(), time.perf_counter()
if case == "search_load":
    index = ImageIndex.load(index_dir)
    index.search(np.ones(512, dtype=np.float32) / 512 ** 0.5, 10)
else:
    update_index(StandIn(), index_dir, progress=False, workers=0)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": round(seconds, 3), "bytes_written": written() - before,
                  "walk_seconds": round(walk["seconds"], 3),
                  "peak_rss_mib": peak_rss_mib()}))
"""


def centres_for(n: int) -> np.ndarray:
    """The sqrt(n) random centres of a library of n photos (photo libraries cluster; uniform vectors would flatter
    an inverted file)."""
    return np.random.default_rng(0).standard_normal((max(1, int(math.sqrt(n))), DIM)).astype(np.float32)


def mixture(centres: np.ndarray, n: int, rng) -> np.ndarray:
    """n unit vectors around `centres`."""
    vectors = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_library(root: Path, index_dir: Path, n: int) -> float:
    """N empty files and an index of them written by the index's writer; returns the seconds it took."""
    start = time.perf_counter()
    stats = {"added": n, "changed": 0, "removed": 0, "unchanged": 0, "unreadable": 0, "total": n}
    _common.synthetic_index(root, index_dir, mixture(centres_for(n), n, np.random.default_rng(1)), stats=stats)
    return round(time.perf_counter() - start, 1)


def recall_after_adds(root: Path, index_dir: Path, n: int, rounds: int = 10, fraction: float = 0.01) -> dict:
    """`rounds` updates each adding fraction * n photos (distinct tiny PNGs; vectors from the library's mixture),
    then recall@10 against exact search, of the updated index and of a fresh build of the same vectors."""
    import torch
    from PIL import Image

    from clipsnail.inference.index import ImageIndex, update_index
    from clipsnail.inference.vector_store import VectorStore, top_k, write_store

    centres, rng = centres_for(n), np.random.default_rng(2)

    class Mixture:  # a stand-in model whose photos come from the library's mixture
        embed_dim, image_size, run_dir = DIM, 8, None

        def eval(self):
            return self

        def preprocess(self, image):
            return torch.zeros(3, 8, 8)

        def encode_image(self, images):
            return torch.from_numpy(mixture(centres, len(images), rng))

    t = time.perf_counter()
    for r in range(rounds):
        folder = root / f"adds_{r:02d}"
        folder.mkdir()
        for i in range(int(n * fraction)):
            Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, r)).save(folder / f"{i:05d}.png")
        update_index(Mixture(), index_dir, progress=False, workers=0)
    seconds = time.perf_counter() - t
    index = ImageIndex.load(index_dir)
    store, k = index.store, 10
    queries = mixture(centres, 500, np.random.default_rng(3))
    truth = top_k(queries, store.vectors, k, live=store.live)[1]

    def recall(found):
        return round(float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth.tolist(), found.tolist())])), 4)

    live = np.flatnonzero(store.live)
    with tempfile.TemporaryDirectory(dir=root.parent) as fresh_dir:
        layout, order = write_store(Path(fresh_dir), store.vectors, live, True, index.structure["target_recall@10"])
        fresh = VectorStore(Path(fresh_dir), DIM, len(live), np.zeros(0, np.int64), layout)
        fresh_found = live[order][fresh.search(queries, k)[1]]
    return {"recall_at_10_after_adds": recall(store.search(queries, k)[1]),
            "recall_at_10_fresh_build": recall(fresh_found), "adds_rounds": rounds, "adds_per_round": int(n * fraction),
            "adds_seconds": round(seconds, 1), "nprobe_after_adds": index.structure["nprobe"],
            "nprobe_fresh_build": layout["nprobe"], "rows_after_adds": index.meta["rows"]}


def child(case: str, index_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(_common.ROOT / "src"), case, str(index_dir)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{case} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(rows: list[dict], key: str) -> float | None:
    """The least-squares slope of log(cost) over log(N)."""
    points = [(math.log(r["n"]), math.log(r[key])) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def main() -> None:
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--work", help="scratch folder (default: a new temporary one, removed after)")
    p.add_argument("--out", default=str(_common.RESULTS / "index_scale.json"))
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipsnail_index_scale_", dir=args.work) as work:
        for n in sizes:
            root, index_dir = Path(work) / f"photos_{n}", Path(work) / f"index_{n}"
            row = {"n": n, "build_s": make_library(root, index_dir, n)}
            nochange = child("nochange", index_dir)
            row.update(nochange_s=nochange["seconds"], nochange_walk_s=nochange["walk_seconds"])
            for i in range(10):
                Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(root / f"new_{i}.png")
            add = child("add10", index_dir)
            row.update(add10_s=add["seconds"], add10_peak_rss_mib=add["peak_rss_mib"],
                       add10_bytes_written=add["bytes_written"])
            row["search_load_s"] = child("search_load", index_dir)["seconds"]
            if n >= 20_000 and not any("recall_at_10_after_adds" in r for r in rows):
                row.update(recall_after_adds(root, index_dir, n))
            rows.append(row)
            _common.say(str(row))
    keys = ("add10_s", "add10_peak_rss_mib", "add10_bytes_written", "nochange_s", "search_load_s")
    results = {"rows": rows, "loglog_slope": {k: slope(rows, k) for k in keys}}
    adds = next((r for r in rows if "recall_at_10_after_adds" in r), None)
    if adds:
        results["recall_at_10_after_adds"] = adds["recall_at_10_after_adds"]
        results["recall_at_10_fresh_build"] = adds["recall_at_10_fresh_build"]
        results["recall_measured_at_n"] = adds["n"]
    at_1m = next((r for r in rows if r["n"] == 1_000_000), None)
    targets = {"at_1m": TARGETS_AT_1M,
               "met": {k: at_1m[k] <= v for k, v in TARGETS_AT_1M.items()} if at_1m else "not measured at 1M"}
    notes = ("Empty files, 1,000 per folder; synthetic clustered unit vectors (sqrt(N) centres) written by the "
             "index's writer; each measured case in a fresh process: its wall time, peak RSS and write_bytes "
             "(/proc/self/io). add10 encodes 10 small PNGs with a stand-in model.")
    _common.write_json(args.out, _common.envelope(benchmark="index_scale", config={"sizes": sizes, "dim": DIM},
                                                  results=results, notes=notes, machine=machine, git_commit=commit,
                                                  date=started, targets=targets))
    _common.say(json.dumps(results["loglog_slope"]))


if __name__ == "__main__":
    main()
