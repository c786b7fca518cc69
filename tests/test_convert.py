"""Pretrained checkpoints into clipsnail runs: OpenAI's BPE against open_clip.tokenize, open_clip CLIP ViT models
(random weights, tiny configs) against open_clip itself, official-layout LeMeViT checkpoints, and the errors."""

import argparse
import copy
import json

import numpy as np
import pytest
import timm
import torch
from helpers import caption_flags, make_open_clip, save_safetensors, sets, tiny_t2i_args
from PIL import Image
from safetensors.torch import save_file

import clipsnail
from clipsnail.apps.convert import convert_lemevit, convert_open_clip
from clipsnail.cli import main
from clipsnail.core.errors import DataError
from clipsnail.data.tokenizers import TextTokenizer, openai_bpe

open_clip = pytest.importorskip("open_clip")

TEXTS = [
    "a photo of a cat",
    "A Photo Of A DOG on the beach.",
    "two men, three women and 42 bicycles; 3.14159 is pi!",
    "don't panic, it's fine -- we're sure they'll come & I'd say you've won",
    "   extra   spaces\tand\nnew lines   ",
    "café naïve résumé Ærøskøbing straße",
    "東京の夜景 and ソウル",
    "emoji 🙂🎉 party 👍🏽",
    "quotes \"double\" and 'single' (brackets) [square] {curly} <angle>",
    "hyphenated-words, under_scores and e-mail@example.com #hashtag $5 100%",
    "",
    "a",
    "the end<end_of_text>after",
    " ".join(f"word{i}" for i in range(60)),  # far past 77 tokens: truncated, <end_of_text> kept last
]


@pytest.fixture(scope="module")
def bpe():
    return openai_bpe()


def test_openai_bpe_matches_open_clip_tokenize(bpe, tmp_path):
    expected = open_clip.tokenize(TEXTS)
    assert torch.equal(bpe(TEXTS), expected)
    assert bpe.sot_id == 49406 and bpe.eot_id == 49407 and bpe.pad_id == 0 and bpe.vocab_size == 49408
    assert bpe.context_length == 77 and bpe(TEXTS[-1])[0, -1] == 49407
    bpe.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert torch.equal(again(TEXTS), expected)
    assert (again.sot_id, again.eot_id, again.pad_id, again.context_length) == (49406, 49407, 0, 77)
    assert again.decode(again(["a photo of a cat"])[0]) == "a photo of a cat"
    short = openai_bpe(context_length=16)  # other context lengths truncate the same way
    assert torch.equal(short(TEXTS), open_clip.tokenize(TEXTS, context_length=16))


def test_build_tokenizer_knows_openai():
    from clipsnail.data.tokenizers import build_tokenizer

    tok = build_tokenizer("openai", [], vocab_size=0, context_length=20)
    assert tok.context_length == 20 and tok.eot_id == 49407


