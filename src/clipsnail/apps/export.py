"""Export a CLIP run to ONNX, and run the export with onnxruntime alone.

`export_onnx(run, out)` writes a folder that embeds images and texts without PyTorch:

    image_encoder.onnx   "images" float32 [B, 3, S, S] (preprocessed) -> "image_embeddings" [B, D], L2-normalised
    text_encoder.onnx    "tokens" int64 [B, L], L <= context_length    -> "text_embeddings" [B, D], L2-normalised
    tokenizer.json       the run's tokenizer (HF `tokenizers`: <sot>/<eot>, truncation and padding included)
    preprocess.json      image size, resize/crop rule, mean/std, logit scale, and what was exported

`OnnxClip(out)` is that user's side: onnxruntime + tokenizers + Pillow + numpy, no torch import.

The text tower of `text.py` slices its input at the last <eot> before running (a data-dependent shape that an
exported graph cannot keep); here it runs over whatever columns it is given and pools the <eot> state with a
gather. Under the causal mask the padding after <eot> cannot reach that state, so the result is the same. The
sequence axis is dynamic (1 to context_length): OnnxClip does the slicing in numpy, before the graph, so short
captions cost what they cost in PyTorch.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__:
    from clipsnail.core.errors import ClipsnailError, DataError
else:  # this file loaded on its own, for OnnxClip where torch (which `import clipsnail` pulls in) is not installed
    class ClipsnailError(Exception):
        pass

    DataError = ClipsnailError

log = logging.getLogger(__name__)

IMAGE_FILE, TEXT_FILE, TOKENIZER_FILE, PREPROCESS_FILE = (
    "image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "preprocess.json")
EXPORT_FORMAT = "clipsnail-onnx-clip"
IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT = "images", "image_embeddings", "tokens", "text_embeddings"
# Captions for the exporter's example input and for the self-check at the end.
CHECK_TEXTS = ["a red circle above a blue square", "a photo of a dog", "two small green triangles"]
CHECK_WARN_ATOL = 1e-4
# The dynamo exporter implements opset 18 and up (torchlib); asked for less it tries a conversion that fails on our
# graphs and quietly keeps 18, so lower opsets (older runtimes) go through the TorchScript exporter instead.
DYNAMO_MIN_OPSET = 18


class ExportError(ClipsnailError):
    """A run that cannot be exported (not a CLIP run, or a tower the ONNX exporter cannot trace)."""


# ----------------------------------------------------------------------------------------------- export (torch)


def _encoders(model):
    """(image encoder, text encoder): nn.Modules with one tensor in and L2-normalised embeddings out."""
    import torch
    from torch import nn

    from clipsnail.models.clip import embed_features
    from clipsnail.models.text import TextTransformer

    # Each holds one tower's side of the model only (a second pair of projections and its share included), so that
    # an exported graph carries no weights of the other tower.
    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.projection = model.visual, model.image_projection
            self.second_projection, self.first_share_logit = model.second_image_projection, model.first_share_logit

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return embed_features(self.visual(images), self.projection, True, self.second_projection,
                                  self.first_share_logit)

    class TextEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.text, self.projection = model.text, model.text_projection
            self.second_projection, self.first_share_logit = model.second_text_projection, model.first_share_logit

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            if isinstance(self.text, TextTransformer):
                x = self.text.forward_features(tokens)  # the whole context: a fixed shape
                eot = self.text.eot_positions(tokens)
                x = x.gather(1, eot[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
            else:  # a pretrained HF tower pools with its padding mask, over the whole context: a fixed shape
                x = self.text.forward_context(tokens)
            return embed_features(x, self.projection, True, self.second_projection, self.first_share_logit)

    return ImageEncoder().eval(), TextEncoder().eval()


def _export_one(module, example, path: Path, input_name: str, output_name: str, opset: int | None,
                batch_dynamic: bool, what: str, max_sequence: int | None = None) -> None:
    import torch

    dims = {0: torch.export.Dim("batch", min=1)} if batch_dynamic else {}
    if max_sequence:
        dims[1] = torch.export.Dim("sequence", min=1, max=max_sequence)
    try:
        if opset is not None and opset < DYNAMO_MIN_OPSET:
            import warnings

            with warnings.catch_warnings():  # "deprecated", and the tracer's notes on our static shape checks
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                axes = {input_name: {i: d.__name__ for i, d in dims.items()}}
                if batch_dynamic:
                    axes[output_name] = {0: "batch"}
                torch.onnx.export(module, example, str(path), dynamo=False, input_names=[input_name],
                                  output_names=[output_name], opset_version=opset, dynamic_axes=axes)
            return
        # The dynamo exporter (torch.export + onnxscript), torch's current one. forward's argument is named like
        # the ONNX input, so dynamic_shapes can key on it. external_data=False: one self-contained file (< 2 GB).
        program = torch.onnx.export(module, example, dynamo=True, input_names=[input_name],
                                    output_names=[output_name], opset_version=opset,
                                    dynamic_shapes={input_name: dims} if dims else None,
                                    external_data=False, optimize=True, verbose=False)
        program.save(str(path), external_data=False)
    except Exception as e:
        at = f" at opset {opset}" if opset else ""
        first_line = (str(e).splitlines() or [""])[0][:300]
        raise ExportError(f"the {what} does not export to ONNX{at}: {type(e).__name__}: {first_line}") from e


def _example_tokens(model, batch: int):
    import torch

    texts = (CHECK_TEXTS * batch)[:batch]
    return torch.as_tensor(model.tokenizer(texts), dtype=torch.long)


def is_export_dir(path: Path) -> bool:
    """True when `path` holds a preprocess.json this program wrote (its format marker): an export to replace."""
    from clipsnail.core.safeio import read_json_object

    spec = read_json_object(Path(path) / PREPROCESS_FILE)
    return spec is not None and str(spec.get("format", "")).startswith(EXPORT_FORMAT + "/")


def _preprocess_spec(model, run_dir: Path) -> dict:
    from clipsnail.models.text import TextTransformer

    v = model.cfg.vision
    return {
        "format": f"{EXPORT_FORMAT}/1",
        "run": str(run_dir.resolve()),
        "image_size": v.image_size,
        # The rule of clipsnail.data.transforms.eval_transform (torchvision v2), which OnnxClip.preprocess follows.
        "resize": f"shorter side to image_size ({v.interpolation}, antialiased; the longer side scaled and "
                  "truncated), then a centre crop of image_size x image_size",
        "interpolation": v.interpolation,
        "channels": "RGB",
        "layout": "NCHW",
        "scale": 1 / 255,
        "mean": list(v.mean),
        "std": list(v.std),
        "context_length": model.tokenizer.context_length,
        # What OnnxClip may slice off: columns after every row's first <eot> (our causal tower) or, for a
        # pretrained tower that pools with a padding mask, the columns that are padding in every row.
        "eot_id": model.text.eot_id if isinstance(model.text, TextTransformer) else None,
        "pad_id": model.tokenizer.pad_id,
        "embed_dim": model.embed_dim,
        "logit_scale": float(model.logit_scale.detach().exp()),
        # SigLIP's learned bias (None for CLIP): zero-shot probabilities are then each class's sigmoid
        "logit_bias": float(model.logit_bias.detach()) if getattr(model, "logit_bias", None) is not None else None,
        "image_encoder": v.encoder,
        "text_encoder": model.cfg.text.encoder,
        "files": {"image_encoder": IMAGE_FILE, "text_encoder": TEXT_FILE, "tokenizer": TOKENIZER_FILE},
        "inputs": {IMAGE_FILE: IMAGE_INPUT, TEXT_FILE: TEXT_INPUT},
        "outputs": {IMAGE_FILE: IMAGE_OUTPUT, TEXT_FILE: TEXT_OUTPUT},
    }


def _io_description(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def shape(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset,
            "inputs": {v.name: {"shape": shape(v), "dtype": dtype(v)} for v in m.graph.input},
            "outputs": {v.name: {"shape": shape(v), "dtype": dtype(v)} for v in m.graph.output}}


def export_onnx(run_dir: str | Path, out_dir: str | Path, opset: int | None = None, batch_dynamic: bool = True,
                check_batch: int = 3, seed: int = 0) -> dict:
    """Export the CLIP run `run_dir` to the folder `out_dir` (module docstring); returns a JSON-able summary.

    opset: the ai.onnx opset (default: the exporter's). batch_dynamic: a dynamic batch axis (else the batch size
    is fixed at the example's, 2). At the end both encoders run in onnxruntime on a check batch (random images,
    real captions) and the largest absolute difference to PyTorch's `encode_image` / `encode_text` is reported.
    The folder is written under a temp name and renamed: a failed export leaves `out_dir` as it was.
    """
    import torch

    from clipsnail.apps.hub import load
    from clipsnail.apps.model_names import resolve_run
    from clipsnail.core.runs import read_run_config
    from clipsnail.core.safeio import check_replaceable, staged_dir

    run_dir, out_dir = resolve_run(run_dir), Path(out_dir)  # a run directory, or a name such as hf-hub:ORG/NAME
    task, _ = read_run_config(run_dir)
    if task != "clip":
        raise ExportError(f"{run_dir}: a {task!r} run; only CLIP runs (task 'clip') export to ONNX")
    check_replaceable(out_dir, is_export_dir, "clipsnail ONNX export")
    if not (run_dir / TOKENIZER_FILE).is_file():
        raise DataError(f"{run_dir}: no {TOKENIZER_FILE}")
    model = load(run_dir)
    image_encoder, text_encoder = _encoders(model)
    size = model.image_size
    generator = torch.Generator().manual_seed(seed)
    example_images = torch.randn(2, 3, size, size, generator=generator)  # batch 2: 1 would be specialised
    example_tokens = _example_tokens(model, 2)

    timings = {}
    with staged_dir(out_dir, is_ours=is_export_dir, what="clipsnail ONNX export") as tmp:
        # Traced with autograd on: model code may take inference-only fast paths under no_grad (LeMeViT's fused
        # oneDNN Linear+GELU, torch.ops.mkldnn._linear_pointwise) that have no ONNX translation.
        with torch.enable_grad():
            t = time.perf_counter()
            _export_one(image_encoder, (example_images,), tmp / IMAGE_FILE, IMAGE_INPUT, IMAGE_OUTPUT, opset,
                        batch_dynamic, f"image tower {model.cfg.vision.encoder!r}")
            timings["image_export_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            _export_one(text_encoder, (example_tokens,), tmp / TEXT_FILE, TEXT_INPUT, TEXT_OUTPUT, opset,
                        batch_dynamic, f"text tower {model.cfg.text.encoder!r}",
                        max_sequence=example_tokens.shape[1])
            timings["text_export_s"] = round(time.perf_counter() - t, 2)
        image_io, text_io = _io_description(tmp / IMAGE_FILE), _io_description(tmp / TEXT_FILE)
        written = {image_io["opset"], text_io["opset"]}
        if opset is not None and written != {opset}:
            raise ExportError(f"opset {opset} was asked for; the exporter wrote opset {', '.join(map(str, written))}")
        shutil.copyfile(run_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        (tmp / PREPROCESS_FILE).write_text(json.dumps(_preprocess_spec(model, run_dir), indent=2) + "\n")
        check = _self_check(model, tmp, check_batch if batch_dynamic else 2, generator)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return {"run": str(run_dir), "out": str(out_dir), "files": files, "opset": image_io["opset"],
            "image_encoder": image_io, "text_encoder": text_io, "check": check, **timings}


def _self_check(model, export_dir: Path, batch: int, generator) -> dict:
    import torch

    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    texts = (CHECK_TEXTS * batch)[:batch]
    onnx_clip = OnnxClip(export_dir)
    with torch.no_grad():
        ref_image = model.encode_image(images).numpy()
        ref_text = model.encode_text(texts).numpy()
    image_diff = float(np.abs(onnx_clip.encode_image(images.numpy()) - ref_image).max())
    text_diff = max(float(np.abs(onnx_clip.encode_text(texts, trim=trim) - ref_text).max()) for trim in (True, False))
    for what, diff in (("image", image_diff), ("text", text_diff)):
        if diff > CHECK_WARN_ATOL:
            log.warning("ONNX %s encoder differs from PyTorch by up to %.2g (> %g)", what, diff, CHECK_WARN_ATOL)
    return {"batch": batch, "image_max_abs_diff": image_diff, "text_max_abs_diff": text_diff,
            "texts": "tokenized by the exported tokenizer.json (onnx) and by the run's tokenizer (torch); the "
                     "onnx text encoder run on the whole context and on the trimmed columns (OnnxClip.trim_tokens)"}


def ensure_query_encoder(index_dir: str | Path) -> str:
    """Give the image index at index_dir its query encoder: this module's export of the run that made its vectors,
    which `clipsnail search --index` and the web app then run on onnxruntime instead of PyTorch. Kept when the one
    there was exported from the same weights. -> "written", "kept", or why not (a missing extra, a run that cannot
    be exported...): an index without one still searches, through PyTorch."""
    from clipsnail.inference.index import QUERY_ENCODER, ImageIndex, set_query_encoder

    index = ImageIndex.load(index_dir)
    try:
        if index.query_encoder() is not None:
            return "kept"
        if index.model_dir is None or not index.model_weights:
            return "not written: the index does not record the weights of its run"
        if index.weights_changed():
            return "not written: the run's weights changed since its vectors were made"
        missing = _missing_onnx_modules()
        if missing:
            return f"not written: it needs the onnx extra (pip install 'clipsnail[onnx]'; missing {', '.join(missing)})"
        model_dir, weights = index.model_dir, index.model_weights
    finally:
        index.close()
    try:
        export_onnx(model_dir, Path(index_dir) / QUERY_ENCODER)
    except Exception as e:  # the exporter's many error types: the index is whole without it, searched with PyTorch
        log.warning("%s: no ONNX query encoder (%s); searches load PyTorch", index_dir, str(e).splitlines()[0])
        return f"not written: {str(e).splitlines()[0]}"
    set_query_encoder(index_dir, weights)
    return "written"


class OnnxImageModel:
    """An export's image encoder on onnxruntime in the shape `index build` and `index update` encode with
    (`embed_dim`, `image_size`, `run_dir`, `preprocess` -> a [3, S, S] tensor, `encode_image` -> [B, D]), so the
    photos of an index are encoded by the graph its queries are (`backend` "onnx", or "onnx-int8" for an export
    quantised by `clipsnail.apps.quantize`; recorded in the index)."""

    def __init__(self, export_dir: str | Path, run_dir: str | Path, weights: dict | None,
                 threads: int | None = None):
        self.onnx = OnnxClip(export_dir, threads=threads)
        # The fingerprint of the weights the export was made from: the vectors it makes are of those, whatever the
        # run holds now
        self.run_dir, self.weights = Path(run_dir), weights
        self.image_size, self.embed_dim = self.onnx.image_size, int(self.onnx.spec["embed_dim"])
        self.backend = "onnx-int8" if self.onnx.spec.get("quantized") else "onnx"

    def eval(self):
        return self

    def preprocess(self, image):
        import torch

        return torch.from_numpy(self.onnx.preprocess(image))

    def encode_image(self, images):
        import torch

        return torch.from_numpy(self.onnx.encode_image(np.ascontiguousarray(images.numpy(), dtype=np.float32)))


def photo_model_of(index, model):
    """The model an update of `index` encodes photos with (`index watch`, `serve --watch`): `model` (PyTorch) for
    an index encoded through PyTorch; for one encoded through ONNX Runtime, its own query encoder."""
    recorded = index.meta.get("backend", "torch")
    if not recorded.startswith("onnx"):
        return model
    own = own_photo_model(index, index.model_dir)
    if own is None or own.backend != recorded:
        raise ClipsnailError(f"{index.index_dir}: its photos were encoded through ONNX Runtime, but its query encoder "
                             f"is missing or of other weights; `clipsnail index update --index {index.index_dir}` "
                             "exports the run again")
    return own


def own_photo_model(index, run_dir: str | Path) -> OnnxImageModel | None:
    """The index's query encoder as the model its photos are encoded with (None when it has none of its weights)."""
    folder = index.query_encoder()
    return None if folder is None else OnnxImageModel(folder, run_dir, index.meta.get("query_encoder"))


