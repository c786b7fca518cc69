#!/usr/bin/env python
"""Benchmark: what loading a model costs before and after the loading code moved to clipsnail.families.

BEFORE is the source tree of an older commit (--before, default f91e034, when `clipsnail.load` still imported the
training code: clipsnail.train, clipsnail.tasks), extracted with `git archive`; NOW is this checkout's src/. Each
case runs in a fresh Python process with that tree first on PYTHONPATH (the child checks `clipsnail.__file__`):

  load        `import clipsnail; clipsnail.load(RUN)` and one `encode_text`: wall time, the clipsnail.* modules
              in sys.modules afterwards, whether any clipsnail.train / clipsnail.tasks module is among them, and
              whether timm was imported;
  serve_app   the web app's start without the server: `from clipsnail.serve import create_app`, ImageIndex.load,
              the index's model loaded, `create_app(index, model)`: wall time and the same module figures;
  search_cli  `python -m clipsnail search --index IDX "a red circle"`: wall time of the whole command.

The wall time is the parent's clock around the child process, interpreter start included; the CPU time is the
child's user + system time (less moved by other work on shared cores than the wall time). Each (case, tree) runs
once untimed first (bytecode compiled, the check that the tree can run the case at all), then --reps times, BEFORE
and NOW alternating (which one goes first alternates too); the results hold every time, the medians, the ratios
NOW / BEFORE of the medians and the median of the ratios within a repetition.

The data are made with the NOW code in --work (a temporary folder unless given; a given one is kept and reused):
64 captioned shapes at 16 px, a tiny CLIP (tests/helpers.py's TINY_CLIP settings) trained for 2 steps, and an
index of the shapes. --conse adds a load case for conse:efficientnet-lite0+all-minilm-l6-v2 (converted from the
installed packages into the clipsnail home on first use, which takes a while).

    .venv/bin/python bench/import_cost.py              # a few minutes on a shared 2-core CPU
    .venv/bin/python bench/import_cost.py --reps 1 --out runs/import_cost_quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

say = _common.say
TAG = "IMPORTCOST "
CONSE = "conse:efficientnet-lite0+all-minilm-l6-v2"
QUERY = "a red circle"
# tests/helpers.py's TINY_CLIP, trained for 2 steps.
TINY_CLIP = [
    "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.depth=1",
    "model.vision.heads=2", "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
    "model.head.embed_dim=16",
    "data.vocab_size=300", "data.context_length=20", "train.batch_size=16", "train.log_every=1",
    "optim.warmup_steps=2", "train.max_steps=2",
]

# Appended to each child: what it imported, as one tagged JSON line.
REPORT = f"""
import json, sys
mods = sorted(k for k in sys.modules if k == "clipsnail" or k.startswith("clipsnail."))
print({TAG!r} + json.dumps({{"file": clipsnail.__file__, "modules": len(mods), "all_modules": len(sys.modules),
      "training": [k for k in mods if k.split(".")[1:2] in (["train"], ["tasks"])], "timm": "timm" in sys.modules}}))
"""
LOAD_CHILD = """
import sys, clipsnail, torch
model = clipsnail.load(sys.argv[1])
with torch.inference_mode():
    model.encode_text([sys.argv[2]])
""" + REPORT
SERVE_CHILD = """
import sys
from clipsnail.serve import create_app
import clipsnail
from clipsnail.inference.index import ImageIndex
index = ImageIndex.load(sys.argv[1])
index.check_model(index.model_dir)
app = create_app(index, clipsnail.load(index.model_dir))
""" + REPORT


def clipsnail_cmd(src: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    """A fresh `python ...` with `src` first on PYTHONPATH, run in `work`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)


def scrub(text: str, work: Path) -> str:
    """A child's message without this machine's paths."""
    return text.replace(str(work), "WORK").replace(str(_common.ROOT), ".")[-600:]


