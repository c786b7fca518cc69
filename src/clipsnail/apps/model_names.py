"""Pretrained CLIPs by name: `resolve_run("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")` -> a run directory.

Wherever a CLIP run directory is taken (`clipsnail.load`, `--model`, `--init`, `finetune.init`, `--clip`, ...) a
name `SCHEME:NAME` of a scheme in `SCHEMES` is taken too. `resolve_run` returns an existing path as it is (so a
folder really called `hf-hub:x` still wins), and turns a name into a run directory cached under
`$CLIPSNAIL_HOME/runs/SCHEME/SAFE_NAME/` (`CLIPSNAIL_HOME` defaults to ~/.cache/clipsnail), made once and reused.

`conse:IMAGE+TEXT` (e.g. `conse:efficientnet-lite0+all-minilm-l6-v2`) is the zero-shot ConSE CLIP that
`convert_conse` builds from installed packages, cached in `runs/conse/NAME/VERSION/`, where VERSION changes with the
converter's settings and the packages' versions. The packaged models' names are case-folded (every spelling shares
one run); TEXT may be a local Hugging Face model folder, named in the cache by its absolute real path, and VERSION
then changes with its files too (their names, sizes and modification times), so that a folder whose model was
replaced, or the same words naming another folder from another directory, is converted anew.
A name that cannot be converted leaves nothing in the cache. The scheme itself is case-insensitive (CONSE:...).

`hf-hub:ORG/NAME` is open_clip's name for a Hugging Face model repository holding `open_clip_config.json` and
`open_clip_model.safetensors`. Both files are fetched with `huggingface_hub` into its own cache (so HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what they mean to every other Hugging Face library) and converted once
by `convert_open_clip` into `runs/hf-hub/ORG--NAME/COMMIT/`. The commit is the one the Hugging Face cache's
`refs/main` names when it holds open_clip_config.json (then nothing is asked of the network, and a converted run of
that commit is used as it is), else the hub's main branch. A newer revision is taken by downloading it again
(`hf download ORG/NAME ...` moves refs/main; the next use converts that commit). Offline or with the hub unreachable,
a name whose files are not in that cache but which was converted before uses the newest such run; one never seen is
a one-line error saying what to download and where to put it.

A cached run is written into a private temp folder and renamed into place, under a lock: concurrent first uses
(the processes of a torchrun) convert once, and a kill -9 leaves at most a temp folder that the next use deletes,
never half a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import _CACHED_NO_EXIST, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from clipsnail.apps.convert import (
    CONSE_DEFAULT,
    CONSE_DEFINITIONS,
    CONSE_LEMMAS,
    CONSE_TEMPERATURE,
    CONSE_TEMPLATE,
    CONSE_TOP_K,
    convert_conse,
    convert_open_clip,
)
from clipsnail.core.display import printable
from clipsnail.core.errors import DataError
from clipsnail.core.pretrained import PACKAGED, PACKAGED_TEXT
from clipsnail.core.safeio import clean_stale, recover_dir, temp_sibling, writer_lock

log = logging.getLogger(__name__)

DEFAULT_HOME = "~/.cache/clipsnail"


class Scheme(NamedTuple):
    """How the names of one scheme become run directories.

    write(name, out): writes the run directory of `name` (the text after "SCHEME:") into the folder `out`, which does
    not exist yet. With `revision`, it gets "NAME@REVISION" instead, the exact version to write.
    revision: None when a name always means the same run (it is cached once); else revision(name) says which
    version the name stands for now (a commit), and each version is cached in its own sub-folder. When it, or
    write, raises `Unreachable` (offline, and not downloaded before), the newest version converted before is used."""

    write: Callable[[str, Path], None]
    revision: Callable[[str], str] | None = None
    example: str = ""  # a name of this scheme, for the error of a name left empty
    # canonical(name): the one spelling under which a name is cached (the spellings of one model share its run),
    # raising DataError for a name that can be told bad before anything is written into the cache.
    canonical: Callable[[str], str] | None = None


class Unreachable(DataError):
    """The source of a name cannot be reached now (offline, no connection) and has nothing cached for it."""


def clipsnail_home() -> Path:
    return Path(os.environ.get("CLIPSNAIL_HOME") or DEFAULT_HOME).expanduser()


def scheme_of(spec: str | Path) -> str | None:
    """The scheme of `spec` when it is a model name (a known `SCHEME:` prefix, and no such file or folder), else
    None: `spec` is a path (or something else, such as `timm:NAME`, for the caller to read)."""
    text = str(spec)
    scheme, sep, _ = text.partition(":")
    if not sep or scheme.lower() not in SCHEMES or os.path.lexists(text):
        return None
    return scheme.lower()


def resolve_run(spec: str | Path) -> Path:
    """The run directory `spec` stands for: `spec` itself when it is a path, or the cached run of a model name
    (module docstring), made on first use."""
    scheme = scheme_of(spec)
    if scheme is None:
        return Path(spec)
    entry = SCHEMES[scheme]
    name = str(spec)[len(scheme) + 1:]
    if not name.strip():
        raise DataError(f"{spec}: no name after '{scheme}:' (e.g. {entry.example})")
    if entry.canonical is not None:
        name = entry.canonical(name)
    folder = clipsnail_home() / "runs" / scheme / safe_name(name)
    try:
        return _resolve_in(folder, entry, name, spec)
    except BaseException:
        _remove_empty(folder)  # a name that failed leaves nothing behind
        raise


def _remove_empty(folder: Path) -> None:
    """`folder`, and the scheme's and runs/ folders above it, removed while they are empty."""
    for path in (folder, folder.parent, folder.parent.parent):
        try:
            path.rmdir()
        except FileNotFoundError:  # never made (a name refused before its folder was)
            continue
        except OSError:  # not empty: other runs, or a lock another process holds
            return


