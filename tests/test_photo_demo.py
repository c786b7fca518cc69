"""`clipsnail demo --photos`: search a folder of photos with a fine-tuned (or given) CLIP.

The real demo fine-tunes the pretrained preset, whose packaged weights a test machine may not have: these tests
fine-tune a tiny from-scratch CLIP instead (`--config` of an empty file plus TINY_CLIP), on the shapes corpus."""

import dataclasses
import json
import shutil

import pytest
from helpers import TINY_CLIP, logged_losses, run_error, sets

from clipsnail.apps.demo import PHOTO_QUERIES
from clipsnail.cli import main
from clipsnail.core import pretrained


@pytest.fixture
def photos(shapes_dir, tmp_path):
    """A folder of 10 'photos' (shape scenes) in two subfolders: the demo searches folders recursively."""
    folder = tmp_path / "photos"
    for i, image in enumerate(sorted((shapes_dir / "images").iterdir())[:10]):
        (folder / f"album{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, folder / f"album{i % 2}" / image.name)
    return folder


@pytest.fixture
def scratch_config(tmp_path):
    path = tmp_path / "scratch.yaml"
    path.write_text("# a from-scratch CLIP: the tiny sizes come as --set values\n")
    return path


def fine_tune_args(photos, out, shapes_dir, config, *extra):
    return ["demo", "--photos", str(photos), "--out", str(out), "--no-onnx", "--captions",
            str(shapes_dir / "captions.csv"),
            "--images", str(shapes_dir / "images"), "--split-file", str(shapes_dir / "split.json"),
            "--config", str(config), *sets(TINY_CLIP), "--steps", "3", "--no-progress", *extra]


def read_summary(out):
    return json.loads((out / "photos_summary.json").read_text())


@pytest.mark.slow
def test_fine_tunes_indexes_and_answers_queries_then_reuses_run_and_index(photos, shapes_dir, scratch_config,
                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    queries = ["--query", "a red circle", "--query", "two blue squares"]
    assert main(fine_tune_args(photos, out, shapes_dir, scratch_config, *queries)) == 0
    printed = capsys.readouterr().out

    assert len(logged_losses(out / "run")) == 3
    summary = read_summary(out)
    assert summary["fine_tuned_steps"] == 3
    held_out = summary["held_out"]  # the caption set's held-out photos: how many, and what chance is
    assert "val_image_retrieval_recall@5" in held_out and held_out["val_num_captions"] >= held_out["val_num_images"] > 0
    chance = min(1.0, 5 / held_out["val_num_images"])
    assert (f"recall@5 {held_out['val_image_retrieval_recall@5']:.3f} over the {held_out['val_num_images']} captioned "
            f"photos kept out of fine-tuning ({held_out['val_num_captions']} captions; chance {chance:.3f})") in printed
    assert summary["indexing"]["added"] == summary["indexing"]["total"] == 10
    assert [a["query"] for a in summary["queries"]] == ["a red circle", "two blue squares"]
    for answer, name in zip(summary["queries"], ["a_red_circle.png", "two_blue_squares.png"]):
        assert answer["grid"] == str(out / "queries" / name) and (out / "queries" / name).is_file()
        assert len(answer["hits"]) == 9  # a 3x3 grid
        assert all(str(photos.resolve()) in hit["path"] for hit in answer["hits"])
        assert answer["hits"][0]["score"] >= answer["hits"][-1]["score"]
    assert str(out / "queries" / "a_red_circle.png") in printed
    assert f"clipsnail search --index {out / 'index'}" in printed
    assert f"clipsnail serve --index {out / 'index'}" in printed

    # Again, with one photo more: the run is reused as it is, and only the new photo is encoded.
    weights = (out / "run" / "model.safetensors").read_bytes()
    shutil.copyfile(sorted((shapes_dir / "images").iterdir())[20], photos / "new.png")
    assert main(fine_tune_args(photos, out, shapes_dir, scratch_config, *queries)) == 0
    assert len(logged_losses(out / "run")) == 3
    assert (out / "run" / "model.safetensors").read_bytes() == weights
    stats = read_summary(out)["indexing"]
    assert (stats["added"], stats["unchanged"], stats["total"]) == (1, 10, 11)


@pytest.mark.slow
def test_more_fine_tuning_reencodes_every_photo(photos, shapes_dir, scratch_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(fine_tune_args(photos, out, shapes_dir, scratch_config, "--query", "a dog")) == 0
    # --steps 5 resumes the 3-step run: vectors of the old weights would not match the new model's queries
    args = fine_tune_args(photos, out, shapes_dir, scratch_config, "--query", "a dog")
    args[args.index("--steps") + 1] = "5"
    assert main(args) == 0
    assert len(logged_losses(out / "run")) == 5
    assert "encoding every photo again: the model changed" in capsys.readouterr().out
    stats = read_summary(out)["indexing"]
    assert (stats["added"], stats["unchanged"]) == (10, 0)


def test_model_run_searches_with_the_default_queries(photos, clip_run, tmp_path):
    out = tmp_path / "out"
    assert main(["demo", "--photos", str(photos), "--model", str(clip_run), "--out", str(out), "--no-progress"]) == 0
    summary = read_summary(out)
    assert summary["model"] == str(clip_run.resolve()) and "fine_tuned_steps" not in summary
    assert [a["query"] for a in summary["queries"]] == PHOTO_QUERIES
    assert summary["query_encoder"] == "written"  # later searches of the index load no PyTorch
    assert len(list((out / "queries").glob("*.png"))) == len(PHOTO_QUERIES)
    assert not (out / "run").exists()
    from clipsnail.inference.index import ImageIndex

    assert ImageIndex.load(out / "index").model_dir == clip_run.resolve()  # what `clipsnail search --index` loads


def test_query_names_stay_inside_the_grid_folder(photos, clip_run, tmp_path):
    out = tmp_path / "out"
    queries = ["--query", "../../escape", "--query", "a dog", "--query", "A dog!"]
    assert main(["demo", "--photos", str(photos), "--model", str(clip_run), "--out", str(out), "--no-progress",
                 "--no-onnx", *queries]) == 0
    assert sorted(p.name for p in (out / "queries").iterdir()) == ["a_dog.png", "a_dog_2.png", "escape.png"]
    assert not (tmp_path / "escape.png").exists()


def test_a_model_and_captions_together_are_refused(photos, shapes_dir, clip_run, tmp_path, capsys):
    line = run_error(capsys, ["demo", "--photos", str(photos), "--out", str(tmp_path / "out"), "--model",
                              str(clip_run), "--captions", str(shapes_dir / "captions.csv"), "--images",
                              str(shapes_dir / "images")])
    assert "--captions FILE --images DIR" in line and "--model RUN" in line and "not both" in line
    assert not (tmp_path / "out").exists()


def test_photo_flags_need_photos(clip_run, capsys):
    assert "--model" in run_error(capsys, ["demo", "--model", str(clip_run)])


def test_refuses_an_output_folder_it_did_not_write(photos, clip_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = run_error(capsys, ["demo", "--photos", str(photos), "--model", str(clip_run), "--out", str(out)])
    assert str(out) in line and "'notes.txt'" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_refuses_an_output_folder_inside_the_photos(photos, clip_run, capsys):
    line = run_error(capsys, ["demo", "--photos", str(photos), "--model", str(clip_run), "--out",
                              str(photos / "results")])
    assert "inside the photo folder" in line
    assert not (photos / "results").exists()


def test_missing_pretrained_extra_is_named_before_any_training(photos, shapes_dir, tmp_path, capsys, monkeypatch):
    # As on a machine without `clipsnail[pretrained]`: the packaged weights' distribution is not installed.
    absent = dataclasses.replace(pretrained.PACKAGED["efficientnet-lite0"], distribution="clipsnail-test-absent")
    monkeypatch.setitem(pretrained.PACKAGED, "efficientnet-lite0", absent)
    out = tmp_path / "out"
    line = run_error(capsys, ["demo", "--photos", str(photos), "--out", str(out), "--captions",
                              str(shapes_dir / "captions.csv"), "--images", str(shapes_dir / "images")])
    assert "pip install 'clipsnail[pretrained]'" in line
    assert not (out / "run").exists()


def test_a_newline_in_a_photo_name_cannot_forge_a_result_line(shapes_dir, clip_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    forged = "fake\n    0.999  totally_real.png"
    shutil.copyfile(sorted((shapes_dir / "images").iterdir())[0], photos / forged)
    capsys.readouterr()
    assert main(["demo", "--photos", str(photos), "--model", str(clip_run), "--out", str(tmp_path / "out"),
                 "--no-onnx",
                 "--no-progress", "--query", "a red circle"]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if "totally_real" in line]
    assert len(shown) == 1 and shown[0].endswith("  fake\\x0a    0.999  totally_real.png"), shown  # one line, escaped


def test_refuses_photos_inside_the_output_folder(photos, clip_run, tmp_path, capsys):
    """`--photos OUT/queries --out OUT`: the demo would index its own grids, then overwrite one of the 'photos'."""
    out = tmp_path / "out"
    shutil.copytree(photos / "album0", out / "queries")
    before = {p.name: p.read_bytes() for p in (out / "queries").iterdir()}
    line = run_error(capsys, ["demo", "--photos", str(out / "queries"), "--model", str(clip_run), "--out", str(out)])
    assert f"{out / 'queries'}: inside the output folder {out}" in line
    assert {p.name: p.read_bytes() for p in (out / "queries").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["queries"]
