"""WebDataset tar shards of a caption corpus: writing them (`write_shards`, `clipsnail data shards`) and streaming
CLIP training samples out of them (`ShardStream`), for corpora too large to index image by image.

The format is the one open_clip, img2dataset and webdataset read. One group of tar members per image, sharing a
key ("000000042"): `KEY.jpg` (the original bytes; .png, .webp... keep their extension), `KEY.txt` (the first
caption: what open_clip's loader reads) and `KEY.json` ({"captions": [all of them], "image": original name}).
`sizes.json` next to the shards maps each shard's file name to its number of samples.

The stream's data order is a pure function of (seed, epoch, rank, world size, number of DataLoader workers), so
distributed training sees disjoint data and a resumed run sees exactly the samples (and augmentations) it would
have seen: see `ShardStream`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.extras import require_extra
from clipsnail.core.rng import seeded
from clipsnail.core.safeio import MAX_IMAGE_FILE_BYTES, atomic_path, atomic_write_json, read_regular
from clipsnail.data.caption_corpora import captions_by_image, load_split
from clipsnail.data.images import IMAGE_EXTENSIONS, load_image

log = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # tar member extensions that hold the image
KEY_DIGITS = 9
SHARD_DIGITS = 6
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")  # webdataset's key/extension split: "dir/key.ext.ext"


def stable_hash(*parts: object) -> int:
    """A 63-bit integer from `parts` (ints and strings), the same on every machine and run, unlike hash()."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def caption_text_id(caption: str) -> int:
    """Identical caption texts (up to case and spacing) get one id, as in CaptionImageDataset: the CLIP loss may
    treat the same caption of two images as a positive pair."""
    return stable_hash("caption", " ".join(caption.lower().split()))


