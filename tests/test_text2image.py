"""Text to image: the text-to-feature predictor (retrieve) and the text-conditioned PixelSNAIL (guided, reranked),
through the CLI and the Python API, on tiny shapes data and a tiny CLIP run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import caption_flags, run_error, sets, tiny_t2i_args
from PIL import Image

from clipsnail import load
from clipsnail.cli import main
from clipsnail.core.errors import DataError
from clipsnail.inference.generate import TextToImage
from clipsnail.models.text2feat import Text2FeatConfig, TextToFeature, nearest

TINY_RETRIEVE = ["model.width=32", "model.depth=1", "model.heads=2", "model.context_length=48",
                 "train.batch_size=16", "train.log_every=1"]


@pytest.mark.parametrize("pool,loss,distance", [("last", "mse", "euclidean"), ("mean", "cosine", "cosine")])
def test_text_to_feature_shapes_and_gradients(pool, loss, distance):
    cfg = Text2FeatConfig(vocab_size=30, context_length=10, width=16, depth=1, heads=2, feature_dim=8, pool=pool,
                          loss=loss, distance=distance)
    model = TextToFeature(cfg)
    tokens = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]])
    predicted = model(tokens)
    assert predicted.shape == (2, 8)
    target = torch.randn(2, 8)
    model.loss(predicted, target).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # padding after <eot> changes nothing, whichever pooling
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], 1)
    model.eval()
    torch.testing.assert_close(model(padded), model(tokens))


def test_nearest_finds_the_closest_known_feature_by_either_distance():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0]])
    query = torch.tensor([[9.0, 0.5]])
    d, i = nearest(query, bank, 2, "euclidean")
    assert i.tolist() == [[2, 0]] and d[0, 0] == pytest.approx((1 + 0.25) ** 0.5)
    _, i = nearest(query, bank, 1, "cosine")  # direction, not length: [1, 0] and [10, 1] are both close
    assert i.tolist() == [[2]]
    with pytest.raises(ValueError, match="distance"):
        nearest(query, bank, 1, "manhattan")


def test_retrieve_train_and_generate(shapes_dir, clip_run, tmp_path, capsys):
    run = tmp_path / "retrieve"
    args = ["t2i", "train", "--kind", "retrieve", "--encoder", str(clip_run), *caption_flags(shapes_dir),
            "--out", str(run), *sets(TINY_RETRIEVE + ["train.max_steps=6"])]
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["val_image_retrieval_recall@1"] <= metrics["val_image_retrieval_recall@5"] <= 1
    assert 0 <= metrics["val_semantic_top1_accuracy"] <= 1  # shapes data: judged by the scene
    for name in ("model.safetensors", "tokenizer.json", "bank.safetensors", "bank.json", "config.json"):
        assert (run / name).is_file()

    grid = tmp_path / "match.png"
    # The old verb, `clipsnail generate`, still works and names the new one.
    assert main(["generate", "--model", str(run), "a blue square", "-n", "4", "--out", str(grid)]) == 0
    printed = capsys.readouterr()
    assert "`clipsnail generate` is now `clipsnail t2i generate`" in printed.err
    matches = json.loads(printed.out)
    assert len(matches) == 4 and Image.open(grid).size[0] > 0
    distances = [m["distance"] for m in matches]
    assert distances == sorted(distances)
    assert all((shapes_dir / "images" / m["image"].split("/")[-1]).is_file() for m in matches)

    # the Python API gives the same answer
    retriever = load(run)
    assert [round(d, 4) for _, d in retriever.generate("a blue square", k=4)] == distances


@pytest.mark.slow
def test_retrieve_with_a_timm_encoder(shapes_dir, tmp_path, capsys):
    run = tmp_path / "retrieve_timm"
    args = ["t2i", "train", "--kind", "retrieve", "--encoder", "timm:resnet18", *caption_flags(shapes_dir),
            "--out", str(run), *sets(TINY_RETRIEVE + ["train.max_steps=2", "encoder_pretrained=false",
                                                       "model.loss=cosine", "model.pool=mean"])]
    assert main(args) == 0
    capsys.readouterr()
    assert load(run).features.shape[1] == 512  # resnet18's pooled features


def test_text_conditioned_pixelsnail_guided_and_reranked(shapes_dir, clip_run, tmp_path, capsys):
    run = tmp_path / "t2i"
    args = tiny_t2i_args(clip_run, shapes_dir, run, "train.max_steps=3", "cond_dropout=0.5", "data.max_eval_images=16")
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 < metrics["val_bits_per_dim"] < 16 and 0 < metrics["ema_val_bits_per_dim"] < 16
    assert list((run / "samples").glob("epoch_*.png"))

    grid = tmp_path / "grid.png"
    assert main(["t2i", "generate", "--model", str(run), "a red circle", "-n", "4", "--rerank", "2", "--guidance", "3",
                 "--out", str(grid), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] == 2 and out["clip_scores"] == sorted(out["clip_scores"], reverse=True)
    assert grid.is_file()

    t2i = load(run)
    assert not any(p.requires_grad for p in [*t2i.model.parameters(), *t2i.clip.parameters()])  # for inference
    images, scores = t2i.generate("a red circle", n=4, seed=1)
    assert images.shape == (4, 3, 8, 8) and scores.shape == (4,)
    # reranking keeps the best-scored of the very same draws
    best, best_scores = t2i.generate("a red circle", n=4, rerank=2, seed=1)
    assert torch.equal(best_scores, scores.sort(descending=True).values[:2])
    assert torch.equal(best[0], images[scores.argmax()])
    with pytest.raises(ValueError, match="rerank"):
        t2i.generate("a red circle", n=2, rerank=3)


def test_bad_inputs_are_named(shapes_dir, clip_run, tmp_path, capsys):
    base = ["t2i", "train", *caption_flags(shapes_dir), *sets(TINY_RETRIEVE + ["train.max_steps=1"])]
    assert main([*base, "--kind", "retrieve", "--out", str(tmp_path / "a")]) == 2
    assert "encoder" in capsys.readouterr().err
    assert main([*base, "--kind", "retrieve", "--encoder", str(shapes_dir), "--out", str(tmp_path / "b")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    classify_like = tmp_path / "not_clip"
    classify_like.mkdir()
    (classify_like / "config.json").write_text('{"task": "pixelsnail"}')
    assert main(["t2i", "train", "--kind", "pixelsnail", "--clip", str(classify_like), *caption_flags(shapes_dir),
                 "--out", str(tmp_path / "c")]) == 2
    assert "CLIP run directory is needed" in capsys.readouterr().err
    assert main(["t2i", "generate", "--model", str(clip_run), "a red circle", "--out", str(tmp_path / "x.png")]) == 2
    assert "not a text-to-image run" in capsys.readouterr().err


def test_a_run_names_its_clip_run_so_that_it_is_found_from_any_folder(shapes_dir, clip_run, tmp_path, monkeypatch,
                                                                      capsys):
    """`--clip runs/clip` relative to where training ran is stored in full; a config that still holds a relative
    path (an older run) fails naming its config.json and the key, not only the missing folder."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(clip_run, work / "runs" / "clip")
    monkeypatch.chdir(work)
    run = work / "runs" / "t2i"
    args = tiny_t2i_args(Path("runs/clip"), shapes_dir, run, "train.max_steps=1", "data.max_eval_images=4")
    assert main(args) == 0
    config_path = run / "config.json"
    config = json.loads(config_path.read_text())
    assert config["clip"] == str((work / "runs" / "clip").resolve())

    monkeypatch.chdir(tmp_path)  # elsewhere
    assert isinstance(load(run), TextToImage)
    config["clip"] = "runs/clip"  # as older runs stored it
    config_path.write_text(json.dumps(config))
    with pytest.raises(DataError) as e:
        load(run)
    message = str(e.value)
    assert message.startswith(f"{config_path}: clip = 'runs/clip' cannot be loaded") and "current folder" in message
    line = run_error(capsys, ["t2i", "generate", "--model", str(run), "a red circle", "--out", str(tmp_path / "g.png")])
    assert str(config_path) in line
