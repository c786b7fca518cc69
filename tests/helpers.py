"""What the tests share besides fixtures (those are in conftest.py, found by name): tiny configs, data writers,
command lines, and checks. Tests import them with `from helpers import ...`."""

import gzip
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

# A CLIP small enough to train a few steps in a second or two on a CPU.
TINY_CLIP = [
    "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.width=32", "model.vision.depth=1",
    "model.vision.heads=2", "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
    "model.head.embed_dim=16",
    "data.vocab_size=300", "data.context_length=20", "train.batch_size=16", "train.log_every=1",
    "optim.warmup_steps=2",
]

# Image classification on 16px inputs with light augmentation, every step logged.
TINY_CLASSIFY = ["data.image_size=16", "train.batch_size=16", "train.log_every=1", "augment.randaugment=",
                 "augment.random_erasing=0", "model.drop_path_rate=0", "optim.warmup_epochs=0", "optim.warmup_steps=2"]

# The text-conditioned PixelSNAIL (`t2i train --kind pixelsnail --config tiny`) on 8px images, a few steps.
TINY_T2I = ["data.image_size=8", "train.batch_size=8", "train.max_steps=2", "data.eval_prompts=2",
            "data.max_eval_images=8"]


# ----------------------------------------------------------------------------------------------- data


def noise_image(path, seed, size=16):
    """A size x size RGB image of uniform noise drawn from `seed`, saved at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_idx(path, array):
    """An IDX file (MNIST's format) of uint8 `array`, gzip-compressed when `path` ends with .gz."""
    array = np.asarray(array, dtype=np.uint8)
    raw = (0x800 + array.ndim).to_bytes(4, "big") + np.array(array.shape, ">u4").tobytes() + array.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


# ----------------------------------------------------------------------------------------------- command lines


def sets(items):
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for item in items for a in ("--set", item)]


def caption_flags(shapes_dir):
    """The shapes corpus as a captioned training set on the command line."""
    return ["--captions", str(shapes_dir / "captions.csv"), "--images", str(shapes_dir / "images"),
            "--split-file", str(shapes_dir / "split.json"), "--no-progress"]


def tiny_clip_args(shapes_dir, out, *extra):
    return ["clip", "train", *caption_flags(shapes_dir), "--out", str(out), *sets(TINY_CLIP), *extra]


def tiny_t2i_args(clip_run, shapes_dir, out, *settings):
    """`t2i train` of a tiny text-conditioned PixelSNAIL on the shapes corpus; `settings` override TINY_T2I."""
    return ["t2i", "train", "--kind", "pixelsnail", "--clip", str(clip_run), "--config", "tiny",
            *caption_flags(shapes_dir), "--out", str(out), *sets(TINY_T2I + list(settings))]


def run_error(capsys, argv, status=2) -> str:
    """The one `clipsnail:` line on stderr of a command that ends with `status` (2: a `clipsnail: error:` line),
    never a traceback."""
    from clipsnail.cli import main

    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("clipsnail:")]
    assert len(lines) == 1, err
    assert status != 2 or lines[0].startswith("clipsnail: error: "), lines
    return lines[0]


def torchrun(args, nproc=2):
    """`torchrun --standalone --nproc-per-node N -m clipsnail ARGS`, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "clipsnail", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------- runs


def tiny_clip(context_length=12, vision=None, text=None, head=None, **top):
    """A freshly initialised (seed 0) two-block CLIP of `tiny_clip_config`, for gradient tests."""
    from clipsnail.models.clip import CLIP

    cfg = tiny_clip_config(context_length, vision, text, head, **top)
    torch.manual_seed(0)
    return CLIP(cfg)


def tiny_clip_config(context_length=12, vision=None, text=None, head=None, **top):
    """A two-block CLIP on 16px images and 50-token texts; the section dicts change fields of the model config's
    sections (`vision={"depth": 3}`), `top` its own fields."""
    from clipsnail.models.clip import ClipHeadConfig, ClipModelConfig, ClipTextConfig, ClipVisionConfig

    return ClipModelConfig(
        vision=ClipVisionConfig(**{"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "heads": 2,
                                   **(vision or {})}),
        text=ClipTextConfig(**{"width": 32, "depth": 2, "heads": 2, "vocab_size": 50, "eot_id": 2,
                               "context_length": context_length, **(text or {})}),
        head=ClipHeadConfig(**{"embed_dim": 16, **(head or {})}), **top)


def make_open_clip(quick_gelu: bool, seed: int = 0, head_width: int = 64):
    """A tiny open_clip CLIP ViT (by default 2 heads of 64 in both towers, as CLIP), every parameter random."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim=32,
                 vision_cfg=CLIPVisionCfg(layers=2, width=128, head_width=head_width, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=128 // head_width,
                                      layers=2),
                 quick_gelu=quick_gelu)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(3.7)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


def save_safetensors(model, path):
    """`model`'s state dict as a safetensors file at `path` (returned)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def logged_losses(run):
    """The training losses of a run's metrics.jsonl, in order."""
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def assert_same_weights(run_a, run_b):
    """Both runs saved bit-identical model.safetensors."""
    from safetensors.torch import load_file

    a, b = load_file(str(run_a / "model.safetensors")), load_file(str(run_b / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def raise_at(step, exception=KeyboardInterrupt):
    """An `on_step` hook for engine.fit that raises `exception` after optimiser step `step` (a crash, Ctrl-C)."""
    def hook(current):
        if current == step:
            raise exception

    return hook


class StandInGenerator:
    """The `.generate` interface of TextToImage, drawing noise: the web app's job handling without a trained model.
    `gate`: each call waits for it; `delay`: each call takes this many seconds more (chunks seen arriving)."""

    def __init__(self, size=8, gate=None, delay=0.0):
        self.config = SimpleNamespace(data=SimpleNamespace(image_size=size))
        self.size, self.gate, self.delay, self.calls = size, gate, delay, []

    def generate(self, prompt, n=16, guidance=1.0, rerank=0, temperature=1.0, seed=0):
        self.calls.append((prompt, n, guidance, rerank, temperature, seed))
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, self.size, self.size, generator=g) * 2 - 1, torch.rand(n, generator=g)


def first_counts(calls, name: str):
    """The CacheCounts of the first call of the feature cache `name` among `cache_counts`'s calls."""
    return next(counts for cache, counts in calls if cache == name)


class Counting:
    """Counts the images the wrapped model encodes; raises after `fail_after` calls when set."""

    def __init__(self, model, fail_after=None):
        self.model, self.images, self.calls, self.fail_after = model, 0, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_image(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash while encoding")
        self.images += len(images)
        return self.model.encode_image(images)


def photo_exif(make=None, model=None, taken=None, offset=None, gps=None, orientation=None):
    """An EXIF block as a camera writes it: make and model, orientation, DateTimeOriginal ("YYYY:MM:DD HH:MM:SS")
    and OffsetTimeOriginal in the Exif IFD, and gps = (lat_ref, (d, m, s), lon_ref, (d, m, s)) in the GPS IFD."""
    from PIL import ExifTags, Image

    exif = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model), (0x0112, orientation)):
        if value is not None:
            exif[tag] = value
    for tag, value in ((0x9003, taken), (0x9011, offset)):
        if value is not None:
            exif.get_ifd(ExifTags.IFD.Exif)[tag] = value
    if gps is not None:
        exif.get_ifd(ExifTags.IFD.GPSInfo).update({1: gps[0], 2: gps[1], 3: gps[2], 4: gps[3]})
    return exif
