"""Prompt templates for zero-shot classification ("a photo of a {}."): the packaged set (CLIP's ImageNet prompt
ensemble, templates.txt) or a user's file, one template per line. Without torch: the web app reads them too."""

from __future__ import annotations

from pathlib import Path

from clipsnail.core.errors import DataError


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def default_templates() -> list[str]:
    return _lines(Path(__file__).with_name("templates.txt"))


def read_templates(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: templates file not found")
    templates = _lines(path)
    for n, t in enumerate(templates, 1):
        if "{}" not in t:
            raise DataError(f"{path}: template {n} {t!r} has no '{{}}' for the class name")
    if not templates:
        raise DataError(f"{path}: no templates")
    return templates
