"""The image-classification task: labelled images -> any timm model (LeMeViT included) -> cross-entropy.

The DeiT recipe: Mixup/CutMix that mix the input images as well as the targets, soft-target cross-entropy with label
smoothing, RandAugment and random erasing, AdamW (no decay on gains, biases and meta tokens) with warmup + cosine;
and from the shared engine AMP, gradient clipping, an EMA of the weights evaluated on its own, resume after a kill
and the best weights by validation accuracy.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import save_run
from clipsnail.data.classes import ClassData, ClassImageDataset, read_class_data
from clipsnail.data.transforms import eval_transform
from clipsnail.families.classify import (
    AugmentConfig,
    ClassifyConfig,
    build_classifier,
    predict,
    resolve_input,
)
from clipsnail.train.losses import soft_target_cross_entropy
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- model and data


def train_transform(a: AugmentConfig, size: int, mean, std, native_size: int | None) -> v2.Compose:
    crop = a.crop
    if crop == "auto":  # small images (CIFAR, MNIST) are not cropped to 8% of their area; they are padded and shifted
        crop = "pad" if size <= 64 else "rrc"
    steps: list = [v2.ToImage()]
    if crop == "rrc":
        steps.append(v2.RandomResizedCrop(size, scale=tuple(a.crop_scale), antialias=True))
    else:
        if native_size != size:
            steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        if crop == "pad":
            steps.append(v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
        elif crop != "none":
            raise ConfigError(f"augment.crop must be auto, rrc, pad or none, got {a.crop!r}")
    if a.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(a.hflip))
    if a.randaugment:
        if not (a.randaugment.startswith("m") and a.randaugment[1:].isdigit()):
            raise ConfigError(f"augment.randaugment must look like 'm9' (or be empty), got {a.randaugment!r}")
        steps.append(v2.RandAugment(num_ops=2, magnitude=int(a.randaugment[1:])))
    if a.color_jitter > 0:
        steps.append(v2.ColorJitter(a.color_jitter, a.color_jitter, a.color_jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if a.random_erasing > 0:
        steps.append(v2.RandomErasing(a.random_erasing, value="random"))
    return v2.Compose(steps)


def read_split(cfg: ClassifyConfig, split: str) -> ClassData:
    if not cfg.data.data:
        raise DataError("no training data: give --data folder:ROOT | mnist:DIR | cifar:DIR")
    return read_class_data(cfg.data.data, split, cfg.data.val_fraction, cfg.data.test_fraction)


# ----------------------------------------------------------------------------------------------- the task


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, config: ClassifyConfig, run_dir: str | Path | None = None):
        # settled here from the data (sizes, classes, the tokenizer's facts), in a copy: the caller's stays as given
        self.config = config = copy.deepcopy(config)
        train = read_split(config, "train")
        m = config.model
        if m.class_names and m.class_names != train.classes:  # resuming with other data would scramble labels
            raise DataError(f"{config.data.data}: its classes {train.classes[:5]}... differ from the run's "
                            f"{m.class_names[:5]}...")
        m.class_names, m.num_classes, m.in_chans = list(train.classes), len(train.classes), train.channels
        if train.source.startswith("mnist") and config.augment.hflip > 0:
            log.info("MNIST digits: horizontal flips turned off")
            config.augment.hflip = 0.0
        self.train_data = train
        try:
            self.val_data = read_split(config, "val")
        except DataError as e:
            self.val_data = None
            log.info("no validation during training (%s)", e)
            if config.train.best_metric.endswith("val_acc1"):
                config.train.best_metric = ""
        size, self.mean, self.std = resolve_input(config)
        config.data.image_size, config.data.mean, config.data.std = size, self.mean, self.std
        self.train_dataset = ClassImageDataset(train, train_transform(config.augment, size, self.mean, self.std,
                                                                       train.native_size), strict=config.data.strict)
        self.eval_transform = eval_transform(size, self.mean, self.std)
        a = config.augment
        self.mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mix_prob,
                               switch_prob=a.switch_prob, mode="batch", label_smoothing=a.label_smoothing,
                               num_classes=m.num_classes)
        log.info("training %s on %d images of %d classes (%s), %dpx", m.name, len(train), m.num_classes,
                 train.split_rule or train.source, size)

    def build_model(self) -> nn.Module:
        return build_classifier(self.config.model)

    def collate(self, samples: list) -> dict | None:
        return self.train_dataset.collate(samples)

    def loss(self, model: nn.Module, batch: dict):
        images, labels = batch["images"], batch["labels"]
        if self.config.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        smoothing = self.config.augment.label_smoothing
        if self.mixup is not None and len(images) % 2 == 0:  # timm's batch mixing pairs each image with its mirror
            images, targets = self.mixup(images, labels)
        else:
            targets = F.one_hot(labels, self.config.model.num_classes).float() * (1 - smoothing) + \
                smoothing / self.config.model.num_classes
        logits = model(images)
        loss = soft_target_cross_entropy(logits.float(), targets)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean().item()  # on mixed images: a rough signal only
        return loss, {"batch_acc": acc}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.val_data is None:
            return {}
        logits, labels = predict(model, self.val_data, self.eval_transform, self.config.data.eval_batch_size)
        acc1 = (logits.argmax(1) == labels).float().mean().item()
        return {"val_acc1": acc1, "val_loss": F.cross_entropy(logits, labels).item()}

    def after_epoch(self, model: nn.Module, run_dir: Path, epoch: int) -> None:
        if self.train_dataset.skipped:
            log.warning("%d corrupt training images skipped so far", self.train_dataset.skipped)

    def save(self, model: nn.Module, run_dir: Path) -> None:
        save_run(run_dir, self.name, self.config, model)


