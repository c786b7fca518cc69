"""Text to image, two ways.

kind "retrieve" (seed 004, done properly): a Transformer reads the prompt and regresses the feature vector that a
frozen image encoder (a trained CLIP run's image tower, or any timm model) computes for the matching image;
"generating" returns the known images nearest to the prediction. The run keeps the known images' features
(bank.safetensors + bank.json), so generating needs neither the encoder nor the images' pixels.

kind "pixelsnail": PixelSNAIL conditioned, in every gated block, on the frozen CLIP text embedding of the caption
(the `h` of Conditional PixelCNN). With probability `cond_dropout` the embedding is replaced by a learned null
vector, which lets the sampler use classifier-free guidance; the CLIP run also reranks the samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from clipsnail import distributed as dist
from clipsnail.config import OptimConfig, TrainConfig
from clipsnail.data.datasets import CaptionImageDataset
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.engine import param_groups_by_prefix, seeded, unwrap
from clipsnail.errors import ConfigError, DataError
from clipsnail.layers.causal import data_dependent_init
from clipsnail.layers.mixture import discretized_mix_logistic_nll
from clipsnail.models.pixelsnail import PixelSNAIL, PixelSNAILConfig
from clipsnail.models.text2feat import Text2FeatConfig, TextToFeature, nearest
from clipsnail.safeio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CaptionDataConfig:
    captions: str = ""  # caption file (any format of DESIGN.md)
    images: str = ""  # folder the caption file's image names are relative to
    format: str = "auto"
    split_file: str = ""  # Karpathy-style split JSON; default: 80/10/10 by a hash of the image name
    strict: bool = False  # a corrupt image is an error instead of a skipped sample
    follow_links: bool = False  # image names may be symbolic links (only to files under `images`)
    max_eval_images: int = 500  # validation during training uses at most this many images
    image_size: int = 16  # kind pixelsnail: images are resized to this side
    eval_prompts: int = 8  # kind pixelsnail: a grid of samples for this many validation captions after each epoch


def load_captions(data: CaptionDataConfig, split: str):
    from clipsnail.tasks.clip import load_caption_split

    return load_caption_split(data, split)


# ----------------------------------------------------------------------------------------------- image encoders


class TimmImageEncoder(nn.Module):
    """A timm model as a frozen feature extractor: its pooled features (the classifier removed) and its own
    preprocessing, behind the `encode_image` / `preprocess` interface of a CLIP model."""

    def __init__(self, name: str, pretrained: bool):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except RuntimeError as e:  # unknown name
            raise ConfigError(f"encoder timm:{name}: {e}") from e
        except Exception as e:  # no network and no cached weights
            raise ConfigError(f"encoder timm:{name}: cannot load pretrained weights ({e}); "
                              "set encoder_pretrained=false to use random weights") from e
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.preprocess = timm.data.create_transform(**data_cfg)
        self.cfg = types.SimpleNamespace(embed_dim=self.model.num_features)  # as CLIP's cfg.embed_dim

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def load_image_encoder(spec: str, pretrained: bool = True) -> nn.Module:
    """`timm:NAME` or a CLIP run directory -> a frozen module with `encode_image` and `preprocess`."""
    if not spec:
        raise ConfigError("no image encoder: give --encoder RUN (a CLIP run) or --encoder timm:NAME")
    if spec.startswith("timm:"):
        return TimmImageEncoder(spec[5:], pretrained).eval()
    return load_clip(spec)


def load_clip(run: str):
    from clipsnail.hub import load, read_run_config

    task, _ = read_run_config(run)
    if task != "clip":
        raise ConfigError(f"{run}: a CLIP run directory is needed, this one is a {task!r} run")
    return load(run).requires_grad_(False)


@torch.no_grad()
def encode_images(encoder: nn.Module, images_dir: str | Path, names: list[str], progress: bool = True) -> torch.Tensor:
    from clipsnail.evaluate import encode_image_paths

    features, readable = encode_image_paths(encoder, [Path(images_dir) / n for n in names], progress=progress)
    if not readable.all():
        bad = names[int((~readable).nonzero()[0])]
        raise DataError(f"{Path(images_dir) / bad}: unreadable image ({int((~readable).sum())} in all); "
                        "the feature targets need every image")
    return features


# ----------------------------------------------------------------------------------------------- kind retrieve


@dataclasses.dataclass
class RetrieveConfig:
    kind: str = "retrieve"
    encoder: str = ""  # a CLIP run directory (its image tower) or timm:NAME
    encoder_pretrained: bool = True  # timm:NAME with its pretrained weights
    model: Text2FeatConfig = dataclasses.field(default_factory=Text2FeatConfig)
    data: CaptionDataConfig = dataclasses.field(default_factory=CaptionDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.01,
                                                                               warmup_steps=100))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=64, epochs=20))


class CaptionTargets(Dataset):
    """Every caption once per epoch: (caption, the row of its image's feature)."""

    def __init__(self, captions: list[str], caption_to_image: list[int]):
        self.captions, self.caption_to_image = captions, caption_to_image

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[str, int]:
        index = item[0] if isinstance(item, tuple) else item
        return self.captions[index], self.caption_to_image[index]


class RetrieveTask:
    name = "t2i_retrieve"

    def __init__(self, config: RetrieveConfig, run_dir: str | Path | None = None, progress: bool = True):
        self.config = config
        data = config.data
        self.names, captions, caption_to_image = load_captions(data, "train")
        tokenizer_path = Path(run_dir) / "tokenizer.json" if run_dir else None
        m = config.model
        if tokenizer_path is not None and tokenizer_path.exists():  # resuming: keep the vocabulary of the run
            self.tokenizer = TextTokenizer.load(tokenizer_path)
        else:
            # Trained on rank 0 and shared: under torchrun every process must encode text identically.
            self.tokenizer = dist.from_main(
                lambda: build_tokenizer(m.tokenizer, captions, m.vocab_size or 2048, m.context_length))
        m.vocab_size, m.pad_id, m.eot_id = self.tokenizer.vocab_size, self.tokenizer.pad_id, self.tokenizer.eot_id
        encoder = load_image_encoder(config.encoder, config.encoder_pretrained)
        log.info("encoding %d training images with the frozen encoder %s", len(self.names), config.encoder)
        self.features = encode_images(encoder, data.images, self.names, progress)
        m.feature_dim = self.features.shape[1]
        self.train_dataset = CaptionTargets(captions, caption_to_image)
        self.val = None
        try:
            names, val_captions, val_c2i = load_captions(data, "val")
            keep = [i for i, c in enumerate(val_c2i) if c < data.max_eval_images]
            names = names[: data.max_eval_images]
            self.val = (names, [val_captions[i] for i in keep], [val_c2i[i] for i in keep],
                        encode_images(encoder, data.images, names, progress))
        except DataError as e:
            log.info("no validation during training (%s)", e)
        log.info("training on %d captions of %d images, features of size %d", len(captions), len(self.names),
                 m.feature_dim)

    def build_model(self) -> TextToFeature:
        model = TextToFeature(self.config.model)
        model.tokenizer = self.tokenizer
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups_by_prefix(model, [], self.config.optim.lr)

    def collate(self, samples: list) -> dict:
        return {"tokens": self.tokenizer([c for c, _ in samples]),
                "targets": self.features[torch.tensor([i for _, i in samples])]}

    def loss(self, model: TextToFeature, batch: dict):
        predicted = model(batch["tokens"])
        return unwrap(model).loss(predicted.float(), batch["targets"]), {}

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, model: TextToFeature) -> dict[str, float]:
        """Validation captions against every known image (training images + validation images): recall@k of the
        caption's own image, and, on generated shapes data, how often the nearest image fits the caption."""
        if self.val is None:
            return {}
        names, captions, caption_to_image, val_features = self.val
        was_training = model.training
        model.eval()
        bank = torch.cat([self.features, val_features])
        predicted = torch.cat([model.encode_text(captions[i:i + 256]) for i in range(0, len(captions), 256)])
        _, hits = nearest(predicted, bank, 5, model.cfg.distance)
        model.train(was_training)
        own = torch.tensor(caption_to_image) + len(self.features)
        metrics = {f"val_image_retrieval_recall@{k}": (hits[:, :k] == own[:, None]).any(1).float().mean().item()
                   for k in (1, 5)}
        from clipsnail.data.shapes import scene_judge

        judge = scene_judge(self.config.data.images, self.names + names)
        if judge is not None:
            metrics["val_semantic_top1_accuracy"] = sum(
                judge(int(h), c) for h, c in zip(hits[:, 0], captions)) / max(len(captions), 1)
        return metrics

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        pass

    def save(self, model: TextToFeature, run_dir: Path) -> None:
        from clipsnail.hub import save_run

        save_run(run_dir, self.name, self.config, model, self.tokenizer)
        if not (run_dir / "bank.json").exists():  # the known images never change during a run
            with atomic_path(run_dir / "bank.safetensors") as tmp:
                save_file({"features": self.features.contiguous()}, str(tmp))
            bank = {"images_dir": str(Path(self.config.data.images).resolve()), "names": self.names}
            atomic_write_text(run_dir / "bank.json", json.dumps(bank) + "\n")


