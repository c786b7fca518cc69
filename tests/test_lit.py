"""Locked towers (LiT) and what comes with them: outputs computed once and kept, partial locks with frozen BatchNorm
statistics, SigLIP in training, and zero-shot evaluation while training."""

import json
import logging
import shutil

import pytest
import torch
from helpers import assert_same_weights, first_counts, logged_losses, noise_image, tiny_clip, tiny_clip_args

from clipsnail.cli import main
from clipsnail.train.feature_cache import CacheCounts, FeatureCache, content_digest, weights_digest

LIT = ["--set", "finetune.lock_image=true", "--set", "data.augment=false"]


def train(shapes_dir, out, *settings, steps=4):
    assert main(tiny_clip_args(shapes_dir, out, "--set", f"train.max_steps={steps}", *settings)) == 0
    return out


# ----------------------------------------------------------------------------------------------- the cache itself


def test_kept_rows_are_read_back_and_only_new_items_encoded(tmp_path):
    calls = []
    d1, d2, d3, d9 = (content_digest(name.encode()) for name in ("1", "2", "3", "9"))
    value = {d1: 1.0, d2: 2.0, d3: 3.0, d9: 9.0}  # the tower's output for each item

    def encoder(digests):
        def encode(rows):
            calls.append(list(rows))
            return torch.tensor([[value[digests[r]], 1.0] for r in rows])
        return encode

    cache = FeatureCache(tmp_path, "image", "ab" * 20)
    rows = cache.outputs([d1, d2, d3], encoder([d1, d2, d3]))
    assert calls == [[0, 1, 2]] and rows[:, 0].tolist() == [1, 2, 3]
    assert cache.counts == CacheCounts(kept=0, encoded=3, checked=0)
    cache = FeatureCache(tmp_path, "image", "ab" * 20)
    again = cache.outputs([d3, d9, d1], encoder([d3, d9, d1]))
    assert calls[1] == [0, 2]  # the kept items, encoded again to check the file against the tower
    assert calls[2:] == [[1]]  # then only the new item
    assert again[:, 0].tolist() == [3, 9, 1]
    assert cache.counts == CacheCounts(kept=2, encoded=1, checked=2)
    # The file holds exactly the items of the last call.
    assert sorted(FeatureCache(tmp_path, "image", "ab" * 20).read()) == sorted([d1, d3, d9])


def test_other_weights_make_another_file_and_the_old_one_goes(tmp_path):
    tower = torch.nn.Linear(3, 2)
    key = weights_digest(tower, "transform A")
    assert weights_digest(tower, "transform B") != key  # what is in front of the tower counts too
    FeatureCache(tmp_path, "image", key).outputs([content_digest(b"a")], lambda rows: torch.ones(len(rows), 2))
    with torch.no_grad():
        tower.weight.add_(1e-3)
    new_key = weights_digest(tower, "transform A")
    assert new_key != key
    calls = []
    FeatureCache(tmp_path, "image", new_key).outputs([content_digest(b"a")],
                                                     lambda rows: calls.append(rows) or torch.ones(1, 2))
    assert calls == [[0]]
    assert [p.name for p in tmp_path.iterdir()] == [f"image-{new_key[:16]}.safetensors"]


def test_a_damaged_cache_file_is_encoded_again(tmp_path, caplog):
    cache = FeatureCache(tmp_path, "text", "cd" * 20)
    cache.outputs([content_digest(b"x")], lambda rows: torch.zeros(1, 4))
    cache.path.write_bytes(b"not safetensors")
    calls = []
    out = cache.outputs([content_digest(b"x")], lambda rows: calls.append(rows) or torch.ones(1, 4))
    assert calls == [[0]] and out.tolist() == [[1.0] * 4]
    assert "unreadable feature cache" in caplog.text


# ----------------------------------------------------------------------------------------------- training from it


