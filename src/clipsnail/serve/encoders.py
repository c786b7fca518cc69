"""What the web app embeds queries with: the index's ONNX query encoder on onnxruntime (no PyTorch in the
process), or the run's PyTorch model. Both give numpy: texts and images as L2-normalised [N, D] float32, zero-shot
class weights as CLIP's prompt ensemble, and probabilities as the model's training calibrated them (a softmax at
the learned temperature; SigLIP: each class's own sigmoid with the learned bias)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class OnnxQueries:
    """The index's query encoder (`clipsnail.apps.export.OnnxClip`)."""

    def __init__(self, onnx_clip):
        self.onnx = onnx_clip
        self.image_size = onnx_clip.image_size
        self.logit_scale = float(onnx_clip.spec["logit_scale"])
        self.logit_bias = onnx_clip.spec.get("logit_bias")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.onnx.encode_text(list(texts))

    def encode_images(self, images: list) -> np.ndarray:
        return self.onnx.encode_image(list(images))

    def class_weights(self, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[C, D]: per class, the mean of its normalised template embeddings, normalised again."""
        weights = []
        for name in classes:
            mean = self.encode_texts([t.format(name) for t in templates]).mean(axis=0)
            weights.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        return np.stack(weights).astype(np.float32)

    def probabilities(self, image_embeddings: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
        logits = self.logit_scale * image_embeddings @ class_weights.T
        if self.logit_bias is not None:
            return 1.0 / (1.0 + np.exp(-(logits + self.logit_bias)))
        logits = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=-1, keepdims=True)


class TorchQueries:
    """A PyTorch CLIP model (`clipsnail.load`); torch is imported by whoever loaded it."""

    def __init__(self, model):
        self.model = model
        self.image_size = model.image_size

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_text(list(texts)).float().cpu().numpy()

    def encode_images(self, images: list) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_image(list(images)).float().cpu().numpy()

    def class_weights(self, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        import torch

        from clipsnail.inference.evaluate import zero_shot_weights

        with torch.inference_mode():
            return zero_shot_weights(self.model, classes, templates).float().cpu().numpy()

    def probabilities(self, image_embeddings: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
        import torch

        from clipsnail.inference.evaluate import zero_shot_probabilities

        return zero_shot_probabilities(self.model, torch.from_numpy(image_embeddings),
                                       torch.from_numpy(class_weights)).numpy()


def query_encoder_of(model) -> OnnxQueries | TorchQueries:
    """`model` as the web app's query encoder: an OnnxClip, a PyTorch CLIP model, or one of the above already."""
    if isinstance(model, (OnnxQueries, TorchQueries)):
        return model
    if hasattr(model, "text_session"):  # an OnnxClip
        return OnnxQueries(model)
    return TorchQueries(model)
