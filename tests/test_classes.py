import os
import pickle
import random

import numpy as np
import pytest
import torch
from helpers import write_idx
from PIL import Image

from clipsnail.core.errors import ConfigError, DataError
from clipsnail.data.classes import ClassData, ClassImageDataset, read_class_data, read_idx


def make_folder(root, counts, ext=".png"):
    """root/<class>/NNN.ext, each image a flat colour that encodes (class, index)."""
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in reversed(range(n)):  # creation order must not matter, only names
            Image.new("RGB", (4, 4), (c * 40, i, 7)).save(root / name / f"{i:03d}{ext}", format="PNG")
    return root


def names(data):
    return [f"{p.parent.name}/{p.name}" for p in data.paths]


def write_mnist(root, prefix, n, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def cifar_rows(n, seed):
    """N×3072 CIFAR rows (R plane, G plane, B plane) whose image i has pixel (row 1, col 2) = (i, 2i, 3i)."""
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    for i in range(n):
        for plane, value in enumerate((i, 2 * i, 3 * i)):
            data[i, plane * 1024 + 1 * 32 + 2] = value
    return data


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root, n_per_batch=4, batches=2, test=True, protocol=pickle.DEFAULT_PROTOCOL, bytes_keys=False):
    root.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)  # the official files come from Python 2: bytes
    dump(root / "batches.meta", {k("label_names"): [k(f"class{i}") for i in range(10)], k("num_cases_per_batch"): 4},
         protocol)
    for b in range(1, batches + 1):
        dump(root / f"data_batch_{b}", {k("data"): cifar_rows(n_per_batch, b), k("labels"): [b] * n_per_batch,
                                        k("batch_label"): k(f"training batch {b}")}, protocol)
    if test:
        dump(root / "test_batch", {k("data"): cifar_rows(3, 99), k("labels"): [9, 8, 7]}, protocol)
    return root


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------- image folders


