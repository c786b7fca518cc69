"""Labelled image data for image classification: class-subfolder image folders, MNIST idx files and CIFAR-10/100
python batches, with deterministic train/val/test splits.

Splits never shuffle: where a data set has no split of its own, the first part (by file name within each class for
folders, by order for arrays) is train, then val, and the last `test_fraction` is test. That makes a split a pure
function of the files and the fractions, so a benchmark can state it in one line (CIFAR-10 folders: the last 100 of
each class's 1,000 files; MNIST t10k alone: the last 1,000 of 10,000 images).
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.rng import seeded
from clipsnail.data.images import IMAGE_EXTENSIONS, class_folders, list_images, load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
FORMATS = ("folder", "mnist", "cifar")

try:  # numpy >= 2 (and late 1.x) keep the array internals in numpy._core; numpy.core warns on access in 2.x
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer


@dataclass
class ClassData:
    """Labelled images, either files (`paths`, decoded on demand) or in memory (`pixels`: uint8 N×H×W or N×H×W×3).

    `source` says what was read and `split_rule` how the split was cut, for messages and benchmark reports.
    """

    classes: list[str]
    labels: np.ndarray
    source: str
    paths: list[Path] | None = None
    pixels: np.ndarray | None = None
    split: str = "all"
    split_rule: str = ""
    counts: dict[str, int] = field(init=False, repr=False)  # images per class name

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if (self.paths is None) == (self.pixels is None):
            raise ValueError("ClassData needs exactly one of paths or pixels")
        if self.paths is not None:
            self.paths = [Path(p) for p in self.paths]
        elif self.pixels.dtype != np.uint8 or self.pixels.ndim not in (3, 4) or (
                self.pixels.ndim == 4 and self.pixels.shape[-1] != 3):
            raise ValueError(f"pixels must be uint8 N×H×W or N×H×W×3, got {self.pixels.dtype} {self.pixels.shape}")
        n = len(self.paths) if self.paths is not None else len(self.pixels)
        if len(self.labels) != n:
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if len(self.labels) and not (0 <= self.labels.min() and self.labels.max() < len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")
        per_class = np.bincount(self.labels, minlength=len(self.classes))
        self.counts = {name: int(c) for name, c in zip(self.classes, per_class)}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        return self.classes

    @property
    def native_size(self) -> int | None:
        """The side of in-memory images (MNIST, CIFAR); None for files, whose sizes are only known once decoded."""
        return self.pixels.shape[1] if self.pixels is not None else None

    @property
    def channels(self) -> int:
        # Folders are decoded by load_image, which always returns RGB.
        return 1 if self.pixels is not None and self.pixels.ndim == 3 else 3

    def image(self, i: int) -> Image.Image:
        """Image `i` as PIL: RGB for files (corrupt ones raise load_image's DataError), "L" or "RGB" for arrays."""
        if self.paths is not None:
            return load_image(self.paths[i])
        return Image.fromarray(np.ascontiguousarray(self.pixels[i]))

    def subset(self, indices: Sequence[int] | np.ndarray) -> ClassData:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ClassData(
            classes=list(self.classes),
            labels=self.labels[indices],
            source=self.source,
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            pixels=self.pixels[indices] if self.pixels is not None else None,
            split=self.split,
            split_rule="; ".join(filter(None, [self.split_rule, f"subset of {len(indices)}"])),
        )


# ----------------------------------------------------------------------------------------------- splits


def _check_split(split: str, val_fraction: float, test_fraction: float) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value}: expected a number from 0 to 1")
    if val_fraction + test_fraction > 1:
        raise ConfigError(f"val_fraction={val_fraction} + test_fraction={test_fraction}: must not exceed 1")


def _part(n: int, fraction: float) -> int:
    # Half rounds up, not to even; the epsilon absorbs float noise so 1000 * 0.1 or 10 * 0.3 are exact.
    return min(n, math.floor(n * fraction + 0.5 + 1e-9))


def _order_slice(n: int, split: str, val_fraction: float, test_fraction: float) -> slice:
    """Where `split` lies in n ordered items: [train | val | test], val and test rounded, train the rest."""
    n_test = _part(n, test_fraction)
    n_val = min(_part(n, val_fraction), n - n_test)
    n_train = n - n_val - n_test
    return {
        "train": slice(0, n_train),
        "val": slice(n_train, n_train + n_val),
        "test": slice(n_train + n_val, n),
        "all": slice(0, n),
    }[split]


