import json

import pytest

from clipsnail.core.errors import DataError
from clipsnail.data.caption_corpora import (
    CaptionRecord,
    detect_format,
    group_by_image,
    hash_split,
    read_captions,
    split_records,
)

EXPECTED = [
    ("a.jpg", "A dog runs, jumps and plays ."),
    ("a.jpg", "A brown dog outside"),
    ("b.jpg", 'A man says "hi"'),
]


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


FILES = {
    "flickr8k_csv": ("captions.txt", 'image,caption\na.jpg,"A dog runs, jumps and plays ."\n'
                     'a.jpg,A brown dog outside\nb.jpg,"A man says ""hi"""\n'),
    "flickr8k_token": ("Flickr8k.token.txt", 'a.jpg#0\tA dog runs, jumps and plays .\n'
                       'a.jpg#1\tA brown dog outside\nb.jpg#0\tA man says "hi"\n'),
    "flickr30k": ("results.csv", 'image_name| comment_number| comment\n'
                  'a.jpg| 0| A dog runs, jumps and plays .\n'
                  'a.jpg| 1| A brown dog outside\nb.jpg| 0| A man says "hi"\n'),
    "coco": ("captions.json", json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A dog runs, jumps and plays .\n"},
                        {"id": 11, "image_id": 1, "caption": " A brown dog outside"},
                        {"id": 12, "image_id": 2, "caption": 'A man says "hi"'}]})),
    "csv": ("data.csv", 'ID,File_Name,Text,score\n1,a.jpg,"A dog runs, jumps and plays .",3\n'
            '2,a.jpg,A brown dog outside,4\n3,b.jpg,"A man says ""hi""",5\n'),
    "tsv": ("data.tsv", 'Sentence\tImage\nA dog runs, jumps and plays .\ta.jpg\n'
            'A brown dog outside\ta.jpg\n"A man says ""hi"""\tb.jpg\n'),
}


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_formats_round_trip(tmp_path, fmt):
    name, text = FILES[fmt]
    path = write(tmp_path / name, text)
    assert detect_format(path) == fmt
    records = read_captions(path)
    assert [(r.image, r.caption) for r in records] == EXPECTED
    assert read_captions(path, format=fmt) == records
    assert records[0].source.startswith(f"{path}:")


def test_bom_blank_lines_and_unquoted_comma(tmp_path):
    path = write(tmp_path / "c.csv", "image,caption\r\n\r\na.jpg,a dog, running\r\n", encoding="utf-8-sig")
    assert detect_format(path) == "flickr8k_csv"
    [record] = read_captions(path)
    assert record == CaptionRecord("a.jpg", "a dog, running", f"{path}:3")


def test_coco_source_names_annotation(tmp_path):
    path = write(tmp_path / FILES["coco"][0], FILES["coco"][1])
    assert read_captions(path)[1].source == f"{path}:annotation id 11"


@pytest.mark.parametrize("name, text, expected", [
    ("captions.csv", "image,caption\na.jpg,fine\nb.jpg,   \n",
     "captions.csv:3: empty caption for image 'b.jpg'"),
    ("Flickr8k.token.txt", "a.jpg#0\tfine\nb.jpg no tab here\n", "Flickr8k.token.txt:2: malformed line"),
    ("results.csv", "image_name| comment_number| comment\na.jpg| 0| fine\n2199200615.jpg| 4 A dog runs .\n",
     "results.csv:3: expected 3 fields"),
    ("data.csv", "id,text\n1,hello\n", "data.csv: no image column"),
    ("data.tsv", "image\tscore\na.jpg\t3\n", "found columns: image, score"),
    ("blank.csv", "  \n\n", "blank.csv: empty file"),
    ("empty.csv", "", "empty.csv: empty file"),
    ("header.csv", "image,caption\n", "header.csv: no captions"),
    ("notes.txt", "just some words\n", "notes.txt: unknown caption format"),
    ("bad.json", '{"images": [}', "bad.json:1: invalid JSON"),
    ("other.json", '{"x": 1}', "other.json: not COCO captions"),
    ("caps.json", json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                              "annotations": [{"id": 7, "image_id": 1, "caption": ""}]}),
     "caps.json:annotation id 7: empty caption for image 'a.jpg'"),
])
def test_errors_name_file_and_line(tmp_path, name, text, expected):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as info:
        read_captions(path)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_unknown_format_lists_accepted_ones(tmp_path):
    path = write(tmp_path / "notes.txt", "hello\n")
    with pytest.raises(DataError, match="flickr8k_token"):
        detect_format(path)
    with pytest.raises(DataError, match="accepted: auto, flickr8k_csv"):
        read_captions(write(tmp_path / "c.csv", "image,caption\na,b\n"), format="yaml")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file"):
        read_captions(tmp_path / "nope.csv")