# ----------------------------------------------------------------------------------------------- writing


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same input gives byte-identical shards on every machine.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Tar shards of at most `shard_size` samples; `open_shard(name)` gives the path to write shard `name` to."""

    def __init__(self, prefix: str, shard_size: int, open_shard: Callable[[str], Path]):
        self.prefix, self.shard_size, self._open_shard = prefix, shard_size, open_shard
        self.sizes: dict[str, int] = {}
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._name = ""

    def add(self, members: dict[str, bytes]) -> str:
        if self._tar is None or self.sizes[self._name] == self.shard_size:
            self.close()
            self._name = f"{self.prefix}{len(self.sizes):0{SHARD_DIGITS}d}.tar"
            self.sizes[self._name] = 0
            self._tar = tarfile.open(self._open_shard(self._name), "w", format=tarfile.USTAR_FORMAT)
        key = f"{self.samples:0{KEY_DIGITS}d}"
        for ext, data in members.items():
            _add_member(self._tar, f"{key}.{ext}", data)
        self.sizes[self._name] += 1
        self.samples += 1
        return key

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _image_ext(name: str, data: bytes) -> str:
    ext = Path(name).suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return ext
    with Image.open(io.BytesIO(data)) as im:  # no usable extension: name the bytes by their format
        return {"jpeg": "jpg"}.get((im.format or "jpg").lower(), (im.format or "jpg").lower())


def brace_pattern(out_dir: str | Path, prefix: str, n_shards: int) -> str:
    """The brace pattern naming shards 0..n_shards-1, e.g. "DIR/{000000..000003}.tar"."""
    first, last = f"{0:0{SHARD_DIGITS}d}", f"{n_shards - 1:0{SHARD_DIGITS}d}"
    return f"{out_dir}/{prefix}{{{first}..{last}}}.tar"


def write_shards(
    captions: str | Path,
    images: str | Path,
    out_dir: str | Path,
    split: str = "train",
    shard_size: int = 1000,
    format: str = "auto",
    split_file: str | Path | None = None,
    seed: int | None = 0,
    strict: bool = False,
    prefix: str = "",
    progress: bool = False,
    follow_links: bool = False,
) -> dict:
    """Write the images of one split of a caption corpus as tar shards in `out_dir`; returns a summary.

    Images go in a seeded shuffled order (`seed`; None keeps sorted name order), so any run of shards holds a
    mix of the corpus; the same input gives byte-identical shards. A missing image file is an error naming the
    caption line; a corrupt one is skipped with a warning and counted (an error when `strict`). Shards of an
    earlier write with the same prefix and a higher number are removed.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    images_dir, out_dir = Path(images), Path(out_dir)
    names, texts, caption_to_image = load_split(captions, images_dir, split, format, split_file, strict=strict,
                                                follow_links=follow_links)
    captions_of = captions_by_image(texts, caption_to_image, len(names))
    order = sorted(range(len(names)), key=lambda i: names[i])
    if seed is not None:
        random.Random(seed).shuffle(order)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Only shards listed in sizes.json were written here before: those may be replaced or removed, nothing else.
    ours = re.compile(re.escape(prefix) + rf"\d{{{SHARD_DIGITS}}}\.tar")
    recorded = _read_sizes(out_dir)
    foreign = sorted(p.name for p in out_dir.iterdir() if ours.fullmatch(p.name) and p.name not in recorded)
    if foreign:
        raise DataError(f"{out_dir / foreign[0]}: named like a shard but not listed in {out_dir / 'sizes.json'}, so "
                        f"not written by `clipsnail data shards`; refusing to overwrite it (choose another --out or "
                        f"--prefix)")
    skipped = written_captions = 0
    # Each shard is written under a temp name (safeio.atomic_path) and renamed over its own name only once all are
    # complete: a failed or killed write leaves the folder as it was.
    with contextlib.ExitStack() as temps:
        writer = _ShardWriter(prefix, shard_size, lambda name: temps.enter_context(atomic_path(out_dir / name)))
        try:
            for i in tqdm(order, desc="writing shards", unit="image", disable=not progress):
                path = images_dir / names[i]
                try:
                    data = read_regular(path, MAX_IMAGE_FILE_BYTES)
                    load_image(path, data)  # a corrupt image is caught now, not in every epoch of training
                    ext = _image_ext(names[i], data)
                except OSError as e:
                    raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
                except DataError as e:
                    if strict:
                        raise
                    log.warning("skipping %s", e)
                    skipped += 1
                    continue
                meta = {"captions": captions_of[i], "image": names[i]}
                writer.add({
                    ext: data,
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                    "txt": captions_of[i][0].encode("utf-8"),
                })
                written_captions += len(captions_of[i])
            if not writer.sizes:
                raise DataError(f"{captions}: no readable images in split {split!r} ({skipped} corrupt)")
        finally:
            writer.close()
    if skipped:
        log.warning("%d corrupt images skipped", skipped)

    for name in sorted(recorded):
        if ours.fullmatch(name) and name not in writer.sizes and (out_dir / name).is_file():
            log.warning("%s: removed, a shard of an earlier write", out_dir / name)
            (out_dir / name).unlink()
    sizes_path = out_dir / "sizes.json"
    sizes = _read_sizes(out_dir)
    sizes = {k: v for k, v in sizes.items() if not ours.fullmatch(k) and (out_dir / k).is_file()}
    atomic_write_json(sizes_path, {**sizes, **writer.sizes}, sort_keys=True, ensure_ascii=False)

    summary = {
        "out": str(out_dir),
        "split": split,
        "shards": len(writer.sizes),
        "samples": writer.samples,
        "captions": written_captions,
        "skipped": skipped,
        "pattern": brace_pattern(out_dir, prefix, len(writer.sizes)),
    }
    info = {**summary, "source_captions": str(captions), "source_images": str(images_dir), "format": format,
            "split_file": str(split_file) if split_file else None, "seed": seed, "shard_size": shard_size,
            "sizes": writer.sizes}
    atomic_write_json(out_dir / f"_{prefix}info.json", info, sort_keys=True, ensure_ascii=False)
    log.info("wrote %d images (%d captions) to %d shards in %s", writer.samples, written_captions,
             len(writer.sizes), out_dir)
    return summary


# ----------------------------------------------------------------------------------------------- reading


def expand_urls(pattern: str) -> list[str]:
    """Shard paths of a pattern: brace expansion ("data/{000000..000099}.tar"), lists joined by "::", and folders
    (every *.tar in it, sorted). A missing shard is an error naming it."""
    require_extra("shards", "reading WebDataset shards")
    from braceexpand import braceexpand

    urls: list[str] = []
    for part in (p.strip() for p in pattern.split("::")):
        if not part:
            continue
        if Path(part).is_dir():
            found = sorted(str(p) for p in Path(part).iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
            if not found:
                raise DataError(f"{part}: no .tar shards in this folder")
            urls += found
        else:
            urls += list(braceexpand(part))
    if not urls:
        raise DataError(f"no shards in {pattern!r}")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(urls)} shards of {pattern!r} not found: "
                        f"{', '.join(missing[:3])}{more}")
    return urls


