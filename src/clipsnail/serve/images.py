"""Decoding images that come from outside (uploads) or from the index (thumbnails), defensively.

Only common raster formats are opened (PIL also knows EPS, which runs Ghostscript, and many rarer decoders that
an upload has no business reaching). The pixel count is checked from the header before anything is decoded, so a
small file that declares enormous dimensions (a decompression bomb) is refused without allocating its pixels.
The limit is below PIL's own (Image.MAX_IMAGE_PIXELS, 89 M), which therefore never needs changing.

Memory. A query or a thumbnail needs a few hundred pixels a side, not a 36-megapixel photo (144 MB decoded, and
PIL's copies for rotation and mode conversion double or triple that). `decode` is given the shortest side the
caller needs (`min_side`): a JPEG is decoded at a reduced scale by its own decoder (`draft`: 1/2, 1/4 or 1/8 of
each side, never below `min_side`), and other formats, which cannot be decoded at a reduced size, are shrunk by an
integer box filter right after decoding, before any copy is made (`clipsnail.data.images.decode_opened`, which
index builds use too: queries and indexed photos go through the same steps, transparent pixels composited on
white in both). glibc keeps freed memory in its arenas rather than returning it, so after a large decode the heap
is trimmed (`malloc_trim`). The app also runs decodes on a small pool of threads of their own, which bounds how
many full-size images exist at once.

Files of the index are read only through `clipsnail.core.safeio.read_regular`: opened without blocking, refused unless
a regular file under the index's root, capped in size. A FIFO or a link to /dev/zero named `x.jpg` is refused at
once instead of blocking a worker forever.
"""

from __future__ import annotations

import ctypes
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from clipsnail.core.errors import DataError
from clipsnail.core.safeio import MAX_IMAGE_FILE_BYTES, read_regular
from clipsnail.data.images import decode_opened, heif_enabled

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

# A decode at least this large (about 16 MB of pixels) is followed by a heap trim; smaller ones are left to the
# allocator, since trimming walks every arena and costs about a millisecond.
TRIM_AFTER_PIXELS = 4_000_000

class BadImage(ValueError):
    """Not an image we open, or a damaged one (HTTP 415/400), or an indexed file that cannot be read (404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class TooManyPixels(BadImage):
    """Dimensions over the pixel limit (HTTP 413), found from the header alone."""

    def __init__(self, message: str):
        super().__init__(message, 413)


def _load_malloc_trim():
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_malloc_trim = _load_malloc_trim()


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc only; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def upload_formats() -> tuple[str, ...]:
    """What an upload may be: FORMATS, and HEIF (phone photos) where the heic extra is installed."""
    return FORMATS + (("HEIF",) if heif_enabled() else ())


def _open_checked(fp, max_pixels: int) -> Image.Image:
    formats = upload_formats()
    try:
        image = Image.open(fp, formats=formats)  # reads the header only
    except UnidentifiedImageError:
        raise BadImage(f"not an image in a supported format ({', '.join(formats)})", 415) from None
    except Image.DecompressionBombError as e:
        raise TooManyPixels(str(e)) from None
    except Exception as e:  # PIL's decoders raise many types on hostile input; none of them may become a 500
        raise BadImage(f"cannot read the image: {e}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage(f"the image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise TooManyPixels(f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                            f"{max_pixels:,}")
    return image


def _decode_bytes(data: bytes, max_pixels: int, min_side: int | None) -> Image.Image:
    image = _open_checked(io.BytesIO(data), max_pixels)
    try:
        image, decoded_pixels = decode_opened(image, min_side)
    except Image.DecompressionBombError as e:
        raise TooManyPixels(str(e)) from None
    except Exception as e:
        raise BadImage(f"cannot decode the image: {e}") from None
    if decoded_pixels >= TRIM_AFTER_PIXELS:
        release_memory()
    return image


def decode_upload(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Bytes from a request -> an RGB PIL image, or BadImage / TooManyPixels saying what is wrong.
    min_side: the shortest side the caller needs; a larger image is decoded or shrunk to about that (module
    docstring). None: full size."""
    if not data:
        raise BadImage("the upload is empty")
    image = _open_checked(io.BytesIO(data), max_pixels)
    try:
        image.verify()  # structure and checksums, before decoding
    except Exception as e:  # PIL's plugins raise a variety of types for broken files
        raise BadImage(f"damaged image: {e}") from None
    return _decode_bytes(data, max_pixels, min_side)  # verify() leaves the image it checked unusable


def read_indexed(path: Path, root: Path, follow_links: bool, max_bytes: int = MAX_IMAGE_FILE_BYTES) -> bytes:
    """The bytes of an indexed file, or BadImage (404) saying why not: missing, not a regular file (a FIFO, a
    device...), a link not followed or leading outside `root`, or over max_bytes. Never blocks on a FIFO."""
    try:
        return read_regular(path, max_bytes, root=root, follow_links=follow_links)
    except DataError as e:
        reason = str(e).removeprefix(f"{path}: ")  # the folder stays private; the name is in the search hit
        raise BadImage(f"the indexed file cannot be read: {reason.replace(str(root), 'the indexed folder')}",
                       404) from None
    except OSError as e:  # an IO error while reading
        raise BadImage(f"the indexed file cannot be read: {e.strerror or type(e).__name__}", 404) from None


def load_file(path: Path, root: Path, follow_links: bool, max_pixels: int,
              min_side: int | None = None) -> Image.Image:
    """An image file of the index -> RGB (see `read_indexed` and `decode_upload` for root, min_side)."""
    return _decode_bytes(read_indexed(path, root, follow_links), max_pixels, min_side)


def thumbnail(path: Path, root: Path, follow_links: bool, size: int, max_pixels: int) -> tuple[bytes, str]:
    """An indexed image file -> (encoded thumbnail, media type), at most `size` pixels on its longer side.

    Small images (the built-in shapes are 16-64 px) are sent as they are, losslessly; the page scales them up."""
    image = load_file(path, root, follow_links, max_pixels, min_side=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if image.width * image.height <= 96 * 96:
        image.save(out, format="PNG")
        return out.getvalue(), "image/png"
    image.save(out, format="JPEG", quality=85)
    return out.getvalue(), "image/jpeg"


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()

