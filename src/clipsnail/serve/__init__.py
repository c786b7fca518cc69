"""The web app (`clipsnail serve`): text and image search over an index, zero-shot labels, text to image.

    from clipsnail.serve import create_app      # the FastAPI app, for tests or another ASGI server
    from clipsnail.serve import run_server      # load an index (+ generator) and serve it with uvicorn
"""

from __future__ import annotations

import logging
from pathlib import Path

from clipsnail.errors import ClipsnailError
from clipsnail.generate import TextToImage
from clipsnail.hub import load
from clipsnail.index import ImageIndex
from clipsnail.serve.app import LOOPBACK_HOSTS, Limits, create_app

__all__ = ["Limits", "create_app", "load_generator", "run_server"]

log = logging.getLogger(__name__)


def load_generator(run: str | Path, device: str = "cpu"):
    """A text-to-image run of kind pixelsnail, for the prompt box (kind retrieve draws nothing: refused)."""
    generator = load(run, device=device)
    if not isinstance(generator, TextToImage):
        raise ClipsnailError(f"{run}: --generator needs a text-to-image run of kind pixelsnail "
                             "(`clipsnail t2i train --kind pixelsnail`)")
    return generator


def run_server(index, generator=None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
               limits: Limits | None = None) -> None:
    """Load the index at `index` (a folder from `clipsnail index build`), its CLIP model and optionally a generator
    run, and serve the app with uvicorn until interrupted."""
    import uvicorn

    image_index = ImageIndex.load(index)
    if image_index.model_dir is None or not Path(image_index.model_dir).is_dir():
        raise ClipsnailError(f"{index}: the CLIP run that made this index ({image_index.model_dir}) is not there; "
                             "rebuild the index with `clipsnail index build --model RUN`")
    model = load(image_index.model_dir, device=device)
    gen = load_generator(generator, device) if generator else None
    loopback = host in LOOPBACK_HOSTS
    if not loopback:
        log.warning("serving on %s: the app has no login; anyone who can reach this address can search and view "
                    "the indexed images", host)
    app = create_app(image_index, model, gen, limits, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    log.info("%d images indexed with %s%s", len(image_index), image_index.model_dir,
             f"; generator {generator}" if generator else "")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
