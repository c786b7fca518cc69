"""Shared fixtures: test data and tiny runs, found by name. The plain helpers are in helpers.py.

`pytest -m "not slow"` leaves out the end-to-end tests marked slow (multi-process training, ONNX export...)."""

import os

# No test may reach the network: Hugging Face libraries (model names such as hf-hub:ORG/NAME, transformers) read
# their cache only. Set before any of them is imported, since huggingface_hub reads it once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from helpers import tiny_clip_args  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def clipsnail_home(tmp_path_factory):
    """Runs made from model names (conse:..., hf-hub:...) are cached here for the session, never in the user's
    ~/.cache/clipsnail. Tests that need an empty cache set CLIPSNAIL_HOME themselves (monkeypatch)."""
    home = tmp_path_factory.mktemp("clipsnail_home")
    before = os.environ.get("CLIPSNAIL_HOME")
    os.environ["CLIPSNAIL_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("CLIPSNAIL_HOME", None)
    else:
        os.environ["CLIPSNAIL_HOME"] = before


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from clipsnail.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=160, size=16, seed=0, captions_per_image=2, holdout=[("purple", "triangle")])
    return out


@pytest.fixture(scope="session")
def colours_dir(tmp_path_factory):
    """An image folder of single shapes labelled by colour: 8 classes of 12 images, 16px."""
    from clipsnail.data.shapes import generate_attribute_folder

    out = tmp_path_factory.mktemp("classes") / "colours"
    generate_attribute_folder(out, "color", 12, size=16, seed=0)
    return out


# ----------------------------------------------------------------------------------------------- command lines


# ----------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="session")
def clip_run(shapes_dir, tmp_path_factory):
    """A tiny CLIP run trained for 4 steps, shared by the tests that only need some CLIP run (index, web app,
    text to image). Tests must not change its weights or config."""
    from clipsnail.cli import main

    out = tmp_path_factory.mktemp("runs") / "clip"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=4")) == 0
    return out


@pytest.fixture(scope="session")
def clip_model(clip_run):
    """`clip_run` loaded for inference (clipsnail.load). Tests must not change it."""
    import clipsnail

    return clipsnail.load(clip_run)


@pytest.fixture
def cache_counts(monkeypatch):
    """(cache name, CacheCounts) for every FeatureCache.outputs call while the test runs, in order: what each call
    kept, encoded and checked."""
    from clipsnail.train.feature_cache import FeatureCache

    calls = []
    outputs = FeatureCache.outputs

    def recorded(self, digests, encode):
        rows = outputs(self, digests, encode)
        calls.append((self.name, self.counts))
        return rows

    monkeypatch.setattr(FeatureCache, "outputs", recorded)
    return calls
