"""A LiT feature cache is trusted no further than it can be checked: a row that is not finite is encoded again, a
file of another layout or key is not read, kept rows are compared with the tower; and training that cannot read a
single image stops with one line instead of spinning or crashing."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from helpers import first_counts, run_error, tiny_clip_args
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from clipsnail.cli import main
from clipsnail.core.config import OptimConfig, TrainConfig
from clipsnail.core.errors import DataError
from clipsnail.train.engine import fit
from clipsnail.train.feature_cache import CacheCounts, FeatureCache, content_digest
from clipsnail.train.task import Task

LIT = ["--set", "finetune.lock_image=true", "--set", "data.augment=false"]
KEY = "ef" * 20


def train(data, out, *settings, steps=4):
    assert main(tiny_clip_args(data, out, "--set", f"train.max_steps={steps}", *LIT, *settings)) == 0
    return out


def cache_warnings(caplog) -> list[str]:
    """What the cache told the user went wrong (counts of what it did are on FeatureCache.counts)."""
    return [r.getMessage() for r in caplog.records
            if r.name == "clipsnail.train.feature_cache" and r.levelno == logging.WARNING]


def tower(digest: str) -> torch.Tensor:
    """A deterministic stand-in for a tower: a row of 8 drawn from the item's digest."""
    return torch.randn(8, generator=torch.Generator().manual_seed(int(digest[:8], 16)))


class Encoder:
    """`encode` for FeatureCache.outputs over `digests`, recording the indices of each call."""

    def __init__(self, digests):
        self.digests, self.calls = digests, []

    def __call__(self, rows):
        self.calls.append(list(rows))
        return torch.stack([tower(self.digests[i]) for i in rows])

    @property
    def encoded(self) -> set[int]:
        return {i for call in self.calls for i in call}


def items(n=10) -> list[str]:
    return [content_digest(str(i).encode()) for i in range(n)]


def filled_cache(tmp_path, n=10) -> tuple[FeatureCache, list[str]]:
    digests = items(n)
    cache = FeatureCache(tmp_path, "image", KEY)
    cache.outputs(digests, Encoder(digests))
    return cache, digests