def test_training_from_the_cache_equals_training_without_it(shapes_dir, tmp_path, cache_counts):
    plain = train(shapes_dir, tmp_path / "plain", *LIT, "--set", "finetune.cache_features=false")
    assert cache_counts == []
    cached = train(shapes_dir, tmp_path / "cached", *LIT)
    image = first_counts(cache_counts, "image")
    assert image.kept == 0 and image.encoded > 0
    assert logged_losses(plain) == logged_losses(cached)
    assert_same_weights(plain, cached)


def test_both_towers_locked_train_the_heads_from_kept_outputs(shapes_dir, tmp_path, cache_counts):
    plain = train(shapes_dir, tmp_path / "plain", *LIT, "--set", "finetune.lock_text=true",
                  "--set", "finetune.cache_features=false")
    cached = train(shapes_dir, tmp_path / "cached", *LIT, "--set", "finetune.lock_text=true")
    assert {name for name, _ in cache_counts} >= {"image", "text", "val_image", "val_text"}
    a, b = logged_losses(plain), logged_losses(cached)
    assert a == pytest.approx(b, rel=1e-5)  # text outputs in batches of another size: float rounding only


def test_a_resume_reads_the_cache_back(shapes_dir, tmp_path, cache_counts):
    run = train(shapes_dir, tmp_path / "run", *LIT, "--set", "train.checkpoint_every=2", steps=2)
    cache_counts.clear()
    train(shapes_dir, run, *LIT, "--set", "train.checkpoint_every=2", steps=4)
    image = first_counts(cache_counts, "image")
    assert image.encoded == 0 and image.kept > 0, cache_counts


def test_an_image_that_changed_is_encoded_again_alone(shapes_dir, tmp_path, cache_counts):
    data = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data)
    run = train(data, tmp_path / "run", *LIT, steps=2)
    split = json.loads((data / "split.json").read_text())["images"]
    changed = data / "images" / next(i["filename"] for i in split if i["split"] == "train")
    noise_image(changed, seed=5)  # other bytes under the same name
    cache_counts.clear()
    train(data, run, *LIT, steps=4)
    assert first_counts(cache_counts, "image").encoded == 1, cache_counts
    assert first_counts(cache_counts, "val_image").encoded == 0, cache_counts


def test_random_augmentation_says_the_locked_tower_runs_every_step(shapes_dir, tmp_path, caplog):
    train(shapes_dir, tmp_path / "run", "--set", "finetune.lock_image=true", steps=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("runs at every step: random augmentation (data.augment)" in w for w in warnings), warnings
    assert not list((tmp_path / "run").glob("feature_cache/image-*"))


# ----------------------------------------------------------------------------------------------- partial locks


def test_unlocked_groups_train_only_the_last_blocks():
    model = tiny_clip(vision={"depth": 3})
    model.lock_image_tower(unlocked_groups=1)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.visual.named_parameters() if n.startswith(("blocks.2.", "ln_post"))}
    model = tiny_clip(vision={"depth": 3})
    model.lock_image_tower(unlocked_groups=3)  # every block; the stem stays
    assert {n for n, p in model.visual.named_parameters() if not p.requires_grad} == {
        "cls_token", "pos_embed", "patch_embed.weight", "ln_pre.weight", "ln_pre.bias"}


def test_too_many_unlocked_groups_is_a_config_error():
    from clipsnail.core.errors import ConfigError

    with pytest.raises(ConfigError, match="has 4 layer groups"):
        tiny_clip(vision={"depth": 3}).lock_image_tower(unlocked_groups=4)


def test_locked_groups_keep_their_batchnorm_statistics():
    model = tiny_clip(vision={"encoder": "timm:resnet10t", "image_size": 32})
    model.lock_image_tower(unlocked_groups=1, freeze_bn_stats=True)
    bns = {n: m for n, m in model.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    model.train()
    model.encode_image(torch.randn(4, 3, 32, 32) * 3 + 1)
    moved = {n for n in bns if not torch.equal(before[n], bns[n].running_mean)}
    unlocked = {n for n in bns if all(p.requires_grad for p in bns[n].parameters())}
    assert moved == unlocked and unlocked and len(unlocked) < len(bns)


def test_a_wholly_locked_tower_stays_in_eval_mode_while_training():
    model = tiny_clip(vision={"drop_path_rate": 0.3})
    model.lock_image_tower()
    model.lock_text_tower()
    model.train()
    assert model.training and not model.visual.training and not model.text.training
    assert model.image_projection.training
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.encode_image(images), model.encode_image(images))  # no drop-path


