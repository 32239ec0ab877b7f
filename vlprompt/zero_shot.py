"""Zero-shot CLIP: frozen image features against frozen class text features."""
from contextlib import contextmanager

from torch import Tensor, nn

from .hicropl import normalize
from .prompted_clip import PromptedImageEncoder


class ZeroShotCLIP(nn.Module):
    def __init__(self, clip_model: nn.Module, class_text_features: Tensor):
        super().__init__()
        self.image_encoder = PromptedImageEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.register_buffer("class_text_features", normalize(class_text_features.float()), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        image = normalize(self.image_encoder(images).float())
        return self.logit_scale.exp().float() * image @ self.class_text_features.t()

    @contextmanager
    def evaluation(self):
        yield  # nothing to precompute: the class features are fixed
