"""Finding and decoding image files: plain folders, class-subfolder layouts, one image at a time."""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from clipsnail.errors import DataError
from clipsnail.safeio import MAX_IMAGE_FILE_BYTES, FileRefused, is_under, read_regular, regular_file_kind

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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


def list_images(root: str | Path, recursive: bool = True, follow_links: bool = False) -> list[Path]:
    """Image files under `root` (by extension; hidden files and folders skipped), sorted.

    Only regular files are listed: FIFOs, devices and sockets named like images are skipped with a warning (reading
    one would block or never end). Symbolic links (to files or folders) are skipped unless `follow_links`, and even
    then only those leading to a place under `root`, so nothing outside the folder the user named is ever read."""
    root = Path(root)
    _require_dir(root)
    real_root = os.path.realpath(root)
    found: list[Path] = []
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
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows a link
                if not is_dir and not _is_image_name(entry.name):
                    continue
                if entry.is_symlink():
                    if not follow_links:
                        refused.append(f"{path} (a symbolic link; --follow-links follows links inside the folder)")
                        continue
                    if not is_under(os.path.realpath(path), real_root):
                        refused.append(f"{path} (a symbolic link leading outside {root})")
                        continue
                if is_dir:
                    if recursive:
                        (linked_folders if entry.is_symlink() else folders).append(path)
                    continue
                problem = regular_file_kind(path)
            except OSError as e:
                problem = e.strerror or str(e)
            if problem is None:
                found.append(path)
            elif problem != "missing":  # a dangling link was reported above, or the file just went away
                refused.append(f"{path} ({problem})")
    if refused:
        log.warning("%s: %d entries skipped: %s%s", root, len(refused), "; ".join(refused[:3]),
                    " ..." if len(refused) > 3 else "")
    if not found:
        raise _no_images(root)
    return sorted(found)


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


def _to_rgb(im: Image.Image) -> Image.Image:
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


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """The image at `path` (or in `data`, read from `path`, e.g. a tar shard), fully decoded, upright (EXIF
    orientation applied), RGB."""
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
                im.load()
                ImageOps.exif_transpose(im, in_place=True)
                return _to_rgb(im)
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, EOFError, struct.error...)
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image, or an unsupported format"
        elif isinstance(e, OSError) and e.strerror:
            reason = e.strerror
        else:
            reason = str(e) or type(e).__name__
        raise DataError(f"{path}: cannot read image: {reason}") from e
