"""The shape of the package: no import circles, the training engine above everything but the command line, loading
a run for inference without the trainer, and comments that cite only what is in the repository."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "clipsnail"


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


def test_comments_cite_only_what_is_in_the_repository():
    absent = re.compile(r"seed[ _]?00\d|DESIGN\.md|REFERENCE\.md|\bseeds/", re.IGNORECASE)
    roots = [PACKAGE, SRC.parent / "tests", SRC.parent / "bench"]
    hits = [f"{p.relative_to(SRC.parent)}:{i}: {line.strip()}" for root in roots for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if absent.search(line) and "seed000_flickr8k" not in line and p.name != "test_structure.py"]
    assert hits == []


def test_no_function_is_longer_than_a_screen_and_a_half():
    """A function that does not fit on a screen or two is several functions: none in the package over 100 lines."""
    long = [f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert long == []
