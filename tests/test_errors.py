"""Bad input through the command line: one line on stderr naming the file/line/key, exit status 2."""

import shutil

import pytest
from helpers import run_error, tiny_clip_args
from PIL import Image

from clipsnail.cli import main
from clipsnail.core.errors import ClipsnailError


@pytest.fixture
def corpus(tmp_path, shapes_dir):
    """A private copy of the tiny shapes corpus that a test may damage."""
    out = tmp_path / "corpus"
    shutil.copytree(shapes_dir, out)
    return out


def train_args(corpus, out, *extra):
    return tiny_clip_args(corpus, out, "--set", "train.max_steps=2", *extra)


def test_missing_image_names_caption_line(capsys, corpus, tmp_path):
    lines = (corpus / "captions.csv").read_text().splitlines()
    lines.insert(3, "no_such_image.png,a red circle")
    (corpus / "captions.csv").write_text("\n".join(lines) + "\n")
    # the new image is not in split.json, so drop the split file to make it part of training
    args = [a for a in train_args(corpus, tmp_path / "r") if not a.endswith("split.json") and a != "--split-file"]
    msg = run_error(capsys, args + ["--set", "data.split_file="])
    assert "captions.csv:4" in msg and "no_such_image.png" in msg


def test_empty_caption_names_line(capsys, corpus, tmp_path):
    lines = (corpus / "captions.csv").read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ","
    (corpus / "captions.csv").write_text("\n".join(lines) + "\n")
    msg = run_error(capsys, train_args(corpus, tmp_path / "r"))
    assert "captions.csv:6" in msg and "empty caption" in msg


def test_unknown_caption_format(capsys, corpus, tmp_path):
    (corpus / "captions.csv").write_text("just some prose\nwith no structure at all\n")
    msg = run_error(capsys, train_args(corpus, tmp_path / "r"))
    assert "captions.csv" in msg and "format" in msg


def test_corrupt_image_is_skipped_and_counted_unless_strict(capsys, corpus, tmp_path, caplog):
    import json

    split = json.loads((corpus / "split.json").read_text())
    train_names = [im["filename"] for im in split["images"] if im["split"] == "train"]
    for name in train_names[:3]:
        (corpus / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(train_args(corpus, tmp_path / "ok", "--set", "train.max_steps=12")) == 0
    assert "corrupt training images skipped" in caplog.text
    msg = run_error(capsys, train_args(corpus, tmp_path / "strict", "--strict", "--set", "train.max_steps=12"))
    assert train_names[0] in msg or train_names[1] in msg or train_names[2] in msg


def test_image_folder_without_images(capsys, tmp_path, shapes_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    run_dir = tmp_path / "r"
    assert main(tiny_clip_args(shapes_dir, run_dir, "--set", "train.max_steps=1")) == 0
    msg = run_error(capsys, ["search", "--model", str(run_dir), "--images", str(empty), "a red circle"])
    assert "empty" in msg and "no images" in msg


def test_wrong_set_key(capsys, shapes_dir, tmp_path):
    msg = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "r", "--set", "model.widht=3"))
    assert "model.widht" in msg and "model.head.embed_dim" in msg


def test_missing_run_directory_and_weights(capsys, tmp_path):
    msg = run_error(capsys, ["search", "--model", str(tmp_path / "nope"), "--images", str(tmp_path), "x"])
    assert "nope" in msg
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{broken")
    assert "config.json" in run_error(capsys, ["zeroshot", "--model", str(run), "--classes", "a,b", "x.png"])


def test_unreadable_query_image(capsys, tmp_path, shapes_dir):
    run_dir = tmp_path / "r"
    assert main(tiny_clip_args(shapes_dir, run_dir, "--set", "train.max_steps=1")) == 0
    bad = tmp_path / "query.jpg"
    bad.write_text("not a jpeg")
    msg = run_error(capsys, ["search", "--model", str(run_dir), "--images", str(shapes_dir / "images"),
                             "--image", str(bad)])
    assert "query.jpg" in msg


def test_bad_holdout_and_batch_larger_than_data(capsys, tmp_path, shapes_dir):
    assert "--holdout" in run_error(capsys, ["data", "shapes", "--out", str(tmp_path / "s"), "--holdout", "pink:cube"])
    msg = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "r", "--set", "train.batch_size=100000"))
    assert "batch" in msg


def test_existing_output_folder_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "keep.png")
    msg = run_error(capsys, ["data", "shapes", "--out", str(out), "--n", "4"])
    assert str(out) in msg and (out / "keep.png").exists()


def test_a_device_name_is_checked_before_anything_runs_on_it():
    import torch

    from clipsnail.core.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ClipsnailError, match=r"unknown device 'gpu'; choose auto \(CUDA, else MPS"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ClipsnailError, match="CUDA is not available here"):
            resolve_device("cuda:0")
