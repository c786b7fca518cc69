"""Damaged runs and stopped commands: one line naming the file and the problem, never a traceback.

A mistyped image folder for `clip eval`, a checkpoint cut short, weights or a config.json that do not describe the
same model, invalid model settings of every family, a closed stdout pipe, and Ctrl-C during training.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from helpers import assert_same_weights, raise_at, run_error, tiny_clip_args
from safetensors.torch import load_file, save_file

import clipsnail
from clipsnail.cli import main
from clipsnail.core.errors import ConfigError, DataError, Interrupted


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(clipsnail.__file__).parents[1])}


@pytest.fixture
def run_copy(clip_run, tmp_path):
    """A private copy of the shared tiny CLIP run that a test may damage."""
    out = tmp_path / "run"
    shutil.copytree(clip_run, out, ignore=shutil.ignore_patterns("embeddings", "checkpoint"))
    return out


# ----------------------------------------------------------------------------------------------- clip eval


def test_clip_eval_names_a_mistyped_image_folder_as_train_does(capsys, clip_run, shapes_dir, tmp_path, caplog):
    typo = shapes_dir / "imagez"
    data = ["--captions", str(shapes_dir / "captions.csv"), "--images", str(typo),
            "--split-file", str(shapes_dir / "split.json")]
    msg = run_error(capsys, ["clip", "eval", "--model", str(clip_run), *data, "--no-progress"])
    assert msg == f"clipsnail: error: {typo}: image folder not found"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # no warning per image
    train = [a if a != str(shapes_dir / "images") else str(typo)
             for a in tiny_clip_args(shapes_dir, tmp_path / "r", "--set", "train.max_steps=1")]
    assert run_error(capsys, train) == msg


def test_clip_eval_names_the_caption_line_of_a_missing_image(capsys, clip_run, shapes_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "images", images)
    split = json.loads((shapes_dir / "split.json").read_text())
    victim = next(im["filename"] for im in split["images"] if im["split"] == "test")
    (images / victim).unlink()
    msg = run_error(capsys, ["clip", "eval", "--model", str(clip_run), "--captions", str(shapes_dir / "captions.csv"),
                             "--images", str(images), "--split-file", str(shapes_dir / "split.json"),
                             "--no-progress"])
    assert "captions.csv:" in msg and victim in msg and "not found" in msg


# ----------------------------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint_on_resume_says_what_to_do(capsys, shapes_dir, tmp_path):
    out = tmp_path / "r"
    command = tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=2")
    assert main(command) == 0
    ckpt = out / "checkpoint" / "state.safetensors"
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2])
    msg = run_error(capsys, command)  # the same command resumes, and finds the checkpoint cut short
    assert str(ckpt) in msg and "damaged checkpoint" in msg and f"delete {ckpt.parent}" in msg
    shutil.rmtree(ckpt.parent)  # as the message says: the run starts over
    assert main(command) == 0
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in ln]
    assert steps == [1, 2]  # the log of the first attempt does not linger


@pytest.mark.parametrize("cut", [0, 7, 100, -9])
def test_load_state_refuses_any_cut(tmp_path, cut):
    from clipsnail.train.checkpoints import load_state, save_state

    path = tmp_path / "checkpoint" / "state.safetensors"
    save_state(path, {"model": {"w": torch.ones(64, 64)}, "step": 3})
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"state\.safetensors: damaged checkpoint \(.+\); delete .*checkpoint"):
        load_state(path)


def test_resume_with_other_model_settings_names_the_checkpoint(capsys, shapes_dir, tmp_path):
    out = tmp_path / "r"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=1")) == 0
    msg = run_error(capsys, tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=2",
                                           "--set", "model.head.embed_dim=8"))
    # said from the run's config.json before the checkpoint is read
    assert f"{out}: resuming with other settings than the run's: model.head.embed_dim was 16, now 8" in msg
    (out / "config.json").unlink()  # a run stopped before it recorded its settings: the checkpoint tells
    msg = run_error(capsys, tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=2",
                                           "--set", "model.head.embed_dim=8"))
    assert "state.safetensors: does not fit" in msg and "shape mismatch at" in msg and "[16," in msg
    assert "[8," in msg and "delete" in msg


# ----------------------------------------------------------------------------------------------- weights of a run


def test_weights_with_wrong_names_name_the_file_and_the_first_key(run_copy):
    path = run_copy / "model.safetensors"
    state = load_file(str(path))
    state["visual.ln_post.gain"] = state.pop("visual.ln_post.weight")
    save_file(state, str(path))
    with pytest.raises(DataError) as info:
        clipsnail.load(run_copy)
    msg = str(info.value)
    assert msg.startswith(f"{path}: does not fit the model that {run_copy / 'config.json'} describes")
    assert "missing key 'visual.ln_post.weight'" in msg and "unexpected key 'visual.ln_post.gain'" in msg
    assert "\n" not in msg


def test_weights_with_a_wrong_shape_give_both_shapes(run_copy, capsys):
    path = run_copy / "model.safetensors"
    state = load_file(str(path))
    state["text_projection.weight"] = torch.zeros(16, 8)
    save_file(state, str(path))
    msg = run_error(capsys, ["clip", "summary", "--model", str(run_copy)])
    assert str(path) in msg
    assert "shape mismatch at 'text_projection.weight': the file has [16, 8], the model needs [16, 32]" in msg


# ----------------------------------------------------------------------------------------------- config.json


def edit_config(run, section, **values):
    config = json.loads((run / "config.json").read_text())
    config["model"][section].update(values)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("vision", {"width": 0}, "model.vision.width must be positive, got 0"),
    ("text", {"width": -32}, "model.text.width must be positive, got -32"),
    ("vision", {"patch_size": 0}, "model.vision.patch_size must be positive, got 0"),
    ("vision", {"patch_size": 5}, "model.vision.image_size=16 is not a multiple of model.vision.patch_size=5"),
    ("vision", {"heads": 3}, "model.vision.heads=3 does not divide model.vision.width=32"),
    ("text", {"heads": 0}, "model.text.heads must be positive, got 0"),
    ("head", {"embed_dim": 0}, "model.head.embed_dim must be positive"),
    ("vision", {"encoder": "timm:resnet_nope"}, "unknown image encoder 'timm:resnet_nope'"),
    ("vision", {"pool": "max"}, "model.vision.pool must be one of 'cls', 'avg', got 'max'"),
    ("vision", {"width": "wide"}, "config key 'model.vision.width': expected a number"),
])
def test_invalid_clip_config_json_names_the_file_and_key(run_copy, section, values, expected):
    edit_config(run_copy, section, **values)
    with pytest.raises(DataError) as info:
        clipsnail.load(run_copy)
    assert str(info.value).startswith(f"{run_copy / 'config.json'}: ")
    assert expected in str(info.value)


def test_config_json_must_be_an_object(run_copy, capsys):
    (run_copy / "config.json").write_text("[1, 2]")
    msg = run_error(capsys, ["search", "--model", str(run_copy), "--images", str(run_copy), "x"])
    assert msg == f"clipsnail: error: {run_copy / 'config.json'}: expected a JSON object at the top level, got a list"


@pytest.mark.parametrize(("config", "expected"), [
    ({"task": "pixelsnail", "model": {"filters": 0}}, "model.filters must be positive, got 0"),
    ({"task": "pixelsnail", "model": {"channels": 2}}, "model.channels must be 1 or 3, got 2"),
    ({"task": "t2i_pixelsnail", "model": {"nr_mix": 0}}, "model.nr_mix must be positive"),
    ({"task": "t2i_retrieve", "model": {"vocab_size": 50, "feature_dim": 8, "width": 30, "heads": 4}},
     "model.heads=4 does not divide model.width=30"),
    ({"task": "classify", "model": {"name": "resnet_nope"}}, "unknown model 'resnet_nope'"),
    ({"task": "classify", "model": {"name": "lemevit_tiny", "num_classes": 2, "args": "head_dim=0"}},
     "LeMeViT: head_dim must be positive, got 0"),
    ({"task": "clip", "model": []}, "model: expected a mapping"),
    ({"task": "gan"}, "unknown task 'gan'"),
])
def test_invalid_config_json_of_every_family(tmp_path, config, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as info:
        clipsnail.load(run)
    assert str(info.value).startswith(f"{run / 'config.json'}: ") and expected in str(info.value)


def test_invalid_set_value_in_training_is_a_config_error(capsys, shapes_dir, tmp_path):
    msg = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "r", "--set", "model.vision.width=0"))
    assert msg == "clipsnail: error: model.vision.width must be positive, got 0"
    msg = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "r", "--set", "model.vision.heads=5"))
    assert "model.vision.heads=5 does not divide model.vision.width=32" in msg


def test_model_checks_of_every_family():
    from clipsnail.models.pixelsnail import PixelSNAIL, PixelSNAILConfig
    from clipsnail.models.text2feat import Text2FeatConfig, TextToFeature

    for bad, match in [(dict(filters=31), "even"), (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
                       (dict(nonlinearity="relu"), "nonlinearity"), (dict(attn_downsample=0), "attn_downsample"),
                       (dict(null_condition=True), "cond_dim")]:
        with pytest.raises(ConfigError, match=match):
            PixelSNAIL(PixelSNAILConfig(**{**dict(filters=8, blocks=1, nr_resnet=1), **bad}))
    good = dict(vocab_size=40, feature_dim=8, width=16, heads=2, depth=1)
    for bad, match in [(dict(pool="max"), "model.pool"), (dict(eot_id=40), "model.eot_id=40"),
                       (dict(context_length=0), "context_length"), (dict(feature_dim=0), "feature_dim")]:
        with pytest.raises(ConfigError, match=match):
            TextToFeature(Text2FeatConfig(**{**good, **bad}))
    import clipsnail.models  # noqa: F401  (registers lemevit_*)

    for args, match in [(dict(head_dim=48), r"embed_dim\[0\]=64 must be a positive multiple of head_dim=48"),
                        (dict(embed_dim=(64, 64, 0, 192, 320)), r"embed_dim\[2\]=0"),
                        (dict(attn_type=("C", "D", "X", "S", "S")), r"attn_type\[2\]='X'"),
                        (dict(drop_path_rate=1.5), "drop_path_rate"), (dict(queries_len=0), "queries_len")]:
        with pytest.raises(ConfigError, match=match):
            timm.create_model("lemevit_tiny", **args)


# ----------------------------------------------------------------------------------------------- closed pipe


@pytest.mark.slow
def test_closed_stdout_pipe_ends_quietly(clip_run, shapes_dir, tmp_path):
    """`clipsnail search ... | head -0`: the reader is gone before the results are written."""
    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("embeddings", "checkpoint"))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "clipsnail", "search", "--model", str(run), "--images",
                               str(shapes_dir / "images"), "a red circle", "-k", "50", "--no-progress"],
                              stdout=write_end, stderr=subprocess.PIPE, env=subprocess_env(), timeout=300)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err


# ----------------------------------------------------------------------------------------------- Ctrl-C


def clip_task(shapes_dir, out, *overrides):
    from clipsnail.core.config import load_config
    from clipsnail.families.clip import ClipConfig
    from clipsnail.tasks.clip import ClipTask

    args = tiny_clip_args(shapes_dir, out, *overrides)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(ClipConfig, None, sets + [f"data.captions={shapes_dir / 'captions.csv'}",
                                                f"data.images={shapes_dir / 'images'}",
                                                f"data.split_file={shapes_dir / 'split.json'}"])
    return ClipTask(cfg, run_dir=out)


def test_interrupt_checkpoints_the_step_and_the_same_command_resumes_exactly(shapes_dir, tmp_path):
    from clipsnail.train.checkpoints import load_state
    from clipsnail.train.engine import fit

    steps = ("--set", "train.max_steps=8", "--set", "train.checkpoint_every=100")

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted) as info:
        fit(clip_task(shapes_dir, out, *steps), out, progress=False, on_step=raise_at(3))
    assert str(info.value) == (f"interrupted after step 3 of 8; {out / 'checkpoint'} holds step 3: run the same "
                               f"command again to resume from there")
    assert load_state(out / "checkpoint" / "state.safetensors")["step"] == 3
    assert fit(clip_task(shapes_dir, out, *steps), out, progress=False).completed
    straight = tmp_path / "straight"
    fit(clip_task(shapes_dir, straight, *steps), straight, progress=False)
    assert_same_weights(out, straight)


def test_interrupt_inside_a_step_names_the_last_checkpoint(capsys, shapes_dir, tmp_path, monkeypatch):
    """A KeyboardInterrupt in the middle of a step (a second Ctrl-C) cannot save: the message names the step that
    the last checkpoint holds."""
    from clipsnail.train import engine

    real, calls = engine.backward, []

    def backward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "backward", backward)
    out = tmp_path / "r"
    msg = run_error(capsys, tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=20",
                                           "--set", "train.checkpoint_every=4"), status=130)
    assert msg == (f"clipsnail: interrupted after step 5 of 20; {out / 'checkpoint'} holds step 4: run the same "
                   f"command again to resume from there")
    calls.clear()
    msg = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "early", "--set", "train.max_steps=20"), 130)
    assert msg == ("clipsnail: interrupted after step 5 of 20, before the first checkpoint: the same command starts "
                   "the run over")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and what job schedulers send
def test_a_stop_signal_stops_after_the_step_with_a_checkpoint(shapes_dir, tmp_path, signum):
    from clipsnail.train.checkpoints import load_state

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "clipsnail", *tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=100000",
                                                               "--set", "train.checkpoint_every=100000")]
    # A process started with SIGINT ignored (a background job of a shell without job control, as CI may run us)
    # passes that on, and Python then leaves it ignored: give the child the default, as a terminal would.
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = load_state(out / "checkpoint" / "state.safetensors")["step"]
    assert step >= 2
    assert last == (f"clipsnail: interrupted after step {step} of 100000; {out / 'checkpoint'} holds step {step}: "
                    f"run the same command again to resume from there")


def test_resuming_with_other_settings_is_refused_naming_the_first(shapes_dir, tmp_path, capsys):
    """A finished or stopped run trains further with a larger step count; with another learning rate (shapes
    unchanged, so the checkpoint would load) it is refused, and config.json still records the run's settings."""
    out = tmp_path / "run"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=2", "--set", "train.checkpoint_every=1",
                               "--no-progress")) == 0
    recorded = (out / "config.json").read_text()
    line = run_error(capsys, tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=3", "--set",
                                            "optim.lr=0.0005", "--no-progress"))
    assert f"{out}: resuming with other settings than the run's: optim.lr was " in line and "now 0.0005" in line
    assert (out / "config.json").read_text() == recorded
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=3", "--set", "train.checkpoint_every=1",
                               "--no-progress")) == 0  # longer: allowed
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 3
