"""Text-to-image generators of trained runs: prompt -> the nearest known images (`FeatureRetriever`), or prompt ->
new images drawn by a text-conditioned PixelSNAIL, guided and reranked by CLIP (`TextToImage`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipsnail.core.errors import DataError
from clipsnail.inference.sampling import sample, to_pil
from clipsnail.models.clip import CLIP
from clipsnail.models.pixelsnail import PixelSNAIL
from clipsnail.models.text2feat import TextToFeature, nearest


class FeatureRetriever:
    """A trained retrieve run: prompt -> predicted feature -> the nearest known images, with their distances."""

    def __init__(self, model: TextToFeature, config, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.model, self.config = model, config  # config: the run's RetrieveConfig
        try:
            self.features = load_file(str(run_dir / "bank.safetensors"))["features"]
            bank = json.loads((run_dir / "bank.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{run_dir}: cannot read the known-image bank (bank.safetensors, bank.json): {e}") from e
        self.features = self.features.to(model.head.weight.device)
        self.images_dir, self.names = Path(bank["images_dir"]), list(bank["names"])
        if len(self.names) != len(self.features):
            raise DataError(f"{run_dir}: bank.json names {len(self.names)} images, bank.safetensors "
                            f"{len(self.features)}")

    def eval(self):
        self.model.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True):
        self.model.requires_grad_(requires_grad)
        return self

    def to(self, device):
        self.model.to(device)
        self.features = self.features.to(device)
        return self

    @torch.no_grad()
    def generate(self, prompt: str, k: int = 9) -> list[tuple[Path, float]]:
        """The k known images nearest to the prompt's predicted feature: [(path, distance)], closest first."""
        distances, indices = nearest(self.model.encode_text([prompt]), self.features, k, self.model.cfg.distance)
        return [(self.images_dir / self.names[int(i)], float(d)) for d, i in zip(distances[0], indices[0])]


class TextToImage:
    """A trained text-conditioned PixelSNAIL with its CLIP run: prompt -> images, guided and reranked."""

    def __init__(self, model: PixelSNAIL, config, clip: CLIP):
        self.model, self.config, self.clip = model, config, clip  # config: the run's TextPixelSNAILConfig

    def eval(self):
        self.model.eval()
        self.clip.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True):
        self.model.requires_grad_(requires_grad)
        self.clip.requires_grad_(requires_grad)
        return self

    def to(self, device):
        self.model.to(device)
        self.clip.to(device)
        return self

    @torch.no_grad()
    def generate(self, prompt: str, n: int = 16, guidance: float = 1.0, rerank: int = 0, temperature: float = 1.0,
                 seed: int | None = 0, method: str = "cached", progress: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples for `prompt` -> (images (k, 3, S, S) in [-1, 1], CLIP scores (k,)), best score first.

        rerank k > 0 keeps the k of the n samples that CLIP scores highest for the prompt (DALL-E's reranking);
        rerank 0 keeps all n, in drawing order. guidance > 1 is classifier-free guidance with that scale."""
        if rerank < 0 or rerank > n:
            raise ValueError(f"rerank must be between 0 and n={n}, got {rerank}")
        device = next(self.model.parameters()).device
        h = self.clip.encode_text([prompt]).float().to(device).expand(n, -1)
        images = sample(self.model, n, self.config.data.image_size, h=h, temperature=temperature, seed=seed,
                        method=method, progress=progress, guidance=guidance)
        scores = clip_scores(self.clip, images, prompt)
        if rerank:
            order = scores.argsort(descending=True)[:rerank]
            images, scores = images[order], scores[order]
        return images, scores


@torch.no_grad()
def clip_scores(clip, images: torch.Tensor, prompt: str) -> torch.Tensor:
    """Cosine similarity (n,) between each generated image (n, 3, S, S) in [-1, 1] and the prompt, under CLIP."""
    image_emb = clip.encode_image(to_pil(images)).float()
    return (image_emb @ clip.encode_text([prompt]).float().T)[:, 0].cpu()
