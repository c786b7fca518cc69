"""Any timm model as a frozen image feature extractor, behind the interface of a CLIP image tower."""

from __future__ import annotations

import torch
from torch import nn

from clipsnail.core import pretrained as weights
from clipsnail.core.errors import ConfigError
from clipsnail.data.transforms import eval_transform


def feature_tokens(features: torch.Tensor) -> torch.Tensor:
    """A tower's `forward_features` output as a token sequence [B, N, C]: a CNN's feature map [B, C, h, w]
    becomes its h*w positions, a transformer's tokens stay as they are."""
    return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features


class TimmImageEncoder(nn.Module):
    """A timm model as a frozen feature extractor: its pooled features (`encode_image`, the classifier removed),
    its token sequence before pooling (`encode_tokens`) and its preprocessing (`preprocess`), behind the
    interface of a CLIP model.

    pretrained: True (timm's own weights, a download on first use), False, or a weights file / packaged name
    (`clipsnail.core.pretrained`, e.g. "efficientnet-lite0"), whose input normalisation then replaces timm's.
    image_size: the side images are resized and centre-cropped to (default: the model's own input size).
    """

    def __init__(self, name: str, pretrained: bool | str, image_size: int | None = None):
        super().__init__()
        import timm

        from_file = not weights.is_off(pretrained) and not weights.is_timm(pretrained)
        kwargs = weights.model_kwargs(str(pretrained)) if from_file else {}
        try:
            self.model = timm.create_model(name, pretrained=weights.is_timm(pretrained), num_classes=0, **kwargs)
        except RuntimeError as e:  # unknown name
            raise ConfigError(f"encoder timm:{name}: {e}") from e
        except Exception as e:  # no network and no cached weights
            raise ConfigError(f"encoder timm:{name}: cannot load pretrained weights ({e}); "
                              "set encoder_pretrained=false to use random weights") from e
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        mean, std = data_cfg["mean"], data_cfg["std"]
        if from_file:
            loaded = weights.load_pretrained_state(str(pretrained), self.model)
            if loaded.mean is not None:
                mean, std = loaded.mean, loaded.std
        if image_size is None and not from_file:
            self.preprocess = timm.data.create_transform(**data_cfg)
        else:
            self.preprocess = eval_transform(image_size or data_cfg["input_size"][-1], mean, std,
                                             data_cfg.get("interpolation", "bilinear"))
        self.embed_dim = self.model.num_features  # as a CLIP model's
        self.requires_grad_(False)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return feature_tokens(self.model.forward_features(images))