def _order_rule(split: str, val_fraction: float, test_fraction: float, unit: str) -> str:
    if split == "all":
        return f"all {unit}"
    where = {"train": "first", "val": "after train", "test": "last"}[split]
    fraction = {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}[split]
    return f"{where} {fraction:.4g} of {unit} (val_fraction={val_fraction}, test_fraction={test_fraction})"


def _empty_split(source: str, split: str, val_fraction: float, test_fraction: float) -> DataError:
    return DataError(f"{source}: split {split!r} is empty (val_fraction={val_fraction}, test_fraction={test_fraction})")


# ----------------------------------------------------------------------------------------------- image folders


def _explicit_split_dirs(root: Path) -> dict[str, Path]:
    """ROOT/train + ROOT/val and/or ROOT/test, each holding class folders, or {} when ROOT is not laid out so."""
    dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir() and class_folders(root / s)}
    return dirs if "train" in dirs and len(dirs) > 1 else {}


def _list_class(d: Path) -> list[Path]:
    try:
        return list_images(d)
    except DataError:
        # An empty class would shift every later label (or silently vanish from the report): the user must decide.
        raise DataError(f"{d}: class folder {d.name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})") from None


def _read_folder(root: Path, split: str, val_fraction: float, test_fraction: float) -> ClassData:
    source = f"folder:{root}"
    explicit = _explicit_split_dirs(root)
    if explicit:
        # Labels must mean the same class in every split, so classes come from all the split folders together.
        classes = sorted({d.name for s in explicit.values() for d in class_folders(s)})
        if split == "all":
            use = list(explicit)
        elif split in explicit:
            use = [split]
        else:  # val without val/, or test without test/: the other one stands in (explicit holds one of them)
            use = ["test" if split == "val" else "val"]
            log.info("%s: no %s/ folder; using %s/ as the %s split", root, split, use[0], split)
        paths: list[Path] = []
        labels: list[int] = []
        for s in use:
            for d in class_folders(explicit[s]):
                images = _list_class(d)
                paths += images
                labels += [classes.index(d.name)] * len(images)
        rule = f"folders {', '.join(f'{s}/' for s in use)}"
    else:
        class_dirs = class_folders(root)
        if not class_dirs:
            raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        classes = [d.name for d in class_dirs]
        paths, labels = [], []
        for label, d in enumerate(class_dirs):
            images = _list_class(d)
            chosen = images[_order_slice(len(images), split, val_fraction, test_fraction)]
            if not chosen and split != "train" and (val_fraction if split == "val" else test_fraction) > 0:
                log.warning("%s: only %d images; none fall in the %s split", d, len(images), split)
            paths += chosen
            labels += [label] * len(chosen)
        rule = _order_rule(split, val_fraction, test_fraction, "each class's files sorted by name")
    if not paths:
        raise _empty_split(source, split, val_fraction, test_fraction)
    return ClassData(classes=classes, labels=labels, source=source, paths=paths, split=split, split_rule=rule)


# ----------------------------------------------------------------------------------------------- arrays


