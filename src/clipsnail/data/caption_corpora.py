"""Readers for image-caption corpora and image-level train/val/test splits.

Every reader returns flat `CaptionRecord`s, one per caption, so several captions of one image are several
records with the same `image`. Splits are made by image, never by caption, so no image leaks between splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.safeio import read_regular, regular_file_kind, resolve_under
from clipsnail.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

# A caption file is read whole; the largest public corpora (COCO, CC3M captions) are well under this.
MAX_CAPTION_FILE_BYTES = 2 * 2**30
FORMATS = ("flickr8k_csv", "flickr8k_token", "flickr30k", "coco", "csv", "tsv")
SPLITS = ("train", "val", "test", "all")
IMAGE_COLUMNS = ("image", "filename", "file_name", "image_name")
CAPTION_COLUMNS = ("caption", "text", "comment", "sentence")
_FORMAT_HELP = (
    "flickr8k_csv (header image,caption), flickr8k_token (name.jpg#N<TAB>caption), "
    "flickr30k (image_name| comment_number| comment), coco (captions JSON), "
    "csv/tsv (image and caption columns)"
)
_TOKEN_LINE = re.compile(r"(?P<image>[^\t]+)#\d+\t(?P<caption>.*)")


@dataclass
class CaptionDataConfig:
    """The caption corpus a task trains on: the `data` section of every caption-based task's config."""

    captions: str = ""  # caption file (any of FORMATS)
    images: str = ""  # folder the caption file's image names are relative to
    format: str = "auto"
    split_file: str = ""  # Karpathy-style split JSON; default: 80/10/10 by a hash of the image name
    # What trains: "train" (that split; the others held out for validation and testing) or "all" (every captioned
    # photo; no validation during training)
    train_split: str = "train"
    strict: bool = False  # a corrupt image is an error instead of a skipped sample
    follow_links: bool = False  # image names may be symbolic links (only to files under `images`)
    max_eval_images: int = 500  # validation during training uses at most this many images


def load_caption_split(data: CaptionDataConfig, split: str) -> tuple[list[str], list[str], list[int]]:
    """`load_split` of the corpus a config names: (image names, captions, caption_to_image) of one split.
    "train" is what trains (`train_split`: the train split, saying how many photos are held out, or all of them);
    while every photo trains, no other split exists (DataError)."""
    if not data.captions or not data.images:
        raise DataError("no caption data: give --captions FILE and --images DIR")
    if data.train_split not in ("train", "all"):
        raise ConfigError(f"data.train_split must be train or all, got {data.train_split!r}")
    if split != "train" and data.train_split == "all":
        raise DataError(f"every captioned photo trains (split all): none is held out for {split}")
    split = data.train_split if split == "train" else split
    every_record = read_captions(data.captions, data.format)
    loaded = load_split(data.captions, data.images, split, data.format, data.split_file,
                        follow_links=data.follow_links, every_record=every_record)
    if split == "train":
        every = {r.image for r in every_record}
        if len(every) > len(loaded[0]):
            rule = f"the {data.split_file} split" if data.split_file else "80/10/10 by a hash of each name"
            log.info("training on %d of the %d captioned photos: %d held out for validation and testing (%s); "
                     "--split all trains on every one", len(loaded[0]), len(every), len(every) - len(loaded[0]),
                     rule)
    return loaded


@dataclass(frozen=True)
class CaptionRecord:
    image: str  # as written in the caption file (COCO: file_name)
    caption: str  # stripped
    source: str  # "path:line" or "path:annotation id N", for error messages


class _Collector:
    """Validates and collects records; a bad line raises, or with strict=False is skipped and counted."""

    def __init__(self, path: Path, strict: bool):
        self.path, self.strict = path, strict
        self.records: list[CaptionRecord] = []
        self.skipped: list[str] = []

    def bad(self, where: object, problem: str) -> None:
        message = f"{self.path}:{where}: {problem}"
        if self.strict:
            raise DataError(message)
        self.skipped.append(message)

    def add(self, image: object, caption: object, where: object) -> None:
        if not isinstance(image, str) or not image.strip():
            return self.bad(where, "empty image name")
        if not isinstance(caption, str):
            return self.bad(where, f"caption for image {image.strip()!r} is not text")
        if not caption.strip():
            return self.bad(where, f"empty caption for image {image.strip()!r}")
        self.records.append(CaptionRecord(image.strip(), caption.strip(), f"{self.path}:{where}"))


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        data = read_regular(path, MAX_CAPTION_FILE_BYTES)
    except DataError as e:
        raise DataError(f"{e} (a caption file)") from None
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet programs put in front of CSV exports.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                        f"save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _detect(text: str, path: Path) -> str:
    body = text.lstrip()
    if body[:1] in ("{", "["):
        return "coco"
    first = body.split("\n", 1)[0].rstrip("\r")
    if _TOKEN_LINE.fullmatch(first):
        return "flickr8k_token"
    if "|" in first and {"image_name", "comment"} <= {c.strip().lower() for c in first.split("|")}:
        return "flickr30k"
    if "\t" in first:
        return "tsv"
    if [c.strip().lower() for c in next(csv.reader([first]))] == ["image", "caption"]:
        return "flickr8k_csv"
    if "," in first:
        return "csv"
    raise DataError(f"{path}: unknown caption format (first line {first[:60]!r}); accepted: {_FORMAT_HELP}")


