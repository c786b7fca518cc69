"""A CLIP run: its config (the model, the caption data, the loss, fine-tuning, the optimiser and the schedule), how a
run is written (config.json, model.safetensors, tokenizer.json, text_encoder/config.json for a Hugging Face text
tower) and how it is loaded for inference. Training (tasks.clip) writes it through `save_clip_run`; everything that
serves a trained CLIP reads it through `load_run`, without the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from clipsnail.core.config import OptimConfig, TrainConfig, check_at_least, check_choice, from_dict
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.pretrained import text_model_dir
from clipsnail.core.runs import (
    build_described,
    build_for_weights,
    load_run_weights,
    read_run_config,
    read_weights,
    save_run,
)
from clipsnail.data.caption_corpora import CaptionDataConfig
from clipsnail.data.tokenizers import TextTokenizer
from clipsnail.data.transforms import eval_transform
from clipsnail.models.clip import CLIP, ClipModelConfig, InferenceKit

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ClipDataConfig(CaptionDataConfig):
    # WebDataset tar shards to stream instead ("data/{000000..000099}.tar", see `clipsnail data shards`); the
    # caption file, when also given, then only serves validation.
    shards: str = ""
    shuffle_buffer: int = 1000  # samples shuffled together while streaming shards
    tokenizer_captions: int = 200_000  # shards: train the BPE on at most this many captions from the first shards
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE trained on the training captions) or "char"
    vocab_size: int = 2048
    context_length: int = 32
    sampling: str = "image"  # "image": one random caption per image per epoch; "pair": every caption
    augment: bool = True
    cache_mb: float = 512  # keep decoded training images in memory up to this size
    max_eval_images: int = 1000  # validation during training uses at most this many images


@dataclasses.dataclass
class ClipLossConfig:
    # "clip": the softmax contrastive loss (InfoNCE) of the CLIP paper; "siglip": a sigmoid loss on every pair,
    # each a binary "do they match" (Zhai et al., ICCV 2023), with a learned bias beside the learned temperature
    kind: str = "clip"
    multi_positive: bool = True  # captions of the same image in one batch are all positives
    same_caption_positive: bool = True  # identical caption texts of different images are positives too
    # Under torchrun each process scores only its own rows against the gathered batch (open_clip --local-loss):
    # [b, B] logits instead of [B, B] per process, same gradients.
    local_loss: bool = False


@dataclasses.dataclass
class FinetuneConfig:
    # A CLIP run to start from (e.g. one written by `clipsnail convert`): its architecture, tokenizer and weights
    # replace the model section; the training run keeps its own data, optimiser and schedule.
    init: str = ""
    lock_image: bool = False  # freeze the image tower (open_clip --lock-image; LiT: Zhai et al. 2022)
    lock_image_unlocked_groups: int = 0  # with lock_image: its last N layer groups still train (open_clip)
    lock_image_freeze_bn_stats: bool = True  # the locked part's BatchNorm statistics stay as they were
    lock_text: bool = False
    # A wholly locked tower under a deterministic transform (data.augment false) runs once over the data, its
    # outputs kept in RUN/feature_cache; a step then runs only the other tower and the heads
    cache_features: bool = True
    image_lr: float | None = None  # per-part learning rates (e.g. 1e-4 image, 1e-5 text, 1e-3 heads)
    text_lr: float | None = None
    head_lr: float | None = None
    # A ConSE image head (model.image_projection=conse): its ImageNet classifier and its label-embedding matrix
    classifier_lr: float | None = None
    label_lr: float | None = None
    second_head_lr: float | None = None  # a second pair of projections (model.head.second_projection) and its share


@dataclasses.dataclass
class ClipTrainConfig(TrainConfig):
    # An image folder of classes (ROOT/<class>/<image>): zero-shot accuracy on it at each evaluation (open_clip's
    # --imagenet-val), logged beside retrieval as zeroshot_acc1, zeroshot_acc5, zeroshot_mean_per_class_recall
    zeroshot_folder: str = ""


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """A CLIP run's whole config, as config.json records it. Frozen: settled once (the command line's flags, a
    fine-tuning run's architecture, the tokenizer's facts), each step giving a new config, never writing into the
    one it was given."""

    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    data: ClipDataConfig = dataclasses.field(default_factory=ClipDataConfig)
    loss: ClipLossConfig = dataclasses.field(default_factory=ClipLossConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1))
    train: ClipTrainConfig = dataclasses.field(default_factory=ClipTrainConfig)


def tokenizer_facts(tokenizer: TextTokenizer) -> dict[str, int]:
    """What a text tower must agree on with its tokenizer: vocabulary size, context length, padding and end ids."""
    facts = {"vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length,
             "pad_id": tokenizer.pad_id}
    if tokenizer.eot_id is not None:  # else the model's default (a pretrained tower pools without one)
        facts["eot_id"] = tokenizer.eot_id
    return facts


def check_clip_config(config: ClipConfig) -> None:
    """ConfigError naming the first key of the loss and fine-tuning sections that cannot work."""
    check_choice(config.loss, "kind", ("clip", "siglip"), section="loss")
    check_at_least(config.finetune, 0, "lock_image_unlocked_groups", section="finetune")
    if config.finetune.lock_image_unlocked_groups and not config.finetune.lock_image:
        raise ConfigError("finetune.lock_image_unlocked_groups applies to a locked image tower: set "
                          "finetune.lock_image=true with it")
    if config.loss.kind == "siglip" and config.loss.local_loss:
        raise ConfigError("loss.local_loss is a setting of the softmax loss; SigLIP always scores each process's "
                          "images against every process's texts")


def save_clip_run(run_dir: Path, config: ClipConfig, model: CLIP, tokenizer: TextTokenizer) -> None:
    """config.json, model.safetensors, tokenizer.json and, for a pretrained Hugging Face text tower, its
    architecture (text_encoder/config.json: the run then loads without the package that provided the weights)."""
    save_run(run_dir, "clip", config, model, tokenizer)
    if config.model.text.encoder.startswith("hf:"):
        (run_dir / "text_encoder").mkdir(exist_ok=True)
        shutil.copyfile(Path(text_model_dir(config.model.text.encoder[3:])) / "config.json",
                        run_dir / "text_encoder" / "config.json")


def ready_for_inference(model: CLIP, tokenizer: TextTokenizer, run_dir: Path | None = None) -> CLIP:
    """Give a CLIP model what `encode_text` / `encode_image` need to take raw strings and images (its tokenizer and
    the evaluation transform of its `cfg`), and the run it came from (an index records it)."""
    v = model.cfg.vision
    model.inference = InferenceKit(tokenizer=tokenizer,
                                   preprocess=eval_transform(v.image_size, v.mean, v.std, v.interpolation),
                                   run_dir=run_dir.resolve() if run_dir is not None else None)
    return model


def run_model_config(run_dir: Path, data: dict) -> ClipModelConfig:
    """The architecture of a CLIP run (config.json `data`, its "model" section), settled: a pretrained Hugging Face
    text tower is the one whose architecture travels with the run (RUN/text_encoder, see `save_clip_run`), so the
    run loads without the package that provided the weights."""
    m = build_described(run_dir, lambda: from_dict(ClipModelConfig, data.get("model", {}), where="model"))
    if m.text.encoder.startswith("hf:"):
        m = m.with_changes(text={"encoder": f"hf:{run_dir / 'text_encoder'}"})
    return m


def load_run(run_dir: Path, data: dict, weights: str = "model") -> CLIP:
    """The CLIP model of a run directory (config.json `data`), with its tokenizer and preprocess. Only the model
    section is read: what trained it (data, loss, schedule) does not change what it computes."""
    m = run_model_config(run_dir, data)
    model = build_for_weights(run_dir, lambda: CLIP(m, load_weights=False), weights)
    load_run_weights(model, run_dir, weights)
    return ready_for_inference(model, TextTokenizer.load(run_dir / "tokenizer.json"), run_dir)


def take_init_run(config: ClipConfig) -> tuple[ClipConfig, dict[str, torch.Tensor]]:
    """`config` with the architecture of its `finetune.init` run (a copy: the given config stays as it is), and
    that run's weights. The run's tokenizer comes with them (the task reads it from the same folder)."""
    run = Path(config.finetune.init)
    data = clip_run_config(run, "finetune.init needs a CLIP run")
    model = from_dict(ClipModelConfig, data.get("model") or {}, where=f"{run}/config.json model")
    log.info("the model of %s: its weights start the run (unless the run directory holds a checkpoint to resume)",
             run)
    asked = config.model.head
    if asked.second_projection and not model.head.second_projection:
        model = model.with_changes(head={key: getattr(asked, key) for key in SECOND_HEAD_KEYS})
        log.info("a second pair of projections (%s, %d dimensions) beside those of %s, learned from the start, "
                 "with %g of the score at first", asked.second_projection, asked.second_embed_dim, run,
                 1 - asked.init_first_share)
    return dataclasses.replace(config, model=model), read_weights(run / "model.safetensors")


# What the config may add to an init run's architecture (`take_init_run`): a second pair of projections.
SECOND_HEAD_KEYS = ("second_projection", "second_embed_dim", "init_first_share")


def load_clip_run(run: str | Path) -> CLIP:
    """A CLIP run as a frozen model for another task (text-to-image conditioning, image features)."""
    run = Path(run)
    return load_run(run, clip_run_config(run, "a CLIP run directory is needed")).eval().requires_grad_(False)


def clip_run_config(run: Path, need: str) -> dict:
    """The config.json data of `run`, which must be a CLIP run: otherwise "RUN: `need`, this one is a 'T' run"."""
    task, data = read_run_config(run)
    if task != "clip":
        raise DataError(f"{run}: {need}, this one is a {task!r} run")
    return data
