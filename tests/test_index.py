"""The image index: build, update, atomic writes, damaged files, and the `index` / `search --index` commands."""

import json
import os
import time

import numpy as np
import pytest
import torch
from helpers import Counting, noise_image, run_error, tiny_clip_args

from clipsnail.cli import main
from clipsnail.core.errors import ClipsnailError, DataError
from clipsnail.inference.index import ImageIndex, build_index, update_index
from clipsnail.inference.vector_store import VectorStore, top_k, write_store


@pytest.fixture
def photos(tmp_path):
    """8 images at the top, 3 in a nested subfolder, one corrupt file with an image name, one text file."""
    root = tmp_path / "photos"
    for i in range(8):
        noise_image(root / f"{i}.png", i)
    for i in range(3):
        noise_image(root / "trip" / "day1" / f"t{i}.png", 100 + i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def self_top1(index, model):
    """For every indexed image: is it its own nearest neighbour?"""
    queries = model.encode_image(index.paths)
    return [hits[0].path == p for hits, p in zip(index.search(queries, k=3), index.paths)]


def by_path(index) -> dict:
    """{path: stored vector} of an index (ids and rows differ between an updated index and a fresh build)."""
    return dict(zip(index.paths, index.vectors()))


def test_build_counts_and_finds_each_image_itself(clip_model, clip_run, photos, tmp_path):
    counting = Counting(clip_model)
    index, stats = build_index(counting, photos, tmp_path / "idx", batch_size=4, progress=False)
    assert stats["added"] == stats["total"] == 11 and stats["unreadable"] == 1 and stats["removed"] == 0
    assert counting.images == 11  # the corrupt file never reaches the model
    assert json.loads((tmp_path / "idx" / "index.json").read_text()) == {"format": "clipsnail-image-index",
                                                                          "version": 2}
    index = ImageIndex.load(tmp_path / "idx")
    assert index.meta["num_unreadable"] == 1 and set(index.catalogue.unreadable()) == {"broken.jpg"}
    assert index.meta["photos"] == index.meta["rows"] == 11 and index.structure["type"] == "exact"
    sha1 = [h for (h,) in index.catalogue.db.execute("SELECT sha1 FROM photos")]
    assert "trip/day1/t0.png" in index.rel_paths and all(len(h) == 40 for h in sha1)
    assert len(index) == 11 and index.dim == 16 and index.model_dir == clip_run.resolve()
    assert all(p.is_absolute() and p.exists() for p in index.paths)
    nested = photos / "trip" / "day1" / "t1.png"
    assert index.contains(nested) and index.contains(photos / "trip" / ".." / "3.png")
    assert not index.contains(photos / "broken.jpg") and not index.contains(tmp_path / "elsewhere.png")
    assert all(self_top1(index, clip_model))
    hits = index.search(clip_model.encode_image([nested]).detach().numpy()[0], k=50)[0]  # numpy, 1-D, k > N
    assert len(hits) == 11 and hits[0].path == nested and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert index.vectors().shape == (11, 16)


def test_search_rejects_bad_queries(clip_model, photos, tmp_path):
    index, _ = build_index(clip_model, photos, tmp_path / "idx", progress=False)
    with pytest.raises(ClipsnailError, match="dim-16"):
        index.search(torch.ones(2, 8), k=3)
    with pytest.raises(ClipsnailError, match="k must be"):
        index.search(torch.ones(1, 16), k=0)


def test_update_encodes_only_new_and_changed_files_and_matches_a_fresh_build(clip_model, photos, tmp_path):
    build_index(clip_model, photos, tmp_path / "idx", batch_size=4, progress=False)
    noise_image(photos / "trip" / "new.png", 500)  # added
    noise_image(photos / "2.png", 501)  # changed
    os.utime(photos / "2.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    (photos / "5.png").unlink()  # removed
    os.utime(photos / "6.png", ns=(time.time_ns(), time.time_ns() + 2 * 10**9))  # touched, same bytes
    counting = Counting(clip_model)
    index, stats = update_index(counting, tmp_path / "idx", batch_size=4, progress=False)
    assert stats == {**stats, "added": 1, "changed": 1, "removed": 1, "unchanged": 9, "unreadable": 1, "total": 11}
    assert counting.images == 2  # the broken file is not retried while it stays the same

    assert stats["written"] and index.meta["rows"] == 13  # appended: the new and the changed photo
    fresh, fresh_stats = build_index(clip_model, photos, tmp_path / "fresh", batch_size=4, progress=False)
    assert fresh_stats["total"] == 11 and sorted(index.paths) == sorted(fresh.paths)
    kept, expected = by_path(index), by_path(fresh)
    assert all(torch.allclose(kept[p], expected[p], atol=1e-5) for p in fresh.paths)
    queries = clip_model.encode_text(["a red circle", "two blue squares"])
    got = [[h.path for h in hits] for hits in index.search(queries, k=5)]
    assert got == [[h.path for h in hits] for hits in fresh.search(queries, k=5)]

    stamp, state = (tmp_path / "idx" / "vectors.f32").stat().st_mtime_ns, index.meta
    counting = Counting(clip_model)
    index, stats = update_index(counting, tmp_path / "idx", progress=False)
    assert (stats["added"], stats["changed"], stats["removed"], stats["unchanged"]) == (0, 0, 0, 11)
    assert counting.calls == 0 and not stats["written"]  # nothing changed: nothing written
    assert (tmp_path / "idx" / "vectors.f32").stat().st_mtime_ns == stamp and index.meta == state


def clustered(n, dim=32, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim))
    x = means[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_inverted_file_agrees_with_exact_search_on_clustered_data(tmp_path):
    x = clustered(4000)
    queries = x[::97]
    _, truth = top_k(queries, x, 1)
    layout, order = write_store(tmp_path, x, np.arange(len(x)), approx=True, target_recall=0.95)
    assert layout["type"] == "ivf" and layout["calibrated_recall@10"] >= 0.95 and sorted(order) == list(range(4000))
    store = VectorStore(tmp_path, 32, len(x), np.zeros(0, np.int64), layout)
    np.testing.assert_array_equal(store.vectors, x[order])  # rows grouped by list, each a row of x
    _, found = store.search(queries, 1)
    assert (order[found[:, 0]] == truth[:, 0]).all()
    store.live[found[:, 0]] = False  # a dead row is never found
    _, second = store.search(queries, 1)
    assert not np.isin(second, found).any()


def test_tiny_threshold_builds_an_approximate_index(clip_model, photos, tmp_path):
    index, _ = build_index(clip_model, photos, tmp_path / "idx", approx_threshold=1, progress=False)
    assert index.structure["type"] == "ivf" and index.structure["approx_threshold"] == 1
    assert all(self_top1(ImageIndex.load(tmp_path / "idx"), clip_model))


def test_a_crash_mid_build_or_update_leaves_the_old_index(clip_model, photos, tmp_path):
    out = tmp_path / "idx"
    build_index(clip_model, photos, out, batch_size=4, progress=False)
    before = ImageIndex.load(out).rel_paths
    query = clip_model.encode_text(["a red circle"])
    expected = [h.path for h in ImageIndex.load(out).search(query, k=5)[0]]
    noise_image(photos / "more" / "x.png", 900)
    for i in range(6):
        noise_image(photos / "more" / f"y{i}.png", 901 + i)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(Counting(clip_model, fail_after=1), photos, out, batch_size=4, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        update_index(Counting(clip_model, fail_after=1), out, batch_size=4, progress=False)
    index = ImageIndex.load(out)
    assert index.rel_paths == before and len(index) == 11 and index.meta["rows"] == 11
    assert [h.path for h in index.search(query, k=5)[0]] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "photos"]  # no temp directories left behind


def test_damaged_or_missing_index_is_a_data_error_naming_the_file(clip_model, photos, tmp_path):
    with pytest.raises(DataError, match="nope"):
        ImageIndex.load(tmp_path / "nope")
    out = tmp_path / "idx"
    build_index(clip_model, photos, out, progress=False)
    (out / "vectors.f32").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="vectors.f32"):
        ImageIndex.load(out)
    build_index(clip_model, photos, out, progress=False)
    (out / "index.json").write_text('{"format": "clipsnail-im')
    with pytest.raises(DataError, match="index.json"):
        ImageIndex.load(out)
    build_index(clip_model, photos, tmp_path / "idx2", progress=False)
    (tmp_path / "idx2" / "catalogue.sqlite").write_bytes(b"garbage" * 1000)
    with pytest.raises(DataError, match="catalogue.sqlite"):
        ImageIndex.load(tmp_path / "idx2")
    not_an_index = tmp_path / "precious"
    not_an_index.mkdir()
    (not_an_index / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a clipsnail index"):
        build_index(clip_model, photos, not_an_index, progress=False)
    assert (not_an_index / "keep.txt").read_text() == "mine"


def cli_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_build_update_search(clip_run, photos, tmp_path, capsys, shapes_dir):
    out = tmp_path / "idx"
    built = cli_json(capsys, ["index", "build", "--model", str(clip_run), "--images", str(photos), "--out", str(out),
                              "--batch-size", "4", "--no-progress", "--no-onnx"])
    assert built["index"] == str(out.absolute()) and built["total"] == 11 and built["unreadable"] == 1
    assert built["structure"]["type"] == "exact"

    hits = cli_json(capsys, ["search", "--index", str(out), "a red circle", "-k", "3"])
    assert len(hits) == 3 and set(hits[0]) == {"path", "score"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    query = str(photos / "trip" / "day1" / "t2.png")
    grid = tmp_path / "grid.png"
    hits = cli_json(capsys, ["search", "--index", str(out), "--image", query, "-k", "9", "--grid", str(grid)])
    assert hits[0]["path"] == query and hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and grid.exists()

    (photos / "0.png").unlink()
    stats = cli_json(capsys, ["index", "update", "--index", str(out), "--no-progress", "--no-onnx"])
    assert {k: stats[k] for k in ("added", "changed", "removed", "unchanged", "unreadable", "total")} == {
        "added": 0, "changed": 0, "removed": 1, "unchanged": 10, "unreadable": 1, "total": 10}

    assert "nope" in run_error(capsys, ["search", "--index", str(tmp_path / "nope"), "a red circle"])
    assert "-k" in run_error(capsys, ["search", "--index", str(out), "a red circle", "-k", "0"])
    assert "empty" in run_error(capsys, ["search", "--index", str(out), "  "])
    assert "exactly one" in run_error(capsys, ["search", "--index", str(out), "--images", str(photos), "x"])
    other = tmp_path / "run8"
    assert main(tiny_clip_args(shapes_dir, other, "--set", "train.max_steps=1", "--set", "model.head.embed_dim=8")) == 0
    msg = run_error(capsys, ["search", "--index", str(out), "--model", str(other), "a red circle"])
    assert "dimension mismatch" in msg and "dim-16" in msg


def perturbed_copy(run, out, seed=0):
    """A copy of `run` at `out` whose weights then change, as when the run trains further."""
    import shutil

    import clipsnail
    from clipsnail.core.runs import save_weights

    shutil.copytree(run, out)
    model = clipsnail.load(out)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    save_weights(model, out / "model.safetensors")
    return out


def test_an_index_takes_vectors_from_the_model_that_made_it_only(clip_run, photos, tmp_path, capsys):
    """Another run of the same dimension neither updates nor searches the index (its vectors would be mixed in,
    or compared with another model's text vectors); the index stays as it was."""
    import shutil

    out = tmp_path / "idx"
    cli_json(capsys, ["index", "build", "--model", str(clip_run), "--images", str(photos), "--out", str(out),
                      "--no-progress", "--no-onnx"])
    meta_before = ImageIndex.load(out).meta
    assert meta_before["model_weights"]["sha1"]
    other = tmp_path / "other"
    shutil.copytree(clip_run, other)  # same weights, another run
    noise_image(photos / "new.png", 999)
    msg = run_error(capsys, ["index", "update", "--index", str(out), "--model", str(other), "--no-progress"])
    assert "adds to them with that run only" in msg and "clipsnail index build --model" in msg
    assert ImageIndex.load(out).meta == meta_before
    msg = run_error(capsys, ["search", "--index", str(out), "--model", str(other), "a red circle"])
    assert f"made by {clip_run.resolve()}" in msg


def test_vectors_of_a_run_that_trained_further_are_never_used(clip_run, photos, tmp_path, capsys):
    """The run's weights change after the index was built: searching refuses with the command to run, `index
    update` encodes every image again (with the new weights), and then search works."""
    import clipsnail

    run = perturbed_copy(clip_run, tmp_path / "run")
    out = tmp_path / "idx"
    old = clipsnail.load(run)
    build_index(old, photos, out, progress=False)
    perturbed_copy(clip_run, tmp_path / "run2", seed=1)
    os.replace(tmp_path / "run2" / "model.safetensors", run / "model.safetensors")  # "trained further"
    msg = run_error(capsys, ["search", "--index", str(out), "a red circle"])
    assert "changed since its vectors were made" in msg and f"clipsnail index update --index {out}" in msg

    stats = cli_json(capsys, ["index", "update", "--index", str(out), "--no-progress", "--no-onnx"])
    assert stats["reencoded"] == stats["total"] == 11 and stats["unchanged"] == 11
    new = clipsnail.load(run)
    index = ImageIndex.load(out)
    expected = new.encode_image(index.paths)
    torch.testing.assert_close(index.vectors(), expected, atol=1e-5, rtol=0)
    assert not index.weights_changed()
    assert len(cli_json(capsys, ["search", "--index", str(out), "a red circle", "-k", "3"])) == 3
    assert cli_json(capsys, ["index", "update", "--index", str(out), "--no-progress", "--no-onnx"])["reencoded"] == 0


def test_search_images_cache_follows_the_run_weights(clip_run, photos, tmp_path, capsys):
    """`search --model RUN --images DIR` keeps its vectors in RUN/embeddings: after RUN's weights change, the
    cached vectors are encoded again, so an image still finds itself with score 1."""
    run = perturbed_copy(clip_run, tmp_path / "run")
    query = str(photos / "3.png")
    argv = ["search", "--model", str(run), "--images", str(photos), "--image", query, "-k", "1", "--no-progress"]
    assert cli_json(capsys, argv)[0]["path"] == query
    perturbed_copy(clip_run, tmp_path / "run2", seed=7)
    os.replace(tmp_path / "run2" / "model.safetensors", run / "model.safetensors")
    hit = cli_json(capsys, argv)[0]
    assert hit["path"] == query and hit["score"] == pytest.approx(1.0, abs=1e-4)
