"""Hostile files and kills: nothing we did not write is replaced, a kill at any instant leaves a whole index, nothing
outside the image folder is read, and FIFOs, devices and lying files never hang or exhaust a reader."""

import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import contextmanager

import pytest
from helpers import noise_image

from clipsnail.cli import main
from clipsnail.core import safeio
from clipsnail.core.errors import DataError
from clipsnail.data.caption_corpora import load_split, read_captions
from clipsnail.data.images import list_images, load_image
from clipsnail.data.shapes import generate_shapes
from clipsnail.data.shards import write_shards
from clipsnail.inference.catalogue import facts_by_path
from clipsnail.inference.index import ImageIndex, _write_new, build_index, update_index
from clipsnail.train.checkpoints import load_state, save_state


@contextmanager
def deadline(seconds=20):
    """Fails the test instead of hanging it forever (what a FIFO did before)."""
    def on_alarm(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def dead_pid():
    """The PID of a process that has exited (so its temp files are leftovers)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        noise_image(root / f"{i}.png", i)
    return root


# ----------------------------------------------------------------------- 1. never replace a folder we did not write


def test_index_build_refuses_a_users_folder_that_happens_to_hold_index_json(clip_model, photos, tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "index.json").write_text('{"my": "own file"}')
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="is not a clipsnail index; refusing to replace it"):
        build_index(clip_model, photos, users, progress=False)
    assert (users / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(users)) == [
        "index.json", "thesis.tex"]
    assert main(["index", "build", "--model", str(clip_model.run_dir), "--images", str(photos), "--out", str(users),
                 "--no-progress", "--no-onnx"]) == 2
    assert (users / "thesis.tex").exists()
    # an index of ours is replaced, an empty folder is filled
    build_index(clip_model, photos, tmp_path / "idx", progress=False)
    build_index(clip_model, photos, tmp_path / "idx", progress=False)
    (tmp_path / "empty").mkdir()
    assert len(build_index(clip_model, photos, tmp_path / "empty", progress=False)[0]) == 4


def test_export_shapes_and_shards_refuse_folders_they_did_not_write(clip_run, shapes_dir, tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "preprocess.json").write_text("{}")  # named like ours, not ours
    (users / "notes.txt").write_text("keep me")
    assert main(["export", "--model", str(clip_run), "--onnx", str(users)]) == 2
    assert "not a clipsnail ONNX export" in capsys.readouterr().err

    with pytest.raises(DataError, match="is not a generated shapes folder"):
        generate_shapes(users, n=2, size=8, overwrite=True)
    shapes = tmp_path / "shapes"
    generate_shapes(shapes, n=2, size=8)
    generate_shapes(shapes, n=3, size=8, overwrite=True)  # ours: replaced
    assert len(os.listdir(shapes / "images")) == 3

    (users / "000000.tar").write_bytes(b"someone else's archive")
    with pytest.raises(DataError, match="000000.tar: named like a shard but not listed"):
        write_shards(shapes_dir / "captions.csv", shapes_dir / "images", users, shard_size=50)
    assert (users / "000000.tar").read_bytes() == b"someone else's archive" and (users / "notes.txt").exists()
    assert sorted(os.listdir(users)) == ["000000.tar", "notes.txt", "preprocess.json"]


# ----------------------------------------------------------------------------------------------- 2. kills


def _die_at(call_number, names):
    """In a forked child: make the `call_number`-th call among the patched functions kill the process outright."""
    calls = {"n": 0}

    def wrap(function):
        def patched(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call_number:
                os._exit(9)  # no handler, no cleanup: what SIGKILL does
            result = function(*args, **kwargs)
            return result
        return patched

    for module, name in names:
        setattr(module, name, wrap(getattr(module, name)))


def _swap_in_child(call_number, exchange_works, new_dir, out_dir):
    import clipsnail.core.safeio as s

    if not exchange_works:
        s.exchange = lambda a, b: False
    _die_at(call_number, [(s.os, "rename"), (s, "exchange"), (s.shutil, "rmtree")])
    index = ImageIndex.load(new_dir)  # written whole over out_dir, as a build or a compaction writes
    entries = {rel: (size, mtime_ns, sha1) for rel, size, mtime_ns, _, _, sha1 in index.catalogue.files()}
    _write_new(out_dir, dict(index.meta), index.rel_paths, entries, index.vectors().numpy(),
               facts_by_path(index.catalogue), {}, 0.95)
    os._exit(0)


@pytest.mark.parametrize("exchange_works, sizes, exits", [
    (True, [4, 5, 5], [9, 9, 0]),  # killed before the exchange, after it (old folder not yet deleted), never
    (False, [4, 4, 4, 5, 5], [9, 9, 9, 9, 0]),  # the third kill falls between the two renames: repaired on load
], ids=["exchange", "two-renames"])
def test_a_kill_at_any_instant_of_the_swap_leaves_a_whole_index(clip_model, photos, tmp_path, exchange_works, sizes,
                                                                 exits):
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "idx"
    build_index(clip_model, photos, old, progress=False)
    noise_image(photos / "extra.png", 99)
    build_index(clip_model, photos, new, progress=False)
    for call_number, (size, exit_code) in enumerate(zip(sizes, exits), 1):
        shutil.copytree(old, out)
        child = multiprocessing.get_context("fork").Process(
            target=_swap_in_child, args=(call_number, exchange_works, new, out))
        child.start()
        child.join(60)
        assert child.exitcode == exit_code
        index = ImageIndex.load(out)
        assert len(index) == size and index.vectors().shape == (size, 16)
        assert index.search(index.vectors()[:1], k=1)[0][0].id == 0
        update_index(clip_model, out, progress=False)  # the next write deletes what the killed one left beside it
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")] == []
        shutil.rmtree(out)


def test_recover_dir_puts_back_the_old_folder_of_a_killed_two_rename_swap(tmp_path):
    out = tmp_path / "data"
    old = tmp_path / f".data.old-{dead_pid()}-0123abcd"
    old.mkdir()
    (old / "x").write_text("old")
    tmp = tmp_path / f".data.tmp-{dead_pid()}-4567cdef"
    tmp.mkdir()
    assert safeio.recover_dir(out) and (out / "x").read_text() == "old"
    assert safeio.clean_stale(out) == [tmp] and not tmp.exists()
    # a swap whose process still runs is never touched
    live = tmp_path / f".data.tmp-{os.getpid()}-89abcdef"
    live.mkdir()
    assert safeio.clean_stale(out) == [] and live.exists()


def test_a_kill_during_a_checkpoint_write_leaves_nothing_for_good(tmp_path):
    path = tmp_path / "checkpoint" / "state.safetensors"
    path.parent.mkdir()
    leftovers = [path.parent / f".state.safetensors.tmp-{dead_pid()}-0badc0de",
                 path.parent / f".state.safetensors.{dead_pid()}.tmp"]  # the name earlier versions used
    for leftover in leftovers:
        leftover.write_bytes(b"\0" * 1000)
    unrelated = path.parent / ".state.safetensors.notes"
    unrelated.write_text("not ours")
    save_state(path, {"step": 3})
    assert load_state(path)["step"] == 3
    assert not any(p.exists() for p in leftovers) and unrelated.exists()
    assert sorted(os.listdir(path.parent)) == [".state.safetensors.notes", "state.safetensors"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), safeio.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


# ------------------------------------------------------------------------------------- 3. FIFOs, devices, lying files


def test_fifos_and_devices_named_like_images_are_skipped_not_read(clip_model, photos, tmp_path, caplog):
    os.mkfifo(photos / "pipe.jpg")
    os.symlink("/dev/zero", photos / "zero.jpg")
    with deadline():
        assert [p.name for p in list_images(photos)] == ["0.png", "1.png", "2.png", "3.png"]
        assert "pipe.jpg (a FIFO)" in caplog.text
        index, stats = build_index(clip_model, photos, tmp_path / "idx", progress=False)
        assert stats["total"] == 4
        with pytest.raises(DataError, match="a FIFO, not a regular file"):
            load_image(photos / "pipe.jpg")
        with pytest.raises(DataError, match="a device, not a regular file"):
            load_image(photos / "zero.jpg")
        # a file swapped for a FIFO after indexing: the update refuses it instead of waiting on it
        (photos / "1.png").unlink()
        os.mkfifo(photos / "1.png")
        assert update_index(clip_model, tmp_path / "idx", progress=False)[1]["total"] == 3


def test_read_regular_refuses_files_over_the_limit(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 5000)
    assert safeio.read_regular(big, max_bytes=5000) == b"x" * 5000
    with pytest.raises(DataError, match="5,000 bytes, over the limit of 4,999"):
        safeio.read_regular(big, max_bytes=4999)


# ----------------------------------------------------------------------------------------------- 6. confinement


@pytest.fixture
def tree(tmp_path):
    """photos/ with a real image, links to a file and a folder outside it, and links inside it."""
    root, outside = tmp_path / "photos", tmp_path / "outside"
    noise_image(root / "real.png", 0)
    noise_image(root / "album" / "a.png", 1)
    noise_image(outside / "secret.png", 2)
    noise_image(outside / "private" / "b.png", 3)
    os.symlink(outside / "secret.png", root / "leak.png")
    os.symlink(outside / "private", root / "leakdir")
    os.symlink(root / "real.png", root / "alias.png")
    os.symlink(root / "album", root / "album_link")
    return root, outside


def names(paths, root):
    return sorted(p.relative_to(root).as_posix() for p in paths)


def test_links_are_skipped_by_default_and_never_lead_outside(tree, caplog):
    root, _ = tree
    assert names(list_images(root), root) == ["album/a.png", "real.png"]
    assert "leak.png (a symbolic link" in caplog.text
    # --follow-links: links inside the root are followed (each folder once), links out never
    assert names(list_images(root, follow_links=True), root) == ["album/a.png", "alias.png", "real.png"]
    assert "leading outside" in caplog.text


def test_the_index_never_holds_or_serves_a_file_outside_its_folder(clip_model, tree, tmp_path):
    root, outside = tree
    index, _ = build_index(clip_model, root, tmp_path / "idx", progress=False, follow_links=True)
    assert not any("secret" in str(p) or "private" in str(p) for p in index.paths)
    assert index.follow_links and ImageIndex.load(tmp_path / "idx").follow_links
    with pytest.raises(DataError, match="leads outside"):
        safeio.read_regular(root / "leak.png", root=root)
    # a catalogue edited to point outside is refused when the path is read
    db = sqlite3.connect(tmp_path / "idx" / "catalogue.sqlite")
    db.execute("UPDATE photos SET path = ? WHERE id = 0", (b"../outside/secret.png",))
    db.commit()
    db.close()
    index = ImageIndex.load(tmp_path / "idx")
    with pytest.raises(DataError, match="catalogue.sqlite: damaged: '../outside/secret.png' is not a path inside"):
        index.search(index.vectors(), k=len(index))
    with pytest.raises(DataError, match="catalogue.sqlite: damaged"):
        index.path_of(0)


def test_index_json_that_is_a_list_or_lacks_a_key_is_one_clear_error(clip_model, photos, tmp_path):
    build_index(clip_model, photos, tmp_path / "idx", progress=False)
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("[1, 2]")
    with pytest.raises(DataError, match="index.json: not a clipsnail index description"):
        ImageIndex.load(tmp_path / "idx")
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "version"}))
    with pytest.raises(DataError, match="index.json: index format version None is not one"):
        ImageIndex.load(tmp_path / "idx")
    meta_path.write_text(json.dumps(meta))
    db = sqlite3.connect(tmp_path / "idx" / "catalogue.sqlite")
    state = json.loads(db.execute("SELECT value FROM catalogue_info WHERE key = 'index'").fetchone()[0])
    db.execute("UPDATE catalogue_info SET value = ? WHERE key = 'index'",
               (json.dumps({k: v for k, v in state.items() if k != "rows"}),))
    db.commit()
    db.close()
    with pytest.raises(DataError, match="catalogue.sqlite: damaged: 'rows' of the index state is missing"):
        ImageIndex.load(tmp_path / "idx")


@pytest.mark.parametrize("name, expected", [
    ("../outside/secret.png", "leads outside"),
    ("album/../../outside/secret.png", "leads outside"),
    ("{outside}/secret.png", "an absolute path"),
    ("leak.png", "a symbolic link"),
    ("pipe.png", "is a FIFO"),
])
def test_caption_files_cannot_name_images_outside_the_folder(tree, tmp_path, name, expected):
    root, outside = tree
    os.mkfifo(root / "pipe.png")
    captions = tmp_path / "captions.csv"
    captions.write_text(f"image,caption\nreal.png,a real photo\n{name.format(outside=outside)},a secret\n")
    with deadline(), pytest.raises(DataError, match=rf"captions.csv:3: image .*{expected}"):
        load_split(captions, root, "all")


def test_follow_links_lets_caption_names_use_links_inside_the_folder(tree, tmp_path):
    root, _ = tree
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\nalias.png,a photo by another name\nreal.png,a photo\n")
    with pytest.raises(DataError, match="symbolic link"):
        load_split(captions, root, "all")
    assert load_split(captions, root, "all", follow_links=True)[0] == ["alias.png", "real.png"]
    captions.write_text("image,caption\nleak.png,a secret\n")
    with pytest.raises(DataError, match="leading outside"):
        load_split(captions, root, "all", follow_links=True)


def test_training_refuses_a_caption_file_that_reaches_outside(tree, tmp_path, capsys):
    root, _ = tree
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\nreal.png,a photo\n../outside/secret.png,a secret\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"images": [{"filename": "real.png", "split": "train"},
                                            {"filename": "../outside/secret.png", "split": "train"}]}))
    assert main(["clip", "train", "--captions", str(captions), "--images", str(root), "--split-file", str(split),
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "captions.csv:3: image '../outside/secret.png': leads outside" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------- 4. caption files


def test_an_unclosed_quote_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('image,caption\na.jpg,a dog\nb.jpg,"a cat on a mat\nc.jpg,a bird\nd.jpg,a fish\n')
    for strict in (True, False):
        with pytest.raises(DataError, match=r"captions.csv:3: a quote opened on this line is not closed: lines 3-5"):
            read_captions(path, strict=strict)
    # a quoted caption that really spans lines is still read
    path.write_text('image,caption\na.jpg,"a dog\nrunning"\nb.jpg,a cat\n')
    assert [r.caption for r in read_captions(path)] == ["a dog\nrunning", "a cat"]


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes(b"image,caption\na.jpg,a dog\nb.jpg,caf" + b"\xe9 au lait\n")
    with pytest.raises(DataError, match=r"captions.csv:3: not UTF-8 text \(byte 0xe9 at column 10\)"):
        read_captions(path)


def test_a_linked_class_folder_is_not_a_class(tmp_path, caplog):
    from clipsnail.data.images import list_image_folder

    root, outside = tmp_path / "classes", tmp_path / "outside"
    noise_image(root / "cat" / "0.png", 0)
    noise_image(outside / "secrets" / "0.png", 1)
    os.symlink(outside / "secrets", root / "dog")
    paths, labels, classes = list_image_folder(root)
    assert classes == ["cat"] and len(paths) == 1 and "dog: a symbolic link" in caplog.text


def test_training_never_writes_into_a_users_folder(shapes_dir, tmp_path, capsys):
    from helpers import tiny_clip_args

    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.json").write_text('{"theme": "dark"}')  # someone's config, not a run's
    assert main(tiny_clip_args(shapes_dir, users, "--set", "train.max_steps=1")) == 2
    assert "is not a clipsnail run directory" in capsys.readouterr().err
    assert os.listdir(users) == ["config.json"] and (users / "config.json").read_text() == '{"theme": "dark"}'


LOCK_HOLDER = """
import sys, time
from clipsnail.core.safeio import writer_lock
with writer_lock(sys.argv[1], "test folder"):
    print("locked", flush=True)
    time.sleep(60)
"""


@contextmanager
def locked_by_another_process(folder):
    """Another process holding the writer lock of `folder` (its pid is yielded)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_of_a_run_or_index_stops_naming_the_first(clip_run, clip_model, photos, shapes_dir, tmp_path,
                                                                   capsys):
    """Two `clip train --out SAME` (or two index builds) at once: the second stops at once with the pid of the
    first, writing nothing; once the first is gone (even killed), the lock is free again."""
    from helpers import run_error, tiny_clip_args

    run = tmp_path / "runs" / "clip"
    with locked_by_another_process(run) as pid:
        line = run_error(capsys, tiny_clip_args(shapes_dir, run, "--set", "train.max_steps=1"))
        assert f"{run}: another clipsnail (pid {pid}) is writing this run directory" in line
        assert not run.exists()
    index = tmp_path / "idx"
    with locked_by_another_process(index.absolute()) as pid:
        line = run_error(capsys, ["index", "build", "--model", str(clip_run), "--images", str(photos), "--out",
                                  str(index), "--no-progress", "--no-onnx"])
        assert f"another clipsnail (pid {pid}) is writing this index" in line and not index.exists()
    build_index(clip_model, photos, index, progress=False)  # the killed holder left no stale lock behind
    assert len(ImageIndex.load(index)) > 0


def test_a_link_at_the_lock_name_is_refused_and_its_target_kept(shapes_dir, tmp_path, capsys):
    """A symbolic link planted at `.NAME.lock` (dangling or not) is never written through: the training stops with
    one line naming the lock, and the file it points to keeps its bytes."""
    from helpers import run_error, tiny_clip_args

    precious = tmp_path / "precious.txt"
    precious.write_text("keep\n")
    run = tmp_path / "run_sym"
    os.symlink(precious, tmp_path / ".run_sym.lock")
    line = run_error(capsys, tiny_clip_args(shapes_dir, run, "--set", "train.max_steps=1"))
    assert f"{tmp_path / '.run_sym.lock'} cannot be used as this run directory's lock (is a symbolic link)" in line
    assert precious.read_text() == "keep\n" and not run.exists()
    os.symlink(tmp_path / "nowhere", tmp_path / ".idx.lock")  # a dangling link would otherwise be created
    with pytest.raises(DataError, match="is a symbolic link"), safeio.writer_lock(tmp_path / "idx", "index"):
        pass
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_name_that_is_not_a_file_is_one_line(tmp_path, kind):
    lock = tmp_path / ".idx.lock"
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    with pytest.raises(DataError, match=rf"{lock} cannot be used as this index's lock \(is a (folder|FIFO)\); "
                                        "remove it"), safeio.writer_lock(tmp_path / "idx", "index"):
        pass
    assert lock.is_dir() if kind == "folder" else lock.is_fifo()


# ----------------------------------------------------------------------- a full or read-only disk


def no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_the_rerun_starts_over(shapes_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    from helpers import run_error, tiny_clip_args

    from clipsnail.train import checkpoints

    run = tmp_path / "run"
    args = tiny_clip_args(shapes_dir, run, "--set", "train.max_steps=2", "--set", "train.checkpoint_every=1",
                          "--set", "train.log_every=1000")
    monkeypatch.setattr(checkpoints, "save_file", no_space)
    line = run_error(capsys, args)
    assert line.startswith(f"clipsnail: error: {run / 'checkpoint' / 'state.safetensors'}: cannot be written: No "
                           f"space left on device")
    written = sorted(p.relative_to(run).parts[0] for p in run.rglob("*"))  # no half-written file; TensorBoard's log
    assert set(written) <= {"checkpoint", "tensorboard"} and not list((run / "checkpoint").iterdir())
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0  # the half-made run is taken up, not refused as someone else's folder
    assert (run / "model.safetensors").is_file()


def test_a_full_disk_while_writing_an_index_keeps_the_old_one(clip_run, clip_model, photos, tmp_path, capsys,
                                                              monkeypatch):
    import errno

    from helpers import run_error

    import clipsnail.inference.vector_store as vector_store

    out = tmp_path / "idx"
    build_index(clip_model, photos, out, progress=False)
    before = ImageIndex.load(out).meta
    noise_image(photos / "new.png", 50)

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vector_store, "_append", disk_full)
    for argv in (["index", "build", "--model", str(clip_run), "--images", str(photos), "--out", str(out), "--no-onnx"],
                 ["index", "update", "--index", str(out), "--no-onnx"]):
        line = run_error(capsys, [*argv, "--no-progress"])
        assert "cannot be written: No space left on device" in line and "is kept as it was" in line, line
        assert ImageIndex.load(out).meta == before and len(ImageIndex.load(out)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "photos"]  # no temp folders left


def test_too_little_free_space_is_said_before_encoding(clip_run, photos, tmp_path, capsys, monkeypatch):
    from helpers import run_error

    import clipsnail.inference.index as index_module

    monkeypatch.setattr(index_module, "_encode", lambda *a, **k: pytest.fail("encoded although the disk is full"))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**16, 2**16))
    line = run_error(capsys, ["index", "build", "--model", str(clip_run), "--images", str(photos), "--out",
                              str(tmp_path / "idx"), "--no-progress", "--no-onnx"])
    assert "an index of 4 images needs about 1 MiB, but only 0 MiB are free" in line


