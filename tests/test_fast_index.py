"""Indexing camera photos fast: JPEGs decoded near the model's input size (draft) with EXIF orientation kept, other
modes as a full decode gives them, embeddings close to a full decode's, and decoding in worker processes giving the
same index as decoding in the encoding one (unreadable files still skipped)."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import noise_image, run_error
from PIL import Image, ImageOps

from clipsnail.cli import main
from clipsnail.data.images import load_image
from clipsnail.inference import evaluate
from clipsnail.inference.index import MIN_IMAGES_FOR_WORKERS, build_index, update_index


def asymmetric(size=(1600, 1200)) -> Image.Image:
    """A picture no flip or rotation maps onto itself: blue, with a red block at the top-left corner and a green
    one in the middle of the bottom edge."""
    w, h = size
    im = Image.new("RGB", size, (20, 40, 200))
    im.paste((230, 20, 20), (0, 0, w // 4, h // 4))
    im.paste((20, 220, 40), (w // 2 - w // 8, h - h // 4, w // 2 + w // 8, h))
    return im


def save_jpeg(path, image, orientation=None, quality=90):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=quality, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_draft_decoding_keeps_the_exif_orientation(tmp_path, orientation):
    path = save_jpeg(tmp_path / "photo.jpg", asymmetric(), orientation)
    fast = load_image(path, min_side=100)
    # The reference: a full decode turned upright by PIL's own exif_transpose, shrunk to the same size.
    with Image.open(path) as full:
        reference = ImageOps.exif_transpose(full.convert("RGB"))
    portrait = orientation in (6, 8)
    assert (reference.height > reference.width) == portrait
    # 1600x1200 decoded at 1/8 (200x150: the shorter side still >= 100), then rotated.
    assert fast.mode == "RGB" and fast.size == ((150, 200) if portrait else (200, 150))
    reference = reference.resize(fast.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 4  # JPEG block edges differ a little between scales; a wrong rotation differs by ~100


def test_draft_decoding_keeps_modes_and_alpha_as_a_full_decode(tmp_path):
    """Large single-colour images in every mode: shrunk (draft for JPEG, box filter otherwise), the colour is the
    one a full decode gives (grey, 16-bit, palette and alpha conversions unchanged)."""
    cases = {
        "l.png": Image.new("L", (800, 600), 128),
        "i16.png": Image.new("I;16", (800, 600), 300),
        "rgba.png": Image.new("RGBA", (800, 600), (200, 0, 0, 128)),  # half transparent: composited on white
        "la.png": Image.new("LA", (800, 600), (50, 0)),
        "p.png": Image.new("P", (800, 600), 3),
        "grey.jpg": Image.new("L", (800, 600), 90),
        "cmyk.jpg": Image.new("CMYK", (800, 600), (10, 200, 30, 5)),
    }
    palette = Image.new("P", (800, 600), 3)  # colour 3 transparent; colour 1 (opaque) along the bottom edge
    palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 0])
    palette.paste(1, (0, 500, 800, 600))
    cases["p_transparent.png"] = palette
    for name, image in cases.items():
        image.save(tmp_path / name, **({"transparency": 3} if name == "p_transparent.png" else {}))
        full, fast = load_image(tmp_path / name), load_image(tmp_path / name, min_side=64)
        assert fast.mode == full.mode == "RGB", name
        assert 64 <= min(fast.size) < 128, (name, fast.size)  # 1/8 draft (JPEG) or a 9x9 box (others)
        centre = fast.getpixel((fast.width // 2, fast.height // 2))
        expected = full.getpixel((full.width // 2, full.height // 2))
        assert max(abs(a - b) for a, b in zip(centre, expected)) <= 2, (name, centre, expected)
    assert load_image(tmp_path / "la.png", min_side=64).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "p_transparent.png", min_side=64).getpixel((0, 0)) == (255, 255, 255)
    small = tmp_path / "small.jpg"
    asymmetric((120, 90)).save(small, quality=90)
    assert load_image(small, min_side=64).size == (120, 90)  # under twice min_side: decoded whole


def test_embedding_of_a_draft_decoded_large_jpeg_is_close_to_the_full_decode(clip_model, shapes_dir, tmp_path):
    """Tolerance: cosine similarity > 0.99 between the embedding of the photo decoded at 1/8 (then box-shrunk to
    about the model's 16 px) and of the same photo fully decoded, for each of 8 shapes pictures blown up to
    1024x768 (the tiny model of the tests' helpers)."""
    sources = sorted((shapes_dir / "images").glob("*.png"))[:8]
    paths = []
    for i, src in enumerate(sources):
        with Image.open(src) as im:
            big = im.convert("RGB").resize((1024, 768), Image.Resampling.BICUBIC)
        paths.append(save_jpeg(tmp_path / f"{i}.jpg", big))
    side = clip_model.image_size
    with torch.no_grad():
        full = clip_model.encode_image(torch.stack([clip_model.preprocess(load_image(p)) for p in paths]))
        fast = clip_model.encode_image(torch.stack([clip_model.preprocess(load_image(p, min_side=side))
                                                    for p in paths]))
    cosine = (full * fast).sum(dim=1)
    assert cosine.min().item() > 0.99, cosine


class PidRecording:
    """The model, noting in a file the process that preprocesses each image (workers are other processes)."""

    def __init__(self, model, log):
        self.model, self.log = model, log

    def __getattr__(self, name):
        return getattr(self.model, name)

    def preprocess(self, image):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.model.preprocess(image)


@pytest.fixture
def camera_roll(tmp_path):
    """MIN_IMAGES_FOR_WORKERS + 4 photos (large rotated JPEGs and small PNGs), two unreadable files named like
    images (garbage, and a JPEG cut in half)."""
    root = tmp_path / "roll"
    n = MIN_IMAGES_FOR_WORKERS + 4
    for i in range(n // 2):
        rng = np.random.default_rng(i)
        pixels = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((100, 100, 1))).astype(np.uint8)
        save_jpeg(root / f"cam/{i:02d}.jpg", Image.fromarray(pixels), orientation=(6, 8, 1)[i % 3])
    for i in range(n - n // 2):
        noise_image(root / f"png/{i:02d}.png", 50 + i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    whole = (root / "cam/00.jpg").read_bytes()
    (root / "cam/truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def test_workers_give_the_same_index_and_skip_unreadable_files(clip_model, camera_roll, tmp_path):
    pids = tmp_path / "pids.txt"
    serial, serial_stats = build_index(clip_model, camera_roll, tmp_path / "serial", batch_size=4, progress=False,
                                       workers=0)
    parallel, stats = build_index(PidRecording(clip_model, pids), camera_roll, tmp_path / "parallel", batch_size=4,
                                  progress=False, workers=2)
    used = set(pids.read_text().split())
    assert len(used) == 2 and str(os.getpid()) not in used  # decoded by two worker processes
    assert parallel.paths == serial.paths and len(parallel) == MIN_IMAGES_FOR_WORKERS + 4
    assert torch.allclose(parallel.vectors(), serial.vectors(), atol=1e-5)
    for stats_ in (serial_stats, stats):
        assert stats_["unreadable"] == 2 and stats_["added"] == stats_["total"] == MIN_IMAGES_FOR_WORKERS + 4
    assert sorted(parallel.catalogue.unreadable()) == ["broken.jpg", "cam/truncated.jpg"]

    # update: new photos are decoded by workers too, and match what a fresh build gives
    for i in range(MIN_IMAGES_FOR_WORKERS):
        noise_image(camera_roll / f"new/{i:02d}.png", 900 + i)
    pids.unlink()
    updated, update_stats = update_index(PidRecording(clip_model, pids), tmp_path / "parallel", batch_size=4,
                                         progress=False, workers=2)
    assert update_stats["added"] == MIN_IMAGES_FOR_WORKERS and update_stats["unreadable"] == 2
    assert str(os.getpid()) not in set(pids.read_text().split())
    fresh, _ = build_index(clip_model, camera_roll, tmp_path / "fresh", batch_size=4, progress=False, workers=0)
    assert sorted(updated.paths) == fresh.paths  # new photos take new ids, after the others
    kept = dict(zip(updated.paths, updated.vectors()))
    assert torch.allclose(torch.stack([kept[p] for p in fresh.paths]), fresh.vectors(), atol=1e-5)


def test_a_few_new_photos_are_decoded_in_the_encoding_process(clip_model, tmp_path):
    root = tmp_path / "few"
    for i in range(3):
        noise_image(root / f"{i}.png", i)
    pids = tmp_path / "pids.txt"
    build_index(PidRecording(clip_model, pids), root, tmp_path / "idx", progress=False, workers=2)
    assert set(pids.read_text().split()) == {str(os.getpid())}  # starting processes would cost more


def test_progress_counts_photos(clip_model, camera_roll, tmp_path, monkeypatch):
    """The encoding bar counts photos, every file tried (the unreadable ones too), up to the last one."""
    bars = []

    class Recorded(evaluate.tqdm):
        def close(self):
            if not self.disable:  # tqdm disables a bar as it closes it: each bar once
                bars.append({"unit": self.unit, "done": self.n, "total": self.total})
            super().close()

    monkeypatch.setattr(evaluate, "tqdm", Recorded)
    _, stats = build_index(clip_model, camera_roll, tmp_path / "idx", batch_size=4, progress=True, workers=0)
    photos = MIN_IMAGES_FOR_WORKERS + 6
    assert bars == [{"unit": "photo", "done": photos, "total": photos}]
    assert stats["added"] + stats["unreadable"] == photos


def test_cli_workers_flag(clip_run, camera_roll, tmp_path, capsys):
    out = tmp_path / "idx"
    capsys.readouterr()
    assert main(["index", "build", "--model", str(clip_run), "--images", str(camera_roll), "--out", str(out),
                 "--workers", "2", "--no-progress", "--no-onnx"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["total"] == MIN_IMAGES_FOR_WORKERS + 4 and built["unreadable"] == 2
    assert main(["index", "update", "--index", str(out), "--workers", "0", "--no-progress", "--no-onnx"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] == MIN_IMAGES_FOR_WORKERS + 4
    assert "--workers" in run_error(capsys, ["index", "build", "--model", str(clip_run), "--images",
                                             str(camera_roll), "--out", str(out), "--workers", "-1", "--no-onnx"])
    assert "--workers" in run_error(capsys, ["index", "update", "--index", str(out), "--workers", "-2"])
