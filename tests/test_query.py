"""Query algebra (clipsnail.inference.query): the grammar and its errors, how weights and negative terms move the
ranking (on an index whose embeddings are known exactly), and the same grammar in `clipsnail search` and /api/search."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from helpers import noise_image, run_error
from PIL import Image

from clipsnail.cli import main
from clipsnail.core.errors import ClipsnailError
from clipsnail.data.images import as_pil_images
from clipsnail.inference.index import build_index
from clipsnail.inference.query import QueryError, Term, combine, local_image, parse_query
from clipsnail.serve import create_app

# ----------------------------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize("query,terms", [
    ("golden retriever", [(1.0, "golden retriever")]),
    ("2:golden retriever", [(2.0, "golden retriever")]),
    ("0.5:cat + 1e1:dog", [(0.5, "cat"), (10.0, "dog")]),
    ("a red circle - fruit", [(1.0, "a red circle"), (-1.0, "fruit")]),
    ("- fruit + 2:cat", [(-1.0, "fruit"), (2.0, "cat")]),
    ("+ cat", [(1.0, "cat")]),
    ("cat  -\tdog +  3:bird ", [(1.0, "cat"), (-1.0, "dog"), (3.0, "bird")]),
    # Text, not operators or weights: + and - inside words, a colon after a prefix that is not a number.
    ("t-shirt", [(1.0, "t-shirt")]),
    ("a -b c+ c++", [(1.0, "a -b c+ c++")]),
    ("photo: a dog", [(1.0, "photo: a dog")]),
    ("re:union - x-ray", [(1.0, "re:union"), (-1.0, "x-ray")]),
    ("AC/DC ~5 dogs", [(1.0, "AC/DC ~5 dogs")]),
    ("2:photo: a dog", [(2.0, "photo: a dog")]),
])
def test_the_grammar_parses_weights_signs_and_text(query, terms):
    assert parse_query(query) == [Term(w, "text", v) for w, v in terms]


@pytest.mark.parametrize("query,message", [
    ("", "the text query is empty"),
    ("   ", "the text query is empty"),
    ("cat +", "no term after the '+' at the end"),
    ("cat -  ", "no term after the '-' at the end"),
    ("-", "no term after the '-' at the end"),
    ("+ + dog", "no term after the '+' at character 1"),
    ("cat + - dog", "no term after the '+' at character 5"),
    ("nan:cat", "term 'nan:cat': the weight 'nan' must be a finite number above 0"),
    ("cat + inf:dog", "term 'inf:dog': the weight 'inf'"),
    ("0:cat", "term '0:cat': the weight '0'"),
    ("cat + -1:dog", "term '-1:dog': the weight '-1'"),
    ("2:", "term '2:': nothing after the weight"),
    ("- fruit", "every term is negative"),
    ("- fruit - 2:cat", "every term is negative"),
])
def test_malformed_queries_are_one_line_errors_saying_where(query, message):
    with pytest.raises(QueryError) as e:
        parse_query(query)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ClipsnailError)  # the CLI prints it as one line


def test_image_terms_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "pool.jpg")
    (tmp_path / "notes.png.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    assert parse_query("2:golden retriever + ./pool.jpg - fruit", local_image) == [
        Term(2.0, "text", "golden retriever"), Term(1.0, "image", "pool.jpg"), Term(-1.0, "text", "fruit")]
    # An existing image file is an image without ./ ; a missing one without it is text.
    assert parse_query("pool.jpg - 0.5:other.jpg", local_image) == [
        Term(1.0, "image", "pool.jpg"), Term(-0.5, "text", "other.jpg")]
    absolute = str(tmp_path / "pool.jpg")
    assert parse_query(f"3:{absolute}", local_image) == [Term(3.0, "image", absolute)]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_query("~/pool.jpg", local_image) == [Term(1.0, "image", absolute)]
    assert parse_query("notes.png.txt + folder.png", local_image)[1] == Term(1.0, "text", "folder.png")
    for query, message in [("cat + ./missing.jpg", "./missing.jpg: no such image file"),
                           ("/no/such/dir/x.png", "/no/such/dir/x.png: no such image file"),
                           ("../", "../: not an image file"), ("~/folder.png", "~/folder.png: not an image file")]:
        with pytest.raises(QueryError, match=message):
            parse_query(query, local_image)


def test_combine_is_the_normalised_weighted_sum_of_unit_vectors():
    a, b = torch.tensor([[3.0, 0, 0]]), torch.tensor([[0, 0.5, 0]])  # unit-normalised first: lengths do not count
    np.testing.assert_allclose(combine([a, b], [1.0, 1.0]), np.array([[1, 1, 0]]) / 2**0.5, rtol=1e-6)
    np.testing.assert_allclose(combine([a.numpy(), b], [2.0, -1.0]), np.array([[2, -1, 0]]) / 5**0.5, rtol=1e-6)
    unit = F.normalize(torch.randn(1, 16), dim=-1)
    assert np.array_equal(combine([unit], [1.0]), unit.numpy()) and np.array_equal(combine([unit[0]], [2.0]),
                                                                                   unit.numpy())
    assert combine([unit], [1.0]).dtype == np.float32
    with pytest.raises(QueryError, match="cancel out"):
        combine([a, a], [1.0, -1.0])
    with pytest.raises(QueryError, match="cancel out"):
        combine([a, b, a], [2.0, 0.0001, -2.0])  # what is left is below rounding-noise level of the weights


# ----------------------------------------------------------------------------------------------- rankings


class ColourModel:
    """A stand-in CLIP with known geometry: an image embeds as its mean RGB colour, a text as the sum of the
    colours it names (an unknown word as a fourth direction)."""

    WORDS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1)}

    def __init__(self):
        self.embed_dim, self.image_size, self.run_dir = 4, 8, None

    def eval(self):
        return self

    def preprocess(self, image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255

    def encode_image(self, images):
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(im) for im in as_pil_images(images)])
        rgb = images.mean(dim=(2, 3))
        return F.normalize(torch.cat([rgb, torch.zeros(len(rgb), 1)], dim=1), dim=-1)

    def encode_text(self, texts):
        rows = []
        for text in texts:
            known = [self.WORDS[w] for w in text.split() if w in self.WORDS]
            rows.append([*np.sum(known, axis=0), 0.0] if known else [0.0, 0.0, 0.0, 1.0])
        return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# Solid colours; orange and lime lie between red and green, nearer one of them ((3, 1, 0) and (1, 3, 0)).
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "orange": (255, 85, 0), "lime": (85, 255, 0), "more/cyan": (0, 255, 255)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    for name, rgb in COLOURS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), rgb).save(root / f"{name}.png")
    model = ColourModel()
    index, _ = build_index(model, root, root.parent / "colour-index", progress=False)
    return model, index


def ranking(colours, query: str) -> list[str]:
    model, index = colours
    terms = parse_query(query)
    vector = combine([model.encode_text([t.value]) for t in terms], [t.weight for t in terms])
    return [h.path.name.removesuffix(".png") for h in index.search(vector, k=len(index))[0]]


def test_a_negative_term_ranks_what_is_like_a_but_not_b_first(colours):
    assert ranking(colours, "yellow")[0] == "yellow"
    minus = ranking(colours, "yellow - green")
    assert minus[:2] == ["red", "orange"] and minus[-1] in ("green", "more/cyan")
    assert ranking(colours, "- green + yellow") == minus  # where the negative term stands does not matter
    assert ranking(colours, "yellow - red")[:2] == ["green", "lime"]


def test_weights_pull_the_query_towards_their_term(colours):
    assert ranking(colours, "red + green")[0] == "yellow"
    towards_red, towards_green = ranking(colours, "3:red + green"), ranking(colours, "red + 3:green")
    assert towards_red[0] == "orange" and towards_green[0] == "lime"
    assert towards_red.index("red") < towards_red.index("green")
    assert towards_green.index("green") < towards_green.index("red")


# ----------------------------------------------------------------------------------------------- the web app


@pytest.fixture(scope="module")
def web(colours):
    model, index = colours
    return TestClient(create_app(index, model), base_url="http://127.0.0.1")


def web_ranking(web, q: str) -> list[str]:
    r = web.get("/api/search", params={"q": q, "k": 10})
    assert r.status_code == 200, r.text
    return [h["path"].removesuffix(".png") for h in r.json()["hits"]]


def test_the_web_search_takes_the_grammar_with_indexed_images_as_terms(web, colours):
    assert web_ranking(web, "yellow - green")[:2] == ["red", "orange"]
    assert web_ranking(web, "3:red + green")[0] == "orange" and web_ranking(web, "red + 3:green")[0] == "lime"
    # Image terms use the stored vectors of the index, named by their path as hits show it.
    hits = web.get("/api/search", params={"q": "more/cyan.png", "k": 2}).json()["hits"]
    assert hits[0]["path"] == "more/cyan.png" and hits[0]["name"] == "cyan.png" and hits[0]["score"] > 0.999
    assert web_ranking(web, "red.png + green.png")[0] == "yellow"
    assert web_ranking(web, "3:./red.png + green.png")[0] == "orange"
    assert web_ranking(web, "yellow - green.png")[:2] == ["red", "orange"]
    assert web_ranking(web, "cyan") == web_ranking(web, "more/cyan.png")
    assert web_ranking(web, "purple.png")  # not in the index and not path-like: text, as on the command line


@pytest.mark.parametrize("q,detail", [
    ("cat +", "no term after the '+' at the end"),
    ("+ + dog", "no term after the '+' at character 1"),
    ("nan:red", "the weight 'nan'"),
    ("- red", "every term is negative"),
    ("red - red", "cancel out"),
    ("red.png - red", "cancel out"),
    ("/etc/passwd", "/etc/passwd: not an image of this index"),
    ("red + ../../etc/passwd", "../../etc/passwd: not an image of this index"),
    ("~/photo.jpg", "~/photo.jpg: not an image of this index"),
    ("./nope.png", "./nope.png: not an image of this index"),
    (" ", "the text query is empty"),
])
def test_malformed_web_queries_are_422_with_the_message(web, q, detail):
    r = web.get("/api/search", params={"q": q})
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]


def test_an_absolute_path_to_an_indexed_file_is_not_an_image_term(web, colours):
    _, index = colours
    r = web.get("/api/search", params={"q": str(index.paths[0])})  # the server's own path of an indexed file
    assert r.status_code == 422 and "not an image of this index" in r.json()["detail"]


# ----------------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def noise_index(clip_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("noise") / "photos"
    for i in range(6):
        noise_image(root / f"{i}.png", i)
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    index, _ = build_index(clip_model, root, root.parent / "idx", progress=False)
    return root, index


def search_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_shell_form_on_the_command_line(clip_model, noise_index, capsys, monkeypatch):
    root, index = noise_index
    idx = str(index.index_dir)
    # A plain query searches with exactly the vector it always did.
    plain = search_json(capsys, ["search", "--index", idx, "a red circle", "-k", "6"])
    direct = index.search(clip_model.encode_text(["a red circle"]), k=6)[0]
    assert plain == [{"path": str(h.path), "score": round(h.score, 4)} for h in direct]
    # Several arguments, "-" and "+" among them, are one query; ./ names a file in the working directory.
    monkeypatch.chdir(root)
    hits = search_json(capsys, ["search", "--index", idx, "2:a red circle", "+", "9:./3.png", "-", "blue", "-k", "6"])
    terms = [clip_model.encode_text(["a red circle"]), clip_model.encode_image([root / "3.png"]),
             clip_model.encode_text(["blue"])]
    expected = index.search(combine(terms, [2.0, 9.0, -1.0]), k=6)[0]
    assert [h["path"] for h in hits] == [str(h.path) for h in expected]
    assert [h["score"] for h in hits] == [round(h.score, 4) for h in expected]
    assert search_json(capsys, ["search", "--index", idx, "-", "blue", "+", "a red circle"])  # negative first
    # --image still works, and gives the same as the query of that one image
    by_flag = search_json(capsys, ["search", "--index", idx, "--image", "3.png", "-k", "3"])
    assert by_flag == search_json(capsys, ["search", "--index", idx, "./3.png", "-k", "3"])
    assert by_flag[0]["path"] == str(root / "3.png") and by_flag[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert "no term after the '+' at the end" in run_error(capsys, ["search", "--index", idx, "cat", "+"])
    assert "the weight 'nan'" in run_error(capsys, ["search", "--index", idx, "nan:cat"])
    assert "every term is negative" in run_error(capsys, ["search", "--index", idx, "-", "fruit"])
    assert "./gone.png: no such image file" in run_error(capsys, ["search", "--index", idx, "cat", "-", "./gone.png"])
    assert "broken.png: cannot read image" in run_error(capsys, ["search", "--index", idx, "cat + ./broken.png"])
    assert "cancel out" in run_error(capsys, ["search", "--index", idx, "cat - cat"])
    assert "exactly one" in run_error(capsys, ["search", "--index", idx, "cat", "--image", "3.png"])


# ----------------------------------------------------------------------------------------------- bounded cost


class CountingColourModel(ColourModel):
    """ColourModel that records each batch of texts it encodes."""

    def __init__(self):
        super().__init__()
        self.text_batches = []

    def encode_text(self, texts):
        self.text_batches.append(list(texts))
        return super().encode_text(texts)


def test_a_querys_distinct_texts_are_encoded_once_in_one_batch(colours):
    _, index = colours
    model = CountingColourModel()
    web = TestClient(create_app(index, model), base_url="http://127.0.0.1")
    r = web.get("/api/search", params={"q": " + ".join(["red"] * 16), "k": 3})
    assert r.status_code == 200 and r.json()["hits"][0]["path"] == "red.png"
    assert model.text_batches == [["red"]]  # sixteen times the same term costs one encoding
    model.text_batches.clear()
    assert web_ranking(web, "red + green - blue + red.png + 2:red")[0] == "orange"
    assert model.text_batches == [["red", "green", "blue"]]  # one batch, each text once; no image is encoded


@pytest.mark.parametrize("terms", [17, 50])
def test_a_query_of_too_many_terms_is_refused_before_any_work(colours, terms):
    _, index = colours
    model = CountingColourModel()
    web = TestClient(create_app(index, model), base_url="http://127.0.0.1")
    r = web.get("/api/search", params={"q": " + ".join(["a"] * terms)})
    assert r.status_code == 422 and f"the query has {terms} terms; at most 16 are allowed" in r.json()["detail"]
    assert model.text_batches == []
    with pytest.raises(QueryError, match="at most 16"):
        parse_query(" - ".join(["a"] * terms))


@pytest.mark.parametrize("weight", ["1e40", "1e308", "1001"])
def test_weights_past_the_bound_are_refused(web, weight):
    with pytest.raises(QueryError, match=rf"the weight '{weight}' must be a finite number above 0 and at most 1000"):
        parse_query(f"{weight}:dog + cat")
    r = web.get("/api/search", params={"q": f"{weight}:red + green"})
    assert r.status_code == 422 and "at most 1000" in r.json()["detail"]


def test_combine_cannot_overflow_or_pass_on_non_finite_vectors():
    a, b = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 1.0, 0]])
    # Weights far past float32's range still give the direction they mean (a sum in float32 overflowed to inf/NaN).
    np.testing.assert_allclose(combine([a, b], [1e300, 1e300]), np.array([[1, 1, 0]]) / 2**0.5, rtol=1e-6)
    np.testing.assert_allclose(combine([a, b], [1e40, 1.0]), a.numpy(), atol=1e-7)
    assert combine([a, b], [1e40, 1.0]).dtype == np.float32
    with pytest.raises(QueryError, match="not finite"):
        combine([a, torch.tensor([[float("nan"), 0, 0]])], [1.0, 1.0])
    with pytest.raises(QueryError, match="finite"):
        combine([a, b], [float("inf"), 1.0])


def test_an_image_term_with_a_name_the_os_refuses_is_the_querys_own_error(tmp_path):
    long_name = "./" + "x" * 300 + ".jpg"  # one path part over the 255-byte limit: OSError "File name too long"
    for query in (f"dog + {long_name}", "./a\0b.jpg"):
        with pytest.raises(QueryError, match="no such image file"):
            parse_query(query, local_image)
    assert parse_query("x" * 300 + ".jpg", local_image)[0].kind == "text"  # not path-like: text, as before


def test_a_query_starting_with_minus_goes_after_the_end_of_options(noise_index, capsys):
    _, index = noise_index
    idx = str(index.index_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["search", "--index", idx, "-0:dog"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: -0:dog (a value that starts with '-' goes after '--'" in err
    assert "-- '-0:dog'" in err
    line = run_error(capsys, ["search", "--index", idx, "--", "-0:dog"])
    assert "the weight '-0' must be a finite number above 0" in line
    long_name = "./" + "x" * 300 + ".jpg"
    assert "no such image file" in run_error(capsys, ["search", "--index", idx, f"dog + {long_name}"])
