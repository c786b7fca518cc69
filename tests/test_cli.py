"""The `clipsnail` command line: flags reach the config as typed values, in a fixed precedence; the parser is built
from one module per command group."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import TINY_CLIP
from PIL import Image

import clipsnail
from clipsnail.cli import build_parser, main
from clipsnail.cli.classify import classify_config
from clipsnail.cli.clip import clip_config
from clipsnail.cli.pixelsnail import pixelsnail_config
from clipsnail.cli.t2i import t2i_config
from clipsnail.core.errors import ConfigError


def parse(line: str):
    return build_parser().parse_args(line.split())


def test_folder_010_and_caption_file_on_are_taken_as_named(shapes_dir, tmp_path, monkeypatch):
    """YAML would read `010` as the number 8 and `on` as true: flags are strings, never parsed as YAML."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(shapes_dir / "images", tmp_path / "010")
    shutil.copyfile(shapes_dir / "captions.csv", tmp_path / "on")
    out = tmp_path / "run"
    args = ["clip", "train", "--captions", "on", "--images", "010", "--split-file", str(shapes_dir / "split.json"),
            "--out", str(out), "--no-progress", "--set", "train.max_steps=1"]
    for item in TINY_CLIP:
        args += ["--set", item]
    assert main(args) == 0
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["images"] == "010" and data["captions"] == "on"
    assert (out / "model.safetensors").is_file()


