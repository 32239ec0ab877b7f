"""CoCoOp: Conditional Context Optimization (Zhou et al., "Conditional Prompt Learning for
Vision-Language Models", CVPR 2022) on frozen CLIP. docs/cocoop.md has the equations and where
we depart from the release.

CoOp's context, shifted for each image by a small meta-network of the image's features:
ctx_b = ctx + meta_net(f_b). Image b is compared with class text features computed from its own
context, so an evaluation encodes B x C prompts; an image's logits depend on that image alone.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..clip.loading import backbone_shape
from .base import PromptedCLIPClassifier
from .common import MAX_CONTEXT_TOKENS
from .coop import RELEASE_CHECKPOINT, check_ctx_init, context_length
from .registry import register_method
from .settings import BackboneShape, checked, option

META_NET_REDUCTION = 16  # hidden width = image feature width // 16 (512 -> 32 -> 512 for ViT-B/16)


@dataclass(frozen=True)
class CoCoOpSettings:
    n_ctx: int = option(16, "learned context tokens (with CTX_INIT: its number of words instead)",
                        low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("", "words the context starts from, separated by single spaces; their number "
                               "sets the context length")

    def validate(self, shape: BackboneShape) -> None:
        check_ctx_init(self.ctx_init)


class CoCoOpPromptLearner(nn.Module):
    """The context `ctx` [n, D] and the meta-network (the release's names: meta_net.linear1/linear2)."""

    def __init__(self, n_ctx: int, width: int, image_width: int, first_context: Optional[Tensor]):
        super().__init__()
        start = first_context.clone() if first_context is not None else \
            nn.init.normal_(torch.empty(n_ctx, width), std=0.02)
        self.ctx = nn.Parameter(start)
        hidden = image_width // META_NET_REDUCTION
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(image_width, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width)),
        ]))

    def forward(self, image_features: Tensor) -> Tensor:
        """Per-image contexts [B, n, D] from normalised image features [B, E]: every context token
        shifted by the same vector meta_net(f_b)."""
        shift = self.meta_net(image_features.to(self.meta_net.linear1.weight.dtype))  # [B, D]
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)


class CoCoOp(PromptedCLIPClassifier):
    """Frozen CLIP + CoCoOp's image-conditioned context; logits for a set of classes."""

    uses_frozen_image_features = True  # the image tower is CLIP's own: its features can be cached

    def __init__(self, clip_model: nn.Module, settings: CoCoOpSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        checked(settings, backbone_shape(clip_model))
        n_ctx = context_length(settings.n_ctx, settings.ctx_init)
        super().__init__(clip_model, n_ctx, settings.ctx_init, classnames, frozen_text_features)
        self.settings = settings
        # meta_net reads the image features: CLIP's joint embedding width (512 for ViT-B/16)
        self.prompt_learner = CoCoOpPromptLearner(n_ctx, self.text_encoder.width, clip_model.visual.output_dim,
                                                  self.first_context)

    @property
    def classes_cacheable(self) -> bool:
        return False  # the class text features are computed per image, in classify

    def encode_classes(self) -> None:
        return None  # nothing on the class side is independent of the images

    def classify(self, images: Tensor, classes: None, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        """Logits [B, C]: image b against the class features of its own context."""
        image = self.frozen_image_features(images) if frozen_image_features is None else frozen_image_features
        return self.in_image_chunks(self.logits_per_image, image)

    def logits_per_image(self, image_features: Tensor) -> Tensor:
        """[B, C]: exp(logit_scale) * cos(f_b, t_bc), t_b the class features of image b's context."""
        contexts = self.prompt_learner(image_features)  # [B, n, D]
        return self.logits(image_features, self.text_encoder.encode_per_context(self.token_ids, contexts))


register_method(
    "CoCoOp", settings=CoCoOpSettings, model=CoCoOp, checkpoint_folder="prompt_learner",  # the release's
    # the release's base-to-new and cross-dataset recipe; few-shot: the same recipe (the release ships
    # no few-shot one)
    default_configs=dict.fromkeys(("base2new", "xd", "fewshot"), "vit_b16_c4_ep10_batch1_ctxv1"),
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/cocoop.md")
