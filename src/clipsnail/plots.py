"""PNG figures: training curves and image grids with a caption above (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def plot_training_curves(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(13 if evals else 9, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    if evals:
        keys = sorted({k for r in evals for k in r if k.startswith("eval/")})[:6]
        for k in keys:
            axes[2].plot([r["step"] for r in evals if k in r], [r[k] for r in evals if k in r], marker="o",
                         label=k[5:])
        axes[2].set(title="evaluation", xlabel="step")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)


def image_grid(
    images: Sequence[Image.Image],
    title: str = "",
    labels: Sequence[str] | None = None,
    cols: int = 3,
    cell: int = 128,
) -> Image.Image:
    """Tile images (upscaled with NEAREST so small pixels stay crisp) with a title above and a label under each."""
    font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=12)
    rows = max(1, -(-len(images) // cols))
    title_h = 30 if title else 0
    label_h = 16 if labels else 0
    pad = 4
    grid = Image.new("RGB", (cols * (cell + pad) + pad, title_h + rows * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 6), title, fill="black", font=font)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell + pad), title_h + pad + r * (cell + label_h + pad)
        resample = Image.NEAREST if max(im.size) < cell else Image.BILINEAR
        im = im.convert("RGB")
        scale = cell / max(im.size)
        grid.paste(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample), (x, y))
        if labels:
            draw.text((x, y + cell + 2), labels[i][:24], fill="black", font=small)
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return path
