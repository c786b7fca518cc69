"""An index carries its query encoder: `index build` writes the run as ONNX beside the vectors, and a text search
on the command line then answers through onnxruntime without importing PyTorch, with the hits PyTorch gives; an
index without one still searches through PyTorch, and `index update` adds it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import noise_image

from clipsnail.cli import main
from clipsnail.inference.index import QUERY_ENCODER, ImageIndex, build_index

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SEARCH = """
import json, sys
from clipsnail.cli import main
assert main(["search", "--index", sys.argv[1], *sys.argv[2:]]) == 0
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_search") / "photos"
    for i in range(10):
        noise_image(root / f"{i}.png", i)
    return root


SERVE = """
import io, json, sys
from fastapi.testclient import TestClient
from PIL import Image
from clipsnail.inference.index import ImageIndex
from clipsnail.serve import create_app, query_model
index = ImageIndex.load(sys.argv[1])
client = TestClient(create_app(index, query_model(index, "cpu")), base_url="http://127.0.0.1")
hits = client.get("/api/search", params={"q": "a red circle", "k": 3}).json()["hits"]
png = io.BytesIO()
Image.new("RGB", (32, 32), "red").save(png, format="PNG")
labels = client.post("/api/zeroshot", files={"file": ("a.png", png.getvalue(), "image/png")},
                     data={"classes": "red, blue"}).json()["labels"]
print(json.dumps({"hits": [h["path"] for h in hits], "labels": labels,
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def search_in_a_fresh_process(index_dir, *argv) -> tuple[list[dict], list[str]]:
    """(the hits, the torch modules imported) of `clipsnail search --index index_dir ARGV` in a new process."""
    proc = subprocess.run([sys.executable, "-c", SEARCH, str(index_dir), *argv], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    return json.loads("\n".join(lines[:-1])), json.loads(lines[-1])


def test_a_text_search_answers_without_torch_and_as_pytorch_does(clip_run, clip_model, photos, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(clip_run), "--images", str(photos), "--out", str(out),
                 "--no-progress"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["query_encoder"] == "written" and (out / QUERY_ENCODER / "text_encoder.onnx").is_file()

    hits, torch_modules = search_in_a_fresh_process(out, "a red circle + 0.5:two squares", "-k", "5",
                                                    "--after", "2000")
    assert torch_modules == []  # onnxruntime + tokenizers + numpy + sqlite only
    index = ImageIndex.load(out)
    from clipsnail.inference.catalogue import parse_filters
    from clipsnail.inference.query import combine

    query = combine([clip_model.encode_text(["a red circle"]), clip_model.encode_text(["two squares"])], [1.0, 0.5])
    expected = index.search(query, 5, parse_filters(after="2000"))[0]
    assert [h["path"] for h in hits] == [str(h.path) for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-3)

    image_hits, torch_modules = search_in_a_fresh_process(out, "--image", str(photos / "3.png"), "-k", "1")
    assert torch_modules == [] and image_hits[0]["path"] == str(photos / "3.png")  # the image encoder, ONNX too

    # The web app answers on the same encoder, PyTorch never imported: the hits and probabilities PyTorch gives
    proc = subprocess.run([sys.executable, "-c", SERVE, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    app = json.loads(proc.stdout.strip().splitlines()[-1])
    assert app["torch"] == [] and app["hits"] == [Path(h.path).name for h in index.search(
        clip_model.encode_text(["a red circle"]), 3)[0]]
    import torch
    from PIL import Image

    from clipsnail.inference.evaluate import default_templates, zero_shot_probabilities, zero_shot_weights
    with torch.no_grad():
        expected = zero_shot_probabilities(clip_model, clip_model.encode_image([Image.new("RGB", (32, 32), "red")]),
                                           zero_shot_weights(clip_model, ["red", "blue"], default_templates()))[0]
    assert {x["label"]: x["prob"] for x in app["labels"]} == pytest.approx(
        {"red": float(expected[0]), "blue": float(expected[1])}, abs=2e-3)


def test_an_index_without_a_query_encoder_searches_with_pytorch_until_an_update_writes_one(clip_model, photos,
                                                                                             tmp_path, capsys):
    out = tmp_path / "idx"
    build_index(clip_model, photos, out, progress=False)  # the Python API writes no encoder (as older releases)
    assert ImageIndex.load(out).query_encoder() is None
    hits, torch_modules = search_in_a_fresh_process(out, "a red circle", "-k", "3")
    assert len(hits) == 3 and "torch" in torch_modules
    capsys.readouterr()
    assert main(["index", "update", "--index", str(out), "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["encoded"] == 0 and stats["query_encoder"] == "written"
    assert search_in_a_fresh_process(out, "a red circle", "-k", "3") == (hits, [])
    assert main(["index", "update", "--index", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["query_encoder"] == "kept"


def an_update_keeps_the_backend(capsys, library, index_dir, backend, other, advice):
    """A new photo in `library`: `index update` encodes it alone through the index's `backend` and keeps its query
    encoder; an update asked to encode through another (`other` flags) is refused, saying to use `advice`."""
    from helpers import run_error

    noise_image(library / "new.png", 99)
    capsys.readouterr()
    assert main(["index", "update", "--index", str(index_dir), "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["backend"] == backend and stats["encoded"] == 1 and stats["query_encoder"] == "kept"
    message = run_error(capsys, ["index", "update", "--index", str(index_dir), *other])
    assert f"encoded through {backend}" in message and advice in message


def test_photos_encoded_through_onnx_agree_with_pytorch_and_an_index_keeps_its_backend(clip_run, clip_model, photos,
                                                                                      tmp_path, capsys):
    import shutil

    import torch

    library = tmp_path / "photos"
    shutil.copytree(photos, library)
    built = {}
    for backend in ("onnx", "torch"):
        capsys.readouterr()
        assert main(["index", "build", "--model", str(clip_run), "--images", str(library), "--out",
                     str(tmp_path / backend), "--backend", backend, "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["backend"] == backend
        index = ImageIndex.load(tmp_path / backend)
        built[backend] = dict(zip(index.paths, index.vectors()))
    onnx, pytorch = (torch.stack([built[b][p] for p in sorted(built["torch"])]) for b in ("onnx", "torch"))
    assert (onnx * pytorch).sum(dim=1).min() >= 0.999  # cosine, photo by photo

    an_update_keeps_the_backend(capsys, library, tmp_path / "onnx", "onnx", ["--backend", "torch"], "--backend onnx")

    # `index watch` and `serve --watch` update it through its own query encoder, encoding only the new photo
    from clipsnail.apps.export import photo_model_of
    from clipsnail.inference.index import update_index

    noise_image(library / "newer.png", 100)
    index = ImageIndex.load(tmp_path / "onnx")
    updated, stats = update_index(photo_model_of(index, clip_model), tmp_path / "onnx", progress=False)
    assert stats["encoded"] == 1 and stats["reencoded"] == 0 and updated.meta["backend"] == "onnx"
    assert photo_model_of(index, clip_model) is not clip_model and photo_model_of(ImageIndex.load(
        tmp_path / "torch"), clip_model) is clip_model


# The least cosine, photo by photo, between an int8 index's vectors and fp32's: noise photos through the test run's
# small random model, a harder case for fixed activation ranges than photos through a trained one.
INT8_MIN_COSINE = 0.95


def test_int8_round_trips_through_index_build_and_an_update_keeps_it(clip_run, photos, tmp_path, capsys):
    import shutil

    import numpy as np

    library = tmp_path / "photos"
    shutil.copytree(photos, library)
    vectors = {}
    for name, flags in (("fp32", ["--backend", "torch", "--no-onnx"]), ("int8", ["--quantize", "int8"])):
        capsys.readouterr()
        assert main(["index", "build", "--model", str(clip_run), "--images", str(library), "--out",
                     str(tmp_path / name), "--no-progress", *flags]) == 0
        stats = json.loads(capsys.readouterr().out)
        index = ImageIndex.load(tmp_path / name)
        vectors[name] = dict(zip(index.paths, index.vectors().numpy()))
    assert stats["backend"] == "onnx-int8" and stats["query_encoder"] == "written"
    spec = json.loads((tmp_path / "int8" / QUERY_ENCODER / "preprocess.json").read_text())
    assert spec["quantized"]["dtype"] == "int8" and spec["quantized"]["image"]["calibration_photos"] == 8
    fp32, int8 = (np.stack([vectors[n][p] for p in sorted(vectors["fp32"])]) for n in ("fp32", "int8"))
    cosine = (fp32 * int8).sum(axis=1)
    assert cosine.min() >= INT8_MIN_COSINE and not np.allclose(fp32, int8, atol=1e-6)  # close, and quantised

    an_update_keeps_the_backend(capsys, library, tmp_path / "int8", "onnx-int8", ["--quantize", "none"],
                                "--quantize int8")

    hits, torch_modules = search_in_a_fresh_process(tmp_path / "int8", "a red circle", "-k", "3")
    assert torch_modules == [] and len(hits) == 3
