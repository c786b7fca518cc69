import pytest

# A CLIP small enough to train a few steps in a second or two on a CPU.
TINY_CLIP = [
    "model.image_size=16", "model.patch_size=4", "model.vision_width=32", "model.vision_depth=1",
    "model.vision_heads=2", "model.text_width=32", "model.text_depth=1", "model.text_heads=2", "model.embed_dim=16",
    "data.vocab_size=300", "data.context_length=20", "train.batch_size=16", "train.log_every=1",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from clipsnail.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(out, n=160, size=16, seed=0, captions_per_image=2, holdout=[("purple", "triangle")])
    return out


def tiny_clip_args(shapes_dir, out, *extra):
    args = ["clip", "train", "--captions", str(shapes_dir / "captions.csv"), "--images", str(shapes_dir / "images"),
            "--split-file", str(shapes_dir / "split.json"), "--out", str(out), "--no-progress"]
    for item in TINY_CLIP:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="session")
def clip_run(shapes_dir, tmp_path_factory):
    """A tiny CLIP run trained for 4 steps, shared by the tests that only need some CLIP run (index, web app,
    text to image). Tests must not change its weights or config."""
    from clipsnail.cli import main

    out = tmp_path_factory.mktemp("runs") / "clip"
    assert main(tiny_clip_args(shapes_dir, out, "--set", "train.max_steps=4")) == 0
    return out