def test_folder_split_is_per_class_by_name_and_exact(tmp_path):
    root = make_folder(tmp_path / "data", {"dog": 10, "cat": 10})
    (root / "cat" / "notes.txt").write_text("x")
    (root / "cat" / "._010.png").write_bytes(b"resource fork")
    make_folder(root / ".cache", {"junk": 2})
    Image.new("RGB", (4, 4)).save(root / "dog" / "010.JPG", format="JPEG")  # extensions are case-insensitive
    splits = {s: read_class_data(f"folder:{root}", s, val_fraction=0.1, test_fraction=0.2)
              for s in ("train", "val", "test", "all")}
    assert splits["train"].classes == ["cat", "dog"]
    assert names(splits["test"]) == ["cat/008.png", "cat/009.png", "dog/009.png", "dog/010.JPG"]
    assert names(splits["val"]) == ["cat/007.png", "dog/008.png"]  # dog has 11 files: val 1, test 2, train 8
    assert names(splits["train"])[:7] == [f"cat/{i:03d}.png" for i in range(7)]
    assert list(splits["test"].labels) == [0, 0, 1, 1]
    parts = [names(splits[s]) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 21  # disjoint
    assert set().union(*parts) == set(names(splits["all"]))  # and complete
    assert splits["all"].channels == 3 and splits["all"].image(0).mode == "RGB"
    assert splits["all"].counts == {"cat": 10, "dog": 11}


def test_benchmark_conventions_are_exact(tmp_path):
    root = tmp_path / "cifar10_test"
    for name in ("airplane", "truck"):
        (root / name).mkdir(parents=True)
        for i in range(1000):
            (root / name / f"{i:04d}.jpg").touch()  # listing and splitting never decode
    train, test = (read_class_data(str(root), s) for s in ("train", "test"))
    assert names(train)[0] == "airplane/0000.jpg" and names(train)[-1] == "truck/0899.jpg" and len(train) == 1800
    assert names(test)[0] == "airplane/0900.jpg" and names(test)[-1] == "truck/0999.jpg" and len(test) == 200
    mnist = tmp_path / "mnist_test"
    mnist.mkdir()
    write_idx(mnist / "t10k-images-idx3-ubyte.gz", np.arange(10000).reshape(10000, 1, 1) % 251)
    write_idx(mnist / "t10k-labels-idx1-ubyte.gz", np.arange(10000) % 10)
    test = read_class_data(str(mnist), "test")
    assert len(test) == 1000 and test.labels[0] == 0 and test.pixels[0, 0, 0] == 9000 % 251
    assert len(read_class_data(str(mnist), "train")) == 9000


def test_explicit_split_folders(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", {"a": 3, "b": 2})
    make_folder(root / "val", {"b": 1, "c": 2})  # a class only in val keeps one label across splits
    train = read_class_data(str(root), "train", test_fraction=0.5)  # fractions are unused here
    val = read_class_data(str(root), "val")
    assert train.classes == val.classes == ["a", "b", "c"]
    assert len(train) == 5 and names(val) == ["b/000.png", "c/000.png", "c/001.png"] and list(val.labels) == [1, 2, 2]
    assert names(read_class_data(str(root), "test")) == names(val)  # test falls back to val
    assert len(read_class_data(str(root), "all")) == 8
    (root / "val").rename(root / "test")
    assert names(read_class_data(str(root), "val")) == names(val)  # and val to test


def test_classdata_subset_and_arrays():
    pixels = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    data = ClassData(classes=["x", "y"], labels=[0, 1, 0, 1, 1], source="test", pixels=pixels)
    assert data.channels == 1 and data.image(1).mode == "L" and data.image(1).size == (3, 2)
    assert np.array_equal(np.asarray(data.image(1)), pixels[1])
    sub = data.subset([4, 0])
    assert len(sub) == 2 and list(sub.labels) == [1, 0] and np.array_equal(sub.pixels[0], pixels[4])
    rgb = ClassData(classes=["x"], labels=[0], source="test", pixels=np.zeros((1, 2, 2, 3), np.uint8))
    assert rgb.channels == 3 and rgb.image(0).mode == "RGB"


# ----------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_train_and_t10k(tmp_path, gz):
    root = tmp_path / "mnist"
    train_images, train_labels = write_mnist(root, "train", 20, gz=gz, seed=1)
    test_images, test_labels = write_mnist(root, "t10k", 6, gz=gz, seed=2)
    train = read_class_data(f"mnist:{root}", "train", val_fraction=0.25)
    val = read_class_data(f"mnist:{root}", "val", val_fraction=0.25)
    test = read_class_data(str(root), "test", val_fraction=0.25, test_fraction=0.5)  # test = t10k, all of it
    assert train.classes == [str(d) for d in range(10)] and train.source.startswith("mnist:")
    assert np.array_equal(train.pixels, train_images[:15]) and np.array_equal(train.labels, train_labels[:15])
    assert np.array_equal(val.pixels, train_images[15:]) and np.array_equal(val.labels, train_labels[15:])
    assert np.array_equal(test.pixels, test_images) and np.array_equal(test.labels, test_labels)
    assert test.channels == 1 and np.array_equal(np.asarray(test.image(3)), test_images[3])
    assert len(read_class_data(str(root), "all")) == 26


def test_mnist_single_file_is_split_by_order(tmp_path):
    root = tmp_path / "mnist"
    images, labels = write_mnist(root, "t10k", 10, gz=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(60, np.uint8))  # labels without images: ignored
    train = read_class_data(str(root), "train", test_fraction=0.2)
    test = read_class_data(str(root), "test", test_fraction=0.2)
    assert np.array_equal(train.pixels, images[:8]) and np.array_equal(test.pixels, images[8:])
    assert np.array_equal(test.labels, labels[8:])
    with pytest.raises(DataError, match="split 'val' is empty"):
        read_class_data(str(root), "val", test_fraction=0.2)


def test_idx_errors_name_the_file(tmp_path):
    root = tmp_path / "mnist"
    write_mnist(root, "t10k", 5)
    images = root / "t10k-images-idx3-ubyte"
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="5 images but .*t10k-labels-idx1-ubyte: 4 labels") as info:
        read_class_data(f"mnist:{root}", "all")
    assert str(images) in str(info.value)
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: header says 5x28x28"):
        read_class_data(f"mnist:{root}", "all")
    with pytest.raises(DataError, match="not an idx labels file"):
        read_idx(images, 1)
    gz = write_idx(tmp_path / "x-images-idx3-ubyte.gz", np.zeros((2, 3, 3)))
    gz.write_bytes(gz.read_bytes()[:-6])
    with pytest.raises(DataError, match="x-images-idx3-ubyte.gz: cannot read"):
        read_idx(gz, 3)


# ----------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_batches(tmp_path, protocol, bytes_keys):
    root = write_cifar10(tmp_path / "cifar", protocol=protocol, bytes_keys=bytes_keys)
    train = read_class_data(f"cifar:{root}", "train")
    test = read_class_data(str(root), "test")
    assert train.classes == [f"class{i}" for i in range(10)] and train.source.startswith("cifar:")
    assert len(train) == 8 and list(train.labels) == [1] * 4 + [2] * 4 and list(test.labels) == [9, 8, 7]
    assert train.pixels.shape == (8, 32, 32, 3) and train.channels == 3
    im = test.image(2)
    assert im.mode == "RGB" and im.size == (32, 32) and im.getpixel((2, 1)) == (2, 4, 6)  # (x=col, y=row)
    assert tuple(train.pixels[5, 1, 2]) == (1, 2, 3)  # batch 2's second image
    val = read_class_data(str(root), "val", val_fraction=0.25)
    assert len(val) == 2 and np.array_equal(val.pixels, train.pixels[6:])


def test_cifar_single_batch_and_cifar100(tmp_path):
    root = write_cifar10(tmp_path / "c10", n_per_batch=10, batches=1, test=False)
    assert len(read_class_data(str(root), "test", test_fraction=0.2)) == 2  # only training data: cut by order
    c100 = tmp_path / "c100"
    c100.mkdir()
    dump(c100 / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20})
    dump(c100 / "train", {"data": cifar_rows(5, 1), "fine_labels": [99, 0, 1, 2, 3], "coarse_labels": [0] * 5}, 2)
    dump(c100 / "test", {"data": cifar_rows(2, 2), "fine_labels": [5, 6], "coarse_labels": [0] * 2})
    train = read_class_data(str(c100), "train")
    assert len(train.classes) == 100 and train.classes[99] == "f99" and list(train.labels) == [99, 0, 1, 2, 3]
    assert train.image(1).getpixel((2, 1)) == (1, 2, 3)
    assert list(read_class_data(f"cifar:{c100}", "test").labels) == [5, 6]


