"""`clipsnail data cifar10|cifar100|mnist --out DIR`: the standard benchmarks, fetched and checked by torchvision's
download helpers (the URLs and MD5 sums of `torchvision.datasets`), written in the layout `cifar:DIR` and `mnist:DIR`
read (`clipsnail.data.classes`).

Nothing is unpickled or loaded on the way in: the archives are checked against their published MD5 sums, unpacked,
and the result is read back by this package's own safe readers to count the images. Offline, the error says which
file to fetch and how to hand it over (`from_dir`: a folder holding the downloaded files).
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from clipsnail.core.errors import DataError
from clipsnail.core.safeio import read_json_object, staged_dir

log = logging.getLogger(__name__)

MARKER = "_clipsnail_download.json"  # what this command writes beside the data: replaceable, and skipped when there


@dataclass(frozen=True)
class Download:
    """One file of a dataset: where it is published (mirrors, tried in order), its name and its MD5 sum."""
    urls: tuple[str, ...]
    filename: str
    md5: str


@dataclass(frozen=True)
class Dataset:
    kind: str  # the data spec prefix that reads it: cifar or mnist
    files: tuple[Download, ...]
    unpack: str | None = None  # the archive's folder whose files make the dataset (None: keep the files as they are)


def datasets() -> dict[str, Dataset]:
    """The datasets this command fetches, by name, with torchvision's URLs and checksums (imported here: torchvision
    imports torch)."""
    from torchvision.datasets import CIFAR10, CIFAR100, MNIST

    def cifar(cls) -> Dataset:
        return Dataset("cifar", (Download((cls.url,), cls.filename, cls.tgz_md5),), unpack=cls.base_folder)

    mnist = Dataset("mnist", tuple(Download(tuple(m + name for m in MNIST.mirrors), name, md5)
                                   for name, md5 in MNIST.resources))
    return {"cifar10": cifar(CIFAR10), "cifar100": cifar(CIFAR100), "mnist": mnist}


NAMES = ("cifar10", "cifar100", "mnist")  # datasets(), without importing torchvision


def is_download_dir(path: Path) -> bool:
    return read_json_object(path / MARKER) is not None


def download_dataset(name: str, out: str | Path, from_dir: str | Path | None = None,
                     table: dict[str, Dataset] | None = None) -> dict:
    """Fetch dataset `name` (one of NAMES) into `out` and return what it holds. A folder this command already filled
    with the same dataset is kept as it is; any other non-empty `out` is refused. `from_dir`: take the files from
    this folder (fetched elsewhere) instead of the network. `table`: the datasets (default `datasets()`)."""
    table = datasets() if table is None else table
    if name not in table:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(table)}")
    dataset, out = table[name], Path(out)
    done = read_json_object(out / MARKER)
    if done is not None and done.get("dataset") == name:
        log.info("%s already holds %s; nothing to fetch", out, name)
        return summary(name, dataset, out, done.get("source", ""))
    source_dir = Path(from_dir) if from_dir is not None else None
    if source_dir is not None and not source_dir.is_dir():
        raise DataError(f"{source_dir}: no such folder (--from: the folder holding the downloaded files)")
    with staged_dir(out, is_ours=is_download_dir, what=f"folder written by `clipsnail data {name}`") as tmp:
        fetched = tmp / ".fetched"
        for file in dataset.files:
            fetch(file, fetched, source_dir, f"clipsnail data {name} --out {out} --from FOLDER",
                  [f.filename for f in dataset.files])
        place(dataset, fetched, tmp)
        shutil.rmtree(fetched)
        source = str(source_dir.resolve()) if source_dir is not None else dataset.files[0].urls[0]
        result = summary(name, dataset, tmp, source)  # read back before the folder is put in place
        (tmp / MARKER).write_text(json.dumps({"dataset": name, "source": source}) + "\n", encoding="utf-8")
    return {**result, "out": str(out), "data": f"{dataset.kind}:{out}"}


def fetch(file: Download, into: Path, source_dir: Path | None, offline_command: str, needed: list[str]) -> None:
    """`file` into folder `into`, checked against its MD5 sum: copied from `source_dir`, or downloaded. The errors
    name `offline_command` (how to hand the files over) and the `needed` file names."""
    from torchvision.datasets.utils import check_integrity, download_url

    into.mkdir(parents=True, exist_ok=True)
    target = into / file.filename
    if source_dir is not None:
        given = source_dir / file.filename
        if not given.is_file():
            raise DataError(f"{given}: not there; --from needs {', '.join(needed)} (from {file.urls[0]})")
        if not check_integrity(str(given), file.md5):
            raise DataError(f"{given}: MD5 differs from the published {file.md5} (a partial or different "
                            f"download); fetch it again from {file.urls[0]}")
        shutil.copyfile(given, target)
        return
    problems = []
    for url in file.urls:
        try:
            download_url(url, str(into), file.filename, file.md5)
            return
        except (urllib.error.URLError, OSError, RuntimeError) as e:  # RuntimeError: torchvision's MD5 mismatch
            problems.append(f"{url}: {getattr(e, 'reason', None) or e}")
            target.unlink(missing_ok=True)
    raise DataError(f"cannot download {file.filename} ({'; '.join(problems)}). Offline? Fetch {', '.join(needed)} "
                    f"(from {file.urls[0].rsplit('/', 1)[0]}/; this one's MD5 is {file.md5}) on a machine that is "
                    f"online, put them in a folder and run `{offline_command}`")


def place(dataset: Dataset, fetched: Path, out: Path) -> None:
    """The dataset's files from the fetched ones into `out`: an archive's data folder unpacked (torchvision's
    extractor), or the files moved as they are (MNIST's .gz idx files, which `mnist:DIR` reads)."""
    if dataset.unpack is None:
        for file in dataset.files:
            (fetched / file.filename).rename(out / file.filename)
        return
    from torchvision.datasets.utils import extract_archive

    unpacked = fetched / "unpacked"
    for file in dataset.files:
        try:
            extract_archive(str(fetched / file.filename), str(unpacked))
        except Exception as e:  # a tar or gzip error: the file passed its MD5, so this is the disk or the library
            raise DataError(f"{file.filename}: cannot unpack: {e}") from e
    folder = unpacked / dataset.unpack
    if not folder.is_dir():
        raise DataError(f"{dataset.files[0].filename}: holds no {dataset.unpack}/ folder")
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.rename(out / entry.name)


def summary(name: str, dataset: Dataset, folder: Path, source: str) -> dict:
    """What `folder` holds, read by the data spec that trains on it: images per split and the class names."""
    from clipsnail.data.classes import read_class_data  # torch: not needed by `clipsnail data --help`

    spec = f"{dataset.kind}:{folder}"
    parts = {split: read_class_data(spec, split) for split in ("train", "test")}  # every dataset here has both
    counts = {split: len(part) for split, part in parts.items()}
    classes = parts["test"].classes
    return {"dataset": name, "out": str(folder), "data": spec, "images": counts, "classes": len(classes),
            "class_names": classes[:20], "source": source}
