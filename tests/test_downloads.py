"""`clipsnail data cifar10|cifar100|mnist`: fetched through torchvision's download helpers from local files only
(file:// URLs and --from folders), never the network."""

import contextlib
import functools
import hashlib
import http.server
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
from helpers import run_error, write_idx

from clipsnail.cli import main
from clipsnail.core.errors import DataError
from clipsnail.data import downloads
from clipsnail.data.classes import read_class_data
from clipsnail.data.downloads import Dataset, Download, download_dataset


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_archive(folder):
    """A CIFAR-10-shaped cifar-10-python.tar.gz: 6 training and 3 test images of 10 named classes."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n, labels in (("data_batch_1", 6, [0, 1, 2, 3, 4, 5]), ("test_batch", 3, [9, 8, 7])):
        with open(batches / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    return archive


def mnist_files(folder):
    """MNIST's four .gz idx files: 5 training and 2 test digits."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    files = []
    for prefix, n in (("train", 5), ("t10k", 2)):
        files.append(write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28))))
        files.append(write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10))
    return files  # in MNIST's order


@contextlib.contextmanager
def local_server(folder):
    """An HTTP server on a loopback port serving `folder`: torchvision's downloader, with no network."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def mnist_table(files, base="file:///nonexistent/mnist/"):
    return {"mnist": Dataset("mnist", tuple(Download((base + f.name,), f.name, md5(f)) for f in files))}


def test_the_table_holds_torchvisions_urls_and_checksums():
    table = downloads.datasets()
    assert tuple(table) == downloads.NAMES
    cifar = table["cifar10"].files[0]
    assert cifar.urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
    assert cifar.md5 == "c58f30108f718f92721af3b95e74349a" and table["cifar10"].unpack == "cifar-10-batches-py"
    assert [f.filename for f in table["mnist"].files] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                                          "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert all(len(f.urls) >= 2 for f in table["mnist"].files)  # mirrors, tried in order


def test_cifar_is_downloaded_checked_unpacked_and_read_back(tmp_path):
    archive = cifar_archive(tmp_path / "server")
    out = tmp_path / "data" / "cifar10"
    with local_server(archive.parent) as url:
        # The first mirror is down: the next is tried.
        table = {"cifar10": Dataset("cifar", (Download((url + "missing/" + archive.name, url + archive.name),
                                                       archive.name, md5(archive)),), unpack="cifar-10-batches-py")}
        summary = download_dataset("cifar10", out, table=table)
    assert summary["data"] == f"cifar:{out}" and summary["images"] == {"train": 6, "test": 3}
    assert summary["classes"] == 10 and summary["class_names"][:2] == ["class0", "class1"]
    assert sorted(p.name for p in out.iterdir()) == ["_clipsnail_download.json", "batches.meta", "data_batch_1",
                                                     "test_batch"]  # no archive, no temp folder left
    assert not [p for p in out.parent.iterdir() if p.name != "cifar10"]
    assert read_class_data(summary["data"], "test").labels.tolist() == [9, 8, 7]

    # A second run finds the dataset there and fetches nothing (the server is gone).
    archive.unlink()
    assert download_dataset("cifar10", out, table=table)["images"] == {"train": 6, "test": 3}


def test_offline_says_what_to_fetch_and_writes_nothing(tmp_path):
    files = mnist_files(tmp_path / "elsewhere")
    out = tmp_path / "mnist"
    with pytest.raises(DataError) as e:
        download_dataset("mnist", out, table=mnist_table(files))
    message = str(e.value)
    assert message.startswith("cannot download train-images-idx3-ubyte.gz (file:///nonexistent/mnist/")
    assert "Offline? Fetch train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz" in message
    assert f"run `clipsnail data mnist --out {out} --from FOLDER`" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_files_fetched_elsewhere_are_taken_from_a_folder_and_checked(tmp_path, monkeypatch, capsys):
    table = mnist_table(mnist_files(tmp_path / "fetched"))
    monkeypatch.setattr(downloads, "datasets", lambda: table)
    out = tmp_path / "mnist"
    assert main(["data", "mnist", "--out", str(out), "--from", str(tmp_path / "fetched")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"] == f"mnist:{out}" and summary["images"] == {"train": 5, "test": 2}
    assert json.loads((out / "_clipsnail_download.json").read_text())["source"] == str(tmp_path / "fetched")
    assert len(read_class_data(f"mnist:{out}", "train")) == 5

    # A file that is not the published one (its MD5 differs) is refused, by name.
    (tmp_path / "fetched" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"truncated")
    error = run_error(capsys, ["data", "mnist", "--out", str(tmp_path / "again"), "--from",
                               str(tmp_path / "fetched")])
    assert "t10k-labels-idx1-ubyte.gz: MD5 differs from the published" in error
    (tmp_path / "fetched" / "t10k-labels-idx1-ubyte.gz").unlink()
    error = run_error(capsys, ["data", "mnist", "--out", str(tmp_path / "again"), "--from",
                               str(tmp_path / "fetched")])
    assert "t10k-labels-idx1-ubyte.gz: not there; --from needs train-images-idx3-ubyte.gz" in error
    assert not (tmp_path / "again").exists()


def test_a_folder_of_someone_elses_is_never_replaced(tmp_path, monkeypatch, capsys):
    files = mnist_files(tmp_path / "fetched")
    monkeypatch.setattr(downloads, "datasets", lambda: mnist_table(files))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    error = run_error(capsys, ["data", "mnist", "--out", str(out), "--from", str(tmp_path / "fetched")])
    assert "exists, is not empty and is not a folder written by `clipsnail data mnist`" in error
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
