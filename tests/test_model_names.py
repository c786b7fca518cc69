"""Pretrained CLIPs by name (`hf-hub:ORG/NAME`): resolved from a fake Hugging Face cache (the hub's own layout:
models--ORG--NAME/refs/main and snapshots/COMMIT/), converted once into $CLIPSNAIL_HOME, reused after; offline
throughout (no test reaches the network)."""

import json
import shutil
import subprocess
import sys
import threading

import huggingface_hub
import pytest
import torch
from helpers import make_open_clip, noise_image, run_error, save_safetensors
from safetensors.torch import load_file, save_file

import clipsnail
from clipsnail.apps import model_names
from clipsnail.apps.convert import convert_open_clip
from clipsnail.apps.model_names import resolve_name, resolve_run
from clipsnail.cli import main
from clipsnail.core import safeio
from clipsnail.core.errors import DataError
from clipsnail.inference.index import ImageIndex

pytest.importorskip("open_clip")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEWER = "89abcdef0123456789abcdef0123456789abcdef"
CONFIG = {"model_cfg": {"embed_dim": 32, "quick_gelu": False}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5],
                                                                                    "std": [0.25, 0.25, 0.25]}}
TEXTS = ["a photo of a cat", "a red square", ""]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An open_clip_model.safetensors of a tiny random open_clip ViT."""
    return save_safetensors(make_open_clip(quick_gelu=False, seed=3),
                            tmp_path_factory.mktemp("weights") / "open_clip_model.safetensors")


@pytest.fixture(scope="module")
def by_hand(weights, tmp_path_factory):
    """`weights` converted by hand (`clipsnail convert`), with the same open_clip_config.json beside them."""
    folder = tmp_path_factory.mktemp("by_hand")
    for name, data in open_clip_files(weights).items():
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.read_bytes())
    convert_open_clip(folder / "open_clip_model.safetensors", folder / "run")
    return clipsnail.load(folder / "run")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and clipsnail home under tmp_path, offline. huggingface_hub reads its
    environment once, at import, so its constants are set too."""
    cache, home = tmp_path / "hf" / "hub", tmp_path / "clipsnail"
    cache.mkdir(parents=True)
    for name, value in (("HF_HUB_CACHE", str(cache)), ("CLIPSNAIL_HOME", str(home)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, home


def put_in_cache(cache, files, repo="org/name", commit=COMMIT):
    """`files` ({name: source path or bytes}) as the hub's cache holds a download of `repo` at `commit`, which
    refs/main names; returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        if isinstance(data, bytes):
            (snapshot / name).write_bytes(data)
        else:
            shutil.copyfile(data, snapshot / name)
    return snapshot


def open_clip_files(weights):
    return {"open_clip_config.json": json.dumps(CONFIG).encode(), "open_clip_model.safetensors": weights}


def count_conversions(monkeypatch):
    calls = []

    def counted(path, out):
        calls.append(path)
        return convert_open_clip(path, out)

    monkeypatch.setattr(model_names, "convert_open_clip", counted)
    return calls


def test_load_by_name_equals_converting_the_file_by_hand(hub, weights, by_hand):
    cache, home = hub
    put_in_cache(cache, open_clip_files(weights))
    model = clipsnail.load("hf-hub:org/name")
    assert model.run_dir == (home / "runs" / "hf-hub" / "org--name" / COMMIT).resolve()
    assert tuple(model.cfg.image_mean) == (0.5, 0.5, 0.5)  # open_clip_config.json was read beside the weights
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.encode_text(TEXTS), by_hand.encode_text(TEXTS))
        assert torch.equal(model.encode_image(images), by_hand.encode_image(images))
    # the run is whole, and nothing else is left beside it (the lock file is removed with the lock)
    assert sorted(p.name for p in model.run_dir.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in model.run_dir.parent.iterdir()) == [COMMIT]


def test_later_uses_reuse_the_cached_run(hub, weights, monkeypatch):
    cache, _ = hub
    put_in_cache(cache, open_clip_files(weights))
    calls = count_conversions(monkeypatch)
    run = resolve_run("hf-hub:org/name")
    stamp = (run / "model.safetensors").stat().st_mtime_ns

    def no_download(*args, **kwargs):
        raise AssertionError("the cached files must be used")

    monkeypatch.setattr(model_names, "hf_hub_download", no_download)
    assert resolve_run("hf-hub:org/name") == run
    assert clipsnail.load("hf-hub:org/name").run_dir == run.resolve()
    assert len(calls) == 1 and (run / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_newer_revision_is_converted_and_a_cleaned_hub_cache_keeps_the_run(hub, weights, monkeypatch):
    cache, home = hub
    put_in_cache(cache, open_clip_files(weights))
    calls = count_conversions(monkeypatch)
    first = resolve_run("hf-hub:org/name")
    put_in_cache(cache, open_clip_files(weights), commit=NEWER)  # `hf download` moved refs/main
    newer = resolve_run("hf-hub:org/name")
    assert newer.name == NEWER and first.name == COMMIT and len(calls) == 2
    shutil.rmtree(cache / "models--org--name")  # the multi-GB download deleted: offline, the converted run serves
    assert resolve_run("hf-hub:org/name") == newer and len(calls) == 2


def test_index_build_search_and_serve_by_name(hub, weights, tmp_path, capsys):
    cache, home = hub
    put_in_cache(cache, open_clip_files(weights))
    images = tmp_path / "photos"
    for i in range(3):
        noise_image(images / f"{i}.png", seed=i, size=32)
    assert main(["index", "build", "--model", "hf-hub:org/name", "--images", str(images), "--out",
                 str(tmp_path / "index"), "--no-progress"]) == 0
    run = (home / "runs" / "hf-hub" / "org--name" / COMMIT).resolve()
    index = ImageIndex.load(tmp_path / "index")
    assert len(index) == 3 and index.model_dir == run  # `serve` and `index update` load the recorded run
    capsys.readouterr()
    assert main(["search", "--images", str(images), "--model", "hf-hub:org/name", "-k", "2", "--no-progress",
                 "a red square"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert (run / "embeddings").is_dir()  # the folder search's cache goes in the resolved run


def test_fine_tuning_and_other_tasks_take_the_resolved_run(hub, weights):
    from clipsnail.cli import build_parser
    from clipsnail.cli.clip import clip_config
    from clipsnail.cli.t2i import t2i_config

    cache, home = hub
    put_in_cache(cache, open_clip_files(weights))
    run = str(home / "runs" / "hf-hub" / "org--name" / COMMIT)
    for flags in (["--init", "hf-hub:org/name"], ["--set", "finetune.init=hf-hub:org/name"]):
        args = build_parser().parse_args(["clip", "train", "--out", "x", *flags])
        assert clip_config(args).finetune.init == run  # what the task reads, and the run's config.json records
    for kind, flag, key in (("pixelsnail", "--clip", "clip"), ("retrieve", "--encoder", "encoder")):
        args = build_parser().parse_args(["t2i", "train", "--kind", kind, flag, "hf-hub:org/name", "--out", "x"])
        assert getattr(t2i_config(args), key) == run
    assert resolve_name("hf-hub:org/name") == run
    for other in ("timm:resnet18", "efficientnet-lite0", "runs/mine", ""):  # not names: left for the task to read
        assert resolve_name(other) == other


def test_not_in_the_cache_offline_is_one_line_saying_what_to_download(hub, capsys, tmp_path):
    cache, home = hub
    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    line = run_error(capsys, ["index", "build", "--model", f"hf-hub:{repo}", "--images", str(tmp_path), "--out",
                              str(tmp_path / "index")])
    for part in (f"hf-hub:{repo}", str(cache), "HF_HUB_OFFLINE", "open_clip_config.json",
                 "open_clip_model.safetensors", f"hf download {repo} open_clip_config.json open_clip_model.safetensors",
                 "clipsnail convert --from open_clip:FOLDER/open_clip_model.safetensors --out RUN"):
        assert part in line, part
    assert not (home / "runs").exists()  # nothing half made
    with pytest.raises(DataError, match="not in the Hugging Face cache"):
        clipsnail.load(f"hf-hub:{repo}")


def test_an_unreachable_hub_is_named_as_such(hub, monkeypatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(model_names, "hf_hub_download", unreachable)  # before going online: nothing is asked
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError, match=r"not in the Hugging Face cache .* and the hub cannot be reached \(without "
                                        r"a network, HF_HUB_OFFLINE=1 skips the retries\); "):
        resolve_run("hf-hub:org/name")


@pytest.mark.parametrize("spec", ["hf-hub:", "hf-hub:a/b/c", "hf-hub:org", "hf-hub:org/na me", "hf-hub:../x",
                                  "hf-hub:org/na--me", "hf-hub:org/-x", "hf-hub:org/x;rm", "hf-hub:/name"])
def test_malformed_names_are_one_line_errors(hub, spec):
    with pytest.raises(DataError) as e:
        resolve_run(spec)
    assert "\n" not in str(e.value) and spec in str(e.value) and "hf-hub:laion/CLIP-ViT-B-32" in str(e.value)


def test_malformed_name_on_the_command_line(hub, capsys, tmp_path):
    line = run_error(capsys, ["zeroshot", "--model", "hf-hub:a/b/c", "--classes", "a,b", str(tmp_path / "x.png")])
    assert "hf-hub:a/b/c: not a Hugging Face model name; expected hf-hub:ORG/NAME" in line


def test_a_repository_without_open_clip_files(hub, weights, monkeypatch):
    cache, _ = hub
    # the hub said, when last asked, that there is no open_clip_config.json (its cache remembers in .no_exist)
    snapshot = put_in_cache(cache, {"config.json": b"{}"}, repo="org/bert")
    no_exist = snapshot.parent.parent / ".no_exist" / COMMIT
    no_exist.mkdir(parents=True)
    (no_exist / "open_clip_config.json").touch()
    with pytest.raises(DataError, match=r"^hf-hub:org/bert: the repository has no open_clip_config.json; only "
                                        "open_clip models"):
        resolve_run("hf-hub:org/bert")
    # online, the hub's answer (EntryNotFoundError) says the same
    from huggingface_hub.utils import EntryNotFoundError

    def missing(*args, **kwargs):
        raise EntryNotFoundError("404 Entry Not Found")

    monkeypatch.setattr(model_names, "hf_hub_download", missing)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError, match=r"^hf-hub:org/other: the repository has no open_clip_config.json"):
        resolve_run("hf-hub:org/other")


def test_a_non_clip_repository_leaves_no_run(hub, weights, tmp_path):
    cache, home = hub
    state = load_file(str(weights))
    state["visual.trunk.stem.weight"] = torch.zeros(1)  # open_clip with a timm image tower: not convertible
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    put_in_cache(cache, open_clip_files(tmp_path / "open_clip_model.safetensors"), repo="org/timm-tower")
    with pytest.raises(DataError, match=r"^hf-hub:org/timm-tower: .*a timm image tower"):
        resolve_run("hf-hub:org/timm-tower")
    folder = home / "runs" / "hf-hub" / "org--timm-tower"
    assert [p.name for p in folder.iterdir()] == []


@pytest.mark.parametrize("locked", [True, False])
def test_concurrent_first_uses_convert_once(hub, weights, monkeypatch, locked):
    """Under the lock one of them converts; without one (no fcntl) each may, and one whole run stays."""
    cache, _ = hub
    put_in_cache(cache, open_clip_files(weights))
    calls = count_conversions(monkeypatch)
    if not locked:
        monkeypatch.setattr(safeio, "fcntl", None)
    results, errors = [], []

    def use():
        try:
            results.append(resolve_run("hf-hub:org/name"))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1 if locked else 1 <= len(calls) <= 3
    assert sorted(p.name for p in results[0].parent.iterdir() if p.name != f".{COMMIT}.lock") == [COMMIT]


def test_the_leftovers_of_a_killed_conversion_are_deleted(hub, weights):
    cache, home = hub
    put_in_cache(cache, open_clip_files(weights))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = home / "runs" / "hf-hub" / "org--name"
    leftover = folder / f".{COMMIT}.tmp-{int(dead.stdout)}-0123abcd" / "run"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # half a run, killed before its rename: never used
    run = resolve_run("hf-hub:org/name")
    assert sorted(p.name for p in folder.iterdir()) == [COMMIT]
    assert clipsnail.load(run).cfg.image_size == 32


def test_paths_are_returned_as_they_are(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf-hub:org").mkdir()
    (tmp_path / "hf-hub:org" / "name").mkdir()  # a folder really called so wins over the name
    assert resolve_run("hf-hub:org/name") == type(tmp_path)("hf-hub:org/name")
    assert resolve_run(tmp_path / "missing") == tmp_path / "missing"  # read_run_config says it is not there
    assert resolve_run("runs/x") == type(tmp_path)("runs/x")


def test_a_run_folder_named_relatively_is_stored_in_full(tmp_path, monkeypatch):
    from clipsnail.apps.model_names import resolve_name

    (tmp_path / "runs" / "clip").mkdir(parents=True)
    (tmp_path / "runs" / "clip" / "config.json").write_text('{"task": "clip"}')
    monkeypatch.chdir(tmp_path)
    assert resolve_name("runs/clip") == str((tmp_path / "runs" / "clip").resolve())
    for unchanged in ("", "efficientnet-lite0", "timm:resnet18", "runs/missing"):
        assert resolve_name(unchanged) == unchanged