def test_unlocked_groups_need_a_locked_image_tower(shapes_dir, tmp_path, capsys):
    from helpers import run_error

    line = run_error(capsys, tiny_clip_args(shapes_dir, tmp_path / "r", "--set",
                                            "finetune.lock_image_unlocked_groups=1"))
    assert "finetune.lock_image=true" in line


# ----------------------------------------------------------------------------------------------- SigLIP, zero-shot


def test_siglip_trains_its_bias_and_the_run_loads_with_it(shapes_dir, tmp_path):
    import clipsnail

    run = train(shapes_dir, tmp_path / "run", "--set", "loss.kind=siglip", steps=3)
    config = json.loads((run / "config.json").read_text())
    assert config["loss"]["kind"] == "siglip" and config["model"]["head"]["init_logit_bias"] == -10.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    biases = [r["logit_bias"] for r in records if "logit_bias" in r]
    assert len(biases) == 3 and biases[0] == -10.0 != biases[-1]  # the bias each step scored with, learned
    model = clipsnail.load(run)
    assert model.logit_bias is not None and float(model.logit_bias) == pytest.approx(biases[-1], abs=1e-3)


def test_siglip_fine_tunes_a_clip_run_from_its_weights(shapes_dir, tmp_path, clip_run):
    from safetensors.torch import load_file

    run = train(shapes_dir, tmp_path / "ft", "--init", str(clip_run), "--set", "loss.kind=siglip",
                "--set", "optim.lr=0", steps=1)
    weights, start = load_file(str(run / "model.safetensors")), load_file(str(clip_run / "model.safetensors"))
    assert float(weights["logit_bias"]) == -10.0  # a softmax run has no bias: SigLIP's start
    assert torch.equal(weights["text_projection.weight"], start["text_projection.weight"])


def test_zero_shot_metrics_are_logged_beside_retrieval(shapes_dir, colours_dir, tmp_path):
    run = train(shapes_dir, tmp_path / "run", *LIT, "--set", f"train.zeroshot_folder={colours_dir}", steps=2)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "eval/zeroshot_acc1" in line]
    assert len(evals) == 1
    record = evals[0]
    assert {"eval/zeroshot_acc1", "eval/zeroshot_acc5", "eval/zeroshot_mean_per_class_recall",
            "eval/val_image_retrieval_recall@5"} <= record.keys()
    assert record["eval/zeroshot_num_classes"] == 8 and record["eval/zeroshot_num_images"] == 96
    assert 0 <= record["eval/zeroshot_acc1"] <= record["eval/zeroshot_acc5"] <= 1


def test_zero_shot_probabilities_are_sigmoids_for_a_siglip_model():
    from clipsnail.inference.evaluate import zero_shot_probabilities

    image, classes = torch.nn.functional.normalize(torch.randn(3, 16), dim=1), \
        torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    clip = tiny_clip()
    softmax = zero_shot_probabilities(clip, image, classes)
    assert torch.allclose(softmax.sum(dim=1), torch.ones(3))
    siglip = tiny_clip(head={"init_logit_bias": -10.0, "init_logit_scale": 2.3})
    sigmoid = zero_shot_probabilities(siglip, image, classes)
    assert torch.allclose(sigmoid, (siglip.logit_scale.exp().detach() * image @ classes.T - 10).sigmoid())
    assert (sigmoid.sum(dim=1) < 0.5).all()  # cosines below 1 at scale 10 and bias -10: no class is likely
