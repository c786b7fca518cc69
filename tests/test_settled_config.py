"""A CLIP config is settled once, then read: every step that completes it (a fine-tuning run's architecture, the
tokenizer's facts, a pretrained text tower's path) gives a new config and never writes into the one it was given;
the settled configs are frozen; a loaded model carries its architecture alone."""

import dataclasses
import json

import pytest
from helpers import TINY_CLIP, caption_flags

from clipsnail.core.config import load_config, to_dict
from clipsnail.core.runs import read_run_config
from clipsnail.families.clip import ClipConfig, load_run, take_init_run
from clipsnail.models.clip import ClipModelConfig


def test_the_settled_configs_are_frozen():
    config = ClipConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = ClipModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.text.vocab_size = 10


def test_a_task_leaves_the_config_it_was_given_as_it_was(clip_run, shapes_dir, tmp_path):
    from clipsnail.tasks.clip import ClipTask

    flags = dict(zip(caption_flags(shapes_dir)[::2], caption_flags(shapes_dir)[1::2]))
    given = load_config(ClipConfig, None, [*TINY_CLIP, f"data.captions={flags['--captions']}",
                                           f"data.images={flags['--images']}",
                                           f"data.split_file={flags['--split-file']}", f"finetune.init={clip_run}"])
    before = json.dumps(to_dict(given), sort_keys=True)
    task = ClipTask(given, run_dir=tmp_path / "run")
    assert json.dumps(to_dict(given), sort_keys=True) == before  # the init run's architecture went into a copy
    run_model = read_run_config(clip_run)[1]["model"]
    assert task.config.model.vision.width == run_model["vision"]["width"]
    assert task.config.model.text.vocab_size == task.tokenizer.vocab_size


def test_taking_an_init_run_returns_a_new_config_and_its_weights(clip_run):
    given = ClipConfig(finetune=dataclasses.replace(ClipConfig().finetune, init=str(clip_run)))
    config, weights = take_init_run(given)
    assert given.model == ClipModelConfig() and config.model != given.model and config.finetune == given.finetune
    assert "logit_scale" in weights


def test_a_loaded_model_carries_its_architecture_alone(clip_run):
    data = read_run_config(clip_run)[1]
    before = json.dumps(data, sort_keys=True)
    model = load_run(clip_run, data)
    assert json.dumps(data, sort_keys=True) == before  # the caller's dict is read, not rewritten
    assert isinstance(model.cfg, ClipModelConfig) and not hasattr(model, "config")
    assert model.run_dir == clip_run.resolve() and model.tokenizer is not None


def test_the_classify_and_pixelsnail_tasks_settle_a_copy_of_their_config(colours_dir):
    """Each task settles its config from the data (classes, channels, image size, normalisation) in a copy it keeps
    as `task.config`; the config it was given stays as it was."""
    from clipsnail.families.classify import ClassifyConfig
    from clipsnail.families.pixelsnail import PixelSNAILTaskConfig, preset_overrides
    from clipsnail.tasks.classify import ClassifyTask
    from clipsnail.tasks.pixelsnail import PixelSNAILTask

    given = load_config(ClassifyConfig, None, [f"data.data={colours_dir}", "model.name=resnet18",
                                               "train.best_metric=val_acc1"])
    before = json.dumps(to_dict(given), sort_keys=True)
    task = ClassifyTask(given)
    assert json.dumps(to_dict(given), sort_keys=True) == before
    assert task.config.model.num_classes == 8 and task.config.data.image_size > 0 and given.model.num_classes == 0
    given = load_config(PixelSNAILTaskConfig, None, [*preset_overrides("tiny"), f"data.data={colours_dir}",
                                                     "data.condition=class"])
    before = json.dumps(to_dict(given), sort_keys=True)
    task = PixelSNAILTask(given)
    assert json.dumps(to_dict(given), sort_keys=True) == before
    assert task.config.data.image_size == 32 and given.data.image_size == 0  # a folder's images are taken at 32
    assert task.config.model.cond_dim == len(task.config.class_names) == 8 and given.model.cond_dim == 0
