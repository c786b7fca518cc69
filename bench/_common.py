"""Helpers shared by the benchmark scripts in bench/: where the package is, machine description, git commit,
peak memory, JSON results written atomically, and a plain-text table.

Each benchmark writes bench/results/NAME.json in one envelope (`envelope`): {"benchmark", "machine", "git_commit",
"date", "config", "results", "notes", ...}; BENCHMARKS.md summarises them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The real images some benchmarks read, which the repository does not hold: $CLIPSNAIL_BENCH_DATA (default data/,
# ignored by git) with coco_val_mini/ (159 COCO val2017 photos in images/ and their captions_val2017.json),
# cifar10_test/ (the CIFAR-10 test set as a class folder, <class>/*.png) and mnist_test/ (the MNIST t10k IDX files).
BENCH_DATA = Path(os.environ.get("CLIPSNAIL_BENCH_DATA") or ROOT / "data")


def data_name(path: Path) -> str:
    """A data path as the results record it: relative to BENCH_DATA ("coco_val_mini/images"), never a path of the
    machine that ran the benchmark."""
    try:
        return str(Path(path).relative_to(BENCH_DATA))
    except ValueError:
        return Path(path).name


def use_source_tree() -> None:
    """Import clipsnail from this checkout's src/ (the package need not be installed)."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def source_env() -> dict:
    """This process's environment with this checkout's src/ first on PYTHONPATH: for `python -m clipsnail` children."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                        if p)}


# The ConSE CLIP of the two packaged models, which the photo benchmarks start from.
CONSE_SPEC = "conse:efficientnet-lite0+all-minilm-l6-v2"


def convert_conse(out: Path, spec: str = CONSE_SPEC) -> Path:
    """`clipsnail convert --from SPEC --out OUT` in a child process (about half a minute); exits on failure."""
    proc = subprocess.run([sys.executable, "-m", "clipsnail", "convert", "--from", spec, "--out", str(out)],
                          cwd=ROOT, env=source_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"conversion of {spec} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out


def last_files_per_class(root: Path, per_class: int) -> tuple[list[str], list[Path], list[int]]:
    """(class names, image paths, their class indices) of a class folder ROOT/<class>/<image>: the last `per_class`
    .jpg/.png files of each class by name, classes sorted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in (".jpg", ".png"))[-per_class:]
        paths += files
        labels += [c] * len(files)
    return classes, paths, labels


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU, cores, memory, library versions and torch threads; load average shows how busy the machine was."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_interop_threads=torch.get_num_interop_threads(),
                    cuda_available=torch.cuda.is_available())
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit(root: Path = ROOT) -> dict:
    """HEAD commit and whether src/ has uncommitted changes (numbers from a dirty tree are not that commit's)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "src_dirty": bool(git("status", "--porcelain", "--", "src"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "src_dirty": None}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def command_line() -> str:
    """How this benchmark was run, as a user types it from the repository root: "python bench/NAME.py ARGS"."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(script.name)
    return " ".join(["python", str(shown), *sys.argv[1:]])


def envelope(*, benchmark: str, config: dict, results, notes, machine: dict | None = None,
             git_commit: dict | None = None, date: str | None = None, command: str | None = None, **extra) -> dict:
    """The one shape of every bench/results/NAME.json: what ran (benchmark, config), where and when (machine,
    git_commit, date: measured now unless given, e.g. at the start of a long run), what came out (results), what
    to know when reading it (notes), how it was run (command: this process's command line unless given), then
    anything else the benchmark records (goals, timings, runs...)."""
    return {"benchmark": benchmark, "machine": machine if machine is not None else machine_info(),
            "git_commit": git_commit if git_commit is not None else globals()["git_commit"](),
            "date": date or now_iso(), "config": config, "results": results, "notes": notes,
            "command": command or command_line(), **extra}


