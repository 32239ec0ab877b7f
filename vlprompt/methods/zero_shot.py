"""Zero-shot CLIP: frozen image features against frozen class text features."""
from contextlib import contextmanager
from typing import Optional

from torch import Tensor, nn

from .common import normalize
from ..clip.encoders import PromptedImageEncoder


class ZeroShotCLIP(nn.Module):
    uses_frozen_image_features = True  # its frozen image features can be cached for evaluation

    def __init__(self, clip_model: nn.Module, class_text_features: Tensor):
        super().__init__()
        self.image_encoder = PromptedImageEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.register_buffer("class_text_features", normalize(class_text_features.float()), persistent=False)

    def zero_shot_image_features(self, images: Tensor) -> Tensor:
        return normalize(self.image_encoder(images).float())

    def forward(self, images: Tensor, zero_shot: Optional[Tensor] = None) -> Tensor:
        image = self.zero_shot_image_features(images) if zero_shot is None else zero_shot
        return self.logit_scale.exp().float() * image @ self.class_text_features.t()

    @contextmanager
    def evaluation(self):
        yield  # nothing to precompute: the class features are fixed
