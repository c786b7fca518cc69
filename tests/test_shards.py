import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipsnail.cli import main
from clipsnail.core.errors import DataError
from clipsnail.data.shards import ShardStream, caption_text_id, count_samples, expand_urls, write_shards
from clipsnail.data.transforms import clip_train_transform

N_IMAGES = 24
TRANSFORM = clip_train_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), augment=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 tiny images (png and jpg), two captions each; every image's second caption is shared by 4 images."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    lines = ["image,caption"]
    for i in range(N_IMAGES):
        name = f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (10, 8), (10 * i, 255 - 10 * i, 7 * i)).save(root / "images" / name)
        lines += [f"{name},picture number {i}", f"{name},a colour of kind {i % 4}"]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def shards(corpus, out, **kw):
    kw = {"split": "all", "shard_size": 3, **kw}
    return write_shards(corpus / "captions.csv", corpus / "images", out, **kw)


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, shards(corpus, out)


def key_to_image(out):
    """key -> original image name, read back from the shards' json members."""
    table = {}
    for url in expand_urls(str(out)):
        with tarfile.open(url) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    table[int(m.name.split(".")[0])] = json.loads(tar.extractfile(m).read())["image"]
    return table


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_write_shards_layout(corpus, written):
    out, summary = written
    assert summary["shards"] == 8 and summary["samples"] == N_IMAGES and summary["captions"] == 2 * N_IMAGES
    assert summary["skipped"] == 0 and summary["pattern"] == f"{out}/{{000000..000007}}.tar"
    assert expand_urls(summary["pattern"]) == [str(out / f"{i:06d}.tar") for i in range(8)]
    assert json.loads((out / "sizes.json").read_text()) == {f"{i:06d}.tar": 3 for i in range(8)}
    info = json.loads((out / "_info.json").read_text())
    assert info["samples"] == N_IMAGES and info["split"] == "all" and info["source_captions"].endswith("captions.csv")
    with tarfile.open(out / "000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name.split(".")[0] for m in members] == ["000000000"] * 3 + ["000000001"] * 3 + ["000000002"] * 3
        assert {m.mtime for m in members} == {0} and {m.uname for m in members} == {""}
        files = {m.name: tar.extractfile(m).read() for m in members}
    meta = json.loads(files["000000000.json"])
    image = [n for n in files if n.startswith("000000000.") and n.rsplit(".", 1)[1] in ("png", "jpg")]
    assert image == [f"000000000.{meta['image'].rsplit('.', 1)[1]}"]  # extension kept
    assert files[image[0]] == (corpus / "images" / meta["image"]).read_bytes()  # bytes unchanged
    assert files["000000000.txt"].decode() == meta["captions"][0] and len(meta["captions"]) == 2
    assert sorted(key_to_image(out).values()) == sorted(p.name for p in (corpus / "images").iterdir())


def test_write_shards_deterministic(corpus, tmp_path, written):
    out, _ = written
    again = shards(corpus, tmp_path / "again")
    assert again["shards"] == 8
    for i in range(8):
        assert (tmp_path / "again" / f"{i:06d}.tar").read_bytes() == (out / f"{i:06d}.tar").read_bytes()
    shards(corpus, tmp_path / "other", seed=1)
    assert key_to_image(tmp_path / "other") != key_to_image(out)
    shards(corpus, tmp_path / "sorted", seed=None, shard_size=10)
    table = key_to_image(tmp_path / "sorted")
    assert [table[k] for k in sorted(table)] == sorted(table.values())
    assert sorted(p.name for p in (tmp_path / "sorted").glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]


def test_rewrite_removes_stale_shards(corpus, tmp_path):
    shards(corpus, tmp_path, shard_size=3)
    summary = shards(corpus, tmp_path, shard_size=10)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 10, "000001.tar": 10, "000002.tar": 4}
    assert summary["shards"] == 3 and not list(tmp_path.glob(".*"))  # no temp files left


