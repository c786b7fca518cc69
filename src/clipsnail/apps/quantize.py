"""int8 versions of an ONNX export (`clipsnail.apps.export`), for indexing photos and answering queries faster.

`quantize_export(folder, calibration)` rewrites an export's two encoders in place:

    image_encoder.onnx   static quantisation in ONNX Runtime's QDQ format: int8 weights (per output channel),
                         uint8 activations whose ranges are calibrated on a sample of the photos to be indexed
                         (`calibration_sample`), percentile calibration (the 99.999th: a few outlying activations
                         do not stretch a whole range);
    text_encoder.onnx    dynamic quantisation of its MatMuls (int8 weights per output channel, activation ranges
                         measured per call): queries have no sample to calibrate on, and a transformer's
                         activations vary too much from caption to caption for fixed ranges.

The image tower's head stays float: every node from the pooling onward (nodes whose output has at most two axes,
[batch, features]). ConSE's head there is a softmax over the ImageNet classes and a weighted mean of the top
classes' text embeddings; an int8 error in its logits changes which classes are kept.

`preprocess.json` gains "quantized", which `OnnxImageModel` reads as the backend "onnx-int8": an index records it,
and an update of an int8 index encodes in int8 again (never a mix).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from clipsnail.apps.export import IMAGE_FILE, IMAGE_INPUT, PREPROCESS_FILE, TEXT_FILE, OnnxClip
from clipsnail.core.errors import DataError
from clipsnail.core.safeio import atomic_write_json
from clipsnail.data.images import load_image, walk_images

log = logging.getLogger(__name__)

INT8 = "int8"
CALIBRATION_PHOTOS = 64
CALIBRATION_BATCH = 8
PERCENTILE = 99.999


def calibration_sample(root: str | Path, n: int = CALIBRATION_PHOTOS, follow_links: bool = False) -> list[Path]:
    """Up to n photo paths under root, spread evenly over the sorted list (the same sample every time)."""
    paths = sorted(path for path, _ in walk_images(root, follow_links=follow_links))
    if len(paths) > n:
        paths = [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)] if n > 1 else paths[:1]
    return [Path(p) for p in paths]


def preprocessed(onnx_clip: OnnxClip, paths: list[Path]) -> np.ndarray:
    """[M, 3, S, S] of the readable ones among paths (decoded to about the model's input size)."""
    arrays = []
    for path in paths:
        try:
            arrays.append(onnx_clip.preprocess(load_image(path, min_side=onnx_clip.image_size)))
        except DataError as e:
            log.info("calibration: skipping %s (%s)", path, e)
    if not arrays:
        raise DataError(f"no readable photo to calibrate int8 on among {len(paths)} (first: "
                        f"{paths[0] if paths else 'none'})")
    return np.stack(arrays)


def _head_nodes(model) -> list[str]:
    """The nodes from the image tower's pooling onward: those with an output of at most two axes (shapes from
    ONNX shape inference; a node whose shape is unknown is left to quantisation)."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.value_info, *model.graph.output]
             if v.type.tensor_type.HasField("shape")}
    return [n.name for n in model.graph.node
            if n.output and all(out in ranks and ranks[out] <= 2 for out in n.output)]


def _quantize_image(source: Path, target: Path, calibration: np.ndarray) -> dict:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Batches of one size: the percentile calibrator stacks each tensor's values over the batches
    batch = min(CALIBRATION_BATCH, len(calibration))
    calibration = calibration[: len(calibration) - len(calibration) % batch]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i: i + batch] for i in range(0, len(calibration), batch))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {IMAGE_INPUT: batch}

    prepared = target.with_name(target.name + ".prepared")
    try:
        # Folds constants and infers shapes, as ONNX Runtime's quantiser expects (its own advice)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        head = _head_nodes(onnx.load(str(prepared), load_external_data=False))
        with contextlib.redirect_stdout(sys.stderr):  # the calibrator prints its progress; stdout is the CLI's JSON
            quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=head,
                            extra_options={"CalibPercentile": PERCENTILE})
    finally:
        prepared.unlink(missing_ok=True)
    return {"method": "static QDQ, per-channel int8 weights, uint8 activations", "calibration": "percentile",
            "percentile": PERCENTILE, "calibration_photos": int(len(calibration)), "float_head_nodes": len(head)}


def _quantize_text(source: Path, target: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])
    return {"method": "dynamic, per-channel int8 MatMul weights"}


def quantize_export(export_dir: str | Path, calibration: np.ndarray) -> dict:
    """Quantise the export at export_dir to int8 in place (module docstring); calibration: [M, 3, S, S]
    preprocessed photos. Each encoder is written beside itself and renamed over it; the export is marked last, so
    a folder left by a failure is never taken for an int8 one. -> what was done (also in preprocess.json)."""
    folder = Path(export_dir)
    spec_path = folder / PREPROCESS_FILE
    spec = json.loads(spec_path.read_text())
    if spec.get("quantized"):
        raise DataError(f"{folder}: already quantised ({spec['quantized']['dtype']})")
    done = {"dtype": INT8}
    for name, quantize in ((IMAGE_FILE, lambda s, t: _quantize_image(s, t, calibration)),
                           (TEXT_FILE, _quantize_text)):
        source, target = folder / name, folder / (name + ".int8")
        try:
            done[name.removesuffix("_encoder.onnx")] = quantize(source, target)
            os.replace(target, source)
        finally:
            target.unlink(missing_ok=True)
    spec["quantized"] = done
    atomic_write_json(spec_path, spec)
    return done


def quantize_for_photos(export_dir: str | Path, root: str | Path, follow_links: bool = False) -> dict:
    """Quantise the export at export_dir, calibrated on a sample of the photos under root."""
    onnx_clip = OnnxClip(export_dir)
    sample = calibration_sample(root, follow_links=follow_links)
    return quantize_export(export_dir, preprocessed(onnx_clip, sample))
