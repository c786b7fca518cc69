"""Absurd settings are one-line errors before any work (they hung, divided by zero, trained on NaN or saved an
untrained model), and YAML that means something other than it says is refused."""

from __future__ import annotations

import pytest
from helpers import run_error, tiny_clip_args

from clipsnail.core.config import TrainConfig, load_config
from clipsnail.core.errors import ConfigError
from clipsnail.families.clip import ClipConfig


@pytest.mark.parametrize("setting, message", [
    ("train.batch_size=-3", "train.batch_size must be at least 1, got -3"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("train.epochs=0", "train.epochs must be at least 1, got 0"),
    ("train.epochs=-1", "train.epochs must be at least 1, got -1"),
    ("train.accum_steps=0", "train.accum_steps must be at least 1, got 0"),
    ("train.accum_steps=3", "train.batch_size 16 must split evenly into train.accum_steps 3"),
    ("train.max_steps=-2", "train.max_steps must be at least 0"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1)"),
    ("train.precision=fp64", "train.precision must be one of"),
    ("optim.lr=-1", "optim.lr must be at least 0, got -1.0"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be at least 0"),
    ("optim.betas=[0.9, 1.5]", "optim.betas must each be in [0, 1)"),
    ("optim.schedule=linear", "optim.schedule must be one of"),
    ("train.time_budget=soon", "time budget 'soon'"),
])
def test_absurd_training_values_are_refused_before_any_work(setting, message, shapes_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = run_error(capsys, tiny_clip_args(shapes_dir, out, "--set", "train.batch_size=16", "--set", setting))
    assert message in line, line
    assert not out.exists()  # nothing was built, read or written


def test_a_model_too_large_for_memory_is_one_line(shapes_dir, tmp_path, capsys):
    line = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "run", "--set", "model.head.embed_dim=100000000"))
    assert "training it needs about" in line and "GiB free; check its sizes" in line


def test_pretrained_weights_for_the_built_in_vit_are_refused(shapes_dir, tmp_path, capsys):
    line = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "run",
                                            "--set", "model.vision.pretrained=weights.pt"))
    assert "model.vision.pretrained='weights.pt' applies to timm image towers only" in line and "--init RUN" in line


def test_a_section_that_is_not_a_mapping_names_itself(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: 5\n")
    with pytest.raises(ConfigError, match="config key 'model': expected a mapping"):
        load_config(ClipConfig, config, overrides=["model.vision.image_size=32"])
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(ClipConfig, config)


def test_a_key_given_twice_in_yaml_names_both_lines(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 30\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: invalid YAML .*key 'epochs' given twice \(lines 2 and 4\)"):
        load_config(ClipConfig, config)


def test_sensible_values_pass():
    config = load_config(ClipConfig, overrides=["train.epochs=1", "train.max_steps=0", "optim.lr=1e-4"])
    assert isinstance(config.train, TrainConfig) and config.optim.lr == 1e-4