def _read_sizes(folder: str | Path) -> dict[str, int]:
    path = Path(folder) / "sizes.json"
    if not path.is_file():
        return {}
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: ignored, not readable JSON (%s)", path, e)
        return {}
    if not isinstance(sizes, dict):
        return {}
    return {k: v for k, v in sizes.items() if isinstance(v, int)}


def _split_member(name: str) -> tuple[str, str] | None:
    match = _MEMBER.match(name)
    return (match[1], match[2].lower()) if match else None


def _read_shard(url: str, strict: bool) -> Iterator[dict]:
    """Raw samples of one shard in tar order: {"__key__", "__url__", ext: bytes, ...}, members grouped by key.

    A shard that breaks off (truncated, corrupt) is an error when `strict`, else a warning and its readable start.
    """
    sample: dict | None = None
    try:
        with tarfile.open(url, mode="r|*") as tar:  # streaming: one pass, no seeks
            for member in tar:
                parts = _split_member(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                data = tar.extractfile(member).read()
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        if strict:
            raise DataError(f"{url}: cannot read shard: {e}") from e
        log.warning("%s: cannot read shard (%s); skipped the rest of it", url, e)
    if sample is not None:
        yield sample


def count_samples(urls: Iterable[str]) -> int:
    """Samples in the shards: from the sizes.json next to them when it lists them all, else by reading them."""
    urls = list(urls)
    sizes: dict[str, dict[str, int]] = {}
    total = 0
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in sizes:
            sizes[folder] = _read_sizes(folder or ".")
        if name not in sizes[folder]:
            break
        total += sizes[folder][name]
    else:
        return total
    log.info("counting the samples of %d shards by reading them (no sizes.json lists them all)", len(urls))
    total = 0
    for url in tqdm(urls, desc="counting samples", unit="shard", disable=len(urls) < 10):
        total += sum(1 for _ in _read_shard(url, strict=False))
    return total


def _buffer_shuffle(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Every sample once, shuffled within a window of `size` samples (webdataset's shuffle), drained at the end."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = rng.randrange(size)
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _image_id(key: str) -> int:
    name = key.rsplit("/", 1)[-1]
    # Keys written by write_shards (and img2dataset) are the image's position in the shards.
    return int(name) if name.isdigit() and len(name) <= 18 else stable_hash("image", key)


class ShardStream(IterableDataset):
    """CLIP training samples streamed from tar shards: an infinite stream per (rank, DataLoader worker).

    Epoch e deals the shards, in a permutation seeded by (seed, e), to the ranks (`shards[rank::world_size]`)
    and then to the rank's DataLoader workers (`[worker::num_workers]`). A worker reads its shards in passes,
    forever: pass 0 in the dealt order, later passes in an order seeded by (seed, e, pass); within a pass, raw
    samples are shuffled in a seeded buffer of `shuffle_buffer` samples. Since no worker ends, the DataLoader
    takes batches from the workers strictly in turn (batch i from worker i % num_workers), so the batches are a
    pure function of (seed, epoch, rank, world_size, num_workers); the engine takes as many as an epoch needs.

    Resuming at batch k (`set_epoch(..., skip_batches=k)`), each worker drops the raw samples of its share of
    the first k batches without decoding them (and, as the DataLoader's round starts again at worker 0, worker w
    of the resumed loader plays worker (w + k) % num_workers of the unbroken run). Augmentation and the choice of
    one of the image's captions are seeded per sample from (seed, epoch, rank, worker, position in the worker's
    stream), as CaptionImageDataset seeds them per (index, seed), so a resumed run sees the same augmentations.

    Items are CaptionImageDataset's: {"image", "caption", "image_id", "caption_id"}, or None for a corrupt
    sample (the task's collate drops and counts it) unless `strict`. Call `set_epoch` before each
    `iter(DataLoader)`; DataLoader workers must not be persistent, or they keep the epoch they started with.
    """

    def __init__(self, pattern: str, transform: Callable, *, seed: int = 0, shuffle_buffer: int = 1000,
                 strict: bool = False):
        super().__init__()
        self.pattern, self.transform, self.seed = pattern, transform, seed
        self.shuffle_buffer, self.strict = shuffle_buffer, strict
        self.urls = expand_urls(pattern)
        self.num_samples = count_samples(self.urls)
        if self.num_samples == 0:
            raise DataError(f"{pattern}: the shards hold no samples")
        self.skipped = 0
        self.epoch, self.rank, self.world_size, self.batch_size, self.skip_batches = 0, 0, 1, 1, 0
        log.info("%d samples in %d shards (%s)", self.num_samples, len(self.urls), pattern)

    def set_epoch(self, epoch: int, *, rank: int = 0, world_size: int = 1, batch_size: int,
                  skip_batches: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or skip_batches < 0:
            raise ValueError(f"need batch_size >= 1 and skip_batches >= 0, got {batch_size}, {skip_batches}")
        if len(self.urls) < world_size:
            raise DataError(f"{self.pattern}: {len(self.urls)} shards cannot feed {world_size} ranks; "
                            "write more, smaller shards (--shard-size)")
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.batch_size, self.skip_batches = batch_size, skip_batches

    def worker_shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards of this epoch's rank and the given DataLoader worker, in pass-0 order."""
        order = list(self.urls)
        random.Random(stable_hash("shards", self.seed, self.epoch)).shuffle(order)
        shards = order[self.rank::self.world_size][worker::num_workers]
        if not shards:
            raise DataError(f"{self.pattern}: {len(self.urls)} shards cannot feed {self.world_size} ranks x "
                            f"{num_workers} DataLoader workers; write more, smaller shards or use fewer workers")
        return shards

    def _raw_stream(self, worker: int, num_workers: int) -> Iterator[dict]:
        shards = self.worker_shards(worker, num_workers)
        rng = random.Random(stable_hash("buffer", self.seed, self.epoch, self.rank, worker))
        for n_pass in itertools.count():
            order = list(shards)
            if n_pass:
                random.Random(stable_hash("pass", self.seed, self.epoch, n_pass, self.rank, worker)).shuffle(order)
            samples = (s for url in order for s in _read_shard(url, self.strict))
            n = 0
            for sample in _buffer_shuffle(samples, self.shuffle_buffer, rng):
                n += 1
                yield sample
            if n == 0:  # no samples at all would loop forever
                raise DataError(f"no readable samples in shards {', '.join(order[:3])}")

    def __iter__(self) -> Iterator[dict | None]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batch i of the epoch comes from worker i % num_workers. A resumed DataLoader starts its round at worker 0
        # with batch skip_batches, so its worker w' plays the part of worker (w' + skip_batches) % num_workers,
        # and drops that worker's share of the first skip_batches batches.
        worker = (loader_worker + self.skip_batches) % num_workers
        skip = len(range(worker, self.skip_batches, num_workers)) * self.batch_size
        stream = itertools.islice(enumerate(self._raw_stream(worker, num_workers)), skip, None)
        for position, raw in stream:
            yield self.decode(raw, stable_hash("sample", self.seed, self.epoch, self.rank, worker, position))

    def _corrupt(self, message: str) -> None:
        if self.strict:
            raise DataError(message)
        log.warning("skipping %s", message)

    def decode(self, raw: dict, sample_seed: int) -> dict | None:
        """One training item from a raw sample; None when it is corrupt, which the task's collate drops and counts
        in `skipped` (as for every dataset: each skipped sample counted once)."""
        where = f"{raw['__url__']}:{raw['__key__']}"
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return self._corrupt(f"{where}: no image ({', '.join(IMAGE_EXTS)}) in the sample")
        captions = _captions(raw)
        if not captions:
            return self._corrupt(f"{where}: no caption (.txt or .json 'captions') in the sample")
        with seeded(sample_seed):
            caption = random.choice(captions)
            try:
                image = self.transform(load_image(f"{where}.{ext}", raw[ext]))
            except DataError as e:
                return self._corrupt(str(e))
        return {
            "image": image,
            "caption": caption,
            "image_id": _image_id(raw["__key__"]),
            "caption_id": caption_text_id(caption),
        }


def _captions(raw: dict) -> list[str]:
    """All captions of a raw sample: the .json "captions" written by write_shards, else the .txt (open_clip)."""
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        found = meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(found, list):
            captions = [c.strip() for c in found if isinstance(c, str) and c.strip()]
            if captions:
                return captions
    try:
        text = raw.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError:
        return []
    return [text] if text else []



def read_shard_captions(pattern: str, limit: int) -> list[str]:
    """Up to `limit` captions from the first shards, in order: enough text to train a tokenizer on a corpus
    too large to read whole."""
    captions: list[str] = []
    for url in expand_urls(pattern):
        for raw in _read_shard(url, strict=False):
            captions.extend(_captions(raw))
            if len(captions) >= limit:
                return captions[:limit]
    return captions
