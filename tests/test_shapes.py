import json
import random

import numpy as np
import pytest

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.data.caption_corpora import read_captions, split_records
from clipsnail.data.images import list_image_folder, load_image
from clipsnail.data.shapes import (
    COLORS,
    SHAPES,
    SIZES,
    CaptionQuery,
    ObjectQuery,
    Scene,
    Shape,
    describe,
    generate_attribute_folder,
    generate_shapes,
    load_scenes,
    parse_caption,
    render,
    sample_scene,
    scene_matches,
)

# A large red circle on the left, a small blue square at the top right, and two green triangles at the bottom.
SCENE = Scene([
    Shape("circle", "red", "large", 0.25, 0.5),
    Shape("square", "blue", "small", 0.8, 0.15),
    Shape("triangle", "green", "small", 0.55, 0.85),
    Shape("triangle", "green", "small", 0.85, 0.8),
])


def test_scene_json_round_trip():
    assert Scene.from_dict(json.loads(json.dumps(SCENE.to_dict()))) == SCENE
    with pytest.raises(ValueError, match="shapes: circle"):
        Shape("hexagon", "red", "large", 0.5, 0.5)


def test_sample_scene_rules():
    rng = random.Random(0)
    scenes = [sample_scene(rng, holdout={("purple", "triangle")}) for _ in range(300)]
    sizes = {len(s.shapes) for s in scenes}
    assert sizes == {1, 2, 3}
    count_scenes = 0
    for scene in scenes:
        combos = [(s.kind, s.color) for s in scene.shapes]
        assert ("triangle", "purple") not in combos
        if len(set(combos)) < len(combos):  # only deliberate count scenes repeat a (kind, colour)
            count_scenes += 1
            assert len({(s.kind, s.color, s.size) for s in scene.shapes}) == len(set(combos))
        for a in scene.shapes:
            assert 0 < a.x < 1 and 0 < a.y < 1
            for b in scene.shapes:
                if a is not b:
                    assert (abs(a.x - b.x) >= a.half_box[0] + b.half_box[0]
                            or abs(a.y - b.y) >= a.half_box[1] + b.half_box[1])
    assert 10 < count_scenes < 100


def test_describe_is_true_of_its_scene():
    seen_words = set()
    for seed in range(500):
        rng = random.Random(seed)
        scene = sample_scene(rng)
        captions = describe(scene, rng, 5)
        assert len(captions) == 5
        for caption in captions:
            assert scene_matches(scene, caption), (scene, caption)
            seen_words.update(caption.split())
        absent = next(c for c in COLORS if c not in {s.color for s in scene.shapes})
        assert not scene_matches(scene, f"a {absent} shape")
    # The templates are all exercised: relations, positions, counts, subsets without size or colour.
    expected = {"left", "right", "above", "below", "top", "bottom", "two", "three", "picture", "shape"}
    assert expected <= seen_words


def test_describe_is_deterministic():
    assert describe(SCENE, random.Random(3), 6) == describe(SCENE, random.Random(3), 6)


@pytest.mark.parametrize("caption", [
    "a red circle", "red", "a circle", "a large red circle on the left", "two green triangles",
    "two small green triangles at the bottom", "a blue square above a red circle",
    "a red circle to the left of a blue square", "a picture of a small blue square in the top right corner",
    "a red circle, a blue square and two green triangles", "a green triangle below a blue square",
    "a red circle and a green shape", "three shapes", "a big red circle on the left side of the image",
])
def test_true_captions_match(caption):
    assert scene_matches(SCENE, caption)


@pytest.mark.parametrize("caption", [
    "a blue circle",  # wrong colour
    "a red star",  # wrong kind
    "a small red circle",  # wrong size
    "a red circle on the right",  # wrong position
    "a red circle to the right of a blue square",  # wrong relation
    "a blue square below a red circle",
    "three green triangles",  # count too high
    "a blue square and a blue square",  # one shape cannot satisfy two descriptions
    "five shapes",
])
def test_false_captions_rejected(caption):
    assert not scene_matches(SCENE, caption)


