"""The built-in captioned shapes data: drawn scenes of 1-3 coloured shapes, each with several true captions.

Small enough to train CLIP on a CPU in minutes. The generator knows every image's scene, so a caption can be
checked against an image exactly (`scene_matches`): on this data many images fit "a red circle", and the
semantic retrieval benchmark counts any of them as a hit, where image-id recall counts only one.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.core.safeio import read_json_object, staged_dir
from clipsnail.data.caption_corpora import hash_split

log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (245, 130, 20),
    "white": (240, 240, 240),
    "cyan": (30, 210, 220),
}
BACKGROUND = (0, 0, 0)  # every colour above, even blue and purple, stands out against black
SIZES = {"small": 0.11, "large": 0.2}  # radius as a fraction of the image side: areas differ about 3x
POSITIONS = ("left", "right", "top", "bottom")
RELATIONS = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}

# Drawing radius of each kind (a square's half-side) in units of the size radius: triangles and stars reach
# further than circles so that their areas stay comparable and their corners visible at 32x32.
_RADIUS = {"circle": 1.0, "square": 0.85, "triangle": 1.3, "star": 1.2}
_STAR_INNER = 0.45  # a fatter star than the regular pentagram (0.38) stays recognisable at 32x32
_SUPERSAMPLE = 4
_GAP = 0.03  # clear space between the bounding boxes of two shapes, so they never touch after downsampling
_CLEAR_POSITION = 0.12  # captions say "on the left" only when the centre is this far from the middle...
_CLEAR_RELATION = 0.2  # ...and "to the left of" only when the centres are this far apart
_COUNT_WORDS = {2: "two", 3: "three"}
_NO_COLOUR = 0.2  # share of object mentions that name no colour
_PREFIXES = ("a picture of", "an image of", "a drawing of", "a photo of")


def _unit_polygon(kind: str) -> list[tuple[float, float]]:
    """Vertices of a radius-1 triangle or star pointing up, shifted so its bounding box is centred on 0:
    the centre a viewer judges ("on the left", "above") is the box centre, not the circumcentre."""
    n, radii = (3, (1.0,)) if kind == "triangle" else (10, (1.0, _STAR_INNER))
    angles = [-math.pi / 2 + 2 * math.pi * i / n for i in range(n)]
    points = [(radii[i % len(radii)] * math.cos(a), radii[i % len(radii)] * math.sin(a))
              for i, a in enumerate(angles)]
    shift = (min(y for _, y in points) + max(y for _, y in points)) / 2
    return [(x, y - shift) for x, y in points]


_POLYGONS = {kind: _unit_polygon(kind) for kind in ("triangle", "star")}
# Half width and half height of each kind's bounding box, in units of its drawing radius.
_HALF_BOX = {"circle": (1.0, 1.0), "square": (1.0, 1.0)} | {
    kind: (max(abs(x) for x, _ in pts), max(abs(y) for _, y in pts)) for kind, pts in _POLYGONS.items()
}


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # a key of SIZES
    x: float  # centre in [0, 1] image coordinates, y pointing down
    y: float

    def __post_init__(self):
        if self.kind not in SHAPES or self.color not in COLORS or self.size not in SIZES:
            raise ValueError(f"unknown shape {self.size!r} {self.color!r} {self.kind!r}; shapes: "
                             f"{', '.join(SHAPES)}; colours: {', '.join(COLORS)}; sizes: {', '.join(SIZES)}")

    @property
    def half_box(self) -> tuple[float, float]:
        """Half width and half height of the drawn shape's bounding box, in image units."""
        r = SIZES[self.size] * _RADIUS[self.kind]
        return r * _HALF_BOX[self.kind][0], r * _HALF_BOX[self.kind][1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        return cls(d["kind"], d["color"], d["size"], float(d["x"]), float(d["y"]))


@dataclass
class Scene:
    shapes: list[Shape] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"shapes": [s.to_dict() for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([Shape.from_dict(s) for s in d["shapes"]])


# ---------------------------------------------------------------------------------------------- sampling


def _holdout_set(holdout) -> frozenset[tuple[str, str]]:
    """(colour, kind) pairs; also accepts "purple triangle" / "purple:triangle" strings for the CLI."""
    pairs = frozenset(tuple(re.split(r"[\s:/_-]+", h.strip())) if isinstance(h, str) else tuple(h)
                      for h in holdout)
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPES:
            raise ConfigError(f"bad holdout combination {pair!r}: expected (colour, shape) with colour in "
                              f"{', '.join(COLORS)} and shape in {', '.join(SHAPES)}")
    return pairs


def _place(rng: random.Random, specs: list[tuple[str, str, str]], tries: int = 50) -> list[Shape] | None:
    """Random non-overlapping positions for (kind, colour, size) specs, or None when they did not fit."""
    placed: list[Shape] = []
    for kind, color, size in sorted(specs, key=lambda s: -SIZES[s[2]] * _RADIUS[s[0]]):  # big ones first
        hw, hh = Shape(kind, color, size, 0.5, 0.5).half_box
        for _ in range(tries):
            # Rounded (inwards) so scenes.json round-trips exactly and stays short.
            x = round(rng.uniform(hw + 0.001, 1 - hw - 0.001), 3)
            y = round(rng.uniform(hh + 0.001, 1 - hh - 0.001), 3)
            if all(abs(x - p.x) >= hw + p.half_box[0] + _GAP or abs(y - p.y) >= hh + p.half_box[1] + _GAP
                   for p in placed):
                placed.append(Shape(kind, color, size, x, y))
                break
        else:
            return None
    return placed


def sample_scene(
    rng: random.Random,
    max_shapes: int = 3,
    holdout=frozenset(),
    *,
    min_shapes: int = 1,
    count_prob: float = 0.2,
    sizes: Sequence[str] = tuple(SIZES),
) -> Scene:
    """A random scene of min_shapes..max_shapes non-overlapping shapes, none of a held-out (colour, kind).

    With probability `count_prob` (when two shapes fit) the scene has 2-3 identical shapes, for captions like
    "two green triangles"; otherwise each shape has its own (colour, kind), so "a red circle" names one shape.
    """
    held = _holdout_set(holdout)
    combos = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in held]
    sizes = list(sizes)
    if not sizes or any(s not in SIZES for s in sizes):
        raise ConfigError(f"sizes must be some of {', '.join(SIZES)}, got {sizes}")
    if not combos or not 1 <= min_shapes <= max_shapes:
        raise ConfigError(f"cannot sample {min_shapes}..{max_shapes} shapes from {len(combos)} combinations")
    for _ in range(1000):
        n = min(rng.randint(min_shapes, max_shapes), len(combos))
        specs, others = [], combos
        if n >= 2 and rng.random() < count_prob:
            color, kind = rng.choice(combos)
            specs = [(kind, color, rng.choice(sizes))] * rng.randint(2, min(3, n))
            others = [c for c in combos if c != (color, kind)]
        specs += [(k, c, rng.choice(sizes)) for c, k in rng.sample(others, n - len(specs))]
        shapes = _place(rng, specs)
        if shapes is not None:
            return Scene(shapes)
    raise ConfigError(f"could not place {max_shapes} shapes without overlap; use fewer shapes")


# --------------------------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size x size RGB image, drawn at 4x and downsampled for antialiased edges."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for s in scene.shapes:
        cx, cy, r, fill = s.x * big, s.y * big, SIZES[s.size] * _RADIUS[s.kind] * big, COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx + r * px, cy + r * py) for px, py in _POLYGONS[s.kind]], fill=fill)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------------------- captioning