@pytest.mark.parametrize("victim", ["test_batch", "batches.meta"])
@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, victim, protocol):
    root = write_cifar10(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    dump(root / victim, {"data": Evil(marker), "labels": [], "label_names": Evil(marker)}, protocol)
    with pytest.raises(DataError, match=rf"{victim}: refusing to unpickle (posix|nt)\.system") as info:
        read_class_data(f"cifar:{root}", "test")
    assert str(root / victim) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_malformed_cifar_batches(tmp_path):
    root = write_cifar10(tmp_path / "cifar")
    dump(root / "test_batch", {"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]})
    with pytest.raises(DataError, match=r"test_batch: 'data' must be a uint8 N×3072 array"):
        read_class_data(str(root), "test")
    dump(root / "test_batch", {"data": cifar_rows(3, 0), "labels": [0, 1]})
    with pytest.raises(DataError, match="test_batch: 3 images but 2 'labels'"):
        read_class_data(str(root), "test")
    (root / "test_batch").write_bytes(b"\x80\x02}q\x00")  # cut off mid-pickle
    with pytest.raises(DataError, match="test_batch: cannot unpickle"):
        read_class_data(str(root), "test")


# ----------------------------------------------------------------------------------------------- errors


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such directory"):
        read_class_data(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere: no such directory"):
        read_class_data(f"mnist:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no class folders"):
        read_class_data(str(tmp_path / "empty"))
    root = make_folder(tmp_path / "data", {"cat": 3})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="dog: class folder 'dog' has no images"):
        read_class_data(str(root))
    with pytest.raises(DataError, match="no MNIST images file"):
        read_class_data(f"mnist:{root}")
    with pytest.raises(DataError, match="no CIFAR batches"):
        read_class_data(f"cifar:{root}")
    for bad in ("validation", "TEST", ""):
        with pytest.raises(ConfigError, match="expected one of train, val, test, all"):
            read_class_data(str(root), bad)
    with pytest.raises(ConfigError, match="test_fraction=1.5"):
        read_class_data(str(root), test_fraction=1.5)


def test_empty_split_is_an_error(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    with pytest.raises(DataError, match=r"folder:.*data: split 'val' is empty \(val_fraction=0.0"):
        read_class_data(str(root), "val")


# ----------------------------------------------------------------------------------------------- dataset


def random_transform(image):
    # Uses both RNGs a real augmentation pipeline draws from.
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return x + torch.rand(x.shape) + random.random()


def test_dataset_is_deterministic_per_seed(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    dataset = ClassImageDataset(ClassData(["a", "b"], [0, 1, 0, 1, 1, 0], "test", pixels=pixels), random_transform)
    random.seed(123)
    torch.manual_seed(123)
    outer = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    a, b, c = dataset[(3, 7)], dataset[(3, 7)], dataset[(3, 8)]
    assert (random.random(), torch.rand(1)) == outer  # the outer RNG streams are untouched
    assert a["label"] == 1 and isinstance(a["label"], int)
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert torch.equal(dataset[3]["image"], dataset[(3, 3)]["image"])
    batch = dataset.collate([a, c])
    assert batch["images"].shape == (2, 5, 5, 3) and batch["labels"].tolist() == [1, 1]


def test_dataset_skips_corrupt_images_unless_strict(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "dog" / "000.png").write_text("not an image")
    data = read_class_data(str(root), "all")
    dataset = ClassImageDataset(data, lambda im: torch.from_numpy(np.asarray(im).copy()))
    items = [dataset[(i, 0)] for i in range(len(dataset))]
    assert items[2] is None and all(x is not None for i, x in enumerate(items) if i != 2)
    batch = dataset.collate(items)
    assert dataset.skipped == 1 and batch["labels"].tolist() == [0, 0, 1]
    assert dataset.collate([None]) is None and dataset.skipped == 2
    strict = ClassImageDataset(data, lambda im: im, strict=True)
    with pytest.raises(DataError, match="000.png: cannot read image"):
        strict[(2, 0)]
