"""An index that follows its folder (`inference.watch`): an added photo and a deleted one become searchable (and
unsearchable) while a server answers every request; both with file-system events and by polling alone."""

import threading
import time

import pytest
from helpers import noise_image

from clipsnail.inference.index import build_index
from clipsnail.inference.watch import watch_index

pytest.importorskip("fastapi")


def wait_for(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("force_polling", [None, True])
def test_a_served_index_follows_its_folder_and_answers_throughout(clip_model, tmp_path, force_polling):
    from fastapi.testclient import TestClient

    from clipsnail.serve import create_app

    root = tmp_path / "photos"
    for i in range(4):
        noise_image(root / f"{i}.png", i, size=32)
    index, _ = build_index(clip_model, root, tmp_path / "index", progress=False)
    app = create_app(index, clip_model)
    client = TestClient(app, base_url="http://127.0.0.1")
    updates, stop = [], threading.Event()

    def swap(new, stats):
        app.state.service.swap(new)
        updates.append(stats)

    watcher = threading.Thread(target=watch_index, args=(clip_model, tmp_path / "index", stop),
                               kwargs={"on_update": swap, "poll_seconds": 0.5, "force_polling": force_polling})
    watcher.start()
    answers, asking = [], threading.Event()

    def ask():  # a client searching the whole time
        while not asking.is_set():
            answers.append(client.get("/api/search", params={"q": "a red circle", "k": 9}).status_code)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        time.sleep(1.0)
        noise_image(root / "trip" / "new.png", 99, size=32)
        assert wait_for(lambda: client.get("/api/info").json()["images"] == 5)
        names = [h["path"] for h in client.get("/api/search", params={"q": "a red circle", "k": 9}).json()["hits"]]
        assert "trip/new.png" in names
        (root / "0.png").unlink()
        assert wait_for(lambda: client.get("/api/info").json()["images"] == 4)
        names = [h["path"] for h in client.get("/api/search", params={"q": "a red circle", "k": 9}).json()["hits"]]
        assert "0.png" not in names and "trip/new.png" in names
    finally:
        asking.set()
        stop.set()
        asker.join(30)
        watcher.join(30)
    assert not watcher.is_alive() and len(answers) > 3 and set(answers) == {200}  # no failed request
    assert [(u["added"], u["removed"]) for u in updates] == [(1, 0), (0, 1)]