def prepare(work: Path, before: str) -> dict:
    """The BEFORE tree, the shapes, the tiny CLIP run and its index, made with the NOW code unless already there."""
    trees = {"before": work / before / "src", "now": _common.ROOT / "src"}
    if not trees["before"].is_dir():
        (work / before).mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", before, "src"], cwd=_common.ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work / before)], input=archive, check=True)
    steps = [
        ("data/scenes.json", ["data", "shapes", "--n", "64", "--size", "16", "--out", "data"]),
        ("run/model.safetensors", ["clip", "train", "--captions", "data/captions.csv", "--images", "data/images",
                                   "--split-file", "data/split.json", "--no-progress", "--out", "run",
                                   *[a for s in TINY_CLIP for a in ("--set", s)]]),
        ("index/index.json", ["index", "build", "--model", "run", "--images", "data/images", "--out", "index",
                              "--no-progress"]),
    ]
    for done, args in steps:
        if not (work / done).exists():
            say(f"clipsnail {' '.join(args[:2])} (NOW code)")
            proc = clipsnail_cmd(trees["now"], work, "-m", "clipsnail", *args)
            if proc.returncode:
                raise SystemExit(f"clipsnail {' '.join(args)} failed: {scrub(proc.stderr, work)}")
            if done.startswith("run/"):
                flatten_model_section(work / "run" / "config.json")
    return trees


def flatten_model_section(config_json: Path) -> None:
    """The run's model section in the flat form of before the split into vision/text/head sections, which both
    trees read (the NOW code migrates it on read)."""
    _common.use_source_tree()
    from clipsnail.models.clip import FLAT_MODEL_KEYS

    config = json.loads(config_json.read_text())
    model = config["model"]
    flat = {old: model[section][key] for old, new in FLAT_MODEL_KEYS.items() for section, key in [new.split(".")]}
    config["model"] = {**flat, "activation": model["activation"]}
    config_json.write_text(json.dumps(config, indent=2))


def cases(work: Path, conse: bool) -> dict[str, list[str]]:
    """Each case's arguments to python (after the interpreter)."""
    found = {"load": ["-c", LOAD_CHILD, str(work / "run"), QUERY],
             "serve_app": ["-c", SERVE_CHILD, str(work / "index")],
             "search_cli": ["-m", "clipsnail", "search", "--index", str(work / "index"), "-k", "5", QUERY]}
    if conse:
        found["load_conse"] = ["-c", LOAD_CHILD, CONSE, QUERY]
    return found


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(src: Path, work: Path, args: list[str]) -> dict:
    """One timed child: seconds, and its report when it prints one; {"error": ...} when it fails or imported
    clipsnail from another tree."""
    cpu_start, start = children_cpu_s(), time.perf_counter()
    proc = clipsnail_cmd(src, work, *args)
    seconds, cpu = time.perf_counter() - start, children_cpu_s() - cpu_start
    if proc.returncode:
        return {"error": f"exit {proc.returncode}: {scrub(proc.stderr or proc.stdout, work)}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    report = json.loads(lines[-1][len(TAG):]) if lines else {}
    if report and not Path(report.pop("file")).resolve().is_relative_to(src.resolve()):
        return {"error": "clipsnail was imported from another tree than the one on PYTHONPATH"}
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), **report}


def measure(trees: dict, work: Path, conse: bool, reps: int) -> tuple[dict, list]:
    """Warm-up (and check) each (case, tree), then reps timed runs alternating the trees: the results per case and
    the load averages seen before each repetition."""
    todo = cases(work, conse)
    results = {name: {tree: {"seconds": [], "cpu_seconds": []} for tree in trees} for name in todo}
    for name, args in todo.items():
        for tree, src in trees.items():
            first = run_once(src, work, args)
            say(f"warm-up {name} {tree}: {first}")
            if "error" in first:
                results[name][tree] = {"error": first["error"]}
    loads = []
    for rep in range(reps):
        loads.append([round(x, 2) for x in os.getloadavg()])
        order = list(trees) if rep % 2 == 0 else list(trees)[::-1]
        for name, args in todo.items():
            for tree in order:
                slot = results[name][tree]
                if "error" in slot:
                    continue
                got = run_once(trees[tree], work, args)
                if "error" in got:
                    results[name][tree] = {"error": got["error"]}
                    continue
                for key in ("seconds", "cpu_seconds"):
                    slot[key].append(got.pop(key))
                slot.update(got)
        say(f"repetition {rep + 1}/{reps} done, load average {loads[-1]}")
    for per_tree in results.values():
        summarise(per_tree)
    return results, loads


