"""Pretrained CLIPs by name (`hf-hub:ORG/NAME`): resolved from a fake Hugging Face cache (the hub's own layout:
models--ORG--NAME/refs/main and snapshots/COMMIT/), converted once into $CLIPSNAIL_HOME, reused after; offline
throughout (no test reaches the network)."""

import json
import re
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
from clipsnail.core.errors import ClipsnailError, DataError
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
    assert tuple(model.cfg.vision.mean) == (0.5, 0.5, 0.5)  # open_clip_config.json was read beside the weights
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
                 str(tmp_path / "index"), "--no-progress", "--no-onnx"]) == 0
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
                              str(tmp_path / "index"), "--no-onnx"])
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
    assert not (home / "runs").exists()  # not even the empty folders a run would have gone in


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
    assert clipsnail.load(run).image_size == 32


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


# ----------------------------------------------------------------------------------------------- hostile input

def with_config(weights, text):
    """The files of a hub repository whose open_clip_config.json is `text` (bytes, or an object dumped to JSON)."""
    return {"open_clip_config.json": text if isinstance(text, bytes) else json.dumps(text).encode(),
            "open_clip_model.safetensors": weights}


def changed(section, key, value):
    """CONFIG with `section`'s `key` set to `value` (a section of "model_cfg" is made when missing)."""
    config = json.loads(json.dumps(CONFIG))
    target = config
    for part in section.split("."):
        target = target.setdefault(part, {})
    target[key] = value
    return config


def assert_refused(home, spec, *parts):
    """resolve_run(spec) is one line naming each of `parts`, and leaves no run in the cache."""
    with pytest.raises(ClipsnailError) as e:
        resolve_run(spec)
    message = str(e.value)
    assert "\n" not in message and len(message) < 600, message
    for part in parts:
        assert part in message, (part, message)
    assert not list((home / "runs").rglob("config.json")), "a run that cannot load was cached"
    return message


