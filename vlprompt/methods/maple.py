"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023) on frozen CLIP.

Text prompts at layers 0..J-1 (J = PROMPT_DEPTH): the first-layer context `ctx` and J-1 deep
"compound" prompts. The visual prompts are functions of the text prompts: the first-layer one is
proj(ctx), the one entering layer i >= 1 is proj_i(compound_i), linear maps from the text width to
the vision width. Loss: cross-entropy. docs/maple.md has the equations, shapes and where we depart
from the release (github.com/muzairkhattak/multimodal-prompt-learning, trainers/maple.py).
"""
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..clip.loading import backbone_shape
from .base import PromptedCLIPClassifier
from .common import (IVLP_FAMILY_INIT_MAX_TOKENS, MAX_CONTEXT_TOKENS, check_init_fills_context,
                     ivlp_family_init_words)
from .registry import ReleaseCheckpoint, entries_under, keys_under, register_method, without_data_parallel
from .settings import BackboneShape, ConfigError, checked, option


@dataclass(frozen=True)
class MaPLeSettings:
    n_ctx: int = option(2, "prompt tokens per layer (text; the visual ones are projected from them)",
                        low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("a photo of a", f"words of the prompt prefix; with N_CTX <= {IVLP_FAMILY_INIT_MAX_TOKENS} "
                                           f"the first N_CTX of them seed the context, the rest stay fixed "
                                           f"tokens (with a larger N_CTX the context starts random)")
    prompt_depth: int = option(9, "layers carrying prompts: the first-layer context and PROMPT_DEPTH-1 deep "
                                  "prompts entering layers 1..PROMPT_DEPTH-1 (1: first layer only)", low=1)

    @property
    def init_words(self) -> str:
        """CTX_INIT as the release uses it (the IVLP family's rule): only when N_CTX <= 4."""
        return ivlp_family_init_words(self.ctx_init, self.n_ctx)

    def validate(self, shape: BackboneShape) -> None:
        """Limits of the backbone; the release creates prompts beyond them that never get a gradient."""
        if self.prompt_depth > shape.layers:
            raise ConfigError("prompt_depth", self.prompt_depth,
                              f"must be in [1, {shape.layers}]: deep prompts enter layers 1..PROMPT_DEPTH-1 of both "
                              f"towers, and this backbone has {shape.text_layers} text and {shape.vision_layers} "
                              f"vision layers")
        check_init_fills_context(self.init_words, self.n_ctx, "N_CTX")


def _normal(*shape: int) -> Tensor:
    return nn.init.normal_(torch.empty(*shape), std=0.02)


class MaPLePromptLearner(nn.Module):
    """Everything MaPLe trains, under the release's names (its `MultiModalPromptLearner`):
    ctx [n, dt]; proj: dt -> dv; compound_prompts_text[k] [n, dt] and compound_prompt_projections[k]:
    dt -> dv for k = 0..J-2 (the prompts entering layer k+1)."""

    def __init__(self, n_ctx: int, depth: int, text_width: int, vision_width: int,
                 first_context: Optional[Tensor] = None):
        super().__init__()
        # the release's order of random draws: ctx, proj, the compound prompts, their projection
        ctx = first_context.clone() if first_context is not None else _normal(n_ctx, text_width)
        self.proj = nn.Linear(text_width, vision_width)
        self.ctx = nn.Parameter(ctx)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(_normal(n_ctx, text_width)) for _ in range(depth - 1)])
        # deep copies of ONE default-initialised Linear, as the release's _get_clones: every
        # projection starts with the same weights
        single = nn.Linear(text_width, vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])

    def forward(self) -> Tuple[List[Tensor], List[Tensor]]:
        """Per-layer prompts: (text [J x [n, dt]], visual [J x [n, dv]])."""
        deep = list(self.compound_prompts_text)
        text = [self.ctx] + deep
        visual = [self.proj(self.ctx)] + [project(p) for project, p in zip(self.compound_prompt_projections, deep)]
        return text, visual


class MaPLe(PromptedCLIPClassifier):
    """Frozen CLIP + MaPLe prompts; logits for a set of classes. The visual prompts depend on the
    learned parameters only, so the class side and the visual prompts are computed together,
    once per evaluation."""

    def __init__(self, clip_model: nn.Module, settings: MaPLeSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        checked(settings, backbone_shape(clip_model))
        super().__init__(clip_model, settings.n_ctx, settings.init_words, classnames, frozen_text_features)
        self.settings = settings
        self.prompt_learner = MaPLePromptLearner(settings.n_ctx, settings.prompt_depth, self.text_encoder.width,
                                                 self.image_encoder.width, self.first_context)

    def encode_classes(self) -> Tuple[Tensor, List[Tensor]]:
        """(text features [C, E], the visual prompts of this forward)."""
        text_prompts, visual_prompts = self.prompt_learner()
        return self.text_encoder(self.token_ids, text_prompts), visual_prompts

    def classify(self, images: Tensor, classes, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        text, visual_prompts = classes
        return self.logits(self.image_encoder(images, visual_prompts), text)


# ---- the release's checkpoints ---------------------------------------------------------------
# The release registers its whole CustomCLIP: `prompt_learner.*` (ours, under the same names, plus
# the class-bound token_prefix/token_suffix buffers), `image_encoder.*`, `text_encoder.*` and
# `logit_scale` (frozen CLIP, which we never load from a prompt checkpoint).
LEARNED = ("ctx", "proj.", "compound_prompts_text.", "compound_prompt_projections.")
CLASS_BOUND = ("token_prefix", "token_suffix")
CUSTOM_CLIP = ("prompt_learner.", "image_encoder.", "text_encoder.", "logit_scale")


def convert_release_state_dict(release_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The release's `MultiModalPromptLearner` checkpoint state dict -> our prompt learner's (fp32)."""
    # another release that saves MaPLe's prompt names in the same folder (CoPrompt: adapters beside
    # them) is refused rather than loaded without its other parts
    foreign = sorted(k for k in map(without_data_parallel, release_state) if not k.startswith(CUSTOM_CLIP))
    if foreign:
        raise KeyError(f"{foreign[0]} is no entry of a MaPLe release checkpoint")
    ours = {}
    for name, value in entries_under(release_state):
        if name in CLASS_BOUND:
            continue
        if not (name == "ctx" or name.startswith(LEARNED[1:])):
            raise KeyError(f"unknown key prompt_learner.{name} in a MaPLe release checkpoint")
        ours[name] = value.float()  # fp16 runs save ctx and proj in fp16
    return ours


is_release_state_dict = keys_under("prompt_learner.")


register_method(
    "MaPLe", settings=MaPLeSettings, model=MaPLe, checkpoint_folder="MultiModalPromptLearner",  # the release's
    default_configs={"base2new": "vit_b16_c2_ep5_batch4_2ctx",
                     "xd": "vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
                     "fewshot": "vit_b16_c2_ep5_batch4_2ctx"},
    release_checkpoint=ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict),
    doc="docs/maple.md")
