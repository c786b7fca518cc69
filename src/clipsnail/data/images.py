"""Finding and decoding image files: plain folders, class-subfolder layouts, one image at a time."""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipsnail.core.errors import DataError
from clipsnail.core.safeio import MAX_IMAGE_FILE_BYTES, FileRefused, file_kind, is_under, read_regular

log = logging.getLogger(__name__)

HEIF_EXTENSIONS = (".heic", ".heif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", *HEIF_EXTENSIONS)
HEIC_EXTRA = "pip install 'clipsnail[heic]'"
_heif: bool | None = None  # whether Pillow opens HEIF files (pillow-heif registered); None: not tried yet


_heif_said = False


def heif_enabled() -> bool:
    """Teach Pillow HEIC/HEIF (phone photos) through pillow-heif, once, before the first image is opened (so a HEIC
    photo named .jpg opens too); False when pillow-heif is not installed."""
    global _heif
    if _heif is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif = False
        else:
            register_heif_opener()
            _heif = True
    return _heif


def check_heif(path: str | Path) -> None:
    """DataError for a HEIC/HEIF file when Pillow cannot read them (the heic extra is missing); the first such
    file of a process also says, once, what to install."""
    global _heif_said
    if heif_enabled() or not str(path).lower().endswith(HEIF_EXTENSIONS):
        return
    if not _heif_said:
        _heif_said = True
        log.warning("HEIC/HEIF photos are skipped: reading them needs the heic extra (%s)", HEIC_EXTRA)
    raise DataError(f"{path}: a HEIC/HEIF photo, which needs the heic extra ({HEIC_EXTRA})")


def _is_image_name(name: str) -> bool:
    # Hidden files include macOS "._x.jpg" resource forks, which carry an image extension but no image.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")


def _no_images(root: Path) -> DataError:
    return DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")


