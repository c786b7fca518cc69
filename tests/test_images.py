import io

import pytest
from PIL import Image

from clipsnail.core.errors import DataError
from clipsnail.data.images import list_image_folder, list_images, load_image


def save(path, mode="RGB", size=(8, 6), color=(10, 200, 30), format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=format)
    return path


def test_load_image_converts_to_rgb(tmp_path):
    im = load_image(save(tmp_path / "g.png", mode="L", color=128))
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == (128, 128, 128)
    transparent = load_image(save(tmp_path / "t.png", mode="RGBA", color=(0, 0, 0, 0)))
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black
    assert load_image(save(tmp_path / "c.jpg")).mode == "RGB"


def test_load_image_errors_name_the_path(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path in (truncated, text, tmp_path / "missing.png"):
        with pytest.raises(DataError, match="cannot read image") as info:
            load_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # over this warns, over twice this raises
    with pytest.raises(DataError, match="big.png: cannot read image"):
        load_image(path)


def test_list_images(tmp_path):
    for rel in ("b.PNG", "a.jpg", "sub/deep/c.webp", "sub/d.txt", ".hidden/e.jpg", "._f.jpg"):
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("x")
        else:
            save(tmp_path / rel, format="PNG")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.jpg", "b.PNG", "sub/deep/c.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.jpg", "b.PNG"]


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no images \(.jpg, .jpeg, .png"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere: no such directory"):
        list_images(tmp_path / "nowhere")


def test_list_image_folder(tmp_path):
    save(tmp_path / "dog" / "1.png")
    save(tmp_path / "dog" / "0.png")
    save(tmp_path / "cat" / "x" / "a.jpg")
    (tmp_path / "empty_class").mkdir()
    paths, labels, classes = list_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["cat/x/a.jpg", "dog/0.png", "dog/1.png"]
    assert labels == [0, 1, 1]


def test_list_image_folder_errors(tmp_path):
    save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class folders"):
        list_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_image_folder(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_keeps_its_grey_levels(tmp_path, fmt):
    """PIL's convert("RGB") clips I;16 at 255: a mid-grey disc on black came out a white silhouette. It is scaled
    to 8 bits instead, in every decoder (files, uploads)."""
    import numpy as np

    from clipsnail.serve.images import decode_upload

    pixels = np.zeros((40, 40), np.uint16)
    pixels[10:30, 10:30] = 30000  # 46% of full scale
    pixels[0, 0] = 65535
    path = tmp_path / f"grey16.{fmt.lower()}"
    Image.fromarray(pixels).save(path, format=fmt)
    assert Image.open(path).mode == "I;16"
    for decoded in (load_image(path), decode_upload(path.read_bytes(), 10_000)):
        rgb = np.asarray(decoded)
        assert decoded.mode == "RGB"
        assert tuple(rgb[20, 20]) == (117, 117, 117) and tuple(rgb[5, 5]) == (0, 0, 0)
        assert tuple(rgb[0, 0]) == (255, 255, 255)


def test_32_bit_and_float_greyscale_are_scaled_by_their_range():
    import numpy as np

    from clipsnail.data.images import decode_opened

    ints = Image.fromarray(np.array([[0, 1000], [4000, 65535]], np.int32), "I")
    assert np.asarray(decode_opened(ints)[0])[:, :, 0].tolist() == [[0, 4], [16, 255]]  # 16-bit data in I
    floats = Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32), "F")
    assert np.asarray(decode_opened(floats)[0])[:, :, 0].tolist() == [[0, 128], [64, 255]]
    odd = Image.fromarray(np.array([[-5.0, float("nan")], [5.0, 15.0]], np.float32), "F")
    assert np.asarray(decode_opened(odd)[0])[:, :, 0].tolist() == [[0, 64], [128, 255]]
