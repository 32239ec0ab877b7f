"""IVLP: independent vision-language prompting (Khattak et al., MaPLe's baseline, CVPR 2023;
release muzairkhattak/multimodal-prompt-learning, trainer `IVLP`) on frozen CLIP.

Deep prompts in both towers, learned independently (no coupling between them):
  text   T_0 [N_CTX_TEXT, dt] takes positions 1..n of "<CTX_INIT or X..X> <class>." (with the
         positional embedding); T_i replaces them before text layer i = 1..PROMPT_DEPTH_TEXT-1.
  image  V_0 [N_CTX_VISION, dv] appended after the patches (before ln_pre); V_i replaces the last
         n tokens before vision layer i = 1..PROMPT_DEPTH_VISION-1.
Language-only prompting (the release's `..._language_only.yaml`: N_CTX_VISION 0 and
PROMPT_DEPTH_VISION 0) has no visual prompt at all: the image features are frozen CLIP's.
docs/ivlp.md has the equations, shapes and where we depart from the release.
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..clip.loading import backbone_shape
from .base import PromptedCLIPClassifier
from .common import MAX_CONTEXT_TOKENS, check_init_fills_context, ivlp_family_init_words
from .registry import ReleaseCheckpoint, register_method, without_data_parallel
from .settings import BackboneShape, ConfigError, checked, option

MAX_VISUAL_TOKENS = 1024  # more than ViT-L/14@336 has patches (576); guards against typos only


@dataclass(frozen=True)
class IVLPSettings:
    """TRAINER.IVLP.* with the release's defaults (its train.py; the recipes override depths)."""
    n_ctx_vision: int = option(2, "visual prompt tokens per layer (0: no visual prompt)", low=0,
                               high=MAX_VISUAL_TOKENS)
    n_ctx_text: int = option(2, "text prompt tokens per layer", low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("a photo of a", "words the first text prompt starts from, used when N_CTX_TEXT <= 4 "
                                           "(else random, as in the release); the words past N_CTX_TEXT stay "
                                           "as fixed tokens")
    prompt_depth_vision: int = option(9, "vision layers whose input carries a prompt: the first and the next "
                                         "PROMPT_DEPTH_VISION-1 (0: no visual prompt)", low=0)
    prompt_depth_text: int = option(9, "text layers whose input carries a prompt: the first and the next "
                                       "PROMPT_DEPTH_TEXT-1", low=1)

    @property
    def has_visual_prompts(self) -> bool:
        return self.n_ctx_vision > 0 and self.prompt_depth_vision > 0

    @property
    def init_words(self) -> str:
        """CTX_INIT as the release uses it: only when N_CTX_TEXT <= 4."""
        return ivlp_family_init_words(self.ctx_init, self.n_ctx_text)

    def validate(self, shape: BackboneShape) -> None:
        """Limits that depend on the backbone, and CTX_INIT's length."""
        # The release silently caps a depth beyond the tower (deep prompts stop at its last layer).
        if self.prompt_depth_text > shape.text_layers:
            raise ConfigError("prompt_depth_text", self.prompt_depth_text,
                              f"must be in [1, {shape.text_layers}]: this backbone has {shape.text_layers} text "
                              f"layers (prompts enter layers 0..PROMPT_DEPTH_TEXT-1)")
        if self.prompt_depth_vision > shape.vision_layers:
            raise ConfigError("prompt_depth_vision", self.prompt_depth_vision,
                              f"must be in [0, {shape.vision_layers}]: this backbone has {shape.vision_layers} "
                              f"vision layers (prompts enter layers 0..PROMPT_DEPTH_VISION-1)")
        check_init_fills_context(self.init_words, self.n_ctx_text, "N_CTX_TEXT")


def _normal(*shape: int) -> Tensor:
    return nn.init.normal_(torch.empty(*shape), std=0.02)  # the release's VPT / ctx init


class IVLPPromptLearner(nn.Module):
    """Everything IVLP trains: text_prompts.i and visual_prompts.i enter layer i of their tower."""

    def __init__(self, settings: IVLPSettings, text_width: int, vision_width: int,
                 first_context: Optional[Tensor] = None):
        super().__init__()
        n_text = settings.n_ctx_text
        first = first_context.clone() if first_context is not None else _normal(n_text, text_width)
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(first)] + [nn.Parameter(_normal(n_text, text_width))
                                     for _ in range(settings.prompt_depth_text - 1)])
        depth_vision = settings.prompt_depth_vision if settings.has_visual_prompts else 0
        self.visual_prompts = nn.ParameterList(
            [nn.Parameter(_normal(settings.n_ctx_vision, vision_width)) for _ in range(depth_vision)])


