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
Writes bench/results/index_scale.json with the log-log slope of each cost over N. Targets at 1M (2 cores): add10 at
most 10 s, 1,536 MiB, 50 MB written; nochange at most 30 s; search_load at most 1 s.
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
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from clipsnail.inference.index import ImageIndex, update_index

class StandIn:
    embed_dim, image_size, run_dir = 512, 32, None
    def eval(self): return self
    def preprocess(self, image):
        return torch.zeros(3, 32, 32)
    def encode_image(self, images):
        v = torch.randn(len(images), 512, generator=torch.Generator().manual_seed(len(images)))
        return torch.nn.functional.normalize(v, dim=-1)

def written():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0

case, index_dir = sys.argv[2], sys.argv[3]
before, t = written(), time.perf_counter()
if case == "search_load":
    index = ImageIndex.load(index_dir)
    index.search(np.ones(512, dtype=np.float32) / 512 ** 0.5, 10)
else:
    update_index(StandIn(), index_dir, progress=False, workers=0)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": round(seconds, 3), "bytes_written": written() - before,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def clustered(n: int, seed: int = 0):
    """n unit vectors around sqrt(n) random centres (photo libraries cluster; uniform vectors would flatter IVF)."""
    import torch

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, int(math.sqrt(n))), DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return torch.nn.functional.normalize(torch.from_numpy(vectors), dim=-1)


def make_library(root: Path, index_dir: Path, n: int) -> float:
    """N empty files and an index of them written by the index's writer; returns the seconds it took."""
    _common.use_source_tree()
    from clipsnail.data.photo_facts import PhotoFacts
    from clipsnail.inference.index import DEFAULT_APPROX_THRESHOLD, DEFAULT_TARGET_RECALL, _finish, _scan

    start = time.perf_counter()
    for i in range(n):
        folder = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").touch()
    found = _scan(root, allow_empty=False, follow_links=False)
    rels = sorted(found)
    vectors = clustered(n)
    entries = {r: (*found[r], f"{i:040x}") for i, r in enumerate(rels)}

    class Writer:  # what _finish reads of a model
        embed_dim = DIM

    stats = {"added": n, "changed": 0, "removed": 0, "unchanged": 0, "unreadable": 0, "total": n}
    _finish(Writer(), index_dir, root, None, entries, {}, stats, DEFAULT_APPROX_THRESHOLD, "ivf",
            DEFAULT_TARGET_RECALL, dict(zip(rels, vectors)), rebuild=True, reuse_from=None, follow_links=False,
            facts={r: PhotoFacts() for r in rels})
    return round(time.perf_counter() - start, 1)


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
            row["nochange_s"] = child("nochange", index_dir)["seconds"]
            for i in range(10):
                Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(root / f"new_{i}.png")
            add = child("add10", index_dir)
            row.update(add10_s=add["seconds"], add10_peak_rss_mib=add["peak_rss_mib"],
                       add10_bytes_written=add["bytes_written"])
            row["search_load_s"] = child("search_load", index_dir)["seconds"]
            rows.append(row)
            _common.say(str(row))
    keys = ("add10_s", "add10_peak_rss_mib", "add10_bytes_written", "nochange_s", "search_load_s")
    results = {"rows": rows, "loglog_slope": {k: slope(rows, k) for k in keys}}
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
