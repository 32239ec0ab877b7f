"""DCP: Deeply Coupled Cross-modal Prompt learning (Liu et al., Findings of ACL 2023; release
"CMPA") on frozen CLIP. docs/dcp.md has the equations and where we depart from the release.

First-layer text and visual contexts. The encoders run in lockstep; before each layer
i = 1..PROMPT_DEPTH a Cross-Modal Prompt Attention (CMPA) module updates the visual prompt states
from the text prompt states and the text prompt states from the visual ones; the updated states
replace the prompt positions, then the frozen layers run.

Text prompt states are the same for every class (under the causal mask, positions 1..n see only
SOS and the prompts). How the two sides meet is FUSING:
- per_image (default; the paper's mutual exchange without batch coupling): each image updates its
  own copy of the text prompt states from its own visual states, and its visual states from that
  copy; image b is compared with class features from its own text copy (B x C text sequences, as
  CoCoOp), so no prediction depends on the other images of the batch.
- image_free (this toolkit's design, cheaper): each image's visual states are updated with the
  text states as query; the text is updated from an image-free visual stream (CLS and the visual
  prompts, no patches) stepped in lockstep and updated like the images, so the classes are
  encoded once per evaluation and never see the images.
- mean | first | max (the release): the batch's visual states are fused into one, updated once
  and given to every image, and the text is updated from that fused state: a prediction depends
  on the other images of its batch.
TEXT_UPDATE False reproduces the release, which computes the text update but never splices it in.
"""
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from clip.model import QuickGELU
from torch import Tensor, nn

from ..clip.encoders import run_lockstep
from ..clip.loading import backbone_shape
from .base import PromptedCLIPClassifier
from .common import MAX_CONTEXT_TOKENS
from .registry import ReleaseCheckpoint, register_method, without_data_parallel
from .settings import BackboneShape, ConfigError, checked, option

BATCH_FUSINGS = ("mean", "first", "max")  # the release's: one fused visual state per batch
FUSINGS = ("per_image", "image_free") + BATCH_FUSINGS


