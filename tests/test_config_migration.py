"""The CLIP model config in sections (vision, text, head): runs, YAML files and `--set` keys written with the flat
names of before still read, each old name as its new place; a run directory written before the split loads and
computes what it computed then."""

import json
from pathlib import Path

import pytest
import torch

import clipsnail
from clipsnail.core import config as config_module
from clipsnail.core.config import from_dict, load_config, to_dict
from clipsnail.core.errors import ConfigError
from clipsnail.families.clip import ClipConfig, FinetuneConfig, take_init_run
from clipsnail.models.clip import FLAT_MODEL_KEYS, ClipModelConfig

# A tiny CLIP run written by the code of before the split (a flat model section), trained 2 steps, with the
# embeddings that code computed for two texts and two images.
FLAT_RUN = Path(__file__).parent / "fixtures" / "clip_run_flat_model"
FIXTURE_IMAGES = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)


def test_a_run_with_the_flat_model_section_loads_and_computes_the_same_embeddings():
    before = {p.name: p.read_bytes() for p in FLAT_RUN.iterdir()}
    flat = json.loads((FLAT_RUN / "config.json").read_text())["model"]
    assert "vision_width" in flat and "vision" not in flat  # the fixture is of the old format
    model = clipsnail.load(FLAT_RUN)
    cfg = model.cfg
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.image_size) == (flat["vision_width"], 1, 16)
    assert (cfg.text.vocab_size, cfg.text.context_length) == (flat["vocab_size"], flat["context_length"])
    assert cfg.head.embed_dim == flat["embed_dim"] == model.embed_dim
    expected = json.loads((FLAT_RUN / "expected_embeddings.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(expected["texts"]), torch.tensor(expected["text_embeddings"]),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_image(FIXTURE_IMAGES), torch.tensor(expected["image_embeddings"]),
                                   rtol=0, atol=1e-6)
    assert {p.name: p.read_bytes() for p in FLAT_RUN.iterdir()} == before  # read, never rewritten


def test_a_flat_run_is_an_init_run_and_its_architecture_is_taken_in_sections():
    config, weights = take_init_run(ClipConfig(finetune=FinetuneConfig(init=str(FLAT_RUN))))
    assert config.model == clipsnail.load(FLAT_RUN).cfg
    assert set(weights) == set(clipsnail.load(FLAT_RUN).state_dict())


def test_every_flat_key_has_a_place_and_every_field_a_flat_key():
    nested = to_dict(ClipModelConfig())
    moved = {}
    for old, new in FLAT_MODEL_KEYS.items():
        section, key = new.split(".")
        moved[old] = nested[section][key]
    assert from_dict(ClipModelConfig, {**moved, "activation": "gelu"}) == from_dict(ClipModelConfig, nested)
    fields = {f"{s}.{k}" for s in ("vision", "text", "head") for k in nested[s]}
    assert set(FLAT_MODEL_KEYS.values()) == fields and len(set(FLAT_MODEL_KEYS.values())) == len(FLAT_MODEL_KEYS)


class Warnings:
    """Stands in for the config module's logger: the arguments of each warning it is given."""

    def __init__(self):
        self.args: list[tuple] = []

    def warning(self, message, *args):
        self.args.append(args)


def test_an_old_yaml_file_reads_as_the_new_sections_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "log", warned := Warnings())
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  vision_width: 64\n  image_encoder: vit\n  embed_dim: 48\n  text_pool: cls\n")
    config = load_config(ClipConfig, path, ["model.vision.depth=2"])
    assert (config.model.vision.width, config.model.vision.depth, config.model.head.embed_dim) == (64, 2, 48)
    assert config.model.text.pool == "cls"
    assert {(args[0], args[1]) for args in warned.args} == {
        (path, "model.vision_width"), (path, "model.image_encoder"), (path, "model.embed_dim"),
        (path, "model.text_pool")}


def test_an_old_set_key_reads_as_its_new_place_with_a_warning(monkeypatch):
    monkeypatch.setattr(config_module, "log", warned := Warnings())
    config = load_config(ClipConfig, None, ["model.vision_width=64", "image_encoder=timm:resnet18",
                                            "model.text.width=48"])
    assert (config.model.vision.width, config.model.vision.encoder, config.model.text.width) == \
        (64, "timm:resnet18", 48)
    assert warned.args == [("model.vision_width", "model.vision.width"), ("image_encoder", "model.vision.encoder")]


def test_a_later_new_key_wins_over_an_earlier_old_one(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  vision_width: 64\n")
    assert load_config(ClipConfig, path, ["model.vision.width=96"]).model.vision.width == 96


def test_one_value_under_its_old_and_its_new_name_is_an_error():
    with pytest.raises(ConfigError, match=r"'model.vision.width' is given twice, once under its old name "
                                          r"'model.vision_width'"):
        from_dict(ClipModelConfig, {"vision_width": 32, "vision": {"width": 64}}, where="model")
    both = from_dict(ClipModelConfig, {"vision_width": 32, "vision": {"depth": 3}}, where="model")
    assert (both.vision.width, both.vision.depth) == (32, 3)  # different fields of one section merge


def test_a_run_written_now_has_only_the_sections(clip_run):
    model = json.loads((clip_run / "config.json").read_text())["model"]
    assert set(model) == {"vision", "text", "head", "activation"}