def default_workers() -> int:
    """Decoding processes for index build and update: one per usable core, at most 8. Measured by
    bench/index_photos.py on 2 cores (12-Mpx JPEGs, photos/s by workers 0/1/2/3): ViT-B/32 9.4/9.4/10.2/10.5,
    ConSE 16.0/16.4/19.4/19.9, so as many workers as cores, since a worker waits on file reads and the model's
    threads leave gaps. Past 8, drafted decoding (tens of ms a photo) outruns any CPU model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def list_images(root: str | Path, recursive: bool = True, follow_links: bool = False) -> list[Path]:
    """Image files under `root` (by extension; hidden files and folders skipped), sorted.

    Only regular files are listed: FIFOs, devices and sockets named like images are skipped with a warning (reading
    one would block or never end). Symbolic links (to files or folders) are skipped unless `follow_links`, and even
    then only those leading to a place under `root`, so nothing outside the folder the user named is ever read."""
    found = sorted(Path(path) for path, _ in walk_images(root, recursive, follow_links))
    if not found:
        raise _no_images(Path(root))
    return found


def walk_images(root: str | Path, recursive: bool = True, follow_links: bool = False
                ) -> Iterator[tuple[str, os.stat_result]]:
    """(path, its stat) of each image file `list_images` lists, in no particular order, one stat call a file (an
    index update walks a whole library this way)."""
    root = Path(root)
    _require_dir(root)
    real_root = os.path.realpath(root)
    refused: list[str] = []
    seen: set[str] = set()
    # Linked folders wait until every real one is listed, so a file is named by its real path when it has one.
    folders, linked_folders = [root], []
    while folders or linked_folders:
        folder = folders.pop() if folders else linked_folders.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder already listed: no loops, no duplicates
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            refused.append(f"{folder} ({e.strerror or e})")
            continue
        for entry in entries:
            kind, why = _entry_kind(entry, root, real_root, follow_links)
            if kind == "image":
                yield entry.path, why
            elif kind == "refused":
                refused.append(f"{entry.path} ({why})")
            elif kind != "skip" and recursive:
                (linked_folders if kind == "linked folder" else folders).append(Path(entry.path))
    _warn_skipped(root, refused)


def _entry_kind(entry: os.DirEntry, root: Path, real_root: str, follow_links: bool) -> tuple[str, object]:
    """What one folder entry is to list_images: ("image" | "folder" | "linked folder" | "skip" | "refused", and
    for an image its stat, for a refused entry why)."""
    if entry.name.startswith("."):
        return "skip", None
    try:
        is_dir = entry.is_dir()  # follows a link
        if not is_dir and not _is_image_name(entry.name):
            return "skip", None
        if entry.is_symlink():
            if not follow_links:
                return "refused", "a symbolic link; --follow-links follows links inside the folder"
            if not is_under(os.path.realpath(entry.path), real_root):
                return "refused", f"a symbolic link leading outside {root}"
        if is_dir:
            return ("linked folder" if entry.is_symlink() else "folder"), None
        st = os.stat(entry.path)  # after a link: one that stays inside the root
        if stat.S_ISREG(st.st_mode):
            return "image", st
        problem = file_kind(st.st_mode)
    except FileNotFoundError:
        problem = "missing"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem == "missing":  # a dangling link was reported above, or the file just went away
        return "skip", None
    return "refused", problem


def _warn_skipped(root: Path, refused: list[str]) -> None:
    if refused:
        log.warning("%s: %d entries skipped: %s%s", root, len(refused), "; ".join(refused[:3]),
                    " ..." if len(refused) > 3 else "")


def class_folders(root: Path) -> list[Path]:
    """The class folders of an image-folder layout, sorted: hidden folders skipped, and symbolic links too (with
    a warning), since a link may lead out of the folder the user named."""
    folders = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        if d.is_symlink():
            log.warning("%s: a symbolic link; not used as a class folder (name the real folder instead)", d)
            continue
        folders.append(d)
    return folders


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """A class-subfolder layout `root/<class>/**/<image>`: (paths, labels, sorted class names).

    Class folders without images are skipped with a warning, so labels index the returned class names.
    """
    root = Path(root)
    _require_dir(root)
    class_dirs = class_folders(root)
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for d in class_dirs:
        try:
            images = list_images(d)
        except DataError:
            log.warning("%s: no images; class %r skipped", d, d.name)
            continue
        paths += images
        labels += [len(classes)] * len(images)
        classes.append(d.name)
    if not classes:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in its class folders")
    return paths, labels, classes


# EXIF orientation -> the transpose that puts the image upright (as PIL.ImageOps.exif_transpose does).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_ORIENTATION_TAG = 0x0112


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (PIL's getexif also reads an XMP one); 1 (as stored) when absent or damaged."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block: show the image as stored
        return 1


def _to_8bit(im: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits (16-bit PNG/TIFF: I;16*, I; floating point: F) as 8-bit L,
    scaled by its type's range. PIL's convert("L"/"RGB") clips these at 255 instead: every pixel brighter than
    1/256 of full scale comes out white, a silhouette. 16-bit data opened as I (32-bit) is scaled as 16-bit; other
    I and F data by its own value range (no fixed range to keep)."""
    values = np.asarray(im, dtype=np.float32)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and low >= 0 and 255 < high <= 65535):
        low, high = 0.0, 65535.0
    elif low >= 0 and high <= (1.0 if im.mode == "F" else 255.0):
        low, high = 0.0, 1.0 if im.mode == "F" else 255.0  # already 8-bit values (or 0..1 floats)
    elif not math.isfinite(low) or not math.isfinite(high) or high <= low:
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), max(float(values.max()), float(values.min()) + 1.0)
    scaled = np.clip((values - low) * (255.0 / (high - low)), 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels keep arbitrary colour values underneath; composite on white as viewers show them.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def as_pil_images(images) -> list[Image.Image]:
    """Images given as paths (read with `load_image`) or PIL images (kept), one or a list, as a list of PIL
    images: what `encode_image`-style methods accept."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [load_image(im) if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__") else im for im in images]


def decode_opened(opened: Image.Image, min_side: int | None = None,
                  inspect: Callable[[Image.Image, tuple[int, int], Image.Image], None] | None = None
                  ) -> tuple[Image.Image, int]:
    """An opened image (only its header read) -> (RGB, upright, shrunk so that its shorter side is still
    >= min_side; the number of pixels the decoder produced). min_side None: full size.

    A caller that resizes anyway (a model's preprocess, a thumbnail) needs a few hundred pixels a side, not a
    12-48 Mpx photo. A JPEG is decoded at a reduced scale by its own decoder (`draft`: 1/2, 1/4 or 1/8 of each
    side), which skips most of the work (a 4000x3000 photo: about 15 ms at 1/8 against 52 ms whole, and the resize
    after it is 15x cheaper); other formats cannot be decoded smaller and are shrunk by an integer box filter
    right after decoding, before further copies. The draft has to be set before the pixels are decoded, and the
    orientation read before conversions (which drop TIFF tags); it is applied last, to the smallest image.
    Transparent pixels are composited on white (`_to_rgb`).
    inspect(opened, its full size, the decoded RGB pixels as stored, before the orientation is applied): called
    before the pixels are turned upright, so facts of the photo (EXIF, a perceptual hash) come from this one decode."""
    orientation = _orientation(opened)
    full_size = opened.size  # before the draft, which shrinks it
    if min_side and opened.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with extra frames (depth, preview)
        opened.draft("RGB", (min_side, min_side))  # keeps both sides >= min_side; L and CMYK stay as they are
    opened.load()  # first frame of an animation
    decoded_pixels = opened.width * opened.height
    image = _to_rgb(opened)  # before shrinking: palette and 16-bit modes cannot be box-filtered
    factor = min(image.size) // min_side if min_side else 1
    if factor >= 2:
        image = image.reduce(factor)  # each output pixel the mean of a factor x factor box
    if inspect is not None:
        inspect(opened, full_size, image)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    if image is not opened:
        # PIL's image files sit in reference cycles, so their pixels would wait for the garbage collector; close()
        # frees them now.
        opened.close()
    return image, decoded_pixels


def load_image(path: str | Path, data: bytes | None = None, min_side: int | None = None,
               inspect: Callable[[Image.Image, tuple[int, int], Image.Image], None] | None = None) -> Image.Image:
    """The image at `path` (or in `data`, read from `path`, e.g. a tar shard), upright (EXIF orientation
    applied), RGB; fully decoded, or with its shorter side reduced to about `min_side` (`decode_opened`, which
    also calls `inspect`)."""
    check_heif(path)
    if data is None:
        try:
            data = read_regular(path, MAX_IMAGE_FILE_BYTES)  # never blocks on a FIFO, never reads /dev/zero forever
        except FileRefused as e:
            raise DataError(f"{path}: cannot read image: {e.reason}") from None
    source = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # A decompression bomb is a bad file in a corpus, not a warning to scroll past.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                return decode_opened(im, min_side, inspect)[0]
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, EOFError, struct.error...)
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image, or an unsupported format"
        elif isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        else:
            reason = str(e) or type(e).__name__
        raise DataError(f"{path}: cannot read image: {reason}") from e