def _resolve_in(folder: Path, entry: Scheme, name: str, spec: str | Path) -> Path:
    """The run of `name` in its cache folder `folder` (`resolve_run`)."""
    if entry.revision is None:
        return _cached(folder, lambda out: entry.write(name, out), spec)
    try:
        revision = entry.revision(name)
        return _cached(folder / safe_name(revision), lambda out: entry.write(f"{name}@{revision}", out), spec)
    except Unreachable:
        earlier = sorted((p.parent for p in folder.glob("*/config.json")), key=lambda p: p.stat().st_mtime_ns)
        if not earlier:
            raise
        log.warning("%s: cannot be fetched now; using the run converted earlier, %s", spec, earlier[-1])
        return earlier[-1]


def resolve_name(spec: str) -> str:
    """A config value that may name a CLIP run (`finetune.init`, `clip`, `encoder`): a model name becomes the path
    of its cached run, and a run folder its absolute path, so that the config saved with the new run names a
    folder that is found from anywhere; anything else (timm:NAME, a packaged name, "") is returned unchanged."""
    if spec and scheme_of(spec):
        return str(resolve_run(spec))
    if spec and (Path(spec).expanduser() / "config.json").is_file():
        return str(Path(spec).expanduser().resolve())
    return spec


def safe_name(name: str) -> str:
    """A folder name for `name`: ORG/NAME -> ORG--NAME (as the Hugging Face cache names its folders); names with
    other characters, or whose mapping could collide with another name's, get a hash of the name appended."""
    safe = name.replace("/", "--")
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", safe) and "--" not in name:
        return safe
    readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", safe).lstrip("._-")[:60]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _is_run(path: Path) -> bool:
    return (path / "config.json").is_file()


def _cached(out: Path, write: Callable[[Path], None], spec: str | Path) -> Path:
    """`out`, written by `write` first when it is not a run yet (module docstring: once, whole, under a lock)."""
    if _is_run(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{spec}: cannot create the cache folder {out.parent} ({e.strerror or e}); set "
                        "CLIPSNAIL_HOME to a writable folder") from None
    with writer_lock(out, "cached model", wait=True):
        recover_dir(out)
        if _is_run(out):  # another process made it while this one waited for the lock
            return out
        clean_stale(out)  # the temp folders of converters that were killed
        stage = temp_sibling(out, "tmp")
        stage.mkdir()
        try:
            log.info("%s: converting once into %s", spec, out)
            write(stage / "run")
            try:
                os.rename(stage / "run", out)  # atomic; also replaces an empty folder
            except OSError:
                if not _is_run(out):
                    raise DataError(f"{out}: exists and is not a run directory; delete it to convert {spec} "
                                    "again") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------- hf-hub