def detect_format(path: str | Path) -> str:
    """The caption format of `path`, one of FORMATS, judged from its content."""
    path = Path(path)
    return _detect(_read_text(path), path)


def _find_column(header: list[str], names: Sequence[str], what: str, path: Path) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DataError(
        f"{path}: no {what} column (expected one of {', '.join(names)}); found columns: {', '.join(header)}"
    )


def _swallowed_record(row: list[str], delimiter: str) -> str | None:
    """A line inside a multi-line field that reads like a record of its own (an image name, then the delimiter):
    the sign of a quote that was opened and never closed, which makes the reader merge the lines that follow."""
    for field in row:
        for line in field.split("\n")[1:]:
            head = line.split(delimiter, 1)
            if len(head) == 2 and head[0].strip().strip('"').lower().endswith(IMAGE_EXTENSIONS):
                return line
    return None


def _read_delimited(text: str, out: _Collector, delimiter: str, quoting: int = csv.QUOTE_MINIMAL) -> None:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    try:
        header = next(row for row in reader if any(f.strip() for f in row))
        header = [h.strip().lower() for h in header]
        image_col = _find_column(header, IMAGE_COLUMNS, "image", out.path)
        caption_col = _find_column(header, CAPTION_COLUMNS, "caption", out.path)
        start = reader.line_num + 1
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not any(f.strip() for f in row):
                continue
            if reader.line_num > lineno and quoting != csv.QUOTE_NONE:
                swallowed = _swallowed_record(row, delimiter)
                if swallowed is not None:  # the whole rest of the file may be one caption: never skip this
                    raise DataError(f"{out.path}:{lineno}: a quote opened on this line is not closed: lines "
                                    f"{lineno}-{reader.line_num} were read as one caption, including "
                                    f"{swallowed[:60]!r}")
            if len(row) > len(header) and caption_col == len(header) - 1:
                # An unquoted delimiter inside the last column is part of the caption, not a new field.
                row = row[: len(header) - 1] + [delimiter.join(row[len(header) - 1 :])]
            if len(row) != len(header):
                out.bad(lineno, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
                continue
            out.add(row[image_col], row[caption_col], lineno)
    except csv.Error as e:
        raise DataError(f"{out.path}:{reader.line_num}: malformed line: {e}") from e
    except StopIteration:
        raise DataError(f"{out.path}: empty file") from None


def _read_token(text: str, out: _Collector) -> None:
    # split("\n"), not splitlines(): captions may hold unicode line separators that are not line ends here.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        match = _TOKEN_LINE.fullmatch(line)
        if match is None:
            out.bad(lineno, "malformed line, expected 'name.jpg#N<TAB>caption'")
        else:
            out.add(match["image"], match["caption"], lineno)


def _read_coco(text: str, out: _Collector) -> None:
    path = out.path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DataError(f"{path}: not COCO captions JSON (expected an object with 'images', 'annotations')")
    names = {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{path}: images[{k}] lacks 'id' or 'file_name'")
        if image["id"] in names and names[image["id"]] != image["file_name"]:
            # Which file the captions of that id describe cannot be told: each would get the other's captions.
            raise DataError(f"{path}: images[{k}]: image id {image['id']!r} is listed twice, for "
                            f"{names[image['id']]!r} and {image['file_name']!r}")
        names[image["id"]] = image["file_name"]
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{path}: annotations[{k}] lacks 'image_id' or 'caption'")
        where = f"annotation id {ann['id']}" if "id" in ann else f"annotations[{k}]"
        if ann["image_id"] not in names:
            out.bad(where, f"image_id {ann['image_id']!r} is not in 'images'")
        else:
            out.add(names[ann["image_id"]], ann["caption"], where)


def read_captions(path: str | Path, format: str = "auto", *, strict: bool = True) -> list[CaptionRecord]:
    """All captions of a caption file, in file order. `format` is one of FORMATS or "auto".

    A malformed line or empty caption raises DataError naming file and line; with strict=False such lines
    are skipped and counted in one warning (the real Flickr30k results.csv has one caption-less row).
    """
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DataError(f"{path}: unknown caption format {format!r}; accepted: auto, {', '.join(FORMATS)}")
    text = _read_text(path)
    format = _detect(text, path) if format == "auto" else format
    out = _Collector(path, strict)
    if format == "coco":
        _read_coco(text, out)
    elif format == "flickr8k_token":
        _read_token(text, out)
    elif format == "flickr30k":
        # Flickr30k comments contain bare double quotes, so quote characters must not be special.
        _read_delimited(text, out, "|", csv.QUOTE_NONE)
    else:
        _read_delimited(text, out, "\t" if format == "tsv" else ",")
    if out.skipped:
        log.warning("%s: skipped %d bad caption lines; first: %s", path, len(out.skipped), out.skipped[0])
    if not out.records:
        raise DataError(f"{path}: no captions found")
    log.debug("%s: %d captions (%s)", path, len(out.records), format)
    return out.records


def hash_split(image: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split of one image name: sha1 of the name as a number in [0, 1) against cumulative fractions.

    A hash, not a seeded shuffle, so an image keeps its split when images are added, removed or reordered,
    and on every machine.
    """
    u = int.from_bytes(hashlib.sha1(image.encode("utf-8")).digest()[:8], "big") / 2**64
    train, val = fractions[0], fractions[0] + fractions[1]
    return "train" if u < train else "val" if u < val else "test"


def _read_split_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a split file (expected {{'images': [{{'filename', 'split'}}, ...]}})")
    table = {}
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DataError(f"{path}: images[{k}] has no 'filename'")
        split = {"restval": "train"}.get(entry.get("split"), entry.get("split"))
        if split not in ("train", "val", "test"):
            raise DataError(
                f"{path}: images[{k}] has split {entry.get('split')!r}; valid: train, val, test, restval"
            )
        table[entry["filename"]] = split
        if entry.get("filepath"):
            table[f"{entry['filepath']}/{entry['filename']}"] = split
    return table


def split_records(
    records: Iterable[CaptionRecord],
    split: str = "all",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split_file: str | Path | None = None,
) -> list[CaptionRecord]:
    """The records whose image is in `split` ("train", "val", "test" or "all"), in their original order.

    Without `split_file` the split comes from `hash_split`; with a Karpathy-style split JSON it comes from
    there (restval counts as train), matching the image name or its base name, and images the file does not
    list are dropped with a warning.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be 3 numbers >= 0 summing to 1, got {tuple(fractions)}")
    records = list(records)
    if split == "all":
        return records
    if split_file is None:
        return [r for r in records if hash_split(r.image, fractions) == split]
    table = _read_split_file(split_file)
    kept, missing = [], set()
    for r in records:
        image_split = table.get(r.image) or table.get(PurePosixPath(r.image).name)
        if image_split is None:
            missing.add(r.image)
        elif image_split == split:
            kept.append(r)
    if missing:
        log.warning("%s: %d images of the captions are not listed; dropped them", split_file, len(missing))
    return kept


def load_split(captions: str | Path, images: str | Path, split: str, format: str = "auto",
               split_file: str | Path | None = None, strict: bool = True, follow_links: bool = False,
               every_record: Sequence[CaptionRecord] | None = None) -> tuple[list[str], list[str], list[int]]:
    """`group_by_image` of one split of a caption file, after checking that the image folder and every image file
    of the split exist (errors name the caption line). `strict=False` skips malformed caption lines; every_record:
    the file's records when they were read already.

    Image names must stay inside the image folder: an absolute name, `..` leading out, a symbolic link (unless
    `follow_links`, and then only to a file under the folder) or something that is not a regular file (a FIFO,
    a device) is an error naming the caption line."""
    images_dir = Path(images)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found")
    if every_record is None:
        every_record = read_captions(captions, format, strict=strict)
    records = split_records(every_record, split, split_file=split_file or None)
    if not records:
        raise DataError(f"{captions}: no captions in split {split!r}")
    checked: set[str] = set()
    for r in records:
        if r.image in checked:
            continue
        checked.add(r.image)
        try:
            path = resolve_under(images_dir, r.image, follow_links)
        except DataError as e:
            raise DataError(f"{r.source}: image {e}") from None
        problem = regular_file_kind(path)
        if problem == "missing":
            raise DataError(f"{r.source}: image {r.image!r} not found in {images_dir}")
        if problem is not None:
            raise DataError(f"{r.source}: image {r.image!r} in {images_dir} is {problem}, not an image file")
    return group_by_image(records)


def captions_by_image(captions: Sequence[str], caption_to_image: Sequence[int], num_images: int) -> list[list[str]]:
    """The captions of each of the first `num_images` images (the inverse of `group_by_image`'s caption_to_image);
    captions of later images are left out."""
    by_image: list[list[str]] = [[] for _ in range(num_images)]
    for text, image in zip(captions, caption_to_image):
        if image < num_images:
            by_image[image].append(text)
    return by_image


def group_by_image(records: Iterable[CaptionRecord]) -> tuple[list[str], list[str], list[int]]:
    """(unique images in first-seen order, captions in record order, index of each caption's image)."""
    index: dict[str, int] = {}
    captions, caption_to_image = [], []
    for r in records:
        caption_to_image.append(index.setdefault(r.image, len(index)))
        captions.append(r.caption)
    return list(index), captions, caption_to_image
