"""CLIP training from WebDataset shards (`clip train --shards`), and fine-tuning from a run (`--init`)."""

import json

import pytest
import torch
from helpers import tiny_clip_args, torchrun
from safetensors.torch import load_file

from clipsnail.cli import main


@pytest.fixture(scope="module")
def shards(shapes_dir, tmp_path_factory):
    from clipsnail.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    summary = write_shards(shapes_dir / "captions.csv", shapes_dir / "images", out, split="train", shard_size=32,
                           split_file=shapes_dir / "split.json")
    assert summary["shards"] >= 2
    return summary["pattern"]


def streaming_args(shapes_dir, shards, out, *extra):
    # --captions/--images/--split-file stay: they now only provide the validation split.
    return tiny_clip_args(shapes_dir, out, "--shards", shards, "--set", "train.max_steps=5",
                          "--set", "train.checkpoint_every=100", *extra)


def test_training_streams_shards_and_resumes_exactly(shapes_dir, shards, tmp_path):
    whole = tmp_path / "whole"
    assert main(streaming_args(shapes_dir, shards, whole)) == 0
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert "eval/val_image_retrieval_recall@1" in records[-1]

    # Stopped after its first step by the time budget, then continued: the stream resumes mid-epoch exactly.
    resumed = tmp_path / "resumed"
    assert main(streaming_args(shapes_dir, shards, resumed, "--time-budget", "0s",
                               "--set", "train.budget_schedule=pause")) == 0
    assert main(streaming_args(shapes_dir, shards, resumed)) == 0
    expected, got = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_streaming_under_torchrun(shapes_dir, shards, tmp_path):
    run = tmp_path / "run"
    done = torchrun(streaming_args(shapes_dir, shards, run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "model.safetensors").is_file() and (run / "tokenizer.json").is_file()


def test_no_training_data_names_the_flags(tmp_path, capsys):
    assert main(["clip", "train", "--out", str(tmp_path / "run")]) == 2
    assert "--shards" in capsys.readouterr().err


def test_fine_tuning_starts_from_the_weights_of_a_run(shapes_dir, clip_run, tmp_path):
    """With a zero learning rate the fine-tuned run must end with exactly the weights it started from."""
    run = tmp_path / "tuned"
    args = tiny_clip_args(shapes_dir, run, "--init", str(clip_run), "--set", "optim.lr=0", "--set",
                          "train.max_steps=2", "--set", "model.vision.width=64")  # the init run's model wins
    assert main(args) == 0
    start, end = load_file(str(clip_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert start.keys() == end.keys()
    for name in start:
        torch.testing.assert_close(end[name], start[name], atol=0, rtol=0, msg=name)
    assert (run / "tokenizer.json").read_text() == (clip_run / "tokenizer.json").read_text()