def test_a_missing_caption_file_named_on_is_named_in_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    assert main(["clip", "train", "--captions", "on", "--images", "images", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clipsnail: error: ")]
    assert errors[0].startswith("clipsnail: error: on: ") and "True" not in err  # YAML would have made it True


def test_flags_are_typed_values():
    cfg = clip_config(parse("clip train --captions on --images 010 --split-file 1e3 --shards {0..9}.tar --init no "
                            "--format csv --out o"))
    assert (cfg.data.captions, cfg.data.images, cfg.data.split_file) == ("on", "010", "1e3")
    assert cfg.data.shards == "{0..9}.tar" and cfg.finetune.init == "no" and cfg.data.format == "csv"
    cfg = classify_config(parse("classify train --data 010 --model yes --pretrained null --out o"))
    assert (cfg.data.data, cfg.model.name, cfg.model.pretrained) == ("010", "yes", "null")
    cfg = t2i_config(parse("t2i train --kind retrieve --encoder off --captions c --images 0x10 --out o"))
    assert cfg.encoder == "off" and cfg.data.images == "0x10"
    cfg = t2i_config(parse("t2i train --clip 1_000 --captions c --images i --config tiny --out o"))
    assert cfg.clip == "1_000" and cfg.preset == "tiny"


def test_precedence_yaml_then_flags_then_set_then_training_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  images: from_yaml\n  captions: from_yaml.csv\ntrain:\n  epochs: 4\n  seed: 1\n"
                         "model:\n  head:\n    embed_dim: 48\n")
    cfg = clip_config(parse(f"clip train --config {yaml_file} --images from_flag --out o"))
    assert cfg.data.images == "from_flag" and cfg.data.captions == "from_yaml.csv"  # flags over YAML
    assert cfg.train.epochs == 4 and cfg.model.head.embed_dim == 48
    # One rule for every flag: preset < YAML < named flags < --set, whatever their order on the line.
    cfg = clip_config(parse(f"clip train --config {yaml_file} --images from_flag --set data.images=from_set "
                            "--set train.epochs=7 --epochs 3 --set train.seed=9 --out o"))
    assert cfg.data.images == "from_set" and cfg.train.epochs == 7 and cfg.train.seed == 9
    cfg = clip_config(parse(f"clip train --config {yaml_file} --epochs 3 --seed 5 --out o"))
    assert cfg.train.epochs == 3 and cfg.train.seed == 5  # the training flags over YAML
    cfg = classify_config(parse("classify train --arch resnet18 --set model.name=resnet34 --seed 2 --out o"))
    assert cfg.model.name == "resnet34" and cfg.train.seed == 2


def test_model_names_a_run_and_its_old_use_for_an_architecture_still_works(capsys):
    assert classify_config(parse("classify train --model resnet18 --out o")).model.name == "resnet18"
    assert "note: --model resnet18 is now --arch resnet18" in capsys.readouterr().err
    assert parse("convert --from lemevit:x.pth --model lemevit_tiny --out o").arch == "lemevit_tiny"


def test_a_pixelsnail_preset_is_the_default_under_a_yaml_file_and_set(tmp_path):
    from clipsnail.models.pixelsnail import CONFIGS

    cfg = pixelsnail_config(parse("pixelsnail train --data 010 --config tiny --set model.filters=8 --out o"))
    assert cfg.preset == "tiny" and cfg.model.blocks == CONFIGS["tiny"]["blocks"] and cfg.model.filters == 8
    assert cfg.data.data == "010"
    yaml_file = tmp_path / "snail.yaml"
    yaml_file.write_text("model:\n  filters: 16\n")
    for line in (f"pixelsnail train --data x --config {yaml_file} --out o",
                 f"t2i train --clip r --captions c --images i --config {yaml_file} --out o"):
        cfg = (pixelsnail_config if line.startswith("pixelsnail") else t2i_config)(parse(line))
        assert cfg.preset == "small" and cfg.model.filters == 16  # the YAML file over the small preset
        assert cfg.model.blocks == CONFIGS["small"]["blocks"]


def test_flag_values_are_checked_like_set_values():
    with pytest.raises(ConfigError, match="unknown config key"):
        pixelsnail_config(parse("pixelsnail train --data x --out o --set model.nosuch=1"))
    with pytest.raises(ConfigError, match="expected an integer"):
        clip_config(parse("clip train --out o --set train.epochs=2.5"))


def test_the_config_flag_of_pixelsnail_tasks_names_the_presets(capsys):
    helps = {}
    for words in (["pixelsnail", "train"], ["t2i", "train"], ["clip", "train"]):
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        helps[words[0]] = " ".join(capsys.readouterr().out.split())
    assert ("--config CONFIG a preset (small, tiny, h12_noup_smallkey, h8_noup_smallkey, h12_pool2_smallkey; "
            "default small) or a YAML config file") in helps["pixelsnail"]
    assert "--config CONFIG kind pixelsnail: a preset (small, tiny, ...; default small); or a YAML config file" in (
        helps["t2i"])
    assert ("--config CONFIG a YAML config file, or the name of a packaged one (lit_small, pretrained_small, ...); "
            "overridden by the flags below") in helps["clip"]


def test_commands_are_listed_in_their_order(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    order = ["demo", "data", "clip", "classify", "pixelsnail", "t2i", "generate", "zeroshot", "index", "search",
             "export", "serve", "convert"]
    lines = [ln.split()[0] for ln in out.splitlines() if ln.startswith("    ") and ln.split()]
    assert [ln for ln in lines if ln in order] == order


def test_write_result_grid_takes_path_score_pairs(tmp_path):
    from clipsnail.inference.plots import write_result_grid

    paths = []
    for i, colour in enumerate(["red", "blue"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 16), colour).save(paths[-1])
    out = write_result_grid(tmp_path / "grid" / "g.png", "two", [(paths[0], 0.9), (str(paths[1]), 0.5)])
    assert out == tmp_path / "grid" / "g.png" and Image.open(out).size[0] > 2 * 100


def test_grid_labels_name_the_files_and_every_text_fits_the_grid():
    from PIL import ImageFont

    from clipsnail.inference.plots import cut_to_width, image_grid, result_labels, wrap_to_width

    labels = result_labels([("/photos/IMG_20240412_093015_HDR_portrait_mode.jpg", 0.3124),
                            (b"/photos/bad\xff\x1b[2J.png".decode("utf-8", "surrogateescape"), 0.25)])
    assert labels[0].splitlines()[0] == "0.312"
    assert labels[1].splitlines() == ["0.250", "bad\ufffd\\x1b[2J.png"]  # lossy, and no terminal escape
    font = ImageFont.load_default(size=12)
    cut = cut_to_width(labels[0].splitlines()[1], font, 128)
    assert font.getlength(cut) <= 128 and cut.startswith("IMG_") and cut.endswith("mode.jpg") and "\u2026" in cut

    title = "a red circle above a blue square and two green triangles (guidance 3, best 4 of 16)"
    big = ImageFont.load_default(size=18)
    lines = wrap_to_width(title, big, 268)
    assert len(lines) > 1 and " ".join(lines) == title and all(big.getlength(ln) <= 268 for ln in lines)
    tiles = [Image.new("RGB", (8, 8), "red")] * 16
    short, long = image_grid(tiles, title="a red", cols=4, cell=64), image_grid(tiles, title=title, cols=4, cell=64)
    assert long.width == short.width and long.height == short.height + 22 * (len(lines) - 1)


@pytest.mark.slow
def test_python_dash_m_runs_the_same_main():
    env = {**os.environ, "PYTHONPATH": str(Path(clipsnail.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "clipsnail", "data", "shapes", "--help"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0 and "--captions-per-image" in result.stdout
    result = subprocess.run([sys.executable, "-m", "clipsnail", "search", "-k", "0", "query", "--images", "x"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr == "clipsnail: error: -k must be at least 1, got 0\n"


def test_version(capsys):
    import clipsnail

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"clipsnail {clipsnail.__version__}"


def test_every_flag_of_every_command_says_what_it_does():
    import argparse

    def commands(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, f"{path} {name}")
        yield path, parser

    missing = [f"{path} {action.option_strings[-1]}" for path, parser in commands(build_parser(), "clipsnail")
               for action in parser._actions
               if action.option_strings and not action.help and not isinstance(action, argparse._HelpAction)]
    assert missing == []


def test_help_imports_no_torch_and_lemevit_still_registers_with_timm():
    """`clipsnail --help` (and a command's help) answers without importing torch, timm or faiss, which take
    seconds; `import clipsnail` then `import timm` still makes the lemevit_* models known to timm."""
    code = textwrap.dedent("""
        import contextlib, io, sys
        from clipsnail.cli import main
        for argv in (["--help"], ["clip", "train", "--help"], ["search", "--help"], ["data", "shapes", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                main(argv)
            assert "usage: clipsnail" in out.getvalue(), argv
        heavy = sorted(name for name in ("torch", "timm", "faiss", "transformers") if name in sys.modules)
        print("heavy:", heavy)
        import timm
        print("registered:", "lemevit_tiny" in timm.list_models("lemevit*"))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(clipsnail.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["heavy: []", "registered: True"]


def test_a_command_line_is_parsed_alike_with_only_its_command_filled_in():
    line = ["clip", "train", "--out", "runs/x", "--epochs", "2", "--set", "model.head.embed_dim=64"]
    assert build_parser(commands=["clip"]).parse_args(line) == build_parser().parse_args(line)
    with pytest.raises(SystemExit):  # the other commands are names only: their flags are not there
        build_parser(commands=["clip"]).parse_args(["search", "--index", "x", "a dog"])


@pytest.mark.parametrize("first", ["clipsnail.layers.attention", "clipsnail.tasks.classify", "clipsnail.models.lemevit",
                                   "clipsnail"])
def test_lemevit_registers_with_timm_whichever_module_imports_timm_first(first):
    """The modules that import timm themselves, each imported first in a fresh interpreter: the registration that
    runs as timm is imported must not import them back half-made (a circular import)."""
    code = f"import {first}, timm; print('lemevit_tiny' in timm.list_models('lemevit*'))"
    env = {**os.environ, "PYTHONPATH": str(Path(clipsnail.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout) == (0, "True\n"), result.stderr
