"""ConSE (Norouzi et al., ICLR 2014) as CLIP's image head: the formula on tiny fakes, config errors, round trips
through a run directory and `clip train --init`, and (marked slow) the real packaged models end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CLIP, caption_flags, run_error, sets, tiny_clip

import clipsnail
from clipsnail.cli import main
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import read_weights
from clipsnail.models.clip import ConseHead

LABELS = ["cat", "dog", "car", "tree", "boat", "cake"]
TINY_CONSE = ["model.head.image_projection=conse", f"model.head.conse_labels=[{', '.join(LABELS)}]",
              "model.head.conse_top_k=3", "model.head.conse_temperature=2.0"]


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
    model = tiny_clip(head={"image_projection": "conse", "conse_labels": LABELS, "conse_top_k": 3})
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
    model = tiny_clip(head={"image_projection": "conse", "conse_labels": LABELS, "conse_top_k": 2,
                            "conse_temperature": 3.0}).eval()
    head = model.image_projection
    with torch.no_grad():
        head.label_embeddings.copy_(F.normalize(torch.randn(len(LABELS), 16), dim=-1))
        images = torch.randn(4, 3, 16, 16)
        expected = conse_by_hand(model.visual(images), head.classifier.weight, head.classifier.bias,
                                 head.label_embeddings, 2, 3.0)
        torch.testing.assert_close(model.encode_image(images, normalize=False), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_image(images), F.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"conse_labels": []}, "model.head.image_projection=conse needs model.head.conse_labels"),
    ({"conse_top_k": 7}, "model.head.conse_top_k must be between 1 and the 6 labels, got 7"),
    ({"conse_top_k": 0}, "model.head.conse_top_k must be between 1 and the 6 labels, got 0"),
    ({"conse_temperature": 0.0}, "model.head.conse_temperature"),
])
def test_bad_conse_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        tiny_clip(head={"image_projection": "conse", "conse_labels": LABELS, **overrides})


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
    head = config["model"]["head"]
    assert head["image_projection"] == "conse" and head["conse_labels"] == LABELS and head["conse_top_k"] == 3
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
    from clipsnail.core.config import load_config
    from clipsnail.families.clip import ClipConfig
    from clipsnail.tasks.clip import ClipTask

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
    assert json.loads((out / "config.json").read_text())["model"]["head"]["image_projection"] == "conse"


def test_convert_conse_rejects_bad_specs(capsys, tmp_path):
    line = run_error(capsys, ["convert", "--from", "conse:resnet50+all-minilm-l6-v2", "--out", str(tmp_path / "r")])
    assert "expected conse:IMAGE+TEXT" in line and "efficientnet-lite0" in line
    line = run_error(capsys, ["convert", "--from", "conse:efficientnet-lite0", "--out", str(tmp_path / "r")])
    assert "expected conse:IMAGE+TEXT" in line
    line = run_error(capsys, ["convert", "--from", "open_clip:x.safetensors", "--top-k", "3", "--out",
                              str(tmp_path / "r")])
    assert "apply to conse:IMAGE+TEXT only" in line
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- the packaged models

CONSE_NAME = "conse:efficientnet-lite0+all-minilm-l6-v2"


@pytest.fixture(scope="session")
def conse_run_of_name(clipsnail_home):
    """The ConSE run of the two packaged models, made once for the session through its model name, in the session's
    CLIPSNAIL_HOME."""
    from clipsnail.apps.model_names import resolve_run

    run = resolve_run(CONSE_NAME)
    assert run.is_relative_to(clipsnail_home)
    return run


def minilm_by_hand(texts):
    """all-MiniLM-L6-v2 sentence embeddings as its model card computes them: mean of the token states over the
    attention mask, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    from clipsnail.core.pretrained import text_model_dir

    folder = text_model_dir("all-minilm-l6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_packaged_conse_is_the_formula_over_the_real_classifier_and_sentence_encoder(conse_run_of_name, tmp_path):
    """The converted run's image embedding equals ConSE computed independently: timm's tf_efficientnet_lite0 with
    the packaged ImageNet weights for the probabilities, MiniLM through transformers for the label embeddings."""
    import timm
    from PIL import Image

    from clipsnail.apps.convert import imagenet_label_names
    from clipsnail.core.pretrained import load_pretrained_state

    model = clipsnail.load(conse_run_of_name)
    cfg = model.cfg.head
    assert (cfg.conse_top_k, cfg.conse_temperature, cfg.conse_template) == (10, 2.0, "a photo of a {}.")
    assert cfg.conse_labels == imagenet_label_names() and cfg.conse_labels[281] == "tabby, tabby cat"
    assert cfg.conse_definitions[281] == "a cat with a grey or tawny coat mottled with black"
    rng = torch.Generator().manual_seed(0)
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(240, 320, 3, generator=rng) * 255).byte().numpy()).save(photo)

    classifier = timm.create_model("tf_efficientnet_lite0", num_classes=1000, bn_eps=1e-3).eval()
    load_pretrained_state("efficientnet-lite0", classifier)
    pixels = model.preprocess(Image.open(photo).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = (classifier(pixels)[0] / 2.0).softmax(-1)
    top_p, top = probs.topk(10)
    names = minilm_by_hand([f"a photo of a {cfg.conse_labels[j]}." for j in top.tolist()])
    defined = minilm_by_hand([f"a photo of a {cfg.conse_labels[j]}: {cfg.conse_definitions[j]}." for j in top.tolist()])
    labels = F.normalize(names + defined, dim=-1)  # the mean of two unit vectors, made unit again
    expected = F.normalize((top_p / top_p.sum()) @ labels, dim=-1)
    with torch.no_grad():
        got = model.encode_image([photo])[0]
        query = model.encode_text(["a dog on a sofa"])[0]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    torch.testing.assert_close(query, minilm_by_hand(["a dog on a sofa"])[0], atol=2e-5, rtol=0)


def photo_folder(shapes_dir, tmp_path, count):
    """tmp_path/photos with copies of the first `count` shapes images."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((shapes_dir / "images").iterdir())[:count]:
        (photos / image.name).write_bytes(image.read_bytes())
    return photos


@pytest.mark.slow
def test_packaged_conse_name_is_converted_once_and_searches(conse_run_of_name, shapes_dir, tmp_path, capsys):
    run = conse_run_of_name
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    from clipsnail.apps.model_names import resolve_run

    assert resolve_run(CONSE_NAME) == run and (run / "model.safetensors").stat().st_mtime_ns == stamp
    photos = photo_folder(shapes_dir, tmp_path, 4)
    assert main(["index", "build", "--model", CONSE_NAME, "--images", str(photos), "--out", str(tmp_path / "idx"),
                 "--no-progress", "--no-onnx"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["total"] == 4
    assert main(["search", "--index", str(tmp_path / "idx"), "a circle", "-k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.slow
def test_photo_demo_with_nothing_but_a_folder_uses_the_conse_model(conse_run_of_name, shapes_dir, tmp_path, capsys):
    run = conse_run_of_name
    photos = photo_folder(shapes_dir, tmp_path, 6)
    out = tmp_path / "out"
    assert main(["demo", "--photos", str(photos), "--out", str(out), "--query", "a red circle", "--no-progress",
                 "--no-onnx"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "photos_summary.json").read_text())
    assert summary["model"] == str(run.resolve())
    assert summary["indexing"]["total"] == 6 and len(summary["queries"][0]["hits"]) == 6
    assert (out / "queries" / "a_red_circle.png").is_file()
    assert "--model hf-hub:" in printed and "--captions" in printed  # how to do better
    assert "fine-tuning" not in summary and "fine_tuned_steps" not in summary


@pytest.mark.slow
def test_photo_demo_with_captions_fine_tunes_conse_and_lit_as_one_model(conse_run_of_name, shapes_dir, tmp_path,
                                                                        capsys):
    photos = photo_folder(shapes_dir, tmp_path, 6)
    out = tmp_path / "out"
    assert main(["demo", "--photos", str(photos), "--out", str(out), "--query", "a red circle", "--no-progress",
                 "--no-onnx", "--steps", "2", *caption_flags(shapes_dir)]) == 0
    summary = json.loads((out / "photos_summary.json").read_text())
    assert summary["fine_tuned_steps"] == 2 and summary["model"] == str((out / "run").resolve())
    head = json.loads((out / "run" / "config.json").read_text())["model"]["head"]
    assert head["image_projection"] == "conse" and head["second_projection"] == "head"
    assert summary["indexing"]["total"] == 6 and len(summary["queries"][0]["hits"]) == 6
    assert clipsnail.load(out / "run").embed_dim == 384 + 256


def test_label_texts_pair_each_name_with_its_definition():
    from clipsnail.apps.convert import conse_label_texts

    texts = conse_label_texts(["crane", "tabby"], "a photo of a {}.", ["large wading bird.", "a mottled cat"])
    assert texts == [["a photo of a crane.", "a photo of a crane: large wading bird."],
                     ["a photo of a tabby.", "a photo of a tabby: a mottled cat."]]
    assert conse_label_texts(["crane"], "{}", []) == [["crane"]]
    with pytest.raises(DataError, match="1 label definitions given for 2 labels"):
        conse_label_texts(["crane", "tabby"], "{}", ["a bird"])