def _split_arrays(
    source: str,
    train: Callable[[], tuple[np.ndarray, np.ndarray]] | None,
    test: Callable[[], tuple[np.ndarray, np.ndarray]] | None,
    split: str,
    val_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(pixels, labels, rule) of `split` from a data set's own train/test parts; parts are read only when needed.

    With both parts, val is the last val_fraction of train and test is the test part (test_fraction unused);
    with one, it is cut by order as train | val | test.
    """
    if train is not None and test is not None:
        if split == "test":
            pixels, labels = test()
            rule = "the test files"
        elif split == "all":
            (p1, l1), (p2, l2) = train(), test()
            pixels, labels, rule = np.concatenate([p1, p2]), np.concatenate([l1, l2]), "train and test files"
        else:
            pixels, labels = train()
            where = _order_slice(len(labels), split, val_fraction, 0.0)
            pixels, labels = pixels[where], labels[where]
            rule = _order_rule(split, val_fraction, 0.0, "the train files")
    else:
        pixels, labels = (train or test)()
        where = _order_slice(len(labels), split, val_fraction, test_fraction)
        pixels, labels = pixels[where], labels[where]
        only = "train" if train else "test"
        rule = _order_rule(split, val_fraction, test_fraction, f"the {only} files (the only ones present)")
    if len(labels) == 0:
        raise _empty_split(source, split, val_fraction, test_fraction)
    return np.ascontiguousarray(pixels), labels, rule


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


# ----------------------------------------------------------------------------------------------- MNIST idx


def _idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    """`{prefix}-{kind}-idxN-ubyte` (also the common `{prefix}-{kind}.idxN-ubyte`), plain preferred over .gz."""
    n = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            path = root / f"{prefix}-{kind}{sep}idx{n}-ubyte{suffix}"
            if path.is_file():
                return path
    return None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes with `ndim` dimensions (3: images, 1: labels), optionally gzipped."""
    path = Path(path)
    raw = _read_bytes(path)
    what = "images" if ndim == 3 else "labels" if ndim == 1 else f"{ndim}-d"
    expected = 0x800 + ndim
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an idx {what} header ({header} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise DataError(f"{path}: not an idx {what} file (magic number 0x{magic:08x}, expected 0x{expected:08x})")
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    size = header + math.prod(dims)
    if len(raw) != size:
        problem = "truncated" if len(raw) < size else "trailing bytes"
        raise DataError(f"{path}: {problem}: header says {'x'.join(map(str, dims))} ({size} bytes) "
                        f"but the file has {len(raw)} bytes")
    # A copy, not a view of the bytes object: the array must be writable for torch.from_numpy and friends.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_mnist_part(images_path: Path, labels_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if labels_path is None:
        raise DataError(f"{images_path}: no labels file beside it (expected "
                        f"{images_path.name.replace('images', 'labels').replace('idx3', 'idx1')})")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path}: {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} out of range 0-9")
    return images, labels


def _read_mnist(root: Path, split: str, val_fraction: float, test_fraction: float) -> ClassData:
    source = f"mnist:{root}"
    parts = {}
    for prefix, part in (("train", "train"), ("t10k", "test")):
        images = _idx_file(root, prefix, "images")
        if images is not None:
            labels = _idx_file(root, prefix, "labels")
            parts[part] = lambda i=images, l=labels: _read_mnist_part(i, l)
    if not parts:
        raise DataError(f"{root}: no MNIST images file (train-images-idx3-ubyte or t10k-images-idx3-ubyte, "
                        "optionally .gz)")
    pixels, labels, rule = _split_arrays(source, parts.get("train"), parts.get("test"), split, val_fraction,
                                         test_fraction)
    return ClassData(classes=[str(d) for d in range(10)], labels=labels, source=source, pixels=pixels, split=split,
                     split_rule=rule)


# ----------------------------------------------------------------------------------------------- CIFAR batches


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); only that use is let through.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


# Everything a CIFAR batch needs: dicts, lists, bytes, str and numbers come from pickle opcodes, not from globals;
# numpy arrays (any protocol; numpy 1.x writes numpy.core, 2.x numpy._core), their dtypes and numpy scalars.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(f"{core}.multiarray", "_reconstruct"): _reconstruct for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.multiarray", "scalar"): scalar for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): _frombuffer for core in ("numpy.core", "numpy._core")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickling runs whatever callable a file names; this one resolves only the numpy array machinery above."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refusing to unpickle {module}.{name} (a CIFAR batch holds only numpy "
                            "arrays, lists and strings; this file is not one, or was tampered with)") from None

    def persistent_load(self, pid):
        raise DataError(f"{self.path}: refusing to unpickle a persistent id (not a CIFAR batch)")


