"""The index as a library that keeps up: an index of format 1 is upgraded in place without encoding; deletions
are marked, then compacted with ids kept; an inverted file takes appended photos and retrains when they double; a
kill -9 at any instant of an append, a commit or a compaction leaves the old state or the new one."""

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Counting
from PIL import Image

import clipsnail.core.safeio as safeio
import clipsnail.inference.index as index_module
import clipsnail.inference.vector_store as vector_store
from clipsnail.inference.catalogue import Catalogue, parse_filters
from clipsnail.inference.index import ImageIndex, build_index, update_index

FIXTURE = Path(__file__).parent / "fixtures" / "index_v1"


class BlockModel:
    """A stand-in for a CLIP image tower: a photo's vector is its 4x4 colour blocks through a fixed projection
    (deterministic, different for every photo of `blocks`, cheap, no threads)."""

    embed_dim, image_size, run_dir = 16, 16, None
    projection = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))

    def eval(self):
        return self

    def preprocess(self, image):
        pixels = np.asarray(image.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def encode_image(self, images):
        batch = torch.stack([i if isinstance(i, torch.Tensor) else self.preprocess(Image.open(i)) for i in images])
        return torch.nn.functional.normalize(batch.reshape(len(batch), -1) @ self.projection, dim=-1)


def blocks(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.NEAREST).save(path)


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "photos"
    for i in range(8):
        blocks(root / ("a" if i % 2 else "b") / f"{i}.png", i)
    return root


def assert_whole(index, model=BlockModel()):
    """Every photo's stored vector is its own, and each photo is its own nearest neighbour (of the photos whose files
    are still there: an old state names deleted ones)."""
    present = [i for i, p in enumerate(index.paths) if p.exists()]
    expected = model.encode_image([index.paths[i] for i in present])
    torch.testing.assert_close(index.vectors()[present], expected, atol=1e-5, rtol=0)
    found = [hits[0].path for hits in index.search(expected, k=1)]
    assert found == [index.paths[i] for i in present]


# ----------------------------------------------------------------------------------------------- format 1


@pytest.mark.parametrize("with_catalogue", [True, False], ids=["catalogued", "before-catalogues"])
def test_an_index_of_format_1_is_upgraded_in_place_encoding_nothing(clip_model, tmp_path, with_catalogue):
    from safetensors.numpy import load_file

    shutil.copytree(FIXTURE, tmp_path / "lib")
    index_dir, root = tmp_path / "lib" / "index", tmp_path / "lib" / "photos"
    meta = json.loads((index_dir / "index.json").read_text())
    (index_dir / "index.json").write_text(json.dumps({**meta, "root": str(root)}))
    if not with_catalogue:
        (index_dir / "catalogue.sqlite").unlink()
    old_paths = json.loads((index_dir / "files.json").read_text())["path"]
    old_vectors = load_file(index_dir / "vectors.safetensors")["vectors"]

    index = ImageIndex.load(index_dir)
    assert json.loads((index_dir / "index.json").read_text())["version"] == 2
    assert not any((index_dir / name).exists() for name in ("files.json", "faiss.index", "vectors.safetensors"))
    assert index.rel_paths == old_paths and index.root == root
    np.testing.assert_array_equal(index.vectors().numpy(), old_vectors)
    assert set(index.catalogue.unreadable()) == {"broken.jpg"}
    hits = index.search(old_vectors[1], 3, parse_filters(camera="iphone"))[0]  # EXIF facts kept, or read
    assert [h.path.name for h in hits] == ["2.jpg", "1.jpg", "0.jpg"] and hits[0].id == 1

    counting = Counting(clip_model)  # dim 16 as the fixture's vectors; copied files have new times, same bytes
    index, stats = update_index(counting, index_dir, progress=False)
    assert counting.images == 0 and stats["encoded"] == 0 and stats["unchanged"] == 6 and stats["total"] == 6
    np.testing.assert_array_equal(index.vectors().numpy(), old_vectors)


# ----------------------------------------------------------------------------------------------- upkeep


def test_deleted_photos_leave_dead_rows_until_a_compaction_that_keeps_ids(library, tmp_path):
    index, _ = build_index(BlockModel(), library, tmp_path / "idx", progress=False)
    ids = dict(zip(index.rel_paths, index.ids.tolist()))
    (library / "a" / "1.png").unlink()
    index, stats = update_index(BlockModel(), tmp_path / "idx", progress=False)
    assert stats["removed"] == 1 and stats["rewritten"] is None
    assert (index.meta["rows"], len(index), len(index.catalogue.dead_rows())) == (8, 7, 1)  # marked, not rewritten
    assert_whole(index)

    (library / "a" / "3.png").unlink()
    blocks(library / "b" / "2.png", 99)  # changed: a new row, the old one dead
    index, stats = update_index(BlockModel(), tmp_path / "idx", progress=False)
    assert stats["changed"] == 1 and stats["removed"] == 1 and "belong to deleted or changed photos" in \
        stats["rewritten"]
    assert (index.meta["rows"], len(index), len(index.catalogue.dead_rows())) == (6, 6, 0)  # compacted
    assert dict(zip(index.rel_paths, index.ids.tolist())) == {r: i for r, i in ids.items() if r in index.rel_paths}
    assert_whole(index)


def test_an_inverted_file_takes_appended_photos_and_retrains_when_they_double(library, tmp_path):
    index, _ = build_index(BlockModel(), library, tmp_path / "idx", approx_threshold=1, progress=False)
    assert index.structure["type"] == "ivf" and index.structure["trained_rows"] == 8
    for i in range(8, 14):
        blocks(library / "c" / f"{i}.png", i)
    index, stats = update_index(BlockModel(), tmp_path / "idx", progress=False)
    assert stats["added"] == 6 and stats["rewritten"] is None and index.structure["trained_rows"] == 8
    assert_whole(index)  # appended rows are found through their lists
    for i in range(14, 18):
        blocks(library / "c" / f"{i}.png", i)
    index, stats = update_index(BlockModel(), tmp_path / "idx", progress=False)
    assert "its lists learnt" in stats["rewritten"] and index.structure["trained_rows"] == 18
    assert_whole(index)


# ----------------------------------------------------------------------------------------------- kills


def _update_dying_at(event, points, index_dir):
    """In a forked child: run an update and die (as kill -9 does: no cleanup) at the `event`-th of `points`, each
    (object, function name, "before" or "after" the call)."""
    torch.set_num_threads(1)
    seen = {"n": 0}

    def wrap(function, when):
        def patched(*args, **kwargs):
            seen["n"] += when == "before"
            if seen["n"] == event and when == "before":
                os._exit(9)
            result = function(*args, **kwargs)
            seen["n"] += when == "after"
            if seen["n"] == event and when == "after":
                os._exit(9)
            return result
        return patched

    for owner, name, when in points:
        setattr(owner, name, wrap(getattr(owner, name), when))
    update_index(BlockModel(), index_dir, progress=False, workers=0)
    os._exit(0)


APPEND = [(vector_store, "_append", "before"), (vector_store, "_append", "after"),
          (Catalogue, "set_state", "before"), (index_module, "_upkeep", "before")]
COMPACTION = [(Catalogue, "set_state", "before"), (Catalogue, "copy_from", "before"),
              (safeio, "replace_dir", "before"), (safeio, "replace_dir", "after")]


@pytest.mark.parametrize("points, change, sizes", [
    # a kill before the append, after it (rows past the committed ones), in the transaction, after the commit
    (APPEND, "add", [8, 8, 8, 11]),
    # a kill in the deletion's commit, while the compacted copy is written, before its swap, after it
    (COMPACTION, "delete", [8, 5, 5, 5]),
], ids=["append", "compaction"])
def test_a_kill_at_any_instant_leaves_the_old_state_or_the_new(library, tmp_path, points, change, sizes):
    build_index(BlockModel(), library, tmp_path / "built", progress=False)
    if change == "add":
        for i in range(8, 11):
            blocks(library / "c" / f"{i}.png", i)
    else:
        for i in (1, 3, 5):
            (library / "a" / f"{i}.png").unlink()
    for event, size in enumerate(sizes, 1):
        out = tmp_path / "idx"
        shutil.copytree(tmp_path / "built", out)
        child = multiprocessing.get_context("fork").Process(target=_update_dying_at, args=(event, points, out))
        child.start()
        child.join(120)
        assert child.exitcode == 9, event
        index = ImageIndex.load(out)
        assert len(index) == size, event
        assert_whole(index)
        index, stats = update_index(BlockModel(), out, progress=False)  # the next writer finishes the job
        assert len(index) == index.meta["rows"] == sizes[-1]
        assert_whole(index)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "idx", "photos"]  # nothing left beside it
        shutil.rmtree(out)
