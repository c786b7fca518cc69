"""What a photo's file says about it besides its pixels: when it was taken, with what camera, where, its size.

Read from the EXIF block (Pillow's `getexif`: the base IFD, the Exif IFD and the GPS IFD), plus a perceptual hash
of the pixels (`perceptual_hash`, decoded at a small size: JPEG's draft mode reads an eighth of the pixels), by
which near copies are found. The date taken is DateTimeOriginal with OffsetTimeOriginal when the camera wrote one
(EXIF 2.31), else without an offset, else the file's modification time; `taken_source` says which. EXIF is
written by cameras, phones, editors and anyone at all, so every value is checked: a date that is not a calendar
date, a coordinate off the globe, a zero denominator, a string where a number belongs is taken as absent, never as
an error, and never stops the photo from being indexed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from clipsnail.core.safeio import open_regular
from clipsnail.data.images import check_heif

# EXIF tag numbers (EXIF 2.32, CIPA DC-008)
MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
DATETIME_ORIGINAL, OFFSET_TIME_ORIGINAL = 0x9003, 0x9011
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4

EXIF_DATE = re.compile(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
EXIF_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")
MAX_TEXT = 64  # camera names are short; longer text in those tags is noise, cut here


@dataclass(frozen=True)
class PhotoFacts:
    """The facts of one photo file. `taken`: local wall-clock time "YYYY-MM-DDTHH:MM:SS" (what the camera's clock
    said), `taken_offset`: its UTC offset "+02:00" when known; `taken_source`: "exif" (with an offset),
    "exif_local" (without one) or "file" (the modification time, in UTC). GPS in decimal degrees (south and west
    negative). `width`/`height` as stored, before `orientation` (EXIF 1-8; 1 is upright) turns them."""

    taken: str | None = None
    taken_offset: str | None = None
    taken_source: str | None = None
    make: str | None = None
    model: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    width: int | None = None
    height: int | None = None
    orientation: int | None = None
    phash: str | None = None  # `perceptual_hash`, 16 hex digits


def read_photo_facts(path: str | Path, root: str | Path | None = None, follow_links: bool = False) -> PhotoFacts:
    """The facts of the photo at `path` (opened as `open_regular` opens it: a regular file, under `root`). A file
    Pillow cannot open still gets its file time; other facts are then absent."""
    check_heif(path)
    fd = open_regular(path, root, follow_links)
    with os.fdopen(fd, "rb") as f:
        mtime = os.fstat(f.fileno()).st_mtime
        try:
            image = Image.open(f)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return PhotoFacts(**file_time(mtime))
        with image:  # the hash decodes it at a reduced size (`perceptual_hash`)
            return decoded_photo_facts(image, image.size, image, mtime)


def decoded_photo_facts(opened: Image.Image, full_size: tuple[int, int], stored: Image.Image,
                        mtime: float) -> PhotoFacts:
    """The facts of an opened photo: its EXIF, its full size and the perceptual hash of `stored`, its pixels as
    stored. `read_photo_facts` passes the opened file itself (the hash decodes it at a reduced size); indexing passes
    the decode made for the model (`load_image`'s `inspect`), so that each photo is decoded once. The two hashes
    differ only by rounding: both are of the stored orientation, at an eighth or more of the size, brought to
    32x32."""
    try:
        return dataclasses.replace(facts_from_exif(opened.getexif(), full_size, mtime), phash=perceptual_hash(stored))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return PhotoFacts(**file_time(mtime))


DCT_SIZE, HASH_SIZE = 32, 8
# The orthonormal DCT-II matrix: row u holds cos(pi (2x + 1) u / 2N), scaled
_DCT = np.sqrt(2 / DCT_SIZE) * np.cos(np.pi * np.outer(np.arange(DCT_SIZE), 2 * np.arange(DCT_SIZE) + 1)
                                      / (2 * DCT_SIZE))
_DCT[0] /= np.sqrt(2)


def perceptual_hash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash (pHash) of an image, as 16 hex digits: the grey image at 32x32, its 2-D DCT,
    and one bit per coefficient of the lowest 8x8 frequencies (the constant term left out, as 0): above their
    median or not. Recompressing, resizing or slightly cropping a photo changes few bits; another photo, about
    half. Compared by Hamming distance (`clipsnail.inference.duplicates`)."""
    image.draft("L", (DCT_SIZE * 2, DCT_SIZE * 2))  # JPEG: decode at a reduced size
    grey = np.asarray(image.convert("L").resize((DCT_SIZE, DCT_SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:HASH_SIZE, :HASH_SIZE].flatten()
    bits = low > np.median(low[1:])
    if np.ptp(low[1:]) <= 1e-9 * max(1.0, abs(low[0])):  # a flat image: no pattern, not rounding noise
        bits[:] = False
    bits[0] = False
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def facts_from_exif(exif: Image.Exif, size: tuple[int, int] | None, mtime: float) -> PhotoFacts:
    try:
        exif_ifd, gps_ifd = exif.get_ifd(ExifTags.IFD.Exif), exif.get_ifd(ExifTags.IFD.GPSInfo)
    except Exception:  # a damaged IFD pointer: Pillow raises whatever its parser met
        exif_ifd, gps_ifd = {}, {}
    taken = exif_date(exif_ifd.get(DATETIME_ORIGINAL), exif_ifd.get(OFFSET_TIME_ORIGINAL))
    orientation = exif.get(ORIENTATION)
    width, height = size if size else (None, None)
    return PhotoFacts(
        **(taken or file_time(mtime)), make=text(exif.get(MAKE)), model=text(exif.get(MODEL)),
        latitude=gps_coordinate(gps_ifd.get(GPS_LATITUDE), gps_ifd.get(GPS_LATITUDE_REF), 90, "NS"),
        longitude=gps_coordinate(gps_ifd.get(GPS_LONGITUDE), gps_ifd.get(GPS_LONGITUDE_REF), 180, "EW"),
        width=width if isinstance(width, int) and width > 0 else None,
        height=height if isinstance(height, int) and height > 0 else None,
        orientation=orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else None)


def exif_date(value, offset) -> dict | None:
    """DateTimeOriginal "YYYY:MM:DD HH:MM:SS" (+ OffsetTimeOriginal "+HH:MM") -> the `taken*` fields, or None
    when it is not a real date and time (cameras with an unset clock write "0000:00:00 00:00:00")."""
    match = EXIF_DATE.fullmatch(text(value) or "")
    if not match:
        return None
    try:
        moment = _dt.datetime(*(int(g) for g in match.groups()))
    except ValueError:
        return None
    offset_match = EXIF_OFFSET.fullmatch(text(offset) or "")
    valid_offset = offset_match and int(offset_match[2]) <= 14 and int(offset_match[3]) < 60
    return {"taken": moment.isoformat(), "taken_offset": offset_match[0] if valid_offset else None,
            "taken_source": "exif" if valid_offset else "exif_local"}


def file_time(mtime: float) -> dict:
    """The file's modification time as the date taken, in UTC (what else it was is not known)."""
    try:
        moment = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).replace(microsecond=0, tzinfo=None)
    except (OverflowError, OSError, ValueError):
        return {}
    return {"taken": moment.isoformat(), "taken_offset": "+00:00", "taken_source": "file"}


def gps_coordinate(dms, ref, limit: float, hemispheres: str) -> float | None:
    """EXIF degrees, minutes, seconds (three rationals) and "N"/"S" or "E"/"W" -> signed decimal degrees within
    [-limit, limit], or None."""
    if not isinstance(dms, tuple) or len(dms) != 3:
        return None
    try:
        degrees, minutes, seconds = (float(part) for part in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = degrees + minutes / 60 + seconds / 3600
    sign = text(ref)
    if not all(math.isfinite(v) and v >= 0 for v in (degrees, minutes, seconds)) or value > limit:
        return None
    if sign not in tuple(hemispheres):
        return None
    return round(-value if sign == hemispheres[1] else value, 7)


def text(value) -> str | None:
    """An EXIF ASCII value as text: bytes decoded, NULs and surrounding space dropped, at most MAX_TEXT
    characters; None when empty or not text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(ch for ch in value.replace("\x00", "") if ch.isprintable()).strip()
    return value[:MAX_TEXT] or None
