"""An index that follows its photo folder: `clipsnail index watch` and `clipsnail serve --watch`.

The index is brought up to date at the start and then whenever the folder changes (`update_index`: new and changed
photos encoded, deleted ones dropped, moved ones taking their vectors). Changes are noticed through file-system
events with `watchfiles` (the `watch` extra), a burst of them (a copy of a hundred photos) gathered into one
update; every `poll_seconds` the folder is also compared with the index whatever the events said, which is all
there is without watchfiles or where a file system sends no events (network mounts: `force_polling`). Only files
named like images wake it, so an index kept inside its own photo folder does not chase its own writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from clipsnail.core.errors import ClipsnailError
from clipsnail.data.images import IMAGE_EXTENSIONS
from clipsnail.inference.index import ImageIndex, update_index

log = logging.getLogger(__name__)

DEBOUNCE_MS = 1500  # events within this window make one update


def watch_index(model, index_dir: str | Path, stop: threading.Event, on_update: Callable | None = None,
                poll_seconds: float = 60.0, force_polling: bool | None = None, workers: int | None = None) -> None:
    """Keep the index at `index_dir` up to date with its folder until `stop` is set. After each update that
    changed the index, `on_update(index, stats)` (e.g. a server's `swap`). An update that fails (a folder gone
    missing, a disk full) is logged and tried again at the next change; the index stays as it was."""
    first = ImageIndex.load(index_dir)
    root = first.root
    first.close()
    if poll_seconds <= 0:
        raise ClipsnailError(f"--poll must be a positive number of seconds, got {poll_seconds}")

    def update() -> None:
        try:
            new, stats = update_index(model, index_dir, progress=False, workers=workers)
        except (ClipsnailError, OSError) as e:
            log.warning("%s: not updated (%s); trying again at the next change", index_dir, e)
            return
        if stats["written"] and on_update is not None:
            on_update(new, stats)

    update()
    try:
        import watchfiles
    except ImportError:
        log.info("watching %s by looking every %g s (pip install 'clipsnail[watch]' to be told of changes)",
                 root, poll_seconds)
        while not stop.wait(poll_seconds):
            update()
        return
    for _ in watchfiles.watch(root, watch_filter=lambda change, path: path.lower().endswith(IMAGE_EXTENSIONS),
                              stop_event=stop, debounce=DEBOUNCE_MS, rust_timeout=int(poll_seconds * 1000),
                              yield_on_timeout=True, force_polling=force_polling, raise_interrupt=False):
        if stop.is_set():
            break
        update()
