"""The image-classification trainer: training reduces the loss, eval writes the metrics and the report files,
any timm model works, Mixup really mixes the inputs, resume is exact, grayscale data, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY_CLASSIFY, assert_same_weights, logged_losses, raise_at, sets, write_idx

from clipsnail.cli import main
from clipsnail.core.config import load_config
from clipsnail.core.errors import ClipsnailError
from clipsnail.families.classify import ClassifyConfig, parse_model_args
from clipsnail.tasks.classify import ClassifyTask
from clipsnail.train.engine import fit
from clipsnail.train.optim import build_optimizer


def tiny_task(data, *settings, fast=TINY_CLASSIFY) -> ClassifyTask:
    """A LeMeViT-tiny-CIFAR classification task on `data` with the fast settings, then `settings`."""
    return ClassifyTask(load_config(ClassifyConfig, None, [f"data.data={data}", "model.name=lemevit_tiny_cifar",
                                                           *fast, *settings]))


@pytest.mark.slow
def test_training_reduces_the_loss_and_eval_writes_the_report(colours_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["classify", "train", "--data", str(colours_dir), "--arch", "lemevit_tiny_cifar", "--out", str(run),
            "--epochs", "6", "--no-progress",
            *sets(TINY_CLASSIFY + ["augment.mixup=0", "augment.cutmix=0", "optim.lr=2e-3"])]
    assert main(args) == 0
    losses = logged_losses(run)
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    assert (run / "best.safetensors").is_file() and json.loads((run / "best.json").read_text())["metric"] == "val_acc1"
    capsys.readouterr()

    assert main(["classify", "eval", "--model", str(run), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("acc1", "acc5", "macro_precision", "macro_recall", "macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_classes"] == 8 and metrics["weights"] == "best" and metrics["split"] == "test"
    assert metrics["acc1"] > 1 / 8  # better than chance after six epochs on colours
    out = run / "eval_test"
    for name in ("metrics.json", "per_class.json", "classification_report.txt", "confusion_matrix.png", "curves.png"):
        assert (out / name).is_file(), name
    per_class = json.loads((out / "per_class.json").read_text())
    assert set(per_class) == {p.name for p in colours_dir.iterdir() if p.is_dir()}
    assert set(per_class["red"]) == {"precision", "recall", "f1-score", "support"}


def test_any_timm_model_trains_and_evaluates(colours_dir, tmp_path, capsys):
    run = tmp_path / "resnet"
    assert main(["classify", "train", "--data", str(colours_dir), "--arch", "resnet18", "--out", str(run),
                 "--no-progress", *sets(TINY_CLASSIFY + ["train.max_steps=2"])]) == 0
    capsys.readouterr()
    assert main(["classify", "eval", "--model", str(run), "--weights", "model", "--split", "val",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "model"


def test_ema_is_evaluated_next_to_the_raw_weights(colours_dir, tmp_path):
    result = fit(tiny_task(colours_dir, "train.max_steps=2"), tmp_path / "run", progress=False)
    assert {"val_acc1", "ema_val_acc1", "val_loss", "ema_val_loss"} <= set(result.metrics)


def test_mixup_mixes_the_images_not_only_the_targets(colours_dir):
    task = tiny_task(colours_dir, "augment.mixup=0.8", "augment.cutmix=0")
    batch = task.collate([task.train_dataset[(i, i)] for i in range(8)])
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(len(x), 8, requires_grad=True)

    loss, _ = task.loss(Spy(), {k: v.clone() for k, v in batch.items()})
    assert not torch.allclose(seen["x"], batch["images"])  # mixing only the targets would leave these unchanged
    assert loss.item() == pytest.approx(np.log(8), rel=1e-4)  # uniform logits: CE of any soft target is log(C)


@pytest.mark.slow
def test_resume_after_a_crash_gives_identical_weights(colours_dir, tmp_path):
    # Mixup/CutMix (numpy RNG), random crops and flips, drop path: all on; the default warmup
    fast = [s for s in TINY_CLASSIFY if not s.startswith(("model.drop_path_rate", "optim.warmup"))]

    def task():
        return tiny_task(colours_dir, "train.max_steps=6", "train.checkpoint_every=2", fast=fast)

    fit(task(), tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(task(), tmp_path / "resumed", progress=False, on_step=raise_at(3))
    fit(task(), tmp_path / "resumed", progress=False)
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")


def test_meta_tokens_get_no_weight_decay(colours_dir):
    task = tiny_task(colours_dir)
    model = task.build_model()
    optimizer = build_optimizer(task.config.optim, task.param_groups(model), model)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.meta_tokens) in no_decay
    assert id(model.head.weight) not in no_decay


def test_grayscale_mnist_gets_one_input_channel_and_no_flips(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 10
    images = np.zeros((60, 28, 28), np.uint8)
    for i, y in enumerate(labels):  # a bar whose height encodes the digit
        images[i, 2 + 2 * y: 4 + 2 * y, 4:24] = 255
    images = np.clip(images + rng.integers(0, 30, images.shape), 0, 255)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    task = tiny_task(f"mnist:{tmp_path}", "train.max_steps=1")
    cfg = task.config
    assert cfg.model.in_chans == 1 and cfg.augment.hflip == 0 and len(cfg.data.mean) == 1
    model = task.build_model()
    assert model.downsample_layers[0][0].in_channels == 1
    fit(task, tmp_path / "run", progress=False)


def test_model_args_are_parsed():
    assert parse_model_args("img_size=32, patch_size=4,global_pool=avg,qkv_bias=false,x=0.5") == {
        "img_size": 32, "patch_size": 4, "global_pool": "avg", "qkv_bias": False, "x": 0.5}
    with pytest.raises(ClipsnailError, match="key=value"):
        parse_model_args("img_size")


def test_bad_input_gives_one_line_errors(colours_dir, tmp_path, capsys):
    assert main(["classify", "train", "--data", str(colours_dir), "--arch", "lemevit_tinyy", "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    assert "unknown model 'lemevit_tinyy'" in capsys.readouterr().err
    assert main(["classify", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"),
                 "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["classify", "train", "--data", str(colours_dir), "--arch", "lemevit_tiny_cifar", "--pretrained",
                 str(tmp_path / "none.pth"), "--out", str(tmp_path / "r3"), "--no-progress"]) == 2
    assert "none.pth: pretrained checkpoint not found" in capsys.readouterr().err