def safe_unpickle(path: str | Path):
    """A pickle that holds only plain data and numpy arrays; anything that would import other code is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a malformed pickle raises many types (UnpicklingError, EOFError, ValueError...)
        raise DataError(f"{path}: cannot unpickle: {str(e) or type(e).__name__}") from e


def _key(d: dict, key: str, path: Path):
    # encoding="bytes" keeps Python 2 str keys (the official files) as bytes; files written by Python 3 use str.
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise DataError(f"{path}: no {key!r} entry (has {', '.join(sorted(map(repr, d)))})")


def _text(s) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s)


def _read_cifar_batch(path: Path, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    data = _key(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 N×3072 array (32x32 RGB planes), found {shape}")
    try:
        labels = np.asarray(_key(batch, labels_key, path), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {labels_key!r} is not a list of integers: {e}") from e
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} {labels_key!r}")
    # Each row is the R plane, then G, then B, each 32x32 row-major: -> N×32×32×3 (HWC) for PIL.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_layout(root: Path):
    """-> (train files, test file, meta file, names key, labels key, number of classes), or None if not CIFAR."""
    batches = [p for p in root.glob("data_batch_*") if p.name[len("data_batch_"):].isdigit()]
    if batches or (root / "test_batch").is_file():
        train = sorted(batches, key=lambda p: int(p.name[len("data_batch_"):]))
        test = root / "test_batch" if (root / "test_batch").is_file() else None
        return train, test, root / "batches.meta", "label_names", "labels", 10
    if (root / "meta").is_file() and ((root / "train").is_file() or (root / "test").is_file()):
        train = [root / "train"] if (root / "train").is_file() else []
        test = root / "test" if (root / "test").is_file() else None
        return train, test, root / "meta", "fine_label_names", "fine_labels", 100
    return None


def _read_cifar(root: Path, split: str, val_fraction: float, test_fraction: float) -> ClassData:
    source = f"cifar:{root}"
    layout = _cifar_layout(root)
    if layout is None:
        raise DataError(f"{root}: no CIFAR batches (data_batch_N/test_batch for CIFAR-10, train/test + meta "
                        "for CIFAR-100)")
    train_files, test_file, meta, names_key, labels_key, n_classes = layout
    if meta.is_file():
        classes = [_text(s) for s in _key(safe_unpickle(meta), names_key, meta)]
    else:
        log.warning("%s: no %s; classes are named by number", root, meta.name)
        classes = [str(i) for i in range(n_classes)]

    def read_train():
        parts = [_read_cifar_batch(p, labels_key) for p in train_files]
        return np.concatenate([p for p, _ in parts]), np.concatenate([lab for _, lab in parts])

    def read_test():
        return _read_cifar_batch(test_file, labels_key)

    pixels, labels, rule = _split_arrays(source, read_train if train_files else None,
                                         read_test if test_file else None, split, val_fraction, test_fraction)
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if bad.size:
        raise DataError(f"{root}: label {int(bad[0])} out of range for the {len(classes)} classes"
                        f"{f' in {meta.name}' if meta.is_file() else ''}")
    return ClassData(classes=classes, labels=labels, source=source, pixels=pixels, split=split, split_rule=rule)


# ----------------------------------------------------------------------------------------------- entry point


def detect_format(root: Path) -> str:
    """The format of a directory by the files in it: mnist, cifar or (anything else) folder."""
    if any(root.glob("*-idx3-ubyte")) or any(root.glob("*-idx3-ubyte.gz")) or any(root.glob("*.idx3-ubyte*")):
        return "mnist"
    if _cifar_layout(root) is not None:
        return "cifar"
    return "folder"


def read_class_data(spec: str, split: str = "train", val_fraction: float = 0.0,
                    test_fraction: float = 0.1) -> ClassData:
    """Labelled images of one split. `spec`: folder:ROOT, mnist:DIR, cifar:DIR, or a directory (format detected).

    Data sets with their own train/test (MNIST train+t10k, CIFAR batches, ROOT/train + ROOT/val|test folders) keep
    it; otherwise the data is cut in order into train | val | test (per class for folders), see the module doc.
    """
    _check_split(split, val_fraction, test_fraction)
    kind, _, rest = str(spec).partition(":")
    if kind in FORMATS and rest:
        root = Path(rest).expanduser()
    else:
        kind, root = "", Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    kind = kind or detect_format(root)
    reader = {"folder": _read_folder, "mnist": _read_mnist, "cifar": _read_cifar}[kind]
    data = reader(root, split, val_fraction, test_fraction)
    log.info("%s: %s split, %d images, %d classes (%s)", data.source, split, len(data), len(data.classes),
             data.split_rule)
    return data


# ----------------------------------------------------------------------------------------------- dataset


class ClassImageDataset(Dataset):
    """(image, label) items of a ClassData, addressed by (index, seed) like CaptionImageDataset: the transform runs
    under `seeded(seed)`, so augmentation is a pure function of the engine's data order.

    A corrupt image yields None unless strict; `collate` drops and counts those in `skipped` (counting happens in
    the collate, as in the CLIP task, so each skipped sample is counted once).
    """

    def __init__(self, data: ClassData, transform: Callable, strict: bool = False):
        self.data, self.transform, self.strict = data, transform, strict
        self.classes = data.classes
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int] | int):
        index, seed = item if isinstance(item, tuple) else (item, item)
        with seeded(seed):
            try:
                image = self.transform(self.data.image(index))
            except DataError as e:
                if self.strict:
                    raise
                log.warning("skipping %s", e)
                return None
        return {"image": image, "label": int(self.data.labels[index])}

    def collate(self, samples: list) -> dict | None:
        """-> {"images": stacked, "labels": long tensor}, or None when every sample was unreadable."""
        kept = [s for s in samples if s is not None]
        self.skipped += len(samples) - len(kept)
        if not kept:
            return None
        return {"images": torch.stack([s["image"] for s in kept]),
                "labels": torch.tensor([s["label"] for s in kept], dtype=torch.long)}