@pytest.mark.parametrize("config, key", [
    (changed("model_cfg.text_cfg", "heads", "two"), "text_cfg.heads"),
    (changed("model_cfg.text_cfg", "heads", 0), "text_cfg.heads"),
    (changed("model_cfg.text_cfg", "heads", 3), "text_cfg.heads"),  # does not divide the width 128
    (changed("model_cfg.text_cfg", "heads", True), "text_cfg.heads"),
    (changed("model_cfg.vision_cfg", "head_width", 0), "vision_cfg.head_width"),
    (changed("model_cfg.vision_cfg", "head_width", -64), "vision_cfg.head_width"),
    (changed("model_cfg.vision_cfg", "head_width", "64"), "vision_cfg.head_width"),
    (changed("model_cfg", "quick_gelu", "false"), "model_cfg.quick_gelu"),
    (changed("model_cfg", "vision_cfg", [1, 2]), "model_cfg.vision_cfg"),
    (changed("model_cfg", "text_cfg", "x"), "model_cfg.text_cfg"),
    (changed("preprocess_cfg", "mean", "abc"), "preprocess_cfg.mean"),
    (changed("preprocess_cfg", "std", "abc"), "preprocess_cfg.std"),
    (changed("preprocess_cfg", "mean", [0.5, "x", 0.5]), "preprocess_cfg.mean"),
    (changed("preprocess_cfg", "std", [0.5, 0.5]), "preprocess_cfg.std"),
    (changed("preprocess_cfg", "std", [0.5, 0.0, 0.5]), "preprocess_cfg.std"),
    (changed("preprocess_cfg", "mean", [True, 0.5, 0.5]), "preprocess_cfg.mean"),
    (changed("preprocess_cfg", "interpolation", ["bicubic"] * 1000), "preprocess_cfg.interpolation"),
    ({**CONFIG, "model_cfg": [1, 2]}, "model_cfg"),
    ({**CONFIG, "preprocess_cfg": "bicubic"}, "preprocess_cfg"),
    ([CONFIG], "top level"),
    (None, "top level"),
    (b'{"model_cfg": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'\xff\xfe{"model_cfg": {}}', "open_clip_config.json"),
])
def test_malformed_open_clip_configs_are_one_line_errors_naming_the_key(hub, weights, config, key):
    cache, home = hub
    put_in_cache(cache, with_config(weights, config))
    assert_refused(home, "hf-hub:org/name", "hf-hub:org/name", "open_clip_config.json", key)


@pytest.mark.parametrize("section, key, text", [
    ("preprocess_cfg", "mean", "[NaN, 0.5, 0.5]"),
    ("preprocess_cfg", "std", "[0.25, Infinity, 0.25]"),
    ("preprocess_cfg", "mean", "[-Infinity, 0.5, 0.5]"),
])
def test_non_finite_mean_and_std_are_refused(hub, weights, section, key, text):
    cache, home = hub
    body = json.dumps(changed(section, key, "@@")).replace('"@@"', text).encode()
    put_in_cache(cache, with_config(weights, body))
    assert_refused(home, "hf-hub:org/name", "open_clip_config.json", f"{section}.{key}", "finite")


def test_non_finite_weights_are_refused_naming_the_tensor(hub, weights, tmp_path):
    cache, home = hub
    state = load_file(str(weights))
    state["visual.proj"][3, 1] = float("nan")
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    put_in_cache(cache, open_clip_files(tmp_path / "open_clip_model.safetensors"))
    assert_refused(home, "hf-hub:org/name", "open_clip_model.safetensors", "visual.proj", "finite")


def test_a_long_mean_is_refused_before_caching_and_shown_short(hub, weights):
    cache, home = hub
    put_in_cache(cache, with_config(weights, changed("preprocess_cfg", "mean", [0.5] * 100_000)))
    message = assert_refused(home, "hf-hub:org/name", "preprocess_cfg.mean", "100000")
    assert len(message) < 400, message


def test_a_mean_of_one_number_means_each_channel_as_in_open_clip(hub, weights):
    cache, _ = hub
    put_in_cache(cache, with_config(weights, changed("preprocess_cfg", "mean", 0.25)))
    assert tuple(clipsnail.load("hf-hub:org/name").cfg.vision.mean) == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("ref", ["../../../../../etc", "main/../x", "", "0123"])
def test_a_refs_main_naming_no_commit_is_one_line(hub, weights, ref):
    cache, home = hub
    snapshot = put_in_cache(cache, open_clip_files(weights))
    (snapshot.parent.parent / "refs" / "main").write_text(ref)
    assert_refused(home, "hf-hub:org/name", "hf-hub:org/name", "refs/main")
    assert not (home / "runs").exists()


def test_zeroshot_never_prints_nan(hub, weights, tmp_path, capsys, monkeypatch):
    from clipsnail.inference import evaluate

    cache, _ = hub
    put_in_cache(cache, open_clip_files(weights))
    image = noise_image(tmp_path / "a.png", seed=0, size=32)
    monkeypatch.setattr(evaluate, "zero_shot_probabilities",
                        lambda model, emb, weights: torch.full((len(emb), 2), float("nan")))
    line = run_error(capsys, ["zeroshot", "--model", "hf-hub:org/name", "--classes", "cat,dog", str(image)])
    assert "probs" in line and "finite" in line
    assert "NaN" not in capsys.readouterr().out


def test_json_text_refuses_non_finite_numbers_naming_where():
    from clipsnail.core.display import json_text

    assert json.loads(json_text({"a": [1, 2.5], "b": "c"})) == {"a": [1, 2.5], "b": "c"}
    for value, where in ((float("nan"), "[0].probs.dog"), (float("inf"), "[0].probs.dog")):
        with pytest.raises(DataError, match=re.escape(where)):
            json_text([{"image": "a.png", "probs": {"cat": 0.5, "dog": value}}])


# ----------------------------------------------------------------------------------------------- conse: names

def fake_conse(monkeypatch):
    """convert_conse replaced by a writer of an empty clip run (the real one reads 110 MB of packaged weights);
    returns the specs it was asked to convert."""
    calls = []

    def write(spec, out):
        calls.append(spec)
        out.mkdir()
        (out / "config.json").write_text('{"task": "clip"}')

    monkeypatch.setattr(model_names, "convert_conse", write)
    return calls


def text_model(folder, weights=b"weights"):
    """A folder that passes for a Hugging Face text model (the fake conversion reads nothing of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_a_conse_text_folder_is_cached_by_its_real_path_and_its_files(hub, tmp_path, monkeypatch):
    calls = fake_conse(monkeypatch)
    first, second = tmp_path / "a", tmp_path / "b"
    text_model(first / "minilm")
    text_model(second / "minilm", b"other weights")
    monkeypatch.chdir(first)
    run = resolve_run("conse:efficientnet-lite0+minilm")
    assert resolve_run("conse:efficientnet-lite0+minilm") == run and len(calls) == 1
    assert calls[0] == f"efficientnet-lite0+{(first / 'minilm').resolve()}"  # a path found from anywhere
    monkeypatch.chdir(second)  # the same words name another folder
    other = resolve_run("conse:efficientnet-lite0+minilm")
    assert other != run and len(calls) == 2
    monkeypatch.chdir(first)
    (first / "minilm" / "model.safetensors").write_bytes(b"junk")  # the folder's model replaced
    replaced = resolve_run("conse:efficientnet-lite0+minilm")
    assert replaced not in (run, other) and len(calls) == 3
    assert resolve_run(f"conse:efficientnet-lite0+{first / 'minilm'}") == replaced and len(calls) == 3


def test_conse_names_are_case_folded_but_folders_are_not(hub, tmp_path, monkeypatch):
    calls = fake_conse(monkeypatch)
    run = resolve_run("conse:efficientnet-lite0+all-minilm-l6-v2")
    for spelling in ("conse:EfficientNet-Lite0+All-MiniLM-L6-v2", "CONSE:EFFICIENTNET-LITE0+all-MiniLM-L6-v2"):
        assert resolve_run(spelling) == run
    assert calls == ["efficientnet-lite0+all-minilm-l6-v2"]
    text_model(tmp_path / "Mine")
    monkeypatch.chdir(tmp_path)
    resolve_run("conse:EfficientNet-Lite0+Mine")
    assert calls[-1] == f"efficientnet-lite0+{(tmp_path / 'Mine').resolve()}"


def test_conse_alone_suggests_a_conse_name(hub):
    for spec in ("conse:", "conse:  "):
        with pytest.raises(DataError) as e:
            resolve_run(spec)
        assert "conse:efficientnet-lite0+all-minilm-l6-v2" in str(e.value) and "hf-hub" not in str(e.value)


@pytest.mark.parametrize("spec", ["conse:resnet50+all-minilm-l6-v2", "conse:efficientnet-lite0",
                                  "conse:efficientnet-lite0+", "conse:+all-minilm-l6-v2", "conse:x/y",
                                  "conse:efficientnet-lite0+no-such-folder", "conse:efficientnet-lite0+../..",
                                  "conse:efficientnet-lite0+all-minilm-l6-v2+more"])
def test_rejected_conse_names_leave_nothing_in_the_cache(hub, spec, monkeypatch, tmp_path):
    _, home = hub
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        resolve_run(spec)
    assert "\n" not in str(e.value) and "conse:efficientnet-lite0+all-minilm-l6-v2" in str(e.value)
    assert not (home / "runs").exists()
