"""The image-classification task: labelled images -> any timm model (LeMeViT included) -> cross-entropy.

The DeiT recipe: Mixup/CutMix that mix the input images as well as the targets, soft-target cross-entropy with label
smoothing, RandAugment and random erasing, AdamW (no decay on gains, biases and meta tokens) with warmup + cosine;
and from the shared engine AMP, gradient clipping, an EMA of the weights evaluated on its own, resume after a kill
and the best weights by validation accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from clipsnail.core import pretrained as weights
from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import build_described, build_for_weights, load_run_weights, save_run
from clipsnail.data.classes import ClassData, ClassImageDataset, read_class_data
from clipsnail.data.transforms import eval_transform
from clipsnail.train.losses import soft_target_cross_entropy
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ClassifyModelConfig:
    name: str = "lemevit_tiny"  # any timm model name: lemevit_tiny, lemevit_tiny_cifar, resnet18, deit_tiny_...
    pretrained: str = ""  # "": random init; "timm": timm's weights (download); or a checkpoint file to start from
    drop_path_rate: float = 0.1
    drop_rate: float = 0.0
    args: str = ""  # extra model arguments, e.g. "img_size=32,patch_size=4" for a ViT on 32x32 images
    channels_last: bool = True  # the fast memory layout for conv stems (and LeMeViT's token views) on CPU and GPU
    num_classes: int = 0  # filled in from the data
    in_chans: int = 3  # filled in from the data (1 for MNIST)
    class_names: list[str] = dataclasses.field(default_factory=list)  # filled in from the data


@dataclasses.dataclass
class ClassifyDataConfig:
    data: str = ""  # folder:ROOT | mnist:DIR | cifar:DIR | ROOT (auto-detected)
    val_fraction: float = 0.1  # when the data has no split of its own: train | val | test in order (see data.classes)
    test_fraction: float = 0.1
    image_size: int = 0  # 0: the model's default input size (e.g. 224 for lemevit_tiny, 32 for lemevit_tiny_cifar)
    mean: list[float] = dataclasses.field(default_factory=list)  # empty: the model's (ImageNet statistics)
    std: list[float] = dataclasses.field(default_factory=list)
    strict: bool = False  # a corrupt image is an error instead of a skipped sample
    eval_batch_size: int = 256


@dataclasses.dataclass
class AugmentConfig:
    crop: str = "auto"  # "rrc" RandomResizedCrop (ImageNet recipes), "pad" pad-and-crop (CIFAR), "none"; auto by size
    crop_scale: tuple[float, float] = (0.08, 1.0)  # of RandomResizedCrop
    hflip: float = 0.5  # set 0 for digits and text (turned off automatically for MNIST)
    randaugment: str = "m9"  # "mN": RandAugment with 2 ops of magnitude N (DeiT: m9); "" off
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; DeiT keeps it off when RandAugment is on
    random_erasing: float = 0.25  # probability (DeiT 0.25)
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # Mixup <-> CutMix
    label_smoothing: float = 0.1


@dataclasses.dataclass
class ClassifyConfig:
    model: ClassifyModelConfig = dataclasses.field(default_factory=ClassifyModelConfig)
    data: ClassifyDataConfig = dataclasses.field(default_factory=ClassifyDataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    # AdamW, wd 0.05, warmup + cosine as DeiT/LeMeViT. Their lr is 5e-4 per 512 images over 300 epochs; short runs
    # from scratch on small data do better with the larger 1e-3 at batch 128.
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(
        lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, warmup_epochs=1.0, grad_clip=5.0))
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        batch_size=128, ema_decay=0.9998, best_metric="val_acc1"))


# ----------------------------------------------------------------------------------------------- model and data


def parse_model_args(text: str) -> dict:
    """"img_size=32,patch_size=4,global_pool=avg" -> {"img_size": 32, ...}; values are int, float, bool or str."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"model.args: expected key=value, got {item!r}")
        key, value = (t.strip() for t in item.split("=", 1))
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def build_classifier(m: ClassifyModelConfig, load_weights: bool = True) -> nn.Module:
    """The timm model of `m` (our LeMeViT is registered with timm on `import clipsnail`)."""
    check_model_name(m.name)
    kwargs = dict(num_classes=m.num_classes, in_chans=m.in_chans, drop_rate=m.drop_rate,
                  drop_path_rate=m.drop_path_rate, **parse_model_args(m.args))
    from_file = not weights.is_off(m.pretrained) and m.pretrained != "timm"
    if from_file:  # architecture arguments the weights need (BatchNorm eps...), also when rebuilt without them
        kwargs = {**weights.model_kwargs(m.pretrained), **kwargs}
    if load_weights and m.pretrained == "timm":
        kwargs["pretrained"] = True
    try:
        model = timm.create_model(m.name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {m.name!r}: {e} (check model.args)") from e
    except RuntimeError as e:
        raise DataError(f"{m.pretrained}: cannot load into {m.name} ({str(e).splitlines()[0]})") from e
    if from_file and load_weights:
        # A file (safetensors, or torch.load with weights_only=True: no code runs; state_dict / state_dict_ema /
        # model wrappers unwrapped) or an installed package's weights, matched by name or, for another layout of the
        # same architecture (efficientnet_pytorch), by order; a head of another size is dropped.
        weights.load_pretrained_state(m.pretrained, model)
    if m.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_model_name(name: str) -> None:
    import clipsnail.models  # noqa: F401  (registers lemevit_*)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))


def resolve_input(cfg: ClassifyConfig) -> tuple[int, list[float], list[float]]:
    """Image size and normalisation: what the config says, else the model's default (pretrained) config, read from
    timm's registry without building the model."""
    check_model_name(cfg.model.name)
    pcfg = timm.models.get_pretrained_cfg(cfg.model.name)
    pcfg = pcfg.to_dict() if pcfg is not None else {}
    packaged = weights.input_normalization(cfg.model.pretrained) if isinstance(cfg.model.pretrained, str) else None
    if packaged is not None:  # packaged weights say what inputs they were trained on
        pcfg["mean"], pcfg["std"] = packaged
    size = cfg.data.image_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
    mean = list(cfg.data.mean or pcfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.data.std or pcfg.get("std", (0.229, 0.224, 0.225)))
    channels = cfg.model.in_chans
    if len(mean) != channels:  # grayscale data with RGB statistics: their average
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return size, mean, std


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


@torch.no_grad()
def predict(model: nn.Module, data: ClassData, transform, batch_size: int = 256,
            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every readable image of `data` (eval mode; unreadable images are skipped)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    dataset = ClassImageDataset(data, transform)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        if batch is None:
            continue
        images = batch["images"].to(device)
        if device.type != "mps":
            images = images.contiguous(memory_format=torch.channels_last)
        logits.append(model(images).float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    if not logits:
        raise DataError(f"{data.source}: no readable images in split {data.split!r}")
    if dataset.skipped:
        log.warning("%s: %d unreadable images skipped", data.source, dataset.skipped)
    return torch.cat(logits), torch.cat(labels)


# ----------------------------------------------------------------------------------------------- the task


class ClassifyTask(Task):
    name = "classify"

    def __init__(self, config: ClassifyConfig, run_dir: str | Path | None = None):
        self.config = config
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


def load_run(run_dir: Path, data: dict, weights: str = "model") -> nn.Module:
    """The timm classifier of a run directory, in eval mode, with three attributes set here and nowhere else:
    `config` (the run's ClassifyConfig), `class_names` (label i is class_names[i]) and `preprocess` (the
    evaluation transform: PIL image -> normalised tensor)."""
    config = build_described(run_dir, lambda: from_dict(ClassifyConfig, data))
    model = build_for_weights(run_dir, lambda: build_classifier(config.model, load_weights=False), weights)
    load_run_weights(model, run_dir, weights)
    model.config = config
    model.class_names = list(config.model.class_names)
    model.preprocess = eval_transform(config.data.image_size, config.data.mean, config.data.std)
    return model
