"""An image-classification run: its config, the timm model it names (LeMeViT included), and how it is loaded for
inference. Training (tasks.classify) builds its model here; evaluation and prediction load it here, without the
trainer.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from clipsnail.core import pretrained as weights
from clipsnail.core.config import OptimConfig, TrainConfig, from_dict
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.runs import build_described, build_for_weights, load_run_weights
from clipsnail.data.classes import ClassData, ClassImageDataset
from clipsnail.data.transforms import eval_transform

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