class FeatureRetriever:
    """A trained retrieve run: prompt -> predicted feature -> the nearest known images, with their distances."""

    def __init__(self, model: TextToFeature, run_dir: str | Path):
        run_dir = Path(run_dir)
        self.model, self.config = model, model.config
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

    @torch.no_grad()
    def generate(self, prompt: str, k: int = 9) -> list[tuple[Path, float]]:
        """The k known images nearest to the prompt's predicted feature: [(path, distance)], closest first."""
        distances, indices = nearest(self.model.encode_text([prompt]), self.features, k, self.model.cfg.distance)
        return [(self.images_dir / self.names[int(i)], float(d)) for d, i in zip(distances[0], indices[0])]


# ----------------------------------------------------------------------------------------------- kind pixelsnail


@dataclasses.dataclass
class TextPixelSNAILConfig:
    kind: str = "pixelsnail"
    clip: str = ""  # a CLIP run directory: its frozen text tower gives h, its two towers rerank samples
    preset: str = "small"  # a PixelSNAIL architecture (models.pixelsnail.CONFIGS); model.* overrides its fields
    cond_dropout: float = 0.1  # probability that a caption's h is replaced by the learned null vector
    model: PixelSNAILConfig = dataclasses.field(default_factory=PixelSNAILConfig)
    data: CaptionDataConfig = dataclasses.field(default_factory=CaptionDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-3, weight_decay=0.0, betas=(0.95, 0.9995), eps=1e-6, warmup_steps=0, schedule="exponential",
        lr_decay=0.999998, grad_clip=0.0))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(batch_size=32, ema_decay=0.999))