@dataclass(frozen=True)
class DCPSettings:
    n_ctx: int = option(16, "prompt tokens per modality", low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("a photo of a", "first-layer text context, used when it has at least N_CTX tokens")
    prompt_depth: int = option(9, "CMPA updates enter layers 1..PROMPT_DEPTH", low=1)
    ps: bool = option(True, "one CMPA module shared by all layers (False: one per layer)")
    fusing: str = option("per_image", "per_image: each image exchanges with its own text copy (the paper's "
                                      "mutual exchange, batch-independent); image_free: the text exchanges with "
                                      "an image-free visual stream (cheaper, classes encoded once); mean/first/max: "
                                      "the release's fusion of the batch's visual states", choices=FUSINGS)
    text_update: bool = option(True, "splice the text update in (the release computes it but does not)")

    def validate(self, shape: BackboneShape) -> None:
        most = shape.layers - 1
        if self.prompt_depth > most:
            raise ConfigError("prompt_depth", self.prompt_depth,
                              f"must be in [1, {most}] (updates enter layers 1..PROMPT_DEPTH of a backbone with "
                              f"{shape.text_layers} text and {shape.vision_layers} vision layers)")


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

    def __init__(self, cfg: DCPSettings, text_width: int, vision_width: int, first_context: Optional[Tensor]):
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


class DCP(PromptedCLIPClassifier):
    """Frozen CLIP + DCP prompts; logits for a set of classes."""

    def __init__(self, clip_model: nn.Module, settings: DCPSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        checked(settings, backbone_shape(clip_model))
        super().__init__(clip_model, settings.n_ctx, settings.ctx_init, classnames, frozen_text_features)
        self.settings = settings
        self.prompt_learner = DCPPromptLearner(settings, self.text_encoder.width, self.image_encoder.width,
                                               self.first_context)

    @property
    def classes_cacheable(self) -> bool:
        # only the image-free stream gives a class side without images
        return self.settings.fusing == "image_free"

    def update(self, layer: int, text: Tensor, visual: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """CMPA before `layer`: (new text states, new visual states) from text [T, n, dt] and visual
        [V, n, dv], T and V both the batch or one of them 1; (None, None) beyond PROMPT_DEPTH."""
        if layer > self.settings.prompt_depth:
            return None, None
        cmpa = self.prompt_learner.module_for(layer)
        new_text = cmpa.text(text, visual) if self.settings.text_update else None
        return new_text, cmpa.visual(visual, text)

    # ---- image_free: the class side from the text and image-free streams, images apart ----------
    def encode_classes(self) -> Optional[Tuple[Tensor, List[Tensor]]]:
        """Text features [C, E] and the text prompt states entering layers 1..depth-1, which the
        images query, from the text and image-free streams alone (no images). None in the modes
        where the class side needs the images."""
        if self.settings.fusing != "image_free":
            return None
        learner = self.prompt_learner
        text_states: List[Tensor] = []

        def between(layer, prompt_states):
            text, image_free = prompt_states
            text_states.append(text)
            return list(self.update(layer, text, image_free))

        final = run_lockstep([self.text_encoder, self.image_encoder],
                             [self.text_encoder.embed(self.token_ids, learner.text_context),
                              self.image_encoder.embed_prompts_only(learner.visual_context)], between)
        return self.text_encoder.features(final[0]), text_states

    def image_side(self, images: Tensor, text_states: List[Tensor]) -> Tensor:
        """Image features [B, E]: each image's visual states updated with the text states as query."""
        learner = self.prompt_learner
        state = self.image_encoder.embed(images, learner.visual_context)
        for layer in range(self.image_encoder.depth):
            prompt = None
            if 0 < layer <= self.settings.prompt_depth:
                prompt = learner.module_for(layer).visual(self.image_encoder.prompt_states(state), text_states[layer - 1])
            state = self.image_encoder.run_layer(layer, state, prompt)
        return self.image_encoder.features(state)

    # ---- per_image: each image exchanges with its own copy of the text ---------------------------
    def encode_per_image(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """(class features per image [B, C, E], image features [B, E]): the text runs once per image
        (B x C sequences, SOS and the prompts once per image), and before each layer image b's
        text and visual prompt states update each other."""
        learner = self.prompt_learner
        text = self.text_encoder.in_groups(self.text_encoder.embed(self.token_ids, learner.text_context), len(images))
        final = run_lockstep([self.text_encoder, self.image_encoder],
                             [text, self.image_encoder.embed(images, learner.visual_context)],
                             lambda layer, states: list(self.update(layer, *states)))
        per_image = self.text_encoder.features(final[0]).view(len(images), len(self.classnames), -1)
        return per_image, self.image_encoder.features(final[1])

    # ---- the release's fusing modes: text and images coupled through the batch ----------------
    def encode_fused(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """(text features [C, E], image features [B, E]): the batch's visual prompt states are fused
        into one, updated once for every image, and the text is updated from that fused state."""
        learner = self.prompt_learner

        def between(layer, prompt_states):
            text, visual = prompt_states
            new_text, new_visual = self.update(layer, text, fuse(visual, self.settings.fusing))
            return [new_text, None if new_visual is None else new_visual.expand(visual.shape[0], -1, -1)]

        final = run_lockstep([self.text_encoder, self.image_encoder],
                             [self.text_encoder.embed(self.token_ids, learner.text_context),
                              self.image_encoder.embed(images, learner.visual_context)], between)
        return self.text_encoder.features(final[0]), self.image_encoder.features(final[1])

    def classify(self, images: Tensor, classes, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        if self.settings.fusing == "per_image":
            return self.in_image_chunks(lambda part: self.logits(*reversed(self.encode_per_image(part))), images)
        if self.settings.fusing in BATCH_FUSINGS:
            text, image = self.encode_fused(images)
            return self.logits(image, text)
        text, text_states = classes
        return self.logits(self.image_side(images, text_states), text)


# ---- the release's checkpoints ---------------------------------------------------------------
# CMPA registers its whole CustomCLIP with Dassl, so its files hold, besides frozen CLIP
# (`encoder.*`, `logit_scale`) and the class-bound `prompt_learner.token_prefix/suffix`:
# the first-layer contexts `prompt_learner.prompts_text` / `prompts_visual`, and a
# PromptAttention module under every block, `encoder.resblocks.<i>.prompt_attn.*` (with PS the
# one shared module saved once per block). Its forward calls block i's module before layer i for
# i = 1..PROMPT_DEPTH, never block 0's.
RELEASE_CONTEXTS = {"prompt_learner.prompts_text": "text_context", "prompt_learner.prompts_visual": "visual_context"}
RELEASE_PARTS = {  # PromptAttention's modules -> PromptUpdate's (direction.module)
    "promt_attention_visual": "visual.attn", "ln_pa_1_visual": "visual.ln_1", "mlp_pa_visual": "visual.mlp",
    "ln_pa_2_visual": "visual.ln_2", "proj_t2v": "visual.proj",  # text width -> visual width: the query
    "promt_attention_text": "text.attn", "ln_pa_1_text": "text.ln_1", "mlp_pa_text": "text.mlp",
    "ln_pa_2_text": "text.ln_2", "proj_v2t": "text.proj"}
_PROMPT_ATTENTION = re.compile(r"encoder\.resblocks\.(\d+)\.prompt_attn\.([^.]+)\.(.+)")


def is_release_state_dict(keys: Iterable[str]) -> bool:
    return any(_PROMPT_ATTENTION.fullmatch(without_data_parallel(key)) for key in keys)


def _at_initial_values(module: Dict[str, Tensor]) -> bool:
    """Still PyTorch's initialisation where it is constant: LayerNorms 1 and 0, attention biases 0."""
    ones = [f"{side}.{ln}.weight" for side in ("visual", "text") for ln in ("ln_1", "ln_2")]
    zeros = [f"{side}.{ln}.bias" for side in ("visual", "text") for ln in ("ln_1", "ln_2")] + [
        f"{side}.attn.{bias}" for side in ("visual", "text") for bias in ("in_proj_bias", "out_proj.bias")]
    return all(bool((module[k] == 1).all()) for k in ones) and all(bool((module[k] == 0).all()) for k in zeros)


def _modules_used(blocks: Dict[int, Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
    """The release's PromptAttention modules in the order our `cmpa` list holds them. PS (every
    block holds the same values): the one module. Per layer: blocks 1..PROMPT_DEPTH. The file does
    not say PROMPT_DEPTH, but the modules of the later blocks never run, so never get a gradient
    and keep their initial values: those trailing blocks are left out (as is block 0's)."""
    first, *others = [blocks[b] for b in sorted(blocks)]
    if all(torch.equal(module[k], first[k]) for module in others for k in first):
        return [first]
    used = [blocks[b] for b in sorted(blocks) if b > 0]
    while used and _at_initial_values(used[-1]):
        used.pop()
    return used


def convert_release_state_dict(release_state: Dict[str, Any]) -> Dict[str, Tensor]:
    """The CMPA release's `MultiModalPromptLearner` state dict -> our DCPPromptLearner's (fp32)."""
    ours, blocks = {}, {}
    for key, value in release_state.items():
        key = without_data_parallel(key)
        if key in RELEASE_CONTEXTS:
            ours[RELEASE_CONTEXTS[key]] = value.float()  # fp16 runs save them in fp16
            continue
        match = _PROMPT_ATTENTION.fullmatch(key)
        if match is None:
            continue  # frozen CLIP, logit_scale, the class-bound token buffers
        block, part, rest = match.groups()
        if part not in RELEASE_PARTS:
            raise KeyError(f"unknown key {key} in a CMPA release checkpoint")
        blocks.setdefault(int(block), {})[f"{RELEASE_PARTS[part]}.{rest}"] = value.float()
    for index, module in enumerate(_modules_used(blocks) if blocks else []):
        ours.update({f"cmpa.{index}.{name}": value for name, value in module.items()})
    return ours


register_method(
    "DCP", settings=DCPSettings, model=DCP, checkpoint_folder="MultiModalPromptLearner",  # the release's folder
    default_configs=dict.fromkeys(("base2new", "xd", "fewshot"), "vit_b16_c2_ep20_batch4_16ctx"),
    # the release's trainer name, with its behaviour as defaults: visual states fused by their
    # batch mean, the text update computed but not spliced in
    release_names={"CMPA": {"fusing": "mean", "text_update": False}},
    release_checkpoint=ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict),
    doc="docs/dcp.md")
