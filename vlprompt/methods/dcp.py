"""DCP: Deeply Coupled Cross-modal Prompt learning (Liu et al., Findings of ACL 2023; release
"CMPA") on frozen CLIP. See shared/docs/dcp.md.

First-layer text and visual contexts. The encoders run in lockstep; before each layer
i = 1..PROMPT_DEPTH a Cross-Modal Prompt Attention (CMPA) module updates the visual prompt states
from the text prompt states and the text prompt states from the visual ones; the updated states
replace the prompt positions, then the frozen layers run.

Text prompt states are the same for every class (under the causal mask, positions 1..n see only
SOS and the prompts), so they never need fusing. The visual side:
- FUSING mean | first | max (the release): the batch's visual states are fused into one, updated
  once and given to every image, and the text is updated from that fused state: a prediction
  depends on the other images of its batch.
- FUSING none (default): each image's visual states are updated with the text states as query;
  the text is updated from an image-free visual stream (CLS and the visual prompts, no patches)
  stepped in lockstep with the others and updated like the images, so text features and
  predictions never depend on the batch, and the classes are encoded once per evaluation.
TEXT_UPDATE False reproduces the release, which computes the text update but never splices it in.
"""
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from clip.model import QuickGELU
from torch import Tensor, nn

from ..clip.encoders import PromptedImageEncoder, PromptedTextEncoder, run_lockstep
from .common import (ConfigError, check_field_types, check_n_ctx, class_token_ids, initial_context,
                           normalize)

FUSINGS = ("none", "mean", "first", "max")


@dataclass(frozen=True)
class DCPConfig:
    """Hyper-parameters; field NAME is config key <node>.NAME (TRAINER.DCP, or TRAINER.CMPA)."""
    n_ctx: int = 16
    ctx_init: str = "a photo of a"
    prompt_depth: int = 9
    ps: bool = True
    fusing: str = "none"
    text_update: bool = True
    node: str = "TRAINER.DCP"

    def key(self, field_name: str) -> str:
        return f"{self.node}.{field_name.upper()}"

    def validate(self, text_depth: int, vision_depth: int) -> None:
        check_field_types(self, self.key)
        check_n_ctx(self.n_ctx, self.key("n_ctx"))
        most = min(text_depth, vision_depth) - 1
        if not 1 <= self.prompt_depth <= most:
            raise ConfigError(f"{self.key('prompt_depth')}={self.prompt_depth!r} is invalid: must be in "
                              f"[1, {most}] (updates enter layers 1..PROMPT_DEPTH of a backbone with "
                              f"{text_depth} text and {vision_depth} vision layers)")
        if self.fusing not in FUSINGS:
            raise ConfigError(f"{self.key('fusing')}={self.fusing!r} is invalid: must be one of {FUSINGS}")


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                      ("c_proj", nn.Linear(4 * width, width))]))


class PromptUpdate(nn.Module):
    """One direction of CMPA: states' = states + MHA(q = LN1(proj(other)), k = v = LN1(states)),
    then states' += MLP(LN2(states')). Query from the other modality; keys, values and residual
    from this one."""

    def __init__(self, width: int, other_width: int, n_heads: int):
        super().__init__()
        self.proj = nn.Linear(other_width, width)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, n_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _mlp(width)

    def forward(self, states: Tensor, other: Tensor) -> Tensor:
        """states [N, n, d]; other [N or 1, n, d_other] -> [N, n, d]."""
        states = states.float()
        query = self.ln_1(self.proj(other.float())).expand(states.shape[0], -1, -1)
        keys = self.ln_1(states)
        states = states + self.attn(query, keys, keys, need_weights=False)[0]
        return states + self.mlp(self.ln_2(states))


class CrossModalPromptAttention(nn.Module):
    """CMPA: the visual update (heads of the vision tower) and the text update (heads of the text tower)."""

    def __init__(self, vision_width: int, vision_heads: int, text_width: int, text_heads: int):
        super().__init__()
        self.visual = PromptUpdate(vision_width, text_width, vision_heads)
        self.text = PromptUpdate(text_width, vision_width, text_heads)


def fuse(states: Tensor, how: str) -> Tensor:
    """[B, n, d] -> [1, n, d] over the batch, as the release does."""
    if how == "mean":
        return states.mean(dim=0, keepdim=True)
    if how == "first":
        return states[:1]
    return states.max(dim=0, keepdim=True)[0]


