"""Any timm model as a frozen image feature extractor, behind the interface of a CLIP image tower."""

from __future__ import annotations

import types

import torch
from torch import nn

from clipsnail.errors import ConfigError


class TimmImageEncoder(nn.Module):
    """A timm model as a frozen feature extractor: its pooled features (the classifier removed) and its own
    preprocessing, behind the `encode_image` / `preprocess` interface of a CLIP model."""

    def __init__(self, name: str, pretrained: bool):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except RuntimeError as e:  # unknown name
            raise ConfigError(f"encoder timm:{name}: {e}") from e
        except Exception as e:  # no network and no cached weights
            raise ConfigError(f"encoder timm:{name}: cannot load pretrained weights ({e}); "
                              "set encoder_pretrained=false to use random weights") from e
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.preprocess = timm.data.create_transform(**data_cfg)
        self.cfg = types.SimpleNamespace(embed_dim=self.model.num_features)  # as CLIP's cfg.embed_dim

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
