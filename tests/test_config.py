from pathlib import Path

import pytest

from clipsnail.core.config import load_config, parse_duration
from clipsnail.core.errors import ConfigError
from clipsnail.families.clip import ClipConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  head:\n    embed_dim: 64\ntrain:\n  epochs: 3\noptim:\n  betas: [0.9, 0.95]\n")
    cfg = load_config(ClipConfig, path, ["train.epochs=5", "vision.encoder=timm:resnet18", "finetune.image_lr=1e-4"])
    assert cfg.model.head.embed_dim == 64 and cfg.train.epochs == 5
    assert cfg.model.vision.encoder == "timm:resnet18"  # a unique tail of the path needs no section
    assert cfg.optim.betas == (0.9, 0.95) and cfg.finetune.image_lr == 1e-4 and cfg.finetune.text_lr is None
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.head.embed_dimm'.*model.head.embed_dim"):
        load_config(ClipConfig, None, ["model.head.embed_dimm=3"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train.epoch.*epochs"):
        load_config(ClipConfig, path)


def test_ambiguous_and_bad_values():
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(ClipConfig, None, ["context_length=16"])  # model.text.context_length or data.context_length
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(ClipConfig, None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ClipConfig, None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(ClipConfig, "/nonexistent.yaml")


def test_typed_values_are_used_as_given_and_checked_like_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  images: yaml_images\n  captions: yaml.csv\ntrain:\n  epochs: 3\n")
    cfg = load_config(ClipConfig, path, values={"data.images": "010", "captions": "on", "train.seed": "7",
                                                "strict": "true", "betas": "0.9, 0.95"})
    assert cfg.data.images == "010" and cfg.data.captions == "on"  # YAML would make them 8 and True
    assert cfg.train.seed == 7 and cfg.data.strict is True and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.epochs == 3  # the YAML file's value where no value is given
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(ClipConfig, values={"train.epochs": 2.5})
    with pytest.raises(ConfigError, match=r"unknown config key 'data.imagez'"):
        load_config(ClipConfig, values={"data.imagez": "x"})
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(ClipConfig, values={"context_length": 16})


def test_precedence_defaults_yaml_values_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  seed: 3\n  log_every: 3\n")
    defaults = {"train": {"epochs": 1, "seed": 1, "log_every": 1, "max_steps": 1}}
    cfg = load_config(ClipConfig, path, ["train.seed=5", ("train.log_every", 6), "train.log_every=7",
                                         ("data.images", "010")],
                      defaults=defaults, values={"train.seed": 4, "train.log_every": 4, "data.images": "yes"})
    assert cfg.train.max_steps == 1 and cfg.train.epochs == 3  # defaults < YAML
    assert cfg.train.seed == 5  # values < --set strings
    assert cfg.train.log_every == 7  # overrides in order: the later wins
    assert cfg.data.images == "010"  # a (key, value) override is not parsed either


def test_set_strings_are_yaml():
    cfg = load_config(ClipConfig, None, ["data.images=010", "data.captions=on", "data.split_file="])
    assert (cfg.data.images, cfg.data.captions, cfg.data.split_file) == ("8", "True", "")


def test_parse_duration():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    assert parse_duration("") is None
    with pytest.raises(ConfigError):
        parse_duration("ten minutes")


SHIPPED_CONFIGS = sorted((Path(__file__).parents[1] / "src" / "clipsnail" / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(SHIPPED_CONFIGS) >= 5  # the parametrised test below would pass with none


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(ClipConfig, path)
    assert cfg.train.batch_size > 0
