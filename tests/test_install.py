"""What `pip install clipsnail` brings and what it leaves to extras: the dependencies in pyproject.toml, the one-line
error of a command whose extra is missing, the packaged configs found by name, and what a built wheel holds."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import run_error

from clipsnail.core.config import PACKAGED_CONFIGS, find_config, packaged_configs
from clipsnail.core.errors import ConfigError
from clipsnail.core.extras import EXTRA_MODULES, MissingExtra, require_extra

ROOT = Path(__file__).resolve().parents[1]
SOURCE_CONFIGS = ROOT / "src" / "clipsnail" / "configs"


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(requirements) -> set[str]:
    """Distribution names of requirement strings, lower-cased ("fastapi>=0.164" -> "fastapi")."""
    out = set()
    for req in requirements:
        name = req.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        out.add(name.lower().replace("_", "-"))
    return out


# ----------------------------------------------------------------------------------------------- pyproject


def test_the_plain_install_leaves_training_the_web_app_and_shards_to_extras():
    base = names(project()["dependencies"])
    assert {"torch", "torchvision", "timm", "faiss-cpu", "tokenizers", "safetensors", "huggingface-hub",
            "open-clip-torch"} <= base  # open_clip_torch: OpenAI's BPE vocabulary, for conversion
    assert not base & {"fastapi", "uvicorn", "python-multipart", "matplotlib", "scikit-learn", "webdataset",
                       "braceexpand", "tensorboard"}
    extras = project()["optional-dependencies"]
    assert {"matplotlib", "scikit-learn"} <= names(extras["train"])
    assert {"fastapi", "uvicorn", "python-multipart"} <= names(extras["serve"])
    assert "braceexpand" in names(extras["shards"])


def test_torch_has_a_lower_bound_and_no_upper_pin():
    deps = {req.split(">")[0].split("<")[0].split("=")[0]: req for req in project()["dependencies"]}
    for name in ("torch", "torchvision"):
        assert ">=" in deps[name] and "<" not in deps[name] and "==" not in deps[name], deps[name]


def test_every_extra_the_code_names_is_declared_and_the_test_extra_pulls_them_all():
    extras = project()["optional-dependencies"]
    assert set(EXTRA_MODULES) <= set(extras)
    test_extra = " ".join(extras["test"])
    for extra in ("train", "serve", "shards", "onnx", "caption", "tensorboard"):
        assert extra in test_extra.split("[", 1)[1].split("]", 1)[0].split(","), extra


def test_package_data_holds_the_configs_and_the_web_page():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["clipsnail"]
    assert "configs/*.yaml" in data and "serve/static/*" in data


# ----------------------------------------------------------------------------------------------- missing extras


def test_serve_without_the_web_stack_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if FastAPI were not installed
    line = run_error(capsys, ["serve", "--index", str(tmp_path / "no_index")])
    assert line == "clipsnail: error: the web app needs the serve extra: pip install 'clipsnail[serve]'"


def test_training_without_its_extra_stops_before_anything_is_written(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    line = run_error(capsys, ["clip", "train", "--captions", "c.csv", "--images", "imgs", "--out", str(out)])
    assert line == "clipsnail: error: training needs the train extra: pip install 'clipsnail[train]'"
    assert not out.exists()


def test_the_shapes_demo_and_classify_eval_name_the_train_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert run_error(capsys, ["demo", "--out", str(tmp_path / "demo")]).endswith("pip install 'clipsnail[train]'")
    assert not (tmp_path / "demo").exists()
    line = run_error(capsys, ["classify", "eval", "--model", str(tmp_path / "run")])
    assert line.endswith("needs the train extra: pip install 'clipsnail[train]'")


def test_importing_the_web_app_without_its_extra_raises_an_import_error_naming_it(monkeypatch):
    # Every module of the web stack as missing, and the app's modules not yet imported (an earlier test may have
    # imported them: a cached submodule would be found without its missing parent).
    for name in ["fastapi", "uvicorn", "h11", *sys.modules]:
        if name.split(".")[0] in ("fastapi", "uvicorn", "h11", "starlette"):
            monkeypatch.setitem(sys.modules, name, None)
        elif name == "clipsnail.serve" or name.startswith("clipsnail.serve."):
            monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install 'clipsnail\[serve\]'") as caught:
        import clipsnail.serve  # noqa: F401
    assert isinstance(caught.value, MissingExtra)


def test_shard_patterns_without_their_extra(monkeypatch, tmp_path):
    from clipsnail.data.shards import expand_urls

    monkeypatch.setitem(sys.modules, "braceexpand", None)
    with pytest.raises(MissingExtra, match=r"the shards extra: pip install 'clipsnail\[shards\]'"):
        expand_urls(str(tmp_path / "{000000..000001}.tar"))


def test_require_extra_passes_when_installed():
    require_extra("train", "training")  # the test extra installs every extra


# ----------------------------------------------------------------------------------------------- packaged configs


def test_a_config_is_found_by_name_with_or_without_yaml():
    assert packaged_configs() == sorted(p.stem for p in SOURCE_CONFIGS.glob("*.yaml"))
    assert "lit_small" in packaged_configs()
    for name in ("lit_small", "lit_small.yaml", "configs/lit_small.yaml"):
        assert find_config(name) == PACKAGED_CONFIGS / "lit_small.yaml"
    assert find_config(None) is None


def test_a_file_in_the_working_directory_wins_over_a_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lit_small.yaml").write_text("train:\n  batch_size: 4\n")
    assert find_config("lit_small.yaml") == Path("lit_small.yaml")
    assert find_config("lit_small") == PACKAGED_CONFIGS / "lit_small.yaml"  # no file of that exact name here
    assert find_config(str(tmp_path / "lit_small.yaml")) == tmp_path / "lit_small.yaml"


def test_an_unknown_config_lists_the_packaged_ones(capsys, tmp_path):
    with pytest.raises(ConfigError, match="lit_small"):
        find_config("no_such_config")
    with pytest.raises(ConfigError):
        find_config(str(tmp_path / "lit_small.yaml"))  # a path in a folder is a path, never a packaged name
    line = run_error(capsys, ["clip", "train", "--config", "no_such_config", "--captions", "c.csv", "--images", "i",
                              "--out", str(tmp_path / "run")])
    assert "no_such_config: config file not found" in line and "pretrained_small" in line


def test_the_photo_demo_fine_tunes_a_packaged_config():
    from clipsnail.apps.demo import FROM_PHOTO_MODEL, PRETRAINED_PRESET

    for path in (*FROM_PHOTO_MODEL, PRETRAINED_PRESET):
        assert path.is_file() and path.parent == PACKAGED_CONFIGS


# ----------------------------------------------------------------------------------------------- the wheel


@pytest.mark.slow
def test_the_wheel_holds_the_configs_the_web_page_and_the_templates(tmp_path):
    """Built from a copy of the project (the checkout's build/ and egg-info stay as they are); read, not installed."""
    import shutil

    source = tmp_path / "project"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("clipsnail-*.whl")
    with zipfile.ZipFile(wheel) as z:
        listed = set(z.namelist())
        metadata = z.read(next(n for n in listed if n.endswith(".dist-info/METADATA"))).decode()
    configs = {n.removeprefix("clipsnail/configs/") for n in listed if n.startswith("clipsnail/configs/")}
    assert configs == {p.name for p in SOURCE_CONFIGS.glob("*.yaml")} and len(configs) >= 5
    static = {p.name for p in (ROOT / "src" / "clipsnail" / "serve" / "static").iterdir()}
    assert static and {f"clipsnail/serve/static/{n}" for n in static} <= listed
    assert "clipsnail/inference/templates.txt" in listed
    required = [ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    plain = [r for r in required if "extra ==" not in r]
    assert not names(plain) & {"fastapi", "uvicorn", "matplotlib", "scikit-learn", "webdataset"}, plain
    assert any(r.startswith("fastapi") and 'extra == "serve"' in r for r in required)