HF_HUB_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
# A repository id as the hub allows it: two parts of letters, digits, '-', '_' and '.', no '--' or '..'.
_HF_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def _repo_id(name: str) -> str:
    parts = name.split("/")
    if len(parts) != 2 or not all(_HF_PART.fullmatch(p) for p in parts) or "--" in name or ".." in name:
        raise DataError(f"hf-hub:{name}: not a Hugging Face model name; expected hf-hub:ORG/NAME, e.g. "
                        "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    return name


def _not_an_open_clip_repo(repo: str, filename: str) -> DataError:
    return DataError(f"hf-hub:{repo}: the repository has no {filename}; only open_clip models "
                     f"({' + '.join(HF_HUB_FILES)}) load by name")


@contextlib.contextmanager
def _quiet_hub_log() -> Iterator[None]:
    """huggingface_hub logs each retry of an unreachable hub twice (its handler and the root's): the error below
    says it in one line. Its download progress bars are not log records and still show."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(repo: str, filename: str, revision: str | None = None) -> Path:
    """One file of `repo` from the Hugging Face cache, downloaded into it when missing; one-line errors."""
    cache = constants.HF_HUB_CACHE
    if not constants.HF_HUB_OFFLINE:
        log.info("hf-hub:%s: fetching %s from the Hugging Face hub into %s", repo, filename, cache)
    try:
        with _quiet_hub_log():
            return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base: offline or unreachable, not cached
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "the hub cannot be reached (without a network, HF_HUB_OFFLINE=1 skips the retries)")
        raise Unreachable(
            f"hf-hub:{repo}: not in the Hugging Face cache ({cache}) and {why}; on a machine that is online run "
            f"`hf download {repo} {' '.join(HF_HUB_FILES)}` (`huggingface-cli download` in older huggingface_hub) "
            f"and copy the folder {repo_folder_name(repo_id=repo, repo_type='model')} of its Hugging Face cache "
            f"into {cache}, or download those two files into one folder and run `clipsnail convert --from "
            f"open_clip:FOLDER/{HF_HUB_FILES[1]} --out RUN`, then use RUN"
        ) from None
    except RepositoryNotFoundError:  # also private and gated repositories without a token that may read them
        raise DataError(f"hf-hub:{repo}: no such model on the Hugging Face hub, or a private or gated one (log in "
                        "with `hf auth login`, or set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise _not_an_open_clip_repo(repo, filename) from None
    except HfHubHTTPError as e:  # before OSError, which it also is
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"hf-hub:{repo}: {filename}: the hub answered: {first}") from None
    except ValueError as e:  # huggingface_hub's checks of what its cache holds (a revision naming no snapshot path)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"hf-hub:{repo}: {filename}: the Hugging Face cache {cache} is damaged "
                        f"({first[:200]})") from None
    except OSError as e:
        raise DataError(f"hf-hub:{repo}: cannot write {filename} into the Hugging Face cache {cache} "
                        f"({e.strerror or e})") from None


def _file(repo: str, filename: str, revision: str | None = None) -> Path:
    """One file of `repo` at `revision` (default: the commit the cache's refs/main names, or else the hub's main):
    from the Hugging Face cache without asking the hub when it is there, else downloaded into it."""
    try:
        cached = try_to_load_from_cache(repo, filename, revision=revision)
    except (OSError, ValueError) as e:  # a damaged cache folder (a file where a folder belongs...)
        raise DataError(f"hf-hub:{repo}: {filename}: cannot read the Hugging Face cache {constants.HF_HUB_CACHE} "
                        f"({e})") from None
    if isinstance(cached, str):
        return Path(cached)
    if cached is _CACHED_NO_EXIST and constants.HF_HUB_OFFLINE:  # the hub said so when last asked
        raise _not_an_open_clip_repo(repo, filename)
    return _download(repo, filename, revision)


def _check_ref(repo: str) -> None:
    """The cache's refs/main, when there is one, names a commit: huggingface_hub joins what it holds to a path
    (a "../.." there fails deep inside it, or reads outside the repository's folder)."""
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / "main"
    if not ref.is_file():  # none yet, or something huggingface_hub skips too (a FIFO would block a read)
        return
    try:
        with open(ref, "rb") as f:
            text = f.read(200)
    except OSError as e:
        raise DataError(f"hf-hub:{repo}: cannot read {ref} ({e.strerror or e})") from None
    if not re.fullmatch(rb"[0-9a-f]{40}", text):
        raise DataError(f"hf-hub:{repo}: {ref} holds {printable(text.decode('utf-8', 'replace')[:60])!r}, not a "
                        f"commit (40 hexadecimal digits); delete it and download the model again (`hf download "
                        f"{repo} {' '.join(HF_HUB_FILES)}`)")


def _hf_hub_revision(name: str) -> str:
    """The commit of the small config file: the run of that commit may be cached already, with no need of the
    weights (a snapshot folder is named by its commit)."""
    repo = _repo_id(name)
    _check_ref(repo)
    return _file(repo, HF_HUB_FILES[0]).parent.name


def _write_hf_hub(pinned: str, out: Path) -> None:
    name, _, commit = pinned.rpartition("@")
    repo = _repo_id(name)
    _, weights = (_file(repo, f, commit) for f in HF_HUB_FILES)  # both of one commit, side by side
    try:
        convert_open_clip(weights, out)  # reads open_clip_config.json beside the weights
    except DataError as e:
        raise DataError(f"hf-hub:{repo}: {e}") from None


CONSE_EXAMPLE = f"conse:{CONSE_DEFAULT}"
# A local text model folder has a config, a tokenizer and weights: far more files than that is not one (and walking
# a whole disk to fingerprint it would take minutes).
_MAX_FOLDER_FILES = 10_000


def _conse_name(name: str) -> str:
    """The one spelling under which a ConSE name is cached: the packaged models' names case-folded (as they are
    looked up), a local text model folder as its absolute real path (the same words name another folder from
    another directory, and the run's config must name one found from anywhere). A name that cannot be converted is
    refused here, before anything is written into the cache."""
    image, plus, text = name.partition("+")
    expected = (f"expected conse:IMAGE+TEXT with IMAGE one of {', '.join(PACKAGED)} and TEXT a sentence encoder "
                f"({', '.join(PACKAGED_TEXT)}, or a Hugging Face model folder), e.g. {CONSE_EXAMPLE}")
    if not plus or not text.strip() or image.strip().lower() not in PACKAGED:
        raise DataError(f"conse:{name}: {expected}")
    if text.strip().lower() in PACKAGED_TEXT:
        return f"{image.strip().lower()}+{text.strip().lower()}"
    folder = Path(text).expanduser()
    if not (folder / "config.json").is_file():
        raise DataError(f"conse:{name}: {text} is not a packaged sentence encoder, nor a Hugging Face model folder "
                        f"(no config.json in it); {expected}")
    return f"{image.strip().lower()}+{folder.resolve()}"


def _folder_fingerprint(folder: Path) -> str:
    """What identifies the contents of a local model folder without reading its weights: each file's path in it,
    size and modification time, and where a symbolic link (a Hugging Face cache snapshot's files) leads. Replacing
    or editing a file changes them, so the cached run of the old contents is not used for the new. Hidden files
    (.git) are left out: the model loaders read none of them."""
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, file)
            try:
                st = os.stat(path)
                entries.append((os.path.relpath(path, folder), st.st_size, st.st_mtime_ns, os.path.realpath(path)))
            except OSError:  # a broken link: the conversion says what it lacks
                entries.append((os.path.relpath(path, folder), None))
            if len(entries) > _MAX_FOLDER_FILES:
                raise DataError(f"{folder}: holds over {_MAX_FOLDER_FILES} files; not a text model folder")
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def _conse_revision(name: str) -> str:
    """A ConSE run is made here, from installed packages and local folders: its version is that of the converter's
    settings, of the packages holding the weights and of a local folder's files (`_folder_fingerprint`), so that an
    upgrade or a changed folder makes a new run instead of reusing a stale one. `name` is `_conse_name`'s."""
    versions = []
    for part in name.split("+", 1):
        known = PACKAGED.get(part)
        distribution = known.distribution if known else PACKAGED_TEXT.get(part, (None,))[0]
        if distribution is None:
            versions.append(_folder_fingerprint(Path(part)))
            continue
        try:
            versions.append(importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            versions.append("missing")  # the conversion itself says which package to install
    settings = repr((CONSE_TEMPLATE, CONSE_LEMMAS, CONSE_DEFINITIONS, CONSE_TOP_K, CONSE_TEMPERATURE, versions))
    return hashlib.sha1(settings.encode()).hexdigest()[:12]


def _write_conse(pinned: str, out: Path) -> None:
    convert_conse(pinned.rpartition("@")[0], out)


# Adding a scheme is one line: "NAME": Scheme(write) with write(name, out) writing a run directory into out.
SCHEMES: dict[str, Scheme] = {
    "hf-hub": Scheme(_write_hf_hub, revision=_hf_hub_revision, example="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    # conse:IMAGE+TEXT, e.g. conse:efficientnet-lite0+all-minilm-l6-v2: a zero-shot CLIP of the packaged models
    "conse": Scheme(_write_conse, revision=_conse_revision, example=CONSE_EXAMPLE, canonical=_conse_name),
}
