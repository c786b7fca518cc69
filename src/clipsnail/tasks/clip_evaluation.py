"""How a CLIP run is evaluated while it trains: retrieval on the validation captions (recall@1/5/10 both ways,
with the gallery's size beside it) and, with train.zeroshot_folder, zero-shot accuracy on a folder of classes, as
open_clip does. A wholly locked tower's outputs come from `LockedTowers`, computed once for the whole run.
"""

from __future__ import annotations

import math
from pathlib import Path

from clipsnail.families.clip import ClipConfig
from clipsnail.models.clip import CLIP
from clipsnail.tasks.clip_towers import LockedTowers


class ClipEvaluation:
    """The evaluation of a CLIP task: `evaluation(model)` -> metrics. `val`: the validation split as
    `load_caption_split` gives it (image names, captions, caption -> image), or None."""

    def __init__(self, config: ClipConfig, val: tuple | None, towers: LockedTowers):
        self.config, self.val, self.towers = config, val, towers

    def __call__(self, model: CLIP) -> dict[str, float]:
        """Retrieval on the validation captions and, with train.zeroshot_folder, zero-shot accuracy on its classes.
        A wholly locked tower's outputs are computed once for the whole run (kept like the training set's)."""
        metrics, was_training = {}, model.training
        model.eval()
        if self.val is not None:
            metrics.update(self.retrieval(model))
        if self.config.train.zeroshot_folder:
            metrics.update(self.zero_shot(model))
        model.train(was_training)
        return metrics

    def retrieval(self, model: CLIP) -> dict[str, float]:
        from clipsnail.inference.evaluate import retrieval_metrics

        names, captions, c2i = self.val
        keep = len(names) if len(names) <= self.config.data.max_eval_images else self.config.data.max_eval_images
        pairs = [(c, i) for c, i in zip(captions, c2i) if i < keep]
        paths = [Path(self.config.data.images) / n for n in names[:keep]]
        image_emb, _ = self.towers.embed_images(model, "val_image", paths)
        text_emb = self.towers.embed_texts(model, "val_text", [c for c, _ in pairs])
        metrics = retrieval_metrics(image_emb, text_emb, [i for _, i in pairs], ks=(1, 5, 10))
        # The gallery's size says what a recall means: R@5 over 15 images is 1/3 by chance alone.
        return {**{f"val_{k}": v for k, v in metrics.items() if "recall" in k},
                "val_num_images": len(paths), "val_num_captions": len(pairs)}

    def zero_shot(self, model: CLIP) -> dict[str, float]:
        """open_clip's zero-shot evaluation while training: the class names in the default prompt templates,
        ensembled; at most data.max_eval_images images, spread evenly over the folder's sorted order."""
        from clipsnail.data.images import list_image_folder
        from clipsnail.inference.evaluate import default_templates, zero_shot_accuracy, zero_shot_weights

        paths, labels, classes = list_image_folder(self.config.train.zeroshot_folder)
        step = max(1, math.ceil(len(paths) / self.config.data.max_eval_images))
        image_emb, readable = self.towers.embed_images(model, "zeroshot_image", paths[::step])
        metrics = zero_shot_accuracy(image_emb, readable, labels[::step],
                                     zero_shot_weights(model, classes, default_templates()))
        return {f"zeroshot_{k}": v for k, v in metrics.items()}