def test_parse_caption():
    assert parse_caption("Two green triangles above a red star.") == CaptionQuery(
        (ObjectQuery(2, None, "green", "triangle"), ObjectQuery(1, None, "red", "star")), ((0, "above", 1),))
    assert parse_caption("a small yellow star at the top") == CaptionQuery(
        (ObjectQuery(1, "small", "yellow", "star", ("top",)),))
    for bad in ("a pink circle", "above a red circle", ""):
        with pytest.raises(ValueError, match="cannot parse caption"):
            parse_caption(bad)


def test_render():
    image = render(Scene([Shape("circle", "red", "large", 0.5, 0.5)]), 32)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert image.getpixel((16, 16)) == COLORS["red"]
    assert image.getpixel((1, 1)) == (0, 0, 0)
    assert render(SCENE, 48).tobytes() == render(SCENE, 48).tobytes()
    for kind in SHAPES:  # every shape is drawn in its colour at its centre and at both sizes
        for size in SIZES:
            pixel = render(Scene([Shape(kind, "blue", size, 0.5, 0.5)]), 64).getpixel((32, 32))
            assert max(abs(a - b) for a, b in zip(pixel, COLORS["blue"])) < 30
    ink = {s: np.asarray(render(Scene([Shape("star", "white", s, 0.5, 0.5)]), 32)).sum() for s in SIZES}
    assert ink["large"] > 2.5 * ink["small"]  # the two sizes differ clearly in area


def test_generate_shapes(tmp_path):
    out, held_pairs = tmp_path / "shapes", {("red", "circle"), ("blue", "square")}
    # Holdout pairs as tuples or as "colour kind" strings (what the CLI passes).
    summary = generate_shapes(out, 60, size=16, seed=1, captions_per_image=2,
                              holdout=[("red", "circle"), "blue square"])
    assert summary["images"] == 60 and summary["captions"] == 120
    assert summary["train"] + summary["val"] + summary["test"] == 60 and summary["held_out"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["captions.csv", "images", "scenes.json", "split.json"]
    records = read_captions(out / "captions.csv")
    assert len(records) == 120 and records[0].image == "000000.png"
    assert load_image(out / "images" / "000059.png").size == (16, 16)
    scenes = load_scenes(out)
    for r in records:
        assert scene_matches(scenes[r.image], r.caption)
    meta = json.loads((out / "scenes.json").read_text())
    assert meta["holdout"] == [["blue", "square"], ["red", "circle"]]
    def pairs(image):
        return {(s.color, s.kind) for s in scenes[image].shapes}

    for split in ("train", "val"):
        for r in split_records(records, split, split_file=out / "split.json"):
            assert not pairs(r.image) & held_pairs
    held = {r.image for r in records if pairs(r.image) & held_pairs}
    assert held and held <= {r.image for r in split_records(records, "test", split_file=out / "split.json")}

    again = tmp_path / "again"
    generate_shapes(again, 60, size=16, seed=1, captions_per_image=2, holdout=sorted(held_pairs))
    for rel in ("captions.csv", "scenes.json", "split.json", "images/000007.png"):
        assert (out / rel).read_bytes() == (again / rel).read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temp folders left behind

    with pytest.raises(DataError, match="already exists and is not empty"):
        generate_shapes(out, 5)
    generate_shapes(out, 5, seed=2, overwrite=True)
    assert len(list((out / "images").iterdir())) == 5


def test_single_large_shapes_for_small_images(tmp_path):
    generate_shapes(tmp_path / "one", 30, size=16, max_shapes=1, sizes=["large"])
    scenes = load_scenes(tmp_path / "one")
    assert all(len(s.shapes) == 1 and s.shapes[0].size == "large" for s in scenes.values())
    with pytest.raises(ConfigError, match="sizes must be some of"):
        sample_scene(random.Random(0), sizes=["huge"])


def test_generate_attribute_folder(tmp_path):
    classes = generate_attribute_folder(tmp_path / "colors", "color", 3, size=16, holdout=[("red", "circle")])
    assert classes == sorted(COLORS)
    paths, labels, folder_classes = list_image_folder(tmp_path / "colors")
    assert folder_classes == classes and len(paths) == 3 * len(COLORS)
    assert paths[0].relative_to(tmp_path / "colors").as_posix() == "blue/0000.png"
    assert generate_attribute_folder(tmp_path / "kinds", "kind", 1) == sorted(SHAPES)
    with pytest.raises(Exception, match="color, kind, size"):
        generate_attribute_folder(tmp_path / "x", "shade", 1)