# ----------------------------------------------------------------------------------------------- open_clip CLIP


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{quick_gelu: (open_clip model, our converted run)}."""
    out = {}
    for quick_gelu in (True, False):
        d = tmp_path_factory.mktemp(f"open_clip_{quick_gelu}")
        source = make_open_clip(quick_gelu, seed=int(quick_gelu))
        info = convert_open_clip(save_safetensors(source, d / "open_clip_model.safetensors"), d / "run",
                                 quick_gelu=quick_gelu)
        assert info["quick_gelu"] is quick_gelu and info["task"] == "clip"
        assert info["architecture"]["vision"]["heads"] == info["architecture"]["text"]["heads"] == 2
        assert info["parameters"] == sum(p.numel() for p in source.parameters())
        out[quick_gelu] = (source, d / "run")
    return out


def assert_same_embeddings(source, ours, texts=TEXTS[:6]):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_images = source.encode_image(images, normalize=True)
        expected_texts = source.encode_text(open_clip.tokenize(texts), normalize=True)
        assert torch.allclose(ours.encode_image(images), expected_images, atol=1e-5)
        assert torch.allclose(ours.encode_text(open_clip.tokenize(texts)), expected_texts, atol=1e-5)
        assert torch.allclose(ours.encode_text(texts), expected_texts, atol=1e-5)  # through our tokenizer
        assert torch.allclose(ours.logit_scale, source.logit_scale.reshape(()))


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_converted_clip_equals_open_clip(converted, quick_gelu):
    source, run = converted[quick_gelu]
    ours = clipsnail.load(run)
    assert ours.cfg.activation == ("quick_gelu" if quick_gelu else "gelu")
    assert ours.image_size == 32 and ours.cfg.vision.patch_size == 8 and ours.cfg.text.context_length == 77
    assert_same_embeddings(source, ours)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    # open_clip's evaluation preprocessing (bicubic resize of the short side, centre crop, OpenAI mean/std)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    reference = open_clip.image_transform(32, is_train=False, mean=ours.cfg.vision.mean, std=ours.cfg.vision.std)
    assert torch.allclose(ours.preprocess(pil), reference(pil), atol=0.02)  # PIL vs tensor rounding only
    assert json.loads((run / "config.json").read_text())["task"] == "clip"


def test_run_configs_from_before_the_new_options_still_load(converted, tmp_path):
    """config.json files written before activation / MLP ratios / interpolation existed load with the old
    behaviour (GELU, 4x MLPs, bilinear)."""
    import shutil

    source, run = converted[False]
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    config = json.loads((old / "config.json").read_text())
    model_section = config["model"]
    for section, key in (("vision", "mlp_ratio"), ("text", "mlp_ratio"), ("vision", "interpolation")):
        del model_section[section][key]
    del model_section["activation"]
    (old / "config.json").write_text(json.dumps(config))
    model = clipsnail.load(old)
    assert model.cfg.activation == "gelu" and model.cfg.vision.interpolation == "bilinear"
    assert_same_embeddings(source, model, texts=TEXTS[:2])


def test_the_activation_matters(converted, tmp_path):
    """Converted with the wrong activation the embeddings change: the option is not cosmetic."""
    source, _ = converted[True]
    path = save_safetensors(source, tmp_path / "model.safetensors")
    convert_open_clip(path, tmp_path / "wrong", quick_gelu=False)
    with torch.no_grad():
        images = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(clipsnail.load(tmp_path / "wrong").encode_image(images),
                                  source.encode_image(images, normalize=True), atol=1e-3)


def test_quick_gelu_from_open_clip_config_and_torch_bin(tmp_path):
    """A .bin state dict (read with weights_only=True) under {"state_dict": {"module.": ...}}, with
    open_clip_config.json beside it saying quick_gelu, as open_clip's hub repos do. Its head counts (4 heads of 32,
    which the shapes cannot show) are read from the config too."""
    source = make_open_clip(quick_gelu=True, seed=5, head_width=32)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"head_width": 32},
                      "text_cfg": {"heads": 4}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    info = convert_open_clip(tmp_path / "open_clip_pytorch_model.bin", tmp_path / "run")
    assert info["quick_gelu"] is True and info["quick_gelu_from"] == "open_clip_config.json"
    assert info["architecture"]["vision"]["heads"] == info["architecture"]["text"]["heads"] == 4
    ours = clipsnail.load(tmp_path / "run")
    assert tuple(ours.cfg.vision.mean) == (0.5, 0.5, 0.5)
    assert_same_embeddings(source, ours)


def test_openai_exports_are_quick_gelu_and_others_default_to_gelu(converted, tmp_path):
    """A state dict taken from OpenAI's TorchScript models keeps input_resolution/context_length/vocab_size: those
    mean QuickGELU. Without that, or a config saying so, the default is GELU."""
    source, _ = converted[True]
    state = {**source.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
             "vocab_size": torch.tensor(49408)}
    torch.save(state, tmp_path / "openai.pt")
    info = convert_open_clip(tmp_path / "openai.pt", tmp_path / "run")
    assert info["quick_gelu"] is True and "OpenAI" in info["quick_gelu_from"]
    assert_same_embeddings(source, clipsnail.load(tmp_path / "run"), texts=TEXTS[:2])
    info = convert_open_clip(save_safetensors(source, tmp_path / "plain.safetensors"), tmp_path / "plain")
    assert info["quick_gelu"] is False and info["quick_gelu_from"].startswith("default")
    # open_clip's CustomTextCLIP layout: the same text tower under "text."
    visual = ("visual.", "logit_scale")
    save_file({(k if k.startswith(visual) else f"text.{k}"): v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "custom_text.safetensors"))
    convert_open_clip(tmp_path / "custom_text.safetensors", tmp_path / "custom_text", quick_gelu=True)
    assert_same_embeddings(source, clipsnail.load(tmp_path / "custom_text"), texts=TEXTS[:2])


def test_cli_convert_prints_json(converted, tmp_path, capsys):
    source, _ = converted[False]
    path = save_safetensors(source, tmp_path / "open_clip_model.safetensors")
    assert main(["convert", "--from", f"open_clip:{path}", "--out", str(tmp_path / "run"), "--no-quick-gelu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run"] == str(tmp_path / "run") and info["architecture"]["embed_dim"] == 32
    assert main(["convert", "--from", f"timm:{path}", "--out", str(tmp_path / "other")]) == 2
    assert "unknown source 'timm'" in capsys.readouterr().err
    assert main(["convert", "--from", f"lemevit:{path}", "--out", str(tmp_path / "other")]) == 2
    assert "needs --arch" in capsys.readouterr().err


def test_existing_out_is_refused(converted, tmp_path):
    source, _ = converted[False]
    path = save_safetensors(source, tmp_path / "m.safetensors")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists, is not empty"):
        convert_open_clip(path, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    convert_open_clip(path, out, quick_gelu=False)  # an empty folder is fine
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_resnet_tower_is_a_clear_error(converted, tmp_path):
    source, _ = converted[False]
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("visual.")}
    state.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
                  "visual.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1),
                  "visual.attnpool.positional_embedding": torch.zeros(50, 64)})
    save_file(state, str(tmp_path / "rn50.safetensors"))
    with pytest.raises(DataError, match=r"rn50\.safetensors.*ModifiedResNet.*ViT family"):
        convert_open_clip(tmp_path / "rn50.safetensors", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_keys_and_shape_mismatches_are_clear_errors(converted, tmp_path):
    source, _ = converted[False]
    state = dict(source.state_dict())
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(128)  # layer scale: not in our model
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ls.safetensors"))
    with pytest.raises(DataError, match=r"ls\.safetensors: unsupported part.*resblocks\.0\.ls_1\.gamma"):
        convert_open_clip(tmp_path / "ls.safetensors", tmp_path / "run", quick_gelu=False)
    state = dict(source.state_dict())
    state["visual.ln_post.weight"] = torch.ones(64)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DataError, match=r"bad\.safetensors: shape mismatch at visual\.ln_post\.weight"):
        convert_open_clip(tmp_path / "bad.safetensors", tmp_path / "run", quick_gelu=False)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": {"pool_type": "last"}}}))
    save_safetensors(source, tmp_path / "model.safetensors")
    with pytest.raises(DataError, match="text_cfg.pool_type='last' is not supported"):
        convert_open_clip(tmp_path / "model.safetensors", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_torchscript_archive_is_refused(tmp_path):
    jit = torch.jit.script(torch.nn.Linear(2, 2))
    jit.save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(DataError, match=r"ViT-B-32\.pt: a TorchScript \(JIT\) archive.*state dict"):
        convert_open_clip(tmp_path / "ViT-B-32.pt", tmp_path / "run")


def test_pickled_code_is_not_run(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "thing": argparse.ArgumentParser}, tmp_path / "evil.pt")
    with pytest.raises(DataError) as e:
        convert_open_clip(tmp_path / "evil.pt", tmp_path / "run")
    message = str(e.value)
    # what clipsnail accepts and how to re-save, not PyTorch's hint to load with weights_only=False here
    assert message.startswith(f"{tmp_path / 'evil.pt'}: holds Python objects besides tensors (argparse.")
    assert "does not unpickle" in message and "save_file(" in message and "\x1b" not in message
    assert "Re-running `torch.load`" not in message


def write_images(root, classes=("red", "blue"), per_class=2, size=32):
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "a": (200, 200, 0), "b": (0, 200, 200)}
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colours[c]) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_converted_run_works_for_zeroshot_and_the_index(converted, tmp_path, capsys):
    from clipsnail.inference.index import ImageIndex, build_index, folder_index

    _, run = converted[False]
    images = write_images(tmp_path / "images")
    assert main(["zeroshot", "--model", str(run), "--folder", str(images), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_images"] == 4 and metrics["num_classes"] == 2 and 0 <= metrics["acc1"] <= 1
    model = clipsnail.load(run)
    index, stats = build_index(model, images, tmp_path / "index", progress=False)
    assert stats["added"] == 4 and len(ImageIndex.load(tmp_path / "index")) == 4
    hits = index.search(model.encode_text(["a red square"]), k=2)[0]
    assert len(hits) == 2
    assert len(folder_index(model, images, tmp_path / "cache", progress=False)) == 4


def test_converted_run_fine_tunes_and_conditions_text_to_image(converted, shapes_dir, tmp_path, capsys):
    _, run = converted[True]
    tuned = tmp_path / "tuned"
    assert main(["clip", "train", "--init", str(run), *caption_flags(shapes_dir), "--out", str(tuned),
                 *sets(["train.max_steps=2", "train.batch_size=8", "optim.lr=1e-3"])]) == 0
    assert (tuned / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    model = clipsnail.load(tuned)
    assert model.cfg.activation == "quick_gelu" and model.cfg.text.vocab_size == 49408
    start = clipsnail.load(run)
    assert not torch.equal(model.visual.patch_embed.weight, start.visual.patch_embed.weight)  # it trained

    t2i = tmp_path / "t2i"
    assert main(tiny_t2i_args(run, shapes_dir, t2i)) == 0
    capsys.readouterr()
    images, scores = clipsnail.load(t2i).generate("a red circle", n=2, rerank=1, seed=0)
    assert images.shape == (1, 3, 8, 8) and scores.shape == (1,)


# ----------------------------------------------------------------------------------------------- LeMeViT


def random_lemevit(num_classes: int, seed: int):
    torch.manual_seed(seed)
    model = timm.create_model("lemevit_tiny", num_classes=num_classes)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def lemevit_checkpoint(tmp_path_factory):
    """The timm train-script layout of the official checkpoints: EMA and raw weights under module., and args."""
    ema = random_lemevit(2, seed=0)
    raw = copy.deepcopy(ema)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("lemevit") / "lemevit_tiny.pth"
    torch.save({"epoch": 299, "arch": "lemevit_tiny", "args": argparse.Namespace(lr=5e-4, model="lemevit_tiny"),
                "state_dict": {f"module.{k}": v for k, v in raw.state_dict().items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, path)
    return path, ema, raw


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_converted_lemevit_gives_the_same_logits(lemevit_checkpoint, tmp_path, weights):
    path, ema, raw = lemevit_checkpoint
    info = convert_lemevit(path, tmp_path / "run", "lemevit_tiny", weights=weights)
    assert info["weights"] == {"ema": "state_dict_ema", "raw": "state_dict"}[weights]
    model = clipsnail.load(tmp_path / "run")
    assert model.class_names == ["class_0", "class_1"] and model.config.data.image_size == 224
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), (ema if weights == "ema" else raw)(x), atol=1e-5)


def test_converted_lemevit_runs_classify_eval(lemevit_checkpoint, tmp_path, capsys):
    path, _, _ = lemevit_checkpoint
    (tmp_path / "classes.txt").write_text("a\nb\n")
    assert main(["convert", "--from", f"lemevit:{path}", "--arch", "lemevit_tiny", "--out", str(tmp_path / "run"),
                 "--class-names", str(tmp_path / "classes.txt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == "state_dict_ema" and info["architecture"]["num_classes"] == 2
    images = write_images(tmp_path / "images", classes=("a", "b"), per_class=1)
    assert main(["classify", "eval", "--model", str(tmp_path / "run"), "--data", f"folder:{images}",
                 "--split", "all", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["acc1"] <= 1
    with pytest.raises(DataError, match="head has 2 classes, not 1000"):
        convert_lemevit(path, tmp_path / "other", "lemevit_tiny", num_classes=1000)