def _missing_onnx_modules() -> list[str]:
    import importlib.util

    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def onnx_backend_available() -> bool:
    """Whether the onnx extra is installed: the exporter and onnxruntime."""
    return not _missing_onnx_modules()


# ----------------------------------------------------------------------------------------------- onnxruntime only


class OnnxClip:
    """An exported CLIP on onnxruntime: `encode_image` / `encode_text` return L2-normalised float32 arrays.

    Needs only onnxruntime, tokenizers, numpy and (for PIL images or paths) Pillow; never imports torch. Where
    clipsnail is not installed, load this file on its own: e.g. copy it next to the export as onnx_clip.py, then
    `from onnx_clip import OnnxClip`. The image encoder's session is created on the first image.
    threads: onnxruntime's intra-op threads (default: its own choice, all cores). spinning=False: idle worker threads
    sleep instead of spinning after each call (slower to wake, but no CPU taken from other work on a shared machine).
    """

    def __init__(self, export_dir: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 spinning: bool = True):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.dir = Path(export_dir)
        spec_path = self.dir / PREPROCESS_FILE
        if not spec_path.is_file():
            raise DataError(f"{self.dir}: not an ONNX export (no {PREPROCESS_FILE})")
        self.spec = json.loads(spec_path.read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = list(providers or ["CPUExecutionProvider"])
        self._session = functools.partial(ort.InferenceSession, sess_options=options, providers=providers)
        self.text_session = ort.InferenceSession(str(self.dir / TEXT_FILE), options, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(self.dir / TOKENIZER_FILE))
        self.image_size = int(self.spec["image_size"])
        self._dynamic_sequence = not isinstance(self.text_session.get_inputs()[0].shape[1], int)
        self.logit_scale = float(self.spec["logit_scale"])

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """[B, context_length] int64 token ids (the tokenizer pads and truncates to the context by itself)."""
        if isinstance(texts, str):
            texts = [texts]
        return np.array([e.ids for e in self.tokenizer.encode_batch(list(texts))], dtype=np.int64)

    def preprocess(self, image) -> np.ndarray:
        """A PIL image or an image path -> [3, S, S] float32, as clipsnail.data.transforms.eval_transform."""
        from PIL import Image, ImageOps

        if not isinstance(image, Image.Image):
            with Image.open(image) as im:
                im.load()
                image = ImageOps.exif_transpose(im)
        if image.mode != "RGB":
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                background.alpha_composite(rgba)
                image = background
            image = image.convert("RGB")
        size = self.image_size
        w, h = image.size
        if (w, h) != (size, size):
            short, long = min(w, h), max(w, h)
            new_long = int(size * long / short)
            new_w, new_h = (size, new_long) if w <= h else (new_long, size)
            if (new_w, new_h) != (w, h):
                resample = Image.BICUBIC if self.spec.get("interpolation") == "bicubic" else Image.BILINEAR
                image = image.resize((new_w, new_h), resample, reducing_gap=None)
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        x = np.asarray(image, dtype=np.float32) * np.float32(self.spec["scale"])
        x = (x - np.asarray(self.spec["mean"], dtype=np.float32)) / np.asarray(self.spec["std"], dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def encode_image(self, images) -> np.ndarray:
        """A preprocessed float [B, 3, S, S] array, or a list of PIL images / paths -> [B, D]."""
        if isinstance(images, np.ndarray):
            batch = images.astype(np.float32, copy=False)
        else:
            if not isinstance(images, (list, tuple)):
                images = [images]
            batch = np.stack([self.preprocess(im) for im in images])
        return self.image_session.run([IMAGE_OUTPUT], {IMAGE_INPUT: batch})[0]

    @functools.cached_property  # loaded on the first image: a text search never pays for it
    def image_session(self):
        return self._session(str(self.dir / IMAGE_FILE))

    def encode_text(self, texts, trim: bool = True) -> np.ndarray:
        """A list of strings (tokenised here) or an int [B, context_length] array of token ids -> [B, D].

        trim: run only the columns that can change the result (see `trim_tokens`); the same embeddings, faster.
        """
        tokens = texts.astype(np.int64, copy=False) if isinstance(texts, np.ndarray) else self.tokenize(texts)
        if trim and self._dynamic_sequence:
            tokens = self.trim_tokens(tokens)
        return self.text_session.run([TEXT_OUTPUT], {TEXT_INPUT: tokens})[0]

    def trim_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Drop the padding columns no embedding depends on: those after every row's first <eot> (as the PyTorch
        tower does; a batch with a row without <eot> is kept whole), or those that are padding in every row."""
        eot_id, pad_id = self.spec.get("eot_id"), self.spec.get("pad_id")
        if eot_id is not None:
            is_eot = tokens == eot_id
            if not is_eot.any(axis=1).all():
                return tokens
            keep = int(is_eot.argmax(axis=1).max()) + 1
        elif pad_id is not None:
            used = np.flatnonzero((tokens != pad_id).any(axis=0))
            keep = int(used[-1]) + 1 if used.size else 1
        else:
            return tokens
        return np.ascontiguousarray(tokens[:, :keep])

    def similarity(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """logit_scale * cosine: [n_images, n_texts] logits, as CLIP's forward."""
        return self.logit_scale * image_embeddings @ text_embeddings.T
