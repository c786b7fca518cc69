"""ConSE (Norouzi et al., ICLR 2014) as CLIP's image head: the formula on tiny fakes, config errors, round trips
through a run directory and `clip train --init`, and (marked slow) the real packaged models end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, caption_flags, run_error, sets, tiny_clip

import clipsnail
from clipsnail.cli import main
from clipsnail.errors import ConfigError
from clipsnail.models.clip import ConseHead
from clipsnail.runs import read_weights

LABELS = ["cat", "dog", "car", "tree", "boat", "cake"]
TINY_CONSE = ["model.image_projection=conse", f"model.conse_labels=[{', '.join(LABELS)}]", "model.conse_top_k=3",
              "model.conse_temperature=2.0"]


def conse_by_hand(features, weight, bias, label_embeddings, top_k, temperature):
    """f(x) = sum_{t<=T} p(y_t|x) s(y_t) / sum_{t<=T} p(y_t|x), one image at a time, with plain Python ordering."""
    rows = []
    for f in features:
        logits = weight @ f + bias
        p = torch.exp(logits / temperature)
        p = p / p.sum()
        order = sorted(range(len(p)), key=lambda j: -float(p[j]))[:top_k]
        z = sum(p[j] for j in order)
        rows.append(sum(p[j] * label_embeddings[j] for j in order) / z)
    return torch.stack(rows)


@torch.no_grad()
def test_head_is_the_conse_formula():
    torch.manual_seed(0)
    head = ConseHead(in_dim=5, num_labels=7, embed_dim=4, top_k=3, temperature=2.0)
    head.label_embeddings.copy_(F.normalize(torch.randn(7, 4), dim=-1))
    features = torch.randn(6, 5)
    expected = conse_by_hand(features, head.classifier.weight, head.classifier.bias, head.label_embeddings, 3, 2.0)
    torch.testing.assert_close(head(features), expected, rtol=1e-5, atol=1e-6)


def test_top_one_is_the_most_probable_label_and_all_labels_the_probability_weighted_mean():
    torch.manual_seed(1)
    head = ConseHead(in_dim=5, num_labels=4, embed_dim=3, top_k=1, temperature=1.0)
    features = torch.randn(3, 5)
    best = head.classifier(features).argmax(dim=1)
    torch.testing.assert_close(head(features), head.label_embeddings[best])
    head.top_k = 4
    probs = head.classifier(features).softmax(dim=1)
    torch.testing.assert_close(head(features), probs @ head.label_embeddings)


def test_gradients_reach_classifier_labels_and_tower():
    model = tiny_clip(image_projection="conse", conse_labels=LABELS, conse_top_k=3)
    with torch.no_grad():
        model.image_projection.label_embeddings.normal_()
    images = torch.randn(2, 3, 16, 16)
    model.encode_image(images).sum().backward()
    head = model.image_projection
    assert head.classifier.weight.grad.abs().sum() > 0
    used = head.label_embeddings.grad.abs().sum(dim=1) > 0
    assert 1 <= int(used.sum()) <= 2 * 3  # only the chosen labels of the two images get gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.parameters())


def test_clip_embedding_is_the_formula_over_the_tower_features():
    model = tiny_clip(image_projection="conse", conse_labels=LABELS, conse_top_k=2, conse_temperature=3.0).eval()
    head = model.image_projection
    with torch.no_grad():
        head.label_embeddings.copy_(F.normalize(torch.randn(len(LABELS), 16), dim=-1))
        images = torch.randn(4, 3, 16, 16)
        expected = conse_by_hand(model.visual(images), head.classifier.weight, head.classifier.bias,
                                 head.label_embeddings, 2, 3.0)
        torch.testing.assert_close(model.encode_image(images, normalize=False), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_image(images), F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"conse_labels": []}, "model.image_projection=conse needs model.conse_labels"),
    ({"conse_top_k": 7}, "model.conse_top_k must be between 1 and the 6 labels, got 7"),
    ({"conse_top_k": 0}, "model.conse_top_k must be between 1 and the 6 labels, got 0"),
    ({"conse_temperature": 0.0}, "model.conse_temperature"),
])
def test_bad_conse_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny_clip(**{"image_projection": "conse", "conse_labels": LABELS, **overrides})


@pytest.fixture(scope="module")
def conse_run(shapes_dir, tmp_path_factory):
    """A tiny from-scratch CLIP with a ConSE image head, trained 2 steps."""
    out = tmp_path_factory.mktemp("conse") / "run"
    argv = ["clip", "train", *caption_flags(shapes_dir), "--out", str(out), *sets(TINY_CLIP + TINY_CONSE),
            "--set", "train.max_steps=2"]
    assert main(argv) == 0
    return out


def test_conse_round_trips_through_a_run_directory(conse_run):
    config = json.loads((conse_run / "config.json").read_text())
    assert config["model"]["image_projection"] == "conse"
    assert config["model"]["conse_labels"] == LABELS and config["model"]["conse_top_k"] == 3
    model = clipsnail.load(conse_run)
    assert isinstance(model.image_projection, ConseHead)
    assert model.image_projection.top_k == 3 and model.image_projection.temperature == 2.0
    state = read_weights(conse_run / "model.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with torch.no_grad():
        a = model.encode_text(["a red circle"])
        b = clipsnail.load(conse_run).encode_text(["a red circle"])
    torch.testing.assert_close(a, b)


def test_clip_train_init_starts_from_the_conse_run_and_trains_each_part(conse_run, shapes_dir, tmp_path):
    from clipsnail.config import load_config
    from clipsnail.tasks.clip import ClipConfig, ClipTask

    values = {"data.captions": str(shapes_dir / "captions.csv"), "data.images": str(shapes_dir / "images"),
              "data.split_file": str(shapes_dir / "split.json"), "finetune.init": str(conse_run)}
    rates = ["finetune.classifier_lr=0.01", "finetune.label_lr=0.02", "finetune.image_lr=0.003",
             "finetune.text_lr=0.004", "finetune.head_lr=0.005"]
    task = ClipTask(load_config(ClipConfig, overrides=rates, values=values))
    model = task.build_model()
    initial = read_weights(conse_run / "model.safetensors")
    for key, value in model.state_dict().items():  # the init run's weights, exactly
        torch.testing.assert_close(value, initial[key])
    groups = {g["name"]: g for g in task.param_groups(model)}
    assert [n for n, _ in groups["classifier"]["params"]] == ["image_projection.classifier.weight",
                                                              "image_projection.classifier.bias"]
    assert [n for n, _ in groups["label_embeddings"]["params"]] == ["image_projection.label_embeddings"]
    assert {name: g["lr"] for name, g in groups.items()} == {
        "image_tower": 0.003, "text_tower": 0.004, "classifier": 0.01, "label_embeddings": 0.02, "heads": 0.005}

    out = tmp_path / "tuned"
    argv = ["clip", "train", *caption_flags(shapes_dir), "--out", str(out), "--set", f"finetune.init={conse_run}",
            *sets(rates), "--set", "train.max_steps=2", "--set", "train.batch_size=16"]
    assert main(argv) == 0
    tuned = read_weights(out / "model.safetensors")
    for key in ("image_projection.classifier.weight", "image_projection.label_embeddings"):
        assert not torch.equal(tuned[key], initial[key]), key
    assert json.loads((out / "config.json").read_text())["model"]["image_projection"] == "conse"


def test_convert_conse_rejects_bad_specs(capsys, tmp_path):
    line = run_error(capsys, ["convert", "--from", "conse:resnet50+all-minilm-l6-v2", "--out", str(tmp_path / "r")])
    assert "expected conse:IMAGE+TEXT" in line and "efficientnet-lite0" in line
    line = run_error(capsys, ["convert", "--from", "conse:efficientnet-lite0", "--out", str(tmp_path / "r")])
    assert "expected conse:IMAGE+TEXT" in line
    line = run_error(capsys, ["convert", "--from", "open_clip:x.safetensors", "--top-k", "3", "--out",
                              str(tmp_path / "r")])
    assert "apply to conse:IMAGE+TEXT only" in line
    assert not (tmp_path / "r").exists()