class DCPPromptLearner(nn.Module):
    """Everything DCP trains: the first-layer contexts and the CMPA module(s)."""

    def __init__(self, cfg: DCPConfig, text_width: int, vision_width: int, first_context: Optional[Tensor]):
        super().__init__()
        n = cfg.n_ctx
        self.text_context = nn.Parameter(
            first_context.clone() if first_context is not None else nn.init.normal_(torch.empty(n, text_width), std=0.02))
        self.visual_context = nn.Parameter(nn.init.normal_(torch.empty(n, vision_width), std=0.02))
        heads = (vision_width // 64, text_width // 64)  # CLIP's own head counts
        count = 1 if cfg.ps else cfg.prompt_depth  # PS: one module shared by all layers
        self.cmpa = nn.ModuleList([CrossModalPromptAttention(vision_width, heads[0], text_width, heads[1])
                                   for _ in range(count)])
        self.shared = cfg.ps

    def module_for(self, layer: int) -> CrossModalPromptAttention:
        return self.cmpa[0 if self.shared else layer - 1]


class DCP(nn.Module):
    """Frozen CLIP + DCP prompts; logits for a set of classes."""

    uses_frozen_image_features = False

    def __init__(self, clip_model: nn.Module, cfg: DCPConfig, classnames: Sequence[str]):
        super().__init__()
        self.text_encoder = PromptedTextEncoder(clip_model)
        self.image_encoder = PromptedImageEncoder(clip_model)
        cfg.validate(self.text_encoder.depth, self.image_encoder.depth)
        self.cfg = cfg
        self.logit_scale = clip_model.logit_scale
        first_context, self.prompt_prefix = initial_context(clip_model.token_embedding, cfg.n_ctx, cfg.ctx_init,
                                                            cfg.key("ctx_init"))
        self.prompt_learner = DCPPromptLearner(cfg, self.text_encoder.width, self.image_encoder.width, first_context)
        self._eval_cache: Optional[Tuple[Tensor, List[Tensor]]] = None
        self.set_classes(classnames)

    def set_classes(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        token_ids = class_token_ids(self.prompt_prefix, classnames, self.cfg.key("n_ctx"), self.cfg.n_ctx)
        self.register_buffer("token_ids", token_ids.to(self.logit_scale.device), persistent=False)

    # ---- the coupled encoders ---------------------------------------------------------------
    def _updates(self, i: int, text: Tensor, visual: Tensor, free: Optional[Tensor]):
        """New (text, visual, image-free) prompt states entering layer i, or None where unchanged."""
        if i > self.cfg.prompt_depth:
            return None, None, None
        cmpa = self.prompt_learner.module_for(i)
        if self.cfg.fusing == "none":
            new_visual = cmpa.visual(visual, text)  # per image, text as query
            new_free = cmpa.visual(free, text)
            new_text = cmpa.text(text, free) if self.cfg.text_update else None
        else:
            fused = fuse(visual, self.cfg.fusing)
            new_visual = cmpa.visual(fused, text).expand(visual.shape[0], -1, -1)
            new_free = None
            new_text = cmpa.text(text, fused) if self.cfg.text_update else None
        return new_text, new_visual, new_free

    def encode(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """(text features [C, E], image features [B, E]), both encoders coupled layer by layer."""
        learner = self.prompt_learner
        encoders = [self.text_encoder, self.image_encoder]
        states = [self.text_encoder.embed(self.token_ids, learner.text_context),
                  self.image_encoder.embed(images, learner.visual_context)]
        if self.cfg.fusing == "none":
            encoders.append(self.image_encoder)
            states.append(self.image_encoder.embed_prompts_only(learner.visual_context))

        def between(i, prompt_states):
            text, visual = prompt_states[0], prompt_states[1]
            free = prompt_states[2] if len(prompt_states) > 2 else None
            new_text, new_visual, new_free = self._updates(i, text, visual, free)
            return [new_text, new_visual, new_free][:len(prompt_states)]

        final = run_lockstep(encoders, states, between)
        return self.text_encoder.features(final[0]), self.image_encoder.features(final[1])

    def _class_side(self) -> Tuple[Tensor, List[Tensor]]:
        """FUSING none: text features and the per-layer text prompt states the images query, from
        the text and image-free streams alone (no images)."""
        learner = self.prompt_learner
        text_states: List[Tensor] = []

        def between(i, prompt_states):
            text, free = prompt_states
            text_states.append(text)
            if i > self.cfg.prompt_depth:
                return [None, None]
            cmpa = learner.module_for(i)
            return [cmpa.text(text, free) if self.cfg.text_update else None, cmpa.visual(free, text)]

        final = run_lockstep([self.text_encoder, self.image_encoder],
                             [self.text_encoder.embed(self.token_ids, learner.text_context),
                              self.image_encoder.embed_prompts_only(learner.visual_context)], between)
        return self.text_encoder.features(final[0]), text_states

    def _image_side(self, images: Tensor, text_states: List[Tensor]) -> Tensor:
        learner = self.prompt_learner
        state = self.image_encoder.embed(images, learner.visual_context)
        for i in range(self.image_encoder.depth):
            prompt = None
            if 0 < i <= self.cfg.prompt_depth:
                prompt = learner.module_for(i).visual(self.image_encoder.prompt_states(state), text_states[i - 1])
            state = self.image_encoder.run_layer(i, state, prompt)
        return self.image_encoder.features(state)

    # ---- logits and loss ---------------------------------------------------------------------
    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        with torch.autocast(image_features.device.type, enabled=False):
            image, text = normalize(image_features.float()), normalize(text_features.float())
            return self.logit_scale.exp().float() * image @ text.t()

    def forward(self, images: Tensor, zero_shot: Optional[Tensor] = None) -> Tensor:
        if self._eval_cache is not None:
            text, text_states = self._eval_cache
            return self.logits(self._image_side(images, text_states), text)
        text, image = self.encode(images)
        return self.logits(image, text)

    def loss(self, images: Tensor, labels: Tensor):
        text, image = self.encode(images)
        logits = self.logits(image, text)
        with torch.autocast(images.device.type, enabled=False):
            loss = F.cross_entropy(logits, labels)
        return loss, logits, {}

    @contextmanager
    def evaluation(self):
        """FUSING none: the classes are encoded once per evaluation. The fusing modes depend on
        each batch, so nothing can be cached there (as in the release)."""
        if self.cfg.fusing != "none":
            yield
            return
        with torch.no_grad():
            self._eval_cache = self._class_side()
        try:
            yield
        finally:
            self._eval_cache = None