def test_write_shards_split_and_errors(corpus, tmp_path):
    train = shards(corpus, tmp_path / "train", split="train")
    test = shards(corpus, tmp_path / "test", split="test")
    assert 0 < train["samples"] < N_IMAGES and train["samples"] + test["samples"] <= N_IMAGES
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\nimg00.jpg,fine\nnope.jpg,gone\n")
    with pytest.raises(DataError, match=r"bad.csv:3: image 'nope.jpg' not found"):
        write_shards(bad, corpus / "images", tmp_path / "x", split="all")


def test_write_shards_skips_corrupt_images(corpus, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes((corpus / "images" / "img01.png").read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "c.csv").write_text("image,caption\na.png,one\nbroken.jpg,two\nb.png,three\n")
    summary = write_shards(tmp_path / "c.csv", images, tmp_path / "out", split="all")
    assert summary["samples"] == 2 and summary["skipped"] == 1 and summary["captions"] == 2
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(DataError, match="broken.jpg: cannot read image"):  # after two shards of one image each
        write_shards(tmp_path / "c.csv", images, tmp_path / "out", split="all", strict=True, seed=None, shard_size=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # a failed write changes nothing


def test_one_pass_covers_every_image_once(written):
    out, summary = written
    stream = ShardStream(summary["pattern"], TRANSFORM, seed=3, shuffle_buffer=5)
    assert stream.num_samples == N_IMAGES
    stream.set_epoch(0, batch_size=4)
    samples = take(stream, 3 * N_IMAGES)
    for p in range(3):  # the stream goes on forever, a full pass at a time
        ids = [s["image_id"] for s in samples[p * N_IMAGES:(p + 1) * N_IMAGES]]
        assert sorted(ids) == list(range(N_IMAGES))
    assert samples[0]["image"].shape == (3, 8, 8) and samples[0]["image"].dtype == torch.float32
    # caption ids name the text: the shared "a colour of kind k" captions get one id across images
    for s in samples:
        assert s["caption_id"] == caption_text_id(s["caption"])
    table = key_to_image(out)
    for s in samples:
        i = int(table[s["image_id"]][3:5])
        assert s["caption"] in (f"picture number {i}", f"a colour of kind {i % 4}")
    # one of the image's captions drawn per sample: over three passes, some images show both
    assert len({(s["image_id"], s["caption"]) for s in samples}) > N_IMAGES


def test_ranks_are_disjoint(written):
    out, summary = written
    sizes = json.loads((out / "sizes.json").read_text())
    seen = []
    for rank in range(2):
        stream = ShardStream(summary["pattern"], TRANSFORM, shuffle_buffer=4)
        stream.set_epoch(1, rank=rank, world_size=2, batch_size=4)
        first_pass = sum(sizes[u.rsplit("/", 1)[1]] for u in stream.worker_shards())
        seen.append([s["image_id"] for s in take(stream, first_pass)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_IMAGES))


def describe(samples):
    return [(s["image_id"], s["caption"], s["image"].sum().item()) for s in samples]


def test_order_is_seeded(written):
    _, summary = written

    def run(epoch, rank=0, seed=0):
        stream = ShardStream(summary["pattern"], TRANSFORM, seed=seed, shuffle_buffer=5)
        stream.set_epoch(epoch, rank=rank, world_size=2, batch_size=4)
        return describe(take(stream, 20))

    assert run(0) == run(0)
    assert [d[0] for d in run(0)] != [d[0] for d in run(1)]
    assert [d[0] for d in run(0)] != [d[0] for d in run(0, seed=1)]
    assert [d[0] for d in run(0)] != [d[0] for d in run(0, rank=1)]


def collate(samples):
    return samples


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_exactly(written, workers):
    _, summary = written
    stream = ShardStream(summary["pattern"], TRANSFORM, seed=5, shuffle_buffer=3)

    def batches(skip, n):
        stream.set_epoch(2, batch_size=4, skip_batches=skip)
        loader = DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=collate)
        it = iter(loader)
        return [describe(next(it)) for _ in range(n)]

    full = batches(0, 10)
    assert batches(3, 7) == full[3:]
    assert batches(6, 4) == full[6:]


def corrupt_shard(path):
    with tarfile.open(path, "w") as tar:
        good = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 0, 0)).save(good, format="PNG")
        for name, data in (("a/k1.png", good.getvalue()), ("a/k1.txt", b"a red square"),
                           ("a/k2.jpg", b"garbage, not a jpeg"), ("a/k2.txt", b"broken"),
                           ("a/k3.txt", b"no image at all")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    corrupt_shard(tmp_path / "c.tar")
    stream = ShardStream(str(tmp_path / "c.tar"), TRANSFORM, shuffle_buffer=0)
    assert stream.num_samples == 3  # no sizes.json: counted by reading the shard
    stream.set_epoch(0, batch_size=1)
    first, second, third = take(stream, 3)
    assert first["caption"] == "a red square" and first["image_id"] not in (0, 1)  # key "a/k1": hashed
    assert second is None and third is None
    strict = ShardStream(str(tmp_path / "c.tar"), TRANSFORM, shuffle_buffer=0, strict=True)
    with pytest.raises(DataError, match=r"c.tar:a/k2.jpg: cannot read image"):
        take(strict, 2)


def test_a_corrupt_sample_is_counted_once_where_the_task_drops_it(tmp_path):
    """The stream yields None for a corrupt sample; the task's collate drops and counts it, as for a folder of
    images: once (the stream counting it too made every corrupt sample count twice)."""
    from clipsnail.tasks.clip import ClipTask

    corrupt_shard(tmp_path / "c.tar")
    stream = ShardStream(str(tmp_path / "c.tar"), TRANSFORM, shuffle_buffer=0)
    stream.set_epoch(0, batch_size=3)
    task = ClipTask.__new__(ClipTask)  # only its collate is used
    task.train_dataset, task.tokenizer = stream, lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)
    batch = task.collate(take(stream, 3))
    assert len(batch["image_ids"]) == 1 and stream.skipped == 2