def test_not_strict_skips_bad_lines(tmp_path, caplog):
    path = write(tmp_path / "results.csv", FILES["flickr30k"][1] + "c.jpg| 4 no separator\nd.jpg| 0| ok\n")
    records = read_captions(path, strict=False)
    assert [r.image for r in records] == ["a.jpg", "a.jpg", "b.jpg", "d.jpg"]
    assert "skipped 1" in caplog.text and "results.csv:5" in caplog.text


def records_for(n_images, per_image=2):
    return [CaptionRecord(f"img_{i}.jpg", f"caption {j}", f"f:{i}")
            for i in range(n_images) for j in range(per_image)]


def test_hash_split_properties():
    records = records_for(2000)
    parts = {s: split_records(records, s) for s in ("train", "val", "test")}
    images = {s: {r.image for r in rs} for s, rs in parts.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    assert set().union(*images.values()) == {r.image for r in records}
    assert sum(len(rs) for rs in parts.values()) == len(records)  # both captions of an image stay together
    assert 0.77 < len(images["train"]) / 2000 < 0.83 and 0.08 < len(images["val"]) / 2000 < 0.12
    assert split_records(list(reversed(records)), "val") == list(reversed(parts["val"]))  # order independent
    assert split_records(records, "all") == records
    assert hash_split("img_3.jpg") == hash_split("img_3.jpg")
    halves = split_records(records, "train", fractions=(0.5, 0.5, 0.0))
    assert 0.45 < len(halves) / len(records) < 0.55


def test_bad_split_arguments():
    with pytest.raises(DataError, match="train, val, test, all"):
        split_records(records_for(3), "training")
    with pytest.raises(Exception, match="summing to 1"):
        split_records(records_for(3), "train", fractions=(0.5, 0.1, 0.1))


def test_split_file(tmp_path, caplog):
    names = ("a.jpg", "b.jpg", "val2014/c.jpg", "d.jpg", "e.jpg")
    records = [CaptionRecord(name, "c", "f:1") for name in names]
    split_file = write(tmp_path / "dataset_x.json", json.dumps({"images": [
        {"filename": "a.jpg", "split": "train"}, {"filename": "b.jpg", "split": "restval"},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test"},
        {"filename": "d.jpg", "split": "val"}]}))
    assert [r.image for r in split_records(records, "train", split_file=split_file)] == ["a.jpg", "b.jpg"]
    assert [r.image for r in split_records(records, "test", split_file=split_file)] == ["val2014/c.jpg"]
    assert "1 images" in caplog.text
    bad = write(tmp_path / "bad_split.json", json.dumps({"images": [{"filename": "a.jpg", "split": "dev"}]}))
    with pytest.raises(DataError, match=r"bad_split.json: images\[0\] has split 'dev'"):
        split_records(records, "train", split_file=bad)


def test_group_by_image():
    records = [CaptionRecord(i, c, "f:1") for i, c in [("b", "x"), ("a", "y"), ("b", "z")]]
    assert group_by_image(records) == (["b", "a"], ["x", "y", "z"], [0, 1, 0])


def test_a_coco_image_id_listed_twice_is_named(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 7, "file_name": "b.jpg"}],
                                "annotations": [{"image_id": 7, "caption": "a dog"}]}))
    with pytest.raises(DataError, match=r"captions\.json: images\[1\]: image id 7 is listed twice, for 'a\.jpg' and "
                                        r"'b\.jpg'"):
        read_captions(path)


def test_split_all_trains_on_every_photo_and_the_default_says_what_it_holds_out(shapes_dir, tmp_path, caplog, capsys):
    import logging

    from clipsnail.cli import main
    from clipsnail.data.caption_corpora import CaptionDataConfig, load_caption_split

    every = {r.image for r in read_captions(shapes_dir / "captions.csv")}
    data = CaptionDataConfig(captions=str(shapes_dir / "captions.csv"), images=str(shapes_dir / "images"))
    with caplog.at_level(logging.INFO, logger="clipsnail.data.caption_corpora"):
        held = load_caption_split(data, "train")[0]
    assert 0 < len(held) < len(every)
    assert f"training on {len(held)} of the {len(every)} captioned photos: {len(every) - len(held)} held out" \
        in caplog.text
    data.train_split = "all"
    assert sorted(load_caption_split(data, "train")[0]) == sorted(every)
    with pytest.raises(DataError, match="none is held out for val"):
        load_caption_split(data, "val")

    from helpers import tiny_clip_args

    run = tmp_path / "all"
    assert main(tiny_clip_args(shapes_dir, run, "--split", "all", "--set", "train.max_steps=1")) == 0
    assert json.loads((run / "config.json").read_text())["data"]["train_split"] == "all"
