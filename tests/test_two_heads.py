"""A CLIP with a second pair of projections beside the first (over a ConSE head: ConSE + LiT as one model): the
score is the learned mix of the two cosines, its gradients reach both pairs and the mix, `clip train --init` adds
the pair to a trained run, and the result round-trips through a run directory, a second `--init`, an index and an
ONNX export."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CLIP, caption_flags, sets, tiny_clip

import clipsnail
from clipsnail.cli import main
from clipsnail.core.errors import ConfigError
from clipsnail.core.runs import read_weights

LABELS = ["cat", "dog", "car", "tree", "boat", "cake"]
CONSE_HEAD = {"image_projection": "conse", "conse_labels": LABELS, "conse_top_k": 3}
SECOND = ["model.head.second_projection=head", "model.head.second_embed_dim=8", "model.head.init_first_share=0.7",
          "finetune.second_head_lr=0.01"]


def two_head_clip(share=0.7):
    return tiny_clip(head={**CONSE_HEAD, "second_projection": "head", "second_embed_dim": 8,
                           "init_first_share": share}).eval()


@torch.no_grad()
def test_the_score_is_the_learned_mix_of_the_two_cosines():
    model = two_head_clip()
    model.image_projection.label_embeddings.normal_()
    images, tokens = torch.randn(3, 3, 16, 16), torch.randint(3, 50, (4, 12))
    image, text = model.encode_image(images), model.encode_text(tokens)
    assert image.shape == (3, 16 + 8) and text.shape == (4, 16 + 8) and model.embed_dim == 24
    torch.testing.assert_close(image.norm(dim=1), torch.ones(3))
    features, words = model.visual(images), model.text(tokens)
    first = F.normalize(model.image_projection(features), dim=-1) @ F.normalize(model.text_projection(words),
                                                                                  dim=-1).T
    second = (F.normalize(model.second_image_projection(features), dim=-1)
              @ F.normalize(model.second_text_projection(words), dim=-1).T)
    torch.testing.assert_close(model.first_share, torch.tensor(0.7))
    torch.testing.assert_close(image @ text.T, 0.7 * first + 0.3 * second)


def test_gradients_reach_both_pairs_and_the_mix():
    model = two_head_clip().train()
    with torch.no_grad():
        model.image_projection.label_embeddings.normal_()
    image = model.encode_image(torch.randn(2, 3, 16, 16))
    text = model.encode_text(torch.randint(3, 50, (2, 12)))
    (image @ text.T).diagonal().sum().backward()
    for name in ("image_projection.classifier.weight", "text_projection.weight", "first_share_logit",
                 "second_image_projection.projection.weight", "second_text_projection.projection.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("head, message", [
    ({"second_projection": "mlp"}, "model.head.second_projection"),
    ({"second_projection": "head", "init_first_share": 1.0}, "model.head.init_first_share must be between 0 and 1"),
    ({"second_projection": "linear", "second_embed_dim": 0}, "model.head.second_embed_dim"),
])
def test_bad_second_pairs_are_config_errors(head, message):
    with pytest.raises(ConfigError, match=message):
        tiny_clip(head=head)


@pytest.fixture(scope="module")
def runs(shapes_dir, tmp_path_factory):
    """(a tiny ConSE run trained 2 steps, the same with a second pair added by `clip train --init`, 2 steps)."""
    root = tmp_path_factory.mktemp("two_heads")
    conse = root / "conse"
    conse_sets = ["model.head.image_projection=conse", f"model.head.conse_labels=[{', '.join(LABELS)}]",
                  "model.head.conse_top_k=3", "train.max_steps=2"]
    assert main(["clip", "train", *caption_flags(shapes_dir), "--out", str(conse), *sets(TINY_CLIP + conse_sets)]) == 0
    both = root / "both"
    assert main(["clip", "train", *caption_flags(shapes_dir), "--out", str(both), "--init", str(conse),
                 *sets(SECOND + ["train.max_steps=2", "train.batch_size=16"])]) == 0
    return conse, both


def test_clip_train_init_adds_a_second_pair_to_a_run_and_trains_it(runs):
    conse, both = runs
    head = json.loads((both / "config.json").read_text())["model"]["head"]
    assert head["image_projection"] == "conse" and head["second_projection"] == "head"
    assert head["second_embed_dim"] == 8 and head["init_first_share"] == 0.7
    before, after = read_weights(conse / "model.safetensors"), read_weights(both / "model.safetensors")
    assert set(after) - set(before) == {k for k in after if k.startswith(("second_", "first_share"))} != set()
    assert not torch.equal(after["image_projection.label_embeddings"], before["image_projection.label_embeddings"])
    assert after["first_share_logit"] != torch.logit(torch.tensor(0.7))  # the mix moved too
    logged = [json.loads(line) for line in (both / "metrics.jsonl").read_text().splitlines()]
    assert any("first_share" in line for line in logged)


def test_a_two_head_run_round_trips_and_starts_another_run(runs, shapes_dir, tmp_path):
    _, both = runs
    model = clipsnail.load(both)
    state = read_weights(both / "model.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    from clipsnail.core.config import load_config
    from clipsnail.families.clip import ClipConfig
    from clipsnail.tasks.clip import ClipTask

    values = {"data.captions": str(shapes_dir / "captions.csv"), "data.images": str(shapes_dir / "images"),
              "data.split_file": str(shapes_dir / "split.json"), "finetune.init": str(both)}
    task = ClipTask(load_config(ClipConfig, overrides=["finetune.second_head_lr=0.02"], values=values))
    again = task.build_model()
    for key, value in again.state_dict().items():  # every weight of the init run, the second pair's included
        torch.testing.assert_close(value, state[key])
    groups = {g["name"]: g for g in task.param_groups(again)}
    assert groups["second_heads"]["lr"] == 0.02
    assert {n for n, _ in groups["second_heads"]["params"]} == {k for k in state if k.startswith(("second_", "first"))}


def test_a_two_head_run_indexes_through_its_onnx_export_and_searches(runs, shapes_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from clipsnail.inference.index import QUERY_ENCODER, ImageIndex

    _, both = runs
    capsys.readouterr()
    assert main(["index", "build", "--model", str(both), "--images", str(shapes_dir / "images"), "--out",
                 str(tmp_path / "index"), "--backend", "onnx", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnx"
    index = ImageIndex.load(tmp_path / "index")
    assert index.dim == 24 and (tmp_path / "index" / QUERY_ENCODER).is_dir()
    paths = sorted(index.paths)[:8]
    with torch.no_grad():
        expected = clipsnail.load(both).encode_image(paths)
    vectors = dict(zip(index.paths, index.vectors()))
    assert (torch.stack([vectors[p] for p in paths]) * expected).sum(dim=1).min() >= 0.999  # cosine, photo by photo
    assert main(["search", "--index", str(tmp_path / "index"), "a red circle", "-k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(-1 <= h["score"] <= 1 for h in hits)
