"""Zero-shot CLIP: frozen image features against frozen class text features (the first row of
every comparison table)."""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

from ..clip.encoders import PromptedImageEncoder
from ..clip.templates import GENERIC_TEMPLATES, dataset_template
from .base import LossOutput
from .common import normalize
from .registry import ClassTexts, register_method
from .settings import option

TEMPLATE_SETS = ("dataset", "ensemble")


@dataclass(frozen=True)
class ZeroShotSettings:
    templates: str = option("dataset", "dataset: one hand-written prompt per dataset, as CoOp's ZeroshotCLIP; "
                                       "ensemble: a set of generic templates", choices=TEMPLATE_SETS)


class ZeroShotCLIP(nn.Module):
    uses_frozen_image_features = True  # its frozen image features can be cached for evaluation

    def __init__(self, clip_model: nn.Module, settings: ZeroShotSettings, classnames: Sequence[str],
                 frozen_text_features: Tensor):
        super().__init__()
        self.image_encoder = PromptedImageEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.prompt_learner = nn.Module()  # nothing is learned
        self.set_classes(classnames, frozen_text_features)

    def set_classes(self, classnames: Sequence[str], frozen_text_features: Optional[Tensor] = None) -> None:
        self.classnames = list(classnames)
        self.register_buffer("frozen_text_features", normalize(frozen_text_features.float()), persistent=False)

    def frozen_image_features(self, images: Tensor) -> Tensor:
        return normalize(self.image_encoder(images).float())

    def forward(self, images: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        image = self.frozen_image_features(images) if frozen_image_features is None else frozen_image_features
        return self.logit_scale.exp().float() * image @ self.frozen_text_features.t()

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput:
        raise RuntimeError("zero-shot CLIP has nothing to train")

    def evaluation(self):
        return nullcontext()  # nothing to precompute: the class features are fixed


def zero_shot_texts(settings: ZeroShotSettings, dataset: str) -> ClassTexts:
    if settings.templates == "dataset":
        return ClassTexts((dataset_template(dataset),))
    return ClassTexts(tuple(GENERIC_TEMPLATES))


register_method("ZeroshotCLIP", settings=ZeroShotSettings, model=ZeroShotCLIP, node="ZSCLIP", trains=False,
                default_configs={"base2new": "vit_b16", "xd": "vit_b16"}, scripts="zsclip", class_texts=zero_shot_texts)
