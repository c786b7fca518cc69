"""Decoding images that come from outside (uploads) or from the index (thumbnails), defensively.

Only common raster formats are opened (PIL also knows EPS, which runs Ghostscript, and many rarer decoders that
an upload has no business reaching). The pixel count is checked from the header before anything is decoded, so a
small file that declares enormous dimensions (a decompression bomb) is refused without allocating its pixels.
The limit is below PIL's own (Image.MAX_IMAGE_PIXELS, 89 M), which therefore never needs changing.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


class BadImage(ValueError):
    """Not an image we open, or a damaged one (HTTP 415/400)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class TooManyPixels(BadImage):
    """Dimensions over the pixel limit (HTTP 413), found from the header alone."""

    def __init__(self, message: str):
        super().__init__(message, 413)


def _open_checked(fp, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(fp, formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise BadImage(f"not an image in a supported format ({', '.join(FORMATS)})", 415) from None
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


def _load_rgb(image: Image.Image) -> Image.Image:
    try:
        image.load()  # first frame of an animation
        return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as e:
        raise TooManyPixels(str(e)) from None
    except Exception as e:
        raise BadImage(f"cannot decode the image: {e}") from None


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes from a request -> an RGB PIL image, or BadImage / TooManyPixels saying what is wrong."""
    if not data:
        raise BadImage("the upload is empty")
    image = _open_checked(io.BytesIO(data), max_pixels)
    try:
        image.verify()  # structure and checksums, before decoding
    except Exception as e:  # PIL's plugins raise a variety of types for broken files
        raise BadImage(f"damaged image: {e}") from None
    return _load_rgb(_open_checked(io.BytesIO(data), max_pixels))  # verify() leaves the image unusable


def load_file(path: Path, max_pixels: int, draft: int | None = None) -> Image.Image:
    """An image file of the index -> RGB. draft: a JPEG may be decoded at a reduced size >= draft (much faster)."""
    with open(path, "rb") as f:
        image = _open_checked(f, max_pixels)
        if draft and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        return _load_rgb(image)


def thumbnail(path: Path, size: int, max_pixels: int) -> tuple[bytes, str]:
    """An indexed image file -> (encoded thumbnail, media type), at most `size` pixels on its longer side.

    Small images (the built-in shapes are 16-64 px) are sent as they are, losslessly; the page scales them up."""
    image = load_file(path, max_pixels, draft=size)
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