class IVLP(PromptedCLIPClassifier):
    """Frozen CLIP + independent deep text and visual prompts; logits for a set of classes."""

    def __init__(self, clip_model: nn.Module, settings: IVLPSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        checked(settings, backbone_shape(clip_model))
        super().__init__(clip_model, settings.n_ctx_text, settings.init_words, classnames, frozen_text_features)
        self.settings = settings
        self.prompt_learner = IVLPPromptLearner(settings, self.text_encoder.width, self.image_encoder.width,
                                                self.first_context)
        # language-only: the image side is frozen CLIP's, so evaluation may reuse cached features
        self.uses_frozen_image_features = not settings.has_visual_prompts

    def encode_classes(self) -> Tensor:
        """Prompted text features [C, E] (unnormalised)."""
        return self.text_encoder(self.token_ids, list(self.prompt_learner.text_prompts))

    def image_features(self, images: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        """Prompted image features [B, E]; without visual prompts, frozen CLIP's (cached ones if given)."""
        visual_prompts = list(self.prompt_learner.visual_prompts)
        if visual_prompts:
            return self.image_encoder(images, visual_prompts)
        return frozen_image_features if frozen_image_features is not None else self.frozen_image_features(images)

    def classify(self, images: Tensor, text_features: Tensor,
                 frozen_image_features: Optional[Tensor] = None) -> Tensor:
        return self.logits(self.image_features(images, frozen_image_features), text_features)


# ---- the release's checkpoints ---------------------------------------------------------------
# The release registers its whole CustomCLIP: frozen CLIP, token buffers and (PromptSRC) a second
# frozen image tower are saved beside the prompts. Only the prompts are ours.
_DEEP_PROMPT = re.compile(r"(text|image)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")


_NOT_LEARNED = ("prompt_learner.token_prefix", "prompt_learner.token_suffix", "prompt_learner.ZS_image_encoder.")


def release_key_to_ours(key: str) -> Optional[str]:
    """Our IVLPPromptLearner name of a release key; None for what is not learned state."""
    if key == "prompt_learner.ctx":
        return "text_prompts.0"
    if key == "image_encoder.VPT":
        return "visual_prompts.0"
    deep = _DEEP_PROMPT.fullmatch(key)
    if deep:
        tower = "text" if deep.group(1) == "text" else "visual"
        return f"{tower}_prompts.{deep.group(2)}"
    if key.startswith("prompt_learner.") and not key.startswith(_NOT_LEARNED):
        # learned state we do not know: another method's checkpoint (MaPLe's prompt_learner.proj, ...)
        raise KeyError(f"unknown key {key} in a release checkpoint: not one of IVLP or PromptSRC")
    return None  # frozen CLIP, logit_scale, the class-bound token buffers, PromptSRC's frozen image tower


def convert_release_state_dict(release_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The release's `VLPromptLearner` state dict (IVLP or PromptSRC) -> our prompt learner's (fp32)."""
    ours = {}
    for key, value in release_state.items():
        name = release_key_to_ours(without_data_parallel(key))
        if name is not None:
            ours[name] = value.float()
    return ours


def is_release_state_dict(keys: Iterable[str]) -> bool:
    return any(without_data_parallel(key) == "prompt_learner.ctx" for key in keys)


RELEASE_CHECKPOINT = ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict)


register_method(
    "IVLP", settings=IVLPSettings, model=IVLP, checkpoint_folder="VLPromptLearner",  # the release's
    # base-to-new and cross-dataset: the release's scripts/independent-vlp/ use this one recipe;
    # language-only: CFG=vit_b16_c2_ep5_batch4_4ctx_language_only (scripts/language-prompting/)
    default_configs=dict.fromkeys(("base2new", "xd"), "vit_b16_c2_ep5_batch4_2+2ctx"),
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/ivlp.md")
