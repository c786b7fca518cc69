"""Text to image by retrieval: a Transformer reads the prompt and regresses the feature vector that a frozen image
encoder (a trained CLIP run's image tower, or any timm model) computes for the matching image; "generating" returns
the known images nearest to the prediction. The run keeps the known images' features (bank.safetensors +
bank.json), so generating needs neither the encoder nor the images' pixels.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipsnail.core import distributed as dist
from clipsnail.core.distributed import unwrap
from clipsnail.core.errors import DataError
from clipsnail.core.runs import save_run
from clipsnail.core.safeio import atomic_path, atomic_write_json
from clipsnail.data.caption_corpora import load_caption_split
from clipsnail.data.datasets import CaptionTargets
from clipsnail.data.tokenizers import TextTokenizer, build_tokenizer
from clipsnail.families.t2i_retrieve import RetrieveConfig, load_image_encoder
from clipsnail.inference.evaluate import encode_every_image
from clipsnail.models.text2feat import TextToFeature, nearest
from clipsnail.train.task import Task

log = logging.getLogger(__name__)


class RetrieveTask(Task):
    name = "t2i_retrieve"

    def __init__(self, config: RetrieveConfig, run_dir: str | Path | None = None, progress: bool = True):
        # settled here from the data (sizes, classes, the tokenizer's facts), in a copy: the caller's stays as given
        self.config = config = copy.deepcopy(config)
        data = config.data
        self.names, captions, caption_to_image = load_caption_split(data, "train")
        tokenizer_path = Path(run_dir) / "tokenizer.json" if run_dir else None
        m = config.model
        if tokenizer_path is not None and tokenizer_path.exists():  # resuming: keep the vocabulary of the run
            self.tokenizer = TextTokenizer.load(tokenizer_path)
        else:
            # Trained on rank 0 and shared: under torchrun every process must encode text identically.
            self.tokenizer = dist.from_main(
                lambda: build_tokenizer(m.tokenizer, captions, m.vocab_size or 2048, m.context_length))
        m.vocab_size, m.pad_id, m.eot_id = self.tokenizer.vocab_size, self.tokenizer.pad_id, self.tokenizer.eot_id
        encoder = load_image_encoder(config.encoder, config.encoder_pretrained)
        log.info("encoding %d training images with the frozen encoder %s", len(self.names), config.encoder)
        self.features = encode_every_image(encoder, data.images, self.names, progress)
        m.feature_dim = self.features.shape[1]
        self.train_dataset = CaptionTargets(captions, caption_to_image)
        self.val = None
        try:
            names, val_captions, val_c2i = load_caption_split(data, "val")
            keep = [i for i, c in enumerate(val_c2i) if c < data.max_eval_images]
            names = names[: data.max_eval_images]
            self.val = (names, [val_captions[i] for i in keep], [val_c2i[i] for i in keep],
                        encode_every_image(encoder, data.images, names, progress))
        except DataError as e:
            log.info("no validation during training (%s)", e)
        log.info("training on %d captions of %d images, features of size %d", len(captions), len(self.names),
                 m.feature_dim)

    def build_model(self) -> TextToFeature:
        model = TextToFeature(self.config.model)
        model.tokenizer = self.tokenizer
        return model

    def collate(self, samples: list) -> dict:
        return {"tokens": self.tokenizer([c for c, _ in samples]),
                "targets": self.features[torch.tensor([i for _, i in samples])]}

    def loss(self, model: TextToFeature, batch: dict):
        predicted = model(batch["tokens"])
        return unwrap(model).loss(predicted.float(), batch["targets"]), {}

    @torch.no_grad()
    def evaluate(self, model: TextToFeature) -> dict[str, float]:
        """Validation captions against every known image (training images + validation images): recall@k of the
        caption's own image, and, on generated shapes data, how often the nearest image fits the caption."""
        if self.val is None:
            return {}
        names, captions, caption_to_image, val_features = self.val
        was_training = model.training
        model.eval()
        bank = torch.cat([self.features, val_features])
        predicted = torch.cat([model.encode_text(captions[i:i + 256]) for i in range(0, len(captions), 256)])
        _, hits = nearest(predicted, bank, 5, model.cfg.distance)
        model.train(was_training)
        own = torch.tensor(caption_to_image) + len(self.features)
        metrics = {f"val_image_retrieval_recall@{k}": (hits[:, :k] == own[:, None]).any(1).float().mean().item()
                   for k in (1, 5)}
        from clipsnail.data.shapes import scene_judge

        judge = scene_judge(self.config.data.images, self.names + names)
        if judge is not None:
            metrics["val_semantic_top1_accuracy"] = sum(
                judge(int(h), c) for h, c in zip(hits[:, 0], captions)) / max(len(captions), 1)
        return metrics

    def save(self, model: TextToFeature, run_dir: Path) -> None:
        save_run(run_dir, self.name, self.config, model, self.tokenizer)
        if not (run_dir / "bank.json").exists():  # the known images never change during a run
            with atomic_path(run_dir / "bank.safetensors") as tmp:
                save_file({"features": self.features.contiguous()}, str(tmp))
            bank = {"images_dir": str(Path(self.config.data.images).resolve()), "names": self.names}
            atomic_write_json(run_dir / "bank.json", bank, indent=None)