def _position_phrases(s: Shape) -> list[str]:
    horizontal = "left" if s.x < 0.5 - _CLEAR_POSITION else "right" if s.x > 0.5 + _CLEAR_POSITION else None
    vertical = "top" if s.y < 0.5 - _CLEAR_POSITION else "bottom" if s.y > 0.5 + _CLEAR_POSITION else None
    phrases = [f"on the {horizontal}"] if horizontal else []
    phrases += [f"at the {vertical}"] if vertical else []
    if horizontal and vertical:
        phrases.append(f"in the {vertical} {horizontal} corner")
    return phrases


def _clear_relations(a: Shape, b: Shape) -> list[str]:
    """Relations "a REL b" that are obviously true to a viewer, not just by a pixel."""
    checks = {"left_of": b.x - a.x, "right_of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}
    return [rel for rel, gap in checks.items() if gap >= _CLEAR_RELATION]


def _mention(group: Sequence[Shape], rng: random.Random, position_p: float = 0.0) -> str:
    """A noun phrase true of the shapes in `group` (identical in kind, colour and size), sometimes vaguer."""
    s, count = group[0], len(group)
    vague = rng.random()
    words = [s.size] if rng.random() < 0.5 else []
    # Colour is the easiest thing to see: captions that leave it out ("a circle above a star") are what makes a
    # model learn the outlines too, instead of settling on colour alone.
    if vague >= _NO_COLOUR:
        words.append(s.color)
    noun = "shape" if _NO_COLOUR <= vague < _NO_COLOUR + 0.06 else s.kind  # "a red shape"
    words.append(noun + ("s" if count > 1 else ""))
    article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([_COUNT_WORDS[count] if count > 1 else article, *words])
    if count == 1 and rng.random() < position_p and (phrases := _position_phrases(s)):
        text += " " + rng.choice(phrases)
    return text


def _caption(scene: Scene, groups: list[list[Shape]], rng: random.Random) -> str:
    pairs = [(a, b, rel) for a, b in itertools.permutations(scene.shapes, 2)
             if (a.kind, a.color) != (b.kind, b.color) for rel in _clear_relations(a, b)]
    style = rng.choices(("all", "one", "relation"), weights=(4, 3, 3 if pairs else 0))[0]
    if style == "relation":
        a, b, rel = rng.choice(pairs)
        text = f"{_mention([a], rng)} {RELATIONS[rel]} {_mention([b], rng)}"
    elif style == "one":  # a subset of the scene is still a true caption
        group = rng.choice(groups)
        if len(group) > 1 and rng.random() < 0.3:
            group = group[:1]
        text = _mention(group, rng, position_p=0.5)
    else:
        parts = [_mention(g, rng, position_p=0.15) for g in rng.sample(groups, len(groups))]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng.random() < 0.25:
        text = f"{rng.choice(_PREFIXES)} {text}"
    return text


def describe(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """n different captions true of the scene (repeats only when the scene allows few variants)."""
    if not scene.shapes:
        raise ValueError("cannot describe an empty scene")
    groups: dict[tuple[str, str, str], list[Shape]] = {}
    for s in scene.shapes:
        groups.setdefault((s.kind, s.color, s.size), []).append(s)
    captions: list[str] = []
    for _ in range(n):
        for _ in range(20):
            caption = _caption(scene, list(groups.values()), rng)
            if caption not in captions:
                break
        captions.append(caption)
    return captions


# ----------------------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class ObjectQuery:
    count: int = 1  # at least this many distinct shapes
    size: str | None = None
    color: str | None = None
    kind: str | None = None
    positions: tuple[str, ...] = ()  # each of POSITIONS, relative to the image centre


@dataclass(frozen=True)
class CaptionQuery:
    objects: tuple[ObjectQuery, ...]
    relations: tuple[tuple[int, str, int], ...] = ()  # (object index, key of RELATIONS, object index)


_NUMBERS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_NOUNS = {**{k: (k, False) for k in SHAPES}, **{k + "s": (k, True) for k in SHAPES},
          **{w: (None, w.endswith("s")) for w in ("shape", "shapes", "object", "objects", "thing", "things")}}
_FILLER = {"the", "of", "picture", "image", "photo", "drawing", "there", "is", "are", "with", "some",
           "showing", "containing", "in", "on", "at", "to", "it"}
_PHRASES = [  # longest first: "to the left of" is a relation, "to the left" a position
    (r"\b(?:of|in|on) the (?:image|picture|photo|drawing|scene)\b", " "),
    (r"\b(?:to the |on the )?left of\b", " <left_of> "),
    (r"\b(?:to the |on the )?right of\b", " <right_of> "),
    (r"\b(?:above|over|on top of)\b", " <above> "),
    (r"\b(?:below|under|underneath|beneath)\b", " <below> "),
    (r"\b(?:in|at|on|to) the (top|bottom)[ -]?(left|right)(?: corner)?\b", r" <\1> <\2> "),
    (r"\b(?:in|at|on|to) the (left|right|top|bottom)(?: side| half| edge| part)?\b", r" <\1> "),
    (r"\b(?:next to|beside)\b", " and "),  # says nothing about where
]


def parse_caption(text: str) -> CaptionQuery:
    """The shapes, attributes and relations a caption states, e.g. "two green triangles above a red star".

    Understands every caption `describe` writes and simple queries ("red", "a circle"); raises ValueError
    on a word it does not know rather than silently ignoring something the caption requires.
    """
    s = re.sub(r"[.,;:!?\"']", " ", text.lower())
    for pattern, replacement in _PHRASES:
        s = re.sub(pattern, replacement, s)
    reader = _CaptionReader(text)
    for word in s.split():
        reader.read(word)
    return reader.query()


class _CaptionReader:
    """parse_caption's state as it reads a caption word by word: the objects described so far, the one being
    described, and a relation waiting for the object on its right."""

    def __init__(self, text: str):
        self.text = text
        self.objects: list[dict] = []
        self.relations: list[tuple[int, str, int]] = []
        self.pending_relation: tuple[int, str] | None = None
        self.current: dict = {}

    def error(self, why: str) -> ValueError:
        return ValueError(f"cannot parse caption {self.text!r}: {why}")

    def close(self) -> None:
        """The object being described is complete (if it names anything); a waiting relation ends on it."""
        if any(k in self.current for k in ("size", "color", "kind")):
            self.objects.append(self.current)
            if self.pending_relation is not None:
                self.relations.append((*self.pending_relation, len(self.objects) - 1))
                self.pending_relation = None
        self.current = {}

    def read(self, word: str) -> None:
        if word in _NUMBERS:
            self.close()
            self.current["count"] = _NUMBERS[word]
        elif word in _SIZE_WORDS or word in COLORS:
            self.attribute(word)
        elif word in _NOUNS:
            self.current["kind"], plural = _NOUNS[word]
            self.current.setdefault("count", 2 if plural else 1)
            self.close()
        elif word.strip("<>") in POSITIONS:
            self.position(word.strip("<>"))
        elif word.strip("<>") in RELATIONS:
            self.relation(word.strip("<>"))
        elif word == "and":
            self.close()
        elif word not in _FILLER:
            raise self.error(f"unknown word {word!r}")

    def attribute(self, word: str) -> None:
        """A size or colour; a second one of the same kind starts a new object ("red blue circle": two)."""
        key, value = ("size", _SIZE_WORDS[word]) if word in _SIZE_WORDS else ("color", word)
        if key in self.current:
            self.close()
        self.current[key] = value

    def position(self, where: str) -> None:
        """A position belongs to the object being described when it has an attribute yet, else to the last one."""
        if "size" in self.current or "color" in self.current:
            target = self.current
        elif self.objects:
            target = self.objects[-1]
        else:
            raise self.error("a position before any shape")
        target.setdefault("positions", []).append(where)

    def relation(self, name: str) -> None:
        self.close()
        if not self.objects or self.pending_relation is not None:
            raise self.error("a relation needs a shape on each side")
        self.pending_relation = (len(self.objects) - 1, name)

    def query(self) -> CaptionQuery:
        self.close()
        if self.pending_relation is not None:
            raise self.error("a relation needs a shape on each side")
        if not self.objects:
            raise self.error("it names no shape, colour or size")
        return CaptionQuery(
            tuple(ObjectQuery(o.get("count", 1), o.get("size"), o.get("color"), o.get("kind"),
                              tuple(sorted(set(o.get("positions", []))))) for o in self.objects),
            tuple(self.relations),
        )


_POSITION_TESTS = {
    "left": lambda s: s.x < 0.5, "right": lambda s: s.x > 0.5,
    "top": lambda s: s.y < 0.5, "bottom": lambda s: s.y > 0.5,
}
_RELATION_TESTS = {
    "left_of": lambda a, b: a.x < b.x, "right_of": lambda a, b: a.x > b.x,
    "above": lambda a, b: a.y < b.y, "below": lambda a, b: a.y > b.y,
}


def _fits(s: Shape, o: ObjectQuery) -> bool:
    return ((o.kind is None or s.kind == o.kind) and (o.color is None or s.color == o.color)
            and (o.size is None or s.size == o.size) and all(_POSITION_TESTS[p](s) for p in o.positions))


def scene_matches(scene: Scene, caption: str | CaptionQuery) -> bool:
    """Whether the scene satisfies everything the caption states.

    Each object description takes its own distinct shapes (a count means at least that many); a relation must
    hold between every pair of shapes taken by its two descriptions. Pass a parsed CaptionQuery to judge one
    caption against many scenes without re-parsing.
    """
    query = parse_caption(caption) if isinstance(caption, str) else caption
    counts = [o.count for o in query.objects]
    bounds = list(itertools.accumulate(counts, initial=0))
    if bounds[-1] > len(scene.shapes):
        return False
    # At most a handful of shapes, so trying every assignment is cheap and obviously correct.
    for chosen in itertools.permutations(scene.shapes, bounds[-1]):
        taken = [chosen[bounds[i]:bounds[i + 1]] for i in range(len(counts))]
        if all(_fits(s, o) for group, o in zip(taken, query.objects) for s in group) and all(
            _RELATION_TESTS[rel](a, b) for i, rel, j in query.relations for a in taken[i] for b in taken[j]
        ):
            return True
    return False


def names_colour_and_shape(scene: Scene, caption: str | CaptionQuery) -> bool:
    """Whether the caption names a shape by colour and kind ("a red circle"), and every colour and kind it names
    belongs to one shape of the scene; counts, sizes, positions and relations are not judged (`scene_matches`
    judges everything). A caption this module cannot parse is False."""
    try:
        query = parse_caption(caption) if isinstance(caption, str) else caption
    except ValueError:
        return False
    return any(o.color and o.kind for o in query.objects) and all(
        any((o.color is None or s.color == o.color) and (o.kind is None or s.kind == o.kind) for s in scene.shapes)
        for o in query.objects)


# -------------------------------------------------------------------------------------------- generation


SHAPES_FORMAT, ATTRIBUTES_FORMAT = "clipsnail-shapes", "clipsnail-shape-attributes"


def is_shapes_dir(path: Path) -> bool:
    """True when `path` holds a scenes.json this program wrote: a shapes folder that --overwrite may replace."""
    meta = read_json_object(Path(path) / "scenes.json")
    # Folders written before the format marker carry exactly these keys.
    return meta is not None and (meta.get("format") == SHAPES_FORMAT
                                 or set(meta) == {"size", "seed", "holdout", "images"})


def is_attribute_dir(path: Path) -> bool:
    """True when `path` holds the attributes.json of `generate_attribute_folder`."""
    meta = read_json_object(Path(path) / "attributes.json")
    return meta is not None and meta.get("format") == ATTRIBUTES_FORMAT


def _output_dir(out: Path, overwrite: bool, is_ours: Callable[[Path], bool]):
    """The temp folder that replaces `out` when the block finishes. overwrite: a folder `is_ours` recognises (an
    earlier one of the same kind) may be replaced, never any other non-empty folder."""
    if os.path.lexists(out) and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out}: already exists and is not empty (overwrite to replace it)")
    return staged_dir(out, is_ours=is_ours if overwrite else None, what="generated shapes folder")


def generate_shapes(
    out_dir: str | Path,
    n: int,
    size: int = 32,
    seed: int = 0,
    captions_per_image: int = 3,
    holdout: Sequence[tuple[str, str]] = (),
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    *,
    max_shapes: int = 3,
    sizes: Sequence[str] = tuple(SIZES),
    overwrite: bool = False,
) -> dict:
    """Writes a captioned shapes dataset: images/NNNNNN.png, captions.csv, scenes.json and split.json.

    Scenes with a held-out (colour, kind) go only to the test split, so a model never trains on them; the
    rest are split by `hash_split` of the image name, as `split_records` would without the split file.
    Image i depends only on (seed, i), so a larger n extends a smaller one; output is byte-identical per args.
    """
    held = _holdout_set(holdout)
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    if n < 1 or captions_per_image < 1 or size < 1 or min(fractions) < 0:
        raise ConfigError(f"bad shapes arguments: n={n}, size={size}, captions_per_image="
                          f"{captions_per_image}, val_fraction={val_fraction}, test_fraction={test_fraction}")
    out = Path(out_dir)
    width = max(6, len(str(n - 1)))
    scenes, splits, rows = {}, [], []
    counts = {"train": 0, "val": 0, "test": 0}
    held_out = 0
    with _output_dir(out, overwrite, is_shapes_dir) as tmp:
        (tmp / "images").mkdir()
        for i in tqdm(range(n), desc="shapes", unit="img", disable=None):
            name = f"{i:0{width}d}.png"
            scene = sample_scene(random.Random(f"shapes:{seed}:{i}"), max_shapes, sizes=sizes)
            render(scene, size).save(tmp / "images" / name)
            captions = describe(scene, random.Random(f"captions:{seed}:{i}"), captions_per_image)
            rows += [(name, c) for c in captions]
            is_held = any((s.color, s.kind) in held for s in scene.shapes)
            held_out += is_held
            split = "test" if is_held else hash_split(name, fractions)
            counts[split] += 1
            scenes[name] = scene.to_dict()
            splits.append({"filename": name, "split": split})
        with open(tmp / "captions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("image", "caption"))
            writer.writerows(rows)
        meta = {"format": SHAPES_FORMAT, "size": size, "seed": seed, "holdout": sorted(map(list, held)),
                "images": scenes}
        for file, obj in (("scenes.json", meta), ("split.json", {"dataset": "shapes", "images": splits})):
            (tmp / file).write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
    summary = {"images": n, "captions": len(rows), **counts, "held_out": held_out}
    log.info("wrote shapes data to %s: %s", out, summary)
    return summary


def load_scenes(path: str | Path) -> dict[str, Scene]:
    """Image name -> Scene from a generated folder or its scenes.json (what `scene_matches` judges)."""
    path = Path(path)
    path = path / "scenes.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {name: Scene.from_dict(d) for name, d in data["images"].items()}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a shapes scenes.json: {e}") from e


def generate_attribute_folder(
    out_dir: str | Path,
    attribute: str,
    n_per_class: int,
    size: int = 32,
    seed: int = 0,
    holdout: Sequence[tuple[str, str]] = (),
    *,
    overwrite: bool = False,
) -> list[str]:
    """An image folder out_dir/<class>/NNNN.png of single shapes labelled by "color", "kind" or "size".

    Other attributes and the position vary at random; held-out (colour, kind) pairs are never drawn.
    Returns the class names, sorted as `list_image_folder` orders them.
    """
    values = {"color": list(COLORS), "kind": list(SHAPES), "size": list(SIZES)}
    if attribute not in values:
        raise ConfigError(f"unknown attribute {attribute!r}; valid: {', '.join(values)}")
    if n_per_class < 1:
        raise ConfigError(f"n_per_class must be at least 1, got {n_per_class}")
    held = _holdout_set(holdout)
    classes = sorted(values[attribute])
    width = max(4, len(str(n_per_class - 1)))
    with _output_dir(Path(out_dir), overwrite, is_attribute_dir) as tmp:
        (tmp / "attributes.json").write_text(json.dumps({"format": ATTRIBUTES_FORMAT, "attribute": attribute,
                                                         "seed": seed, "size": size}) + "\n", encoding="utf-8")
        for cls in classes:
            allowed = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in held
                       and cls == {"color": c, "kind": k, "size": cls}[attribute]]
            if not allowed:
                raise ConfigError(f"the holdout leaves no shape for class {cls!r}")
            (tmp / cls).mkdir()
            for j in range(n_per_class):
                rng = random.Random(f"attribute:{seed}:{attribute}:{cls}:{j}")
                color, kind = rng.choice(allowed)
                shape_size = cls if attribute == "size" else rng.choice(list(SIZES))
                scene = Scene(_place(rng, [(kind, color, shape_size)]))  # one shape always fits
                render(scene, size).save(tmp / cls / f"{j:0{width}d}.png")
    return classes


def scenes_for(images_dir: str | Path, names: Sequence[str]) -> list[Scene | None] | None:
    """The generated scene of each of `names` (files in a generated images/ folder; None for a name it does not
    know); None when `images_dir` is not generated shapes data (no scenes.json beside it)."""
    scenes_path = Path(images_dir).parent / "scenes.json"
    if not scenes_path.is_file():
        return None
    scenes_by_name = load_scenes(scenes_path)
    return [scenes_by_name.get(Path(n).name) for n in names]


def scene_judge(images_dir: str | Path, names: Sequence[str]):
    """judge(image index, caption) -> bool over `names` (files in a generated images/ folder), for the semantic
    retrieval metrics; None when `images_dir` is not generated shapes data (no scenes.json beside it)."""
    scenes = scenes_for(images_dir, names)
    if scenes is None:
        return None
    parse = functools.lru_cache(maxsize=None)(parse_caption)  # one parse per distinct caption
    return lambda i, caption: scenes[i] is not None and scene_matches(scenes[i], parse(caption))