def write_json(path: str | Path, data: dict) -> Path:
    """Write to a temp name then rename (safeio.atomic_write_text): a killed benchmark never leaves half a results
    file."""
    use_source_tree()
    from clipsnail.core.safeio import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned plain-text table; floats with 4 significant decimals, None as '-'."""
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.4f}".rstrip("0").rstrip(".") if v % 1 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- shared by benchmarks


def say(text: str) -> None:
    print(text, flush=True)


def median(values, ndigits: int | None = None):
    """Median of the values that are not None (None when there are none), optionally rounded."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = statistics.median(values)
    return round(m, ndigits) if ndigits is not None else m


def pixelsnail_rows(presets: str, shapes: str) -> tuple[list[str], list[str]]:
    """--presets and --shapes, comma-separated -> (presets, shapes); an unknown preset (models.pixelsnail.CONFIGS)
    or a bad shape ends the benchmark with a message."""
    use_source_tree()
    from clipsnail.models.pixelsnail import CONFIGS

    names = [s.strip() for s in presets.split(",") if s.strip()]
    shape_list = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    for s in shape_list:
        parse_shape(s)
    return names, shape_list


def under_root(path: str | Path) -> Path:
    """A path given on the command line; a relative one is taken from the repository root."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def parse_shape(text: str) -> tuple[int, int, int]:
    """'32x32x3' -> (H, W, C)."""
    try:
        h, w, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad shape {text!r}: expected HxWxC, e.g. 32x32x3") from None
    if c not in (1, 3):
        raise SystemExit(f"bad shape {text!r}: C must be 1 or 3")
    return h, w, c


def median_logged_speed(run: Path) -> float:
    """Median of the training speeds the engine logged (samples/s over each log interval): less sensitive than the
    wall time to other work on the machine during part of the run."""
    speeds = [json.loads(ln)["samples_per_s"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()
              if '"samples_per_s"' in ln]
    return round(statistics.median(speeds), 1) if speeds else float("nan")


# Peak memory is measured in a fresh child process per model, which prints one tagged JSON line.
MEM_TAG = "PEAKMEM "


def proc_status_mib(field_name: str, pid: int | str = "self") -> float | None:
    """VmRSS (current) or VmHWM (peak) of a process (default: this one) from /proc/PID/status, in MiB; None
    without /proc or once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return round(int(line.split()[1]) / 2**10, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def print_mem(figures: dict) -> None:
    """The child's answer: one tagged JSON line on stdout."""
    print(MEM_TAG + json.dumps(figures), flush=True)


def run_mem_child(cmd: Sequence[str]) -> dict:
    """Run a memory child process and return its figures (plus the seconds it took), or {"error": ...}."""
    t = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEM_TAG)]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}"}
    return dict(json.loads(lines[-1][len(MEM_TAG):]), seconds=round(time.perf_counter() - t, 1))



def synthetic_index(root: Path, index_dir: Path, vectors, model_dir: Path | None = None, stats: dict | None = None):
    """An index of len(vectors) real (empty) files, 1,000 per folder under root (so a walk and its stats are real),
    written by the index's own writer with `vectors` [N, D] as their embeddings (model_dir: the run recorded as
    having made them, with its weights' fingerprint)."""
    use_source_tree()
    from clipsnail.core.fingerprint import weights_fingerprint
    from clipsnail.data.photo_facts import PhotoFacts
    from clipsnail.inference.index import (
        DEFAULT_APPROX_THRESHOLD,
        DEFAULT_TARGET_RECALL,
        _base_state,
        _scan,
        _write_new,
    )

    for i in range(len(vectors)):
        folder = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").touch()
    found = _scan(root, allow_empty=False, follow_links=False)
    rels = sorted(found)
    state = _base_state(root, False, str(model_dir.resolve()) if model_dir else None, vectors.shape[1],
                        DEFAULT_APPROX_THRESHOLD, None, stats or {})
    state["model_weights"] = weights_fingerprint(model_dir) if model_dir else None
    _write_new(index_dir, state, rels, {r: (*found[r], f"{i:040x}") for i, r in enumerate(rels)}, vectors,
               {r: PhotoFacts() for r in rels}, {}, DEFAULT_TARGET_RECALL)