def test_a_read_only_disk_met_anywhere_is_one_line(monkeypatch, capsys, tmp_path):
    import errno

    from helpers import run_error

    from clipsnail.cli import data

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / "captions.csv"))

    monkeypatch.setattr(data, "cmd_data_shapes", read_only)
    line = run_error(capsys, ["data", "shapes", "--out", str(tmp_path / "out")])
    assert line == (f"clipsnail: error: {tmp_path / 'out' / 'captions.csv'}: Read-only file system; what was there "
                    f"before is kept. Free some space (or write elsewhere) and run the command again")


def test_search_images_of_a_read_only_run_caches_its_vectors_in_clipsnail_home(clip_run, photos, tmp_path, capsys,
                                                                               monkeypatch):
    from clipsnail.cli import search

    clipsnail_home = tmp_path / "home"
    monkeypatch.setenv("CLIPSNAIL_HOME", str(clipsnail_home))
    monkeypatch.setattr(search, "writable", lambda folder: False)
    capsys.readouterr()
    assert main(["search", "--model", str(clip_run), "--images", str(photos), "a red circle", "-k", "2",
                 "--no-progress"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    cached = list((clipsnail_home / "embeddings").glob("*/*/index.json"))  # run, then folder
    assert len(cached) == 1 and ImageIndex.load(cached[0].parent).root == photos.resolve()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_weights_and_vectors_are_written_as_the_umask_says(clip_model, photos, tmp_path, umask):
    """safetensors writes 0600 whatever the umask; a run or index shared with a group failed on exactly those
    files. Every file we write gets 0666 less the umask, like the JSON beside it."""
    from clipsnail.core.runs import save_weights

    old = os.umask(umask)
    try:
        save_weights(clip_model, tmp_path / "model.safetensors")
        build_index(clip_model, photos, tmp_path / "idx", progress=False)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    files = [tmp_path / "model.safetensors", *(p for p in (tmp_path / "idx").iterdir() if p.is_file())]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(expected) for p in files}