def rewrite(path, change):
    """Rewrite the safetensors file at `path` through `change(tensors, metadata)`, which edits them in place."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


# ------------------------------------------------------------------------------------------ rows that are not finite


def test_a_row_that_is_not_finite_on_disk_is_encoded_again_and_kept(tmp_path):
    cache, digests = filled_cache(tmp_path)
    rewrite(cache.path, lambda t, m: t["features"][3].fill_(float("nan")))
    encode = Encoder(digests)
    out = FeatureCache(tmp_path, "image", KEY).outputs(digests, encode)
    assert encode.calls[-1] == [3]  # after the spot check, that item alone
    assert out.isfinite().all() and torch.equal(out[3], tower(digests[3]))
    again = Encoder(digests)
    FeatureCache(tmp_path, "image", KEY).outputs(digests, again)
    assert 3 not in again.calls[-1] or len(again.calls) == 1  # the good row is kept now


def test_only_a_fresh_encode_marks_an_item_unreadable(tmp_path):
    digests = items(4)

    def encode(rows):  # item 2 cannot be decoded
        return torch.stack([tower(digests[i]) if i != 2 else torch.full((8,), float("nan")) for i in rows])

    cache = FeatureCache(tmp_path, "image", KEY)
    assert cache.outputs(digests, encode)[2].isnan().all()
    assert sorted(cache.read()) == sorted(digests[:2] + digests[3:])  # kept: only what was read
    calls = []
    cache.outputs(digests, lambda rows: calls.append(list(rows)) or encode(rows))
    assert calls[-1] == [2]  # tried again: it may read now


# ----------------------------------------------------------------------------------------------- trusting the file


def test_permuted_rows_are_discarded_and_everything_encoded_again(tmp_path, caplog):
    cache, digests = filled_cache(tmp_path)
    rewrite(cache.path, lambda t, m: t.update(features=t["features"].roll(1, dims=0).contiguous()))
    encode = Encoder(digests)
    out = FeatureCache(tmp_path, "image", KEY).outputs(digests, encode)
    assert encode.calls[-1] == list(range(10))
    assert torch.equal(out, torch.stack([tower(d) for d in digests]))
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "discarded, encoding every item again" in warnings[0], warnings


@pytest.mark.parametrize("rows", ["all", "one"])
def test_rows_of_absurd_magnitude_are_discarded(tmp_path, caplog, rows):
    cache, digests = filled_cache(tmp_path)
    for i in range(10) if rows == "all" else [7]:
        rewrite(cache.path, lambda t, m, i=i: t["features"][i].mul_(1e30))
    encode = Encoder(digests)
    out = FeatureCache(tmp_path, "image", KEY).outputs(digests, encode)
    assert encode.calls[-1] == list(range(10))
    assert out.abs().max() < 100
    assert len(cache_warnings(caplog)) == 1


def test_rounding_of_another_device_or_bfloat16_passes_the_spot_check(tmp_path, caplog):
    cache, digests = filled_cache(tmp_path)
    rewrite(cache.path, lambda t, m: t.update(features=t["features"].bfloat16().float()))
    encode = Encoder(digests)
    again = FeatureCache(tmp_path, "image", KEY)
    again.outputs(digests, encode)
    assert len(encode.calls) == 1 and len(encode.calls[0]) == 4  # the spot check, nothing more
    assert cache_warnings(caplog) == []
    assert again.counts == CacheCounts(kept=10, encoded=0, checked=4)


def test_a_file_whose_key_is_another_is_not_this_cache(tmp_path, caplog):
    cache, digests = filled_cache(tmp_path)
    other = FeatureCache(tmp_path, "image", "12" * 20)
    shutil.copyfile(cache.path, other.path)  # the right layout under another key's name
    encode = Encoder(digests)
    other.outputs(digests, encode)
    assert encode.calls == [list(range(10))]
    assert "not this cache" in caplog.text


# ----------------------------------------------------------------------------------------------- the file's layout


def wider(t, m):
    t["features"] = torch.cat([t["features"], t["features"]], dim=1)


def half(t, m):
    t["features"] = t["features"].half()


def rank3(t, m):
    t["features"] = t["features"][:, None].contiguous()


def digests_above_255(t, m):
    t["digests"] = t["digests"].long() + 256


def short_digests(t, m):
    t["digests"] = t["digests"][:, :10].contiguous()


def fewer_rows(t, m):
    t["features"] = t["features"][:5].contiguous()


@pytest.mark.parametrize("damage", [wider, half, rank3, digests_above_255, short_digests, fewer_rows])
def test_a_cache_of_another_layout_is_unreadable_and_encoded_again(tmp_path, caplog, damage):
    cache, digests = filled_cache(tmp_path)
    rewrite(cache.path, damage)
    encode = Encoder(digests)
    out = FeatureCache(tmp_path, "image", KEY).outputs(digests, encode)
    assert encode.calls[-1] == list(range(10))
    assert out.dtype == torch.float32 and torch.equal(out, torch.stack([tower(d) for d in digests]))
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "unreadable feature cache" in warnings[0], warnings
    assert len(FeatureCache(tmp_path, "image", KEY).read()) == 10  # and written again whole


# ----------------------------------------------------------------------------------------------- in training


def image_cache(run):
    return next((run / "feature_cache").glob("image-*.safetensors"))


def assert_all_encoded(calls: list[tuple[str, CacheCounts]]) -> None:
    """The training images were all encoded again: none read back from the file."""
    image = first_counts(calls, "image")
    assert image.kept == 0 and image.encoded > 0, calls


@pytest.mark.parametrize("damage", [wider, digests_above_255])
def test_training_goes_on_from_a_cache_of_another_layout(shapes_dir, tmp_path, caplog, cache_counts, damage):
    run = train(shapes_dir, tmp_path / "run", steps=2)
    rewrite(image_cache(run), damage)
    caplog.clear()
    cache_counts.clear()
    train(shapes_dir, run, steps=4)
    assert any("unreadable feature cache" in w for w in cache_warnings(caplog))
    assert_all_encoded(cache_counts)


def test_a_resume_after_the_rows_were_permuted_encodes_everything_again(shapes_dir, tmp_path, caplog, cache_counts):
    run = train(shapes_dir, tmp_path / "run", steps=2)
    rewrite(image_cache(run), lambda t, m: t.update(features=t["features"].roll(1, dims=0).contiguous()))
    caplog.clear()
    cache_counts.clear()
    train(shapes_dir, run, steps=4)
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "feature cache disagrees" in warnings[0], warnings
    assert_all_encoded(cache_counts)


def test_a_resume_encodes_again_an_image_whose_row_went_bad(shapes_dir, tmp_path, cache_counts):
    run = train(shapes_dir, tmp_path / "run", steps=2)
    rewrite(image_cache(run), lambda t, m: t["features"][5].fill_(float("nan")))
    cache_counts.clear()
    train(shapes_dir, run, steps=4)
    assert first_counts(cache_counts, "image").encoded == 1, cache_counts
    with safe_open(str(image_cache(run)), "pt") as f:
        assert f.get_tensor("features").isfinite().all()


# ----------------------------------------------------------------------------------------------- nothing readable


class Unreadable(Dataset):
    """Every sample unreadable (None); more draws than a few epochs' worth mean the loop is spinning."""

    def __init__(self):
        self.draws = 0

    def __len__(self):
        return 16

    def __getitem__(self, item):
        self.draws += 1
        assert self.draws < 16 * 50, "the training loop spins over epochs that make no step"
        return None


class UnreadableTask(Task):
    def __init__(self):
        self.config = type("Config", (), {})()
        self.config.optim = OptimConfig(lr=1e-2)
        self.config.train = dataclasses.replace(TrainConfig(), epochs=3, batch_size=8, log_every=1)
        self.train_dataset = Unreadable()

    def build_model(self):
        return nn.Linear(4, 1)

    def collate(self, samples):
        return None if all(s is None for s in samples) else samples

    def save(self, model, run_dir):
        pass


def test_an_epoch_that_makes_no_step_stops_training(tmp_path):
    with pytest.raises(DataError, match="no training image could be read"):
        fit(UnreadableTask(), tmp_path / "run", progress=False)


@pytest.mark.parametrize("settings", [[], LIT], ids=["plain", "lit"])
def test_no_readable_training_image_is_one_line(shapes_dir, tmp_path, capsys, caplog, settings):
    data = tmp_path / "junk"
    shutil.copytree(shapes_dir, data)
    for image in (data / "images").iterdir():
        image.write_bytes(b"not a png at all")
    train_images = sum(i["split"] == "train" for i in json.loads((data / "split.json").read_text())["images"])
    line = run_error(capsys, tiny_clip_args(data, tmp_path / "run", *settings))
    assert f"no training image could be read ({train_images} skipped)" in line, line
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # not a warning per image first
