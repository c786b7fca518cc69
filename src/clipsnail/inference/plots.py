"""PNG figures: training curves and image grids with a caption above (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from clipsnail.core.display import display_name, printable
from clipsnail.core.safeio import atomic_path
from clipsnail.data.images import load_image


def plot_training_curves(metrics_path: Path, out_path: Path) -> None:
    """Training loss (with evaluation losses on the same axes), learning rate, and the other evaluation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and "_num_" not in k})  # not counts
    loss_keys = [k for k in eval_keys if "loss" in k]
    other_keys = [k for k in eval_keys if k not in loss_keys][:8]
    fig, axes = plt.subplots(1, 3 if other_keys else 2, figsize=(13 if other_keys else 9, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    for k in loss_keys:
        axes[0].plot([r["step"] for r in evals if k in r], [r[k] for r in evals if k in r], marker="o", label=k[5:])
    axes[0].set(title="loss", xlabel="step")
    if loss_keys:
        axes[0].legend(fontsize=7)
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    if other_keys:
        for k in other_keys:
            axes[2].plot([r["step"] for r in evals if k in r], [r[k] for r in evals if k in r], marker="o",
                         label=k[5:])
        axes[2].set(title="evaluation", xlabel="step")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, out_path)


def plot_confusion_matrix(labels, predictions, class_names, out_path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class), counts in the cells when there are few classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import confusion_matrix

    n = len(class_names)
    cm = confusion_matrix(labels, predictions, labels=list(range(n)))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(20, 2 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 30:
        ticks = range(n)
        ax.set_xticks(ticks, [str(c)[:14] for c in class_names], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(ticks, [str(c)[:14] for c in class_names], fontsize=8)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    _save_figure(fig, out_path)


def _save_figure(fig, out_path: Path) -> None:
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def image_grid(
    images: Sequence[Image.Image],
    title: str = "",
    labels: Sequence[str] | None = None,
    cols: int = 3,
    cell: int = 128,
) -> Image.Image:
    """Tile images (upscaled with NEAREST so small pixels stay crisp) with a title above, wrapped to the grid's
    width, and under each image its label: lines of text ("0.312" then a file name), each cut to the cell's width."""
    font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=12)
    cols = max(1, min(cols, len(images))) if images else 1
    rows = max(1, -(-len(images) // cols))
    pad = 4
    width = cols * (cell + pad) + pad
    title_lines = wrap_to_width(title, font, width - 2 * pad) if title else []
    title_h = 22 * len(title_lines) + 8 if title_lines else 0
    label_lines = [str(label).splitlines() for label in labels] if labels else []
    label_h = 15 * max((len(lines) for lines in label_lines), default=0) + 2 if labels else 0
    grid = Image.new("RGB", (width, title_h + rows * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((pad, 5 + 22 * i), line, fill="black", font=font)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell + pad), title_h + pad + r * (cell + label_h + pad)
        resample = Image.NEAREST if max(im.size) < cell else Image.BILINEAR
        im = im.convert("RGB")
        scale = cell / max(im.size)
        grid.paste(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample), (x, y))
        for j, line in enumerate(label_lines[i] if labels else []):
            draw.text((x, y + cell + 2 + 15 * j), cut_to_width(line, small, cell), fill="black", font=small)
    return grid


def wrap_to_width(text: str, font, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words (a word wider than a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(cut_to_width(word, font, width))
    return lines


def cut_to_width(text: str, font, width: float) -> str:
    """`text` if it fits in `width` pixels, else its start and end around an ellipsis ("IMG_20...0412.jpg"): the
    end of a file name (its number, its extension) tells photos apart as much as its start."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        head, tail = text[: (keep + 1) // 2], text[len(text) - keep // 2:] if keep // 2 else ""
        if font.getlength(f"{head}\u2026{tail}") <= width:
            return f"{head}\u2026{tail}"
    return "\u2026"


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def write_result_grid(path: str | Path, title: str, results: Sequence[tuple[str | Path, float]]) -> Path:
    """Search results as a grid PNG: (image path, score) pairs, best first, each image labelled with its score and
    its file name."""
    images = [load_image(p) for p, _ in results]
    return save_png(image_grid(images, title=title, labels=result_labels(results)), path)


def result_labels(results: Sequence[tuple[str | Path, float]]) -> list[str]:
    """"0.312" over the file's name (lossy where the name is not UTF-8, control characters escaped)."""
    return [f"{score:.3f}\n{printable(display_name(Path(p).name))}" for p, score in results]
