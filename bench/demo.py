"""The first command a newcomer runs: `make demo` from a fresh clone, install included, timed.

    python bench/demo.py [--runs 1] [--keep]

Each run clones this repository's HEAD into a scratch folder, runs `make setup-demo` (a new .venv: what `make demo`
installs first) and then `make demo`, each under its own clock, and reads the printed metrics back from
demo_out/demo_metrics.json. Writes bench/results/demo.json: the wall times (install, demo, total), the training
steps/s from the run's metrics.jsonl, and the metrics, per run and as medians. Target: at most 12 minutes in all on 2
idle cores, with semantic text->image R@5 at least 0.85. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import _common

TARGET_TOTAL_S = 12 * 60
TARGET_RECALL = 0.85


def timed(args: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return round(time.perf_counter() - start, 1)


def training_speed(run_dir: Path) -> float | None:
    """Median optimiser steps/s over the logged steps of the demo's run (samples/s / batch size)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    config = json.loads((run_dir / "config.json").read_text())
    return _common.median([s / config["train"]["batch_size"] for s in speeds], 3)


def one_run(scratch: Path) -> dict:
    clone = scratch / "clipsnail"
    subprocess.run(["git", "clone", "--quiet", str(_common.ROOT), str(clone)], check=True)
    install_s = timed(["make", "setup-demo"], clone, scratch / "setup.log")
    demo_s = timed(["make", "demo"], clone, scratch / "demo.log")
    out = clone / "demo_out"
    return {"install_s": install_s, "demo_s": demo_s, "total_s": round(install_s + demo_s, 1),
            "train_steps_per_s": training_speed(out / "run"),
            "metrics": json.loads((out / "demo_metrics.json").read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the scratch clones (their logs and demo_out)")
    p.add_argument("--out", default=str(_common.RESULTS / "demo.json"))
    args = p.parse_args()
    machine, commit, started = _common.machine_info(), _common.git_commit(), _common.now_iso()
    runs = []
    for i in range(args.runs):
        scratch = Path(tempfile.mkdtemp(prefix="clipsnail_demo_"))
        try:
            runs.append(one_run(scratch))
            _common.say(f"run {i + 1}: {json.dumps(runs[-1])}")
        finally:
            if args.keep:
                _common.say(f"kept {scratch}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
    recall = "semantic_image_retrieval_recall@5"
    medians = {key: _common.median([r[key] for r in runs], 1) for key in ("install_s", "demo_s", "total_s")}
    medians["train_steps_per_s"] = _common.median([r["train_steps_per_s"] for r in runs], 3)
    medians[recall] = _common.median([r["metrics"][recall] for r in runs], 4)
    results = {"runs": runs, "median": medians,
               "targets": {"total_s_at_most": TARGET_TOTAL_S, f"{recall}_at_least": TARGET_RECALL,
                           "met": medians["total_s"] <= TARGET_TOTAL_S and medians[recall] >= TARGET_RECALL}}
    notes = ("A fresh clone of HEAD per run: `make setup-demo` (python -m venv .venv, pip install -e '.[train]' with "
             "torch and torchvision from this machine's disk) then `make demo`; wall times of each. "
             "train_steps_per_s: median of the run's logged samples/s over the batch size.")
    path = _common.write_json(args.out, _common.envelope(benchmark="demo", config={"runs": args.runs},
                                                         results=results, notes=notes, machine=machine,
                                                         git_commit=commit, date=started))
    _common.say(json.dumps(medians))
    _common.say(f"wrote {path}")


if __name__ == "__main__":
    main()
