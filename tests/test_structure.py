"""The shape of the package: no import circles, the training engine above everything but the command line, loading
a run for inference without the trainer, no reference to a path outside the repository, and functions short and
simple enough to read (at most 100 lines, McCabe complexity at most 15)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "clipsnail"
ROOT = SRC.parent
BENCH = ROOT / "bench"


def import_graph() -> dict[str, set[str]]:
    """clipsnail module -> the clipsnail modules it imports anywhere in its text (inside functions too: an import
    moved into a function to dodge a circle is still a circle)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import mod` imports the module; `from mod import name` the module it is in
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_engine_is_imported_only_by_the_command_line_and_the_demo():
    importers = sorted(m for m, targets in import_graph().items() if "clipsnail.train.engine" in targets)
    assert all(m == "clipsnail.apps.demo" or m.startswith("clipsnail.cli") for m in importers), importers


# The package's folders from the bottom up: a module imports from its own layer or the ones below it.
LAYERS = [
    ("clipsnail.core",),  # errors, configs, safe file writes, run directories, torchrun, weight names
    ("clipsnail.data", "clipsnail.layers"),  # reading data; building blocks of the models
    ("clipsnail.models",),
    ("clipsnail.inference",),  # metrics, sampling, generation, captioning, the index, figures
    ("clipsnail.families",),  # each model family's run format: config, save, load (clipsnail.load)
    ("clipsnail.train",),  # the engine, losses, optimiser
    ("clipsnail.tasks",),
    ("clipsnail.apps",),  # load by name, convert, export, demos
    ("clipsnail.serve",),
    ("clipsnail", "clipsnail.index", "clipsnail.export"),  # the package and its public re-exports
    ("clipsnail.cli", "clipsnail.__main__"),
]


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or (p != "clipsnail" and module.startswith(p + ".")) for p in prefixes):
            return level
    return None


def test_every_module_is_in_a_layer():
    assert sorted(m for m in import_graph() if layer_of(m) is None) == []


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    upward = {m: sorted(t for t in targets if layer_of(t) > layer_of(m)) for m, targets in graph.items()}
    assert {m: t for m, t in upward.items() if t} == {}


@pytest.fixture(scope="module")
def a_run_of_each_family(clip_run, shapes_dir, colours_dir, tmp_path_factory):
    """family -> a run directory written by its training command (one step of a tiny model)."""
    from helpers import TINY_CLASSIFY, caption_flags, sets, tiny_t2i_args

    from clipsnail.cli import main

    root = tmp_path_factory.mktemp("families")
    one_step = ["train.max_steps=1", "train.eval_every=0"]
    commands = {
        "classify": ["classify", "train", "--data", str(colours_dir), "--arch", "lemevit_tiny_cifar", "--no-progress",
                     *sets(TINY_CLASSIFY + one_step)],
        "pixelsnail": ["pixelsnail", "train", "--data", f"folder:{colours_dir}", "--config", "tiny", "--no-progress",
                       *sets(["data.image_size=8", "train.batch_size=8", "data.samples_per_epoch=0", *one_step])],
        "t2i_retrieve": ["t2i", "train", "--kind", "retrieve", "--encoder", str(clip_run), *caption_flags(shapes_dir),
                         *sets(["model.width=32", "model.depth=1", "model.heads=2", "train.batch_size=16", *one_step])],
        "caption": ["caption", "train", "--encoder", str(clip_run), *caption_flags(shapes_dir),
                    *sets(["model.width=32", "model.depth=1", "model.heads=2", "train.batch_size=16",
                           "data.vocab_size=300", "data.context_length=20", *one_step])],
    }
    runs = {"clip": clip_run}
    for family, argv in commands.items():
        runs[family] = root / family
        assert main([*argv, "--out", str(runs[family])]) == 0, family
    runs["t2i_pixelsnail"] = root / "t2i_pixelsnail"
    assert main(tiny_t2i_args(clip_run, shapes_dir, runs["t2i_pixelsnail"], "train.max_steps=1")) == 0
    return runs


# Loads a run of every family and asks each model for an answer, then lists the clipsnail modules imported.
SERVE_EVERY_FAMILY = """
import json, sys
import clipsnail
from PIL import Image
from clipsnail.inference.index import build_index

runs, images, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
image = Image.open(sorted(__import__("pathlib").Path(images).iterdir())[0]).convert("RGB")
clip = clipsnail.load(runs["clip"])
index, _ = build_index(clip, images, out, progress=False)
assert index.search(clip.encode_text(["a red circle"]), k=3)[0]
classifier = clipsnail.load(runs["classify"])
assert classifier(classifier.preprocess(image)[None]).shape[0] == 1
pixelsnail = clipsnail.load(runs["pixelsnail"])
pixelsnail(__import__("torch").zeros(1, pixelsnail.config.model.channels, 8, 8))
assert clipsnail.load(runs["t2i_retrieve"]).generate("a red circle", k=1)
clipsnail.load(runs["t2i_pixelsnail"]).generate("a red circle", n=1)
assert clipsnail.load(runs["caption"]).caption([image], beam_size=1)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("clipsnail."))))
"""


@pytest.mark.slow
def test_serving_a_run_of_every_family_imports_no_training_code(a_run_of_each_family, shapes_dir, tmp_path):
    """The library floor (clipsnail.families) loads every kind of run without the trainer: after loading a run of
    each family and answering with it (a search over a fresh index among them), no module of clipsnail.train,
    clipsnail.tasks or clipsnail.cli has been imported."""
    runs = {family: str(run) for family, run in a_run_of_each_family.items()}
    out = subprocess.run([sys.executable, "-c", SERVE_EVERY_FAMILY, json.dumps(runs), str(shapes_dir / "images"),
                          str(tmp_path / "index")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert "clipsnail.families.clip" in imported and "clipsnail.families.caption" in imported
    assert [m for m in imported if m.startswith(("clipsnail.train", "clipsnail.tasks", "clipsnail.cli"))] == []


def repository_text_files() -> list[Path]:
    """The files a reader follows: the Python of the package, the tests and the benchmarks, every Markdown file,
    the packaged configs, the pyproject, the Makefile and the CI script. (bench/results holds what runs recorded,
    the machine's paths included, and is not read.)"""
    files = [p for folder in (SRC, ROOT / "tests", BENCH) for p in folder.rglob("*.py")]
    files += [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *SRC.rglob("*.md"), *BENCH.glob("*.md")]
    files += [*(PACKAGE / "configs").rglob("*.yaml")]
    files += [ROOT / "pyproject.toml", ROOT / "Makefile", ROOT / ".ci" / "run"]
    return sorted({p for p in files if p.is_file()})


# The patterns are spelled so that their own text does not match them (an escaped slash is a slash to `re`), so this
# file is checked like any other.
# Anywhere, code and test data included: the workspace the repository was written in (the folder shared beside it,
# the machine's work and scratch folders, which a reader does not have; examples write under the git-ignored runs/)
# and the names of documents and seeds that stayed outside it.
OUTSIDE = re.compile(r"\.\.\/shared\b|(?<![\w.])\/(?:work|tmp)\/|seed[ _]?00\d|DESIGN\.md|REFERENCE\.md|\bseeds\/",
                     re.IGNORECASE)
# A relative path into a folder: `..` steps, then a folder name and a slash. In prose it is a reference to be
# followed; in Python, strings and comments also show paths a test or a check refuses, so climbs are judged in prose
# only. An example of a refused path in prose names no folder beyond the climb (a file name or nothing).
CLIMB = re.compile(r"(?<![\w./])((?:\.\.\/)+)[\w.-]+\/")


def outside_references(path: Path) -> list[str]:
    """`path`'s lines that refer to a place outside the repository, as "file:line: text"."""
    where = path.relative_to(ROOT)
    prose = path.suffix != ".py"
    depth = len(where.parts) - 1  # a climb counts from the file's folder, as a link in it reads (the lenient reading)
    hits = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        climbs_out = prose and any(m.group(1).count("..") > depth for m in CLIMB.finditer(line))
        if OUTSIDE.search(line) or climbs_out:
            hits.append(f"{where}:{i}: {line.strip()}")
    return hits


def test_the_repository_refers_to_no_path_outside_it():
    """Nothing the repository holds leads a reader outside it: no folder beside it, no machine path of where it was
    written, no relative path climbing above its root, no document or seed that is not in it."""
    files = repository_text_files()
    assert ROOT / "README.md" in files and Path(__file__).resolve() in files
    assert [hit for p in files for hit in outside_references(p)] == []


def test_the_outside_reference_check_sees_each_kind(tmp_path, monkeypatch):
    """The check above catches what it names (so an empty list there means something): each kind of reference in a
    Markdown file, all but climbs in Python too, and passes examples of refused paths."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "a.md"
    up, up2 = "..", "../.."
    lines = [f"data in `{up}/shared/data`", "see /" + "work/main/x", "out to /" + "tmp/x.json",
             f"files in `{up2}/main/src`", "as " + "DESIGN" + ".md says", "seed" + " 003 " + "seeds" + "/",
             f"`{up}/README.md` and `{up}/x.jpg` are refused", f"the folder `{up}/docs/` is here", "plain text"]
    doc.write_text("\n".join(lines))
    assert [int(h.split(":")[1]) for h in outside_references(doc)] == [1, 2, 3, 4, 5, 6]
    code = tmp_path / "t.py"
    code.write_text("\n".join([f"x = '{up2}/outside/secret.png'", "y = '/" + "tmp/x'", f"# {up}/shared/x",
                                "z = '/" + "work/x'"]))
    assert [int(h.split(":")[1]) for h in outside_references(code)] == [2, 3, 4]


def test_no_function_is_longer_than_a_screen_and_a_half():
    """A function that does not fit on a screen or two is several functions: none in the package or the benchmarks
    over 100 lines."""
    files = [*sorted(PACKAGE.rglob("*.py")), *sorted(BENCH.rglob("*.py"))]
    assert BENCH / "lemevit.py" in files
    long = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in files for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert long == []


def test_no_function_has_more_than_15_paths():
    """McCabe complexity (ruff's C901) at most 15 in the package, the tests and the benchmarks: past that a function
    has more paths than a reader or a test follows one by one. The setting is given here, so it holds whatever the
    pyproject selects."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "C901", "--config",
                          "lint.mccabe.max-complexity=15", "src", "tests", "bench"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