def summarise(per_tree: dict) -> None:
    """Medians of each tree's wall and CPU seconds; the ratios NOW / BEFORE of the medians, and the median of the
    ratios of the runs paired by repetition (less moved by the load changing over the run)."""
    for slot in per_tree.values():
        if "seconds" in slot:
            slot["median_s"] = _common.median(slot["seconds"], 3)
            slot["median_cpu_s"] = _common.median(slot["cpu_seconds"], 3)
    before, now = per_tree["before"], per_tree["now"]
    for key, median in (("ratio_now_over_before", "median_s"), ("cpu_ratio_now_over_before", "median_cpu_s")):
        b, n = before.get(median), now.get(median)
        per_tree[key] = round(n / b, 3) if b and n else None
    paired = [n / b for b, n in zip(before.get("seconds", []), now.get("seconds", [])) if b]
    per_tree["paired_ratio_median"] = _common.median(paired, 3)


def table(results: dict) -> str:
    """Medians, ratios and module counts per case, as plain text."""
    both = ("before", "now")
    rows = [[name, *(r[t].get("median_s", r[t].get("error", "-")[:30]) for t in both), r["ratio_now_over_before"],
             r["paired_ratio_median"], *(r[t].get("median_cpu_s") for t in both), r["cpu_ratio_now_over_before"],
             *(r[t].get("modules") for t in both)] for name, r in results.items()]
    return _common.format_table(["case", "before s", "now s", "now/before", "paired", "before cpu s", "now cpu s",
                                 "cpu now/before", "mods before", "mods now"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="f91e034", help="the older commit (default f91e034)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per case and tree (default 5)")
    ap.add_argument("--work", help="folder for the trees, data, run and index (kept; default: a temporary one)")
    ap.add_argument("--conse", action="store_true", help=f"also time loading {CONSE}")
    ap.add_argument("--out", default=str(_common.RESULTS / "import_cost.json"))
    args = ap.parse_args()
    machine = _common.machine_info()
    with tempfile.TemporaryDirectory(prefix="import_cost_") as tmp:
        work = _common.under_root(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trees = prepare(work, args.before)
        results, loads = measure(trees, work, args.conse, args.reps)
    end_load = [round(x, 2) for x in os.getloadavg()]
    say(table(results))
    notes = [
        "Wall time of a fresh child process (interpreter start included), measured by the parent, and the child's "
        "user + system CPU time (RUSAGE_CHILDREN): medians over the repetitions after one untimed warm-up per case "
        "and tree. BEFORE and NOW alternate; paired_ratio_median is the median of NOW / BEFORE within each "
        "repetition. CPU time is less moved than wall time by other work on the cores.",
        "The machine's cores are shared with other workers: load average (1, 5, 15 min) "
        f"{machine.get('load_average_at_start')} at the start, {end_load} at the end, before each repetition {loads}.",
        "modules: clipsnail.* modules in sys.modules after the case; training: the clipsnail.train / clipsnail.tasks "
        "ones among them; timm: whether timm was imported. The run and index were made with the NOW code.",
    ]
    config = {"before": args.before, "reps": args.reps, "conse": args.conse, "data": "shapes, 64 images at 16 px",
              "clip": TINY_CLIP, "query": QUERY}
    out = _common.write_json(_common.under_root(args.out), _common.envelope(
        benchmark="import_cost", config=config, results=results, notes=notes, machine=machine))
    say(f"wrote {out.relative_to(_common.ROOT) if out.is_relative_to(_common.ROOT) else out}")


if __name__ == "__main__":
    main()