@torch.no_grad()
def embed_captions(clip, captions: list[str], batch_size: int = 512) -> tuple[dict[str, int], torch.Tensor]:
    """Distinct captions -> (row of each caption text, L2-normalised CLIP text embeddings (N, D))."""
    from clipsnail.evaluate import encode_texts

    rows: dict[str, int] = {}
    for c in captions:
        rows.setdefault(c, len(rows))
    return rows, encode_texts(clip, list(rows), batch_size)


class TextPixelSNAILTask:
    name = "t2i_pixelsnail"

    def __init__(self, config: TextPixelSNAILConfig, run_dir: str | Path | None = None):
        from clipsnail.tasks.pixelsnail import image_transform

        self.config = config
        if not 0 <= config.cond_dropout < 1:
            raise ConfigError(f"cond_dropout must be in [0, 1), got {config.cond_dropout}")
        data = config.data
        names, captions, caption_to_image = load_captions(data, "train")
        clip = load_clip(config.clip)
        self.rows, self.embeddings = embed_captions(clip, captions)
        m = config.model
        m.channels, m.cond_dim, m.null_condition = 3, self.embeddings.shape[1], config.cond_dropout > 0
        self.transform = image_transform(data.image_size, None)
        self.train_dataset = CaptionImageDataset(data.images, names, captions, caption_to_image, self.transform,
                                                 sampling="image", strict=data.strict)
        self.val_dataset = None
        try:
            names, captions, caption_to_image = load_captions(data, "val")
            self.val_dataset = CaptionImageDataset(data.images, names, captions, caption_to_image, self.transform,
                                                   sampling="image", strict=data.strict)
            rows, embeddings = embed_captions(clip, [c for c in captions if c not in self.rows])
            for c, i in rows.items():
                self.rows[c] = i + len(self.embeddings)
            self.embeddings = torch.cat([self.embeddings, embeddings])
        except DataError as e:
            log.info("no validation during training (%s)", e)
        self.dims = 3 * data.image_size**2
        log.info("text-conditioned PixelSNAIL %s on %d images %dx%d, CLIP text embeddings of size %d",
                 config.preset, len(self.train_dataset), data.image_size, data.image_size, m.cond_dim)

    def condition(self, captions: list[str]) -> torch.Tensor:
        return self.embeddings[torch.tensor([self.rows[c] for c in captions])]

    def build_model(self) -> PixelSNAIL:
        model = PixelSNAIL(self.config.model)
        n = min(len(self.train_dataset), max(self.config.train.batch_size, 16))
        batch = self.collate([self.train_dataset[(i, i)] for i in range(n)])
        data_dependent_init(model, batch["images"], h=batch["h"])
        return model

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups_by_prefix(model, [], self.config.optim.lr)

    def collate(self, samples: list) -> dict | None:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None
        return {"images": torch.stack([s["image"] for s in kept]), "h": self.condition([s["caption"] for s in kept])}

    def loss(self, model: PixelSNAIL, batch: dict):
        h = batch["h"]
        if model.training and self.config.cond_dropout > 0:
            drop = torch.rand(h.shape[0], 1, device=h.device) < self.config.cond_dropout
            h = torch.where(drop, model.unconditional(h.shape[0]), h)
        params = model(batch["images"], h=h)
        nll = discretized_mix_logistic_nll(batch["images"], params.float(), self.config.model.nr_mix)
        return nll, {"bits_per_dim": nll.item() / (math.log(2) * self.dims)}

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, model: PixelSNAIL) -> dict[str, float]:
        """Bits/dim of validation images given one of their captions (fixed choice), up to max_eval_images."""
        if self.val_dataset is None:
            return {}
        was_training = model.training
        model.eval()
        n = min(len(self.val_dataset), self.config.data.max_eval_images)
        total, count = 0.0, 0
        for start in range(0, n, 64):
            batch = self.collate([self.val_dataset[(i, i)] for i in range(start, min(start + 64, n))])
            if batch is None:
                continue
            params = model(batch["images"], h=batch["h"])
            total += discretized_mix_logistic_nll(batch["images"], params.float(), self.config.model.nr_mix,
                                                  reduce=False).sum().item()
            count += len(batch["images"])
        model.train(was_training)
        return {"val_bits_per_dim": total / (math.log(2) * self.dims * max(count, 1))}

    def after_epoch(self, model: PixelSNAIL, run_dir: Path, epoch: int) -> None:
        k = self.config.data.eval_prompts
        if k <= 0 or self.val_dataset is None:
            return
        from clipsnail.sampling import sample, save_sample_grid

        captions = sorted(set(self.val_dataset.captions))
        with seeded(epoch):
            prompts = random.sample(captions, min(k, len(captions)))
        images = sample(model, len(prompts), self.config.data.image_size, h=self.condition(prompts), seed=epoch)
        save_sample_grid(images, run_dir / "samples" / f"epoch_{epoch + 1:03d}.png", title=f"epoch {epoch + 1}",
                         labels=prompts)

    def save(self, model: PixelSNAIL, run_dir: Path) -> None:
        from clipsnail.hub import save_run

        save_run(run_dir, self.name, self.config, model)


class TextToImage:
    """A trained text-conditioned PixelSNAIL with its CLIP run: prompt -> images, guided and reranked."""

    def __init__(self, model: PixelSNAIL, config: TextPixelSNAILConfig):
        self.model, self.config = model, config
        self.clip = load_clip(config.clip)

    def eval(self):
        self.model.eval()
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
        from clipsnail.sampling import sample

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
    from clipsnail.sampling import to_pil

    image_emb = clip.encode_image(to_pil(images)).float()
    return (image_emb @ clip.encode_text([prompt]).float().T)[:, 0].cpu()
