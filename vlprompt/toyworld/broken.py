"""Deliberately broken HiCroPL variants: bugs that make the method learn worse without failing.

They exist to show that the toy world's learning-quality checks can fail (tests and the
evidence script); nothing else uses them. Measured on ToyObjects (benchmarks/toy_world_quality.py,
seeds 1-3): dropping the visual prompts costs about 7 points on base classes and fails the
tests' threshold; frozen mappers are caught by the test that mappers change; the others
(no fusion, shifted or shallow prompts) cost at most 4 points and are NOT caught by accuracy.
"""
from typing import Optional, Sequence, Tuple

from torch import Tensor

from ..methods.common import normalize
from ..methods.hicropl import HiCroPL


class HiCroPLWithoutFusion(HiCroPL):
    """Forgets to fuse the frozen CLIP features: t = norm(prompted text), i = norm(prompted
    image), without `+ t_fix` / `+ i_zs` (the distillation toward them stays)."""

    def text_features(self, text_prompts: Sequence[Tensor]) -> Tensor:
        return normalize(self.text_encoder(self.token_ids, text_prompts).float())

    def image_features(self, images: Tensor, visual_prompts: Sequence[Tensor],
                       zero_shot: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if zero_shot is None:
            zero_shot = self.frozen_image_features(images)
        return normalize(self.image_encoder(images, visual_prompts).float()), zero_shot


class HiCroPLFrozenMappers(HiCroPL):
    """The mappers and proxies silently stop learning (their parameters are left out of
    training), as when an optimiser is built before the modules are registered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        learner = self.prompt_learner
        for module in (learner.text_proxies, learner.visual_proxies, learner.text_to_image, learner.image_to_text):
            for p in module.parameters():
                p.requires_grad_(False)


class _RewiredPrompts(HiCroPL):
    """The prompt learner's per-layer (text, visual) prompts pass through `rewire` on their way
    to the encoders."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        forward = self.prompt_learner.forward
        self.prompt_learner.forward = lambda: self.rewire(*forward())

    @staticmethod
    def rewire(text: list, visual: list) -> Tuple[list, list]:
        raise NotImplementedError


class HiCroPLShiftedPrompts(_RewiredPrompts):
    """Writes every deep prompt one layer too late: the prompt learned for layer i enters
    layer i + 1 and the last layer's prompt is dropped."""

    @staticmethod
    def rewire(text: list, visual: list) -> Tuple[list, list]:
        return text[:1] + text[:-1], visual[:1] + visual[:-1]


class HiCroPLVisualPromptsDropped(HiCroPL):
    """Never hands the visual prompts to the image encoder (e.g. a keyword typo that a
    `**kwargs` swallows): the image tower runs unprompted, only the text side adapts."""

    def image_features(self, images: Tensor, visual_prompts: Sequence[Tensor],
                       zero_shot: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return super().image_features(images, [], zero_shot)


class HiCroPLShallowPrompts(_RewiredPrompts):
    """Writes the prompts of layer 0 only: the deep prompts of layers 1.. never enter the
    encoders (an off-by-one in the layer loop)."""

    @staticmethod
    def rewire(text: list, visual: list) -> Tuple[list, list]:
        return text[:1], visual[:1]


BROKEN_VARIANTS = {"no_fusion": HiCroPLWithoutFusion, "frozen_mappers": HiCroPLFrozenMappers,
                   "shifted_prompts": HiCroPLShiftedPrompts, "no_visual_prompts": HiCroPLVisualPromptsDropped,
                   "shallow_prompts": HiCroPLShallowPrompts}