def test_expand_urls(tmp_path):
    for i in range(3):
        (tmp_path / f"s{i:02d}.tar").write_bytes(b"")
    (tmp_path / "other.txt").write_text("x")
    names = [str(tmp_path / f"s{i:02d}.tar") for i in range(3)]
    assert expand_urls(f"{tmp_path}/s{{00..02}}.tar") == names
    assert expand_urls(str(tmp_path)) == names
    assert expand_urls(f"{names[2]}::{tmp_path}/s{{00..01}}.tar") == names[2:] + names[:2]
    with pytest.raises(DataError, match=r"2 of 5 shards .* not found: .*s03.tar, .*s04.tar"):
        expand_urls(f"{tmp_path}/s{{00..04}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        expand_urls(str(tmp_path / "empty"))


def test_num_samples_without_sizes_json(corpus, tmp_path):
    shards(corpus, tmp_path, shard_size=5)
    assert count_samples(expand_urls(str(tmp_path))) == N_IMAGES
    (tmp_path / "sizes.json").unlink()
    assert count_samples(expand_urls(str(tmp_path))) == N_IMAGES


def test_too_few_shards_for_the_ranks(written):
    _, summary = written
    stream = ShardStream(summary["pattern"], TRANSFORM)
    with pytest.raises(DataError, match="8 shards cannot feed 9 ranks"):
        stream.set_epoch(0, rank=0, world_size=9, batch_size=2)


def test_cli_data_shards(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["data", "shards", "--captions", str(corpus / "captions.csv"), "--images", str(corpus / "images"),
                 "--out", str(out), "--split", "all", "--shard-size", "10", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 3 and summary["samples"] == N_IMAGES and summary["skipped"] == 0
    assert summary["pattern"] == f"{out}/{{000000..000002}}.tar"
    code = main(["data", "shards", "--captions", str(tmp_path / "none.csv"), "--images", str(corpus / "images"),
                 "--out", str(out)])
    assert code == 2 and "none.csv: no such file" in capsys.readouterr().err
