"""HiCroPL: Hierarchical Cross-modal Prompt Learning (Zheng et al., ICCV 2025) on frozen CLIP.

Prompts at layers 0..L-1 of both encoders. Layers < k: text -> image (text prompts, compressed
per layer by a knowledge proxy, refine the visual prompts of all early layers at once through
one mapper). Layers >= k: image -> text, mirrored. Final features are fused with frozen CLIP
features and distilled toward them. docs/hicropl.md has the equations, shapes and where we
depart from the release.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from clip.model import QuickGELU
from torch import Tensor, nn

from ..clip.loading import backbone_shape
from ..clip.templates import GENERIC_TEMPLATES
from .base import LossOutput, PromptedCLIPClassifier
from .common import MAX_CONTEXT_TOKENS, normalize
from .registry import ClassTexts, ReleaseCheckpoint, entries_under, keys_under, register_method
from .settings import BackboneShape, ConfigError, checked, option

MAPPER_MODES = ("learned", "release")
MAX_LAMBD = 1e4  # beyond this the distillation term alone overflows fp16 losses


@dataclass(frozen=True)
class HiCroPLSettings:
    n_ctx: int = option(16, "prompt tokens per layer and modality", low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("a photo of a", "first-layer text context, used when it has at least N_CTX "
                                           "tokens (else random, as in the release)")
    prompt_depth: int = option(12, "layers carrying prompts, 2..number of layers", low=2)
    cross_layer: int = option(6, "layers below it: text -> image; from it on: image -> text; "
                                 "1..PROMPT_DEPTH-1", low=1)
    lambd: float = option(12.0, "weight of the distillation toward frozen CLIP (the paper: 12)", low=0, high=MAX_LAMBD)
    mapper_mode: str = option("learned", "learned: the paper (mappers and proxies learn); release: the "
                                         "release's in-place copy, without gradient", choices=MAPPER_MODES)
    n_heads: int = option(8, "heads of the knowledge proxies and mappers", low=1)
    exact_shortcuts: bool = option(True, "cut text at the last EOT and share the prompt prefix (exact; "
                                         "False computes as the release does)")

    def validate(self, shape: BackboneShape) -> None:
        """Limits that depend on the backbone."""
        if self.prompt_depth > shape.layers:
            raise ConfigError("prompt_depth", self.prompt_depth,
                              f"must be in [2, {shape.layers}]: both flows need a layer, and this backbone has "
                              f"{shape.text_layers} text and {shape.vision_layers} vision layers")
        if self.cross_layer > self.prompt_depth - 1:
            raise ConfigError("cross_layer", self.cross_layer,
                              f"must be in [1, PROMPT_DEPTH-1] = [1, {self.prompt_depth - 1}]")
        if shape.text_width % self.n_heads or shape.vision_width % self.n_heads:
            raise ConfigError("n_heads", self.n_heads, f"must divide both prompt widths ({shape.text_width} "
                                                       f"text, {shape.vision_width} vision)")


class KnowledgeProxy(nn.Module):
    """Layer-specific knowledge proxy (LKP): one learnable token attends over a layer's prompts.

    p = LN2(q + MHA(LN1(q), LN1(S), LN1(S))),  S [n, d] -> p [1, d]
    """

    def __init__(self, width: int, n_heads: int, init_std: float = 1.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, width) * init_std)  # the release: std 1
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, n_heads)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, source: Tensor) -> Tensor:
        source = self.ln_1(source)
        attended = self.attn(self.ln_1(self.query), source, source, need_weights=False)[0]
        return self.ln_2(self.query + attended)


class KnowledgeMapper(nn.Module):
    """Hierarchical knowledge mapper: target prompts of all layers of a group attend to the
    proxies of all layers of the other modality.

    q' = Wq Q, k' = Wk P, v' = Wv P;  q' = q' + MHA(LN1(q'), LN1(k'), LN1(v'));  out = q' + FFN(LN2(q'))
    """

    def __init__(self, width: int, source_width: int, n_heads: int):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(source_width, width)
        self.v_proj = nn.Linear(source_width, width)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, n_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, targets: Tensor, proxies: Tensor) -> Tensor:
        q = self.q_proj(targets)  # [m, d]
        k, v = self.k_proj(proxies), self.v_proj(proxies)  # [p, d]
        q = q + self.attn(self.ln_1(q), self.ln_1(k), self.ln_1(v), need_weights=False)[0]
        return q + self.mlp(self.ln_2(q))


def _normal(*shape: int) -> Tensor:
    return nn.init.normal_(torch.empty(*shape), std=0.02)


class HiCroPLPromptLearner(nn.Module):
    """Everything HiCroPL trains: per-layer prompts T_i, V_i, the proxies and the two mappers."""

    def __init__(self, cfg: HiCroPLSettings, text_width: int, vision_width: int,
                 first_context: Optional[Tensor] = None):
        super().__init__()
        n, depth, k = cfg.n_ctx, cfg.prompt_depth, cfg.cross_layer
        self.n_ctx, self.depth, self.cross_layer = n, depth, k
        self.mapper_mode = cfg.mapper_mode
        first = first_context.clone() if first_context is not None else _normal(n, text_width)
        # one independent tensor per layer and modality
        self.text_prompts = nn.ParameterList(
            [nn.Parameter(first)] + [nn.Parameter(_normal(n, text_width)) for _ in range(depth - 1)])
        self.visual_prompts = nn.ParameterList(
            [nn.Parameter(_normal(n, vision_width)) for _ in range(depth)])
        self.text_proxies = nn.ModuleList([KnowledgeProxy(text_width, cfg.n_heads) for _ in range(k)])
        self.visual_proxies = nn.ModuleList(
            [KnowledgeProxy(vision_width, cfg.n_heads) for _ in range(depth - k)])
        self.text_to_image = KnowledgeMapper(vision_width, text_width, cfg.n_heads)
        self.image_to_text = KnowledgeMapper(text_width, vision_width, cfg.n_heads)

    def text_to_image_flow(self) -> Tensor:
        """Early layers: V_0..V_{k-1} refined by the proxies of T_0..T_{k-1}; [k, n, dv]."""
        k = self.cross_layer
        proxies = torch.cat([lkp(self.text_prompts[i]) for i, lkp in enumerate(self.text_proxies)])
        targets = torch.cat(list(self.visual_prompts[:k]))  # [k*n, dv]
        return self.text_to_image(targets, proxies).view(k, self.n_ctx, -1)

    def image_to_text_flow(self) -> Tensor:
        """Late layers: T_k..T_{L-1} refined by the proxies of V_k..V_{L-1}; [L-k, n, dt]."""
        k = self.cross_layer
        proxies = torch.cat([lkp(self.visual_prompts[k + j]) for j, lkp in enumerate(self.visual_proxies)])
        targets = torch.cat(list(self.text_prompts[k:]))  # [(L-k)*n, dt]
        return self.image_to_text(targets, proxies).view(self.depth - k, self.n_ctx, -1)

    def forward(self) -> Tuple[List[Tensor], List[Tensor]]:
        """Per-layer prompts for this forward: (text [L x [n, dt]], visual [L x [n, dv]])."""
        if self.mapper_mode == "release":
            return self._map_in_place()
        k = self.cross_layer
        mapped_visual = self.text_to_image_flow()
        mapped_text = self.image_to_text_flow()
        text = list(self.text_prompts[:k]) + list(mapped_text.unbind(0))
        visual = list(mapped_visual.unbind(0)) + list(self.visual_prompts[k:])
        return text, visual

    def _map_in_place(self) -> Tuple[List[Tensor], List[Tensor]]:
        # The release writes the mapped prompts into the parameters (`.data.copy_`): no gradient
        # reaches the mappers or proxies, and the overwritten prompts lose their own updates.
        k = self.cross_layer
        with torch.no_grad():
            mapped_visual = self.text_to_image_flow()
            mapped_text = self.image_to_text_flow()
            for i in range(k):
                self.visual_prompts[i].copy_(mapped_visual[i])
            for j in range(self.depth - k):
                self.text_prompts[k + j].copy_(mapped_text[j])
        return list(self.text_prompts), list(self.visual_prompts)


class HiCroPL(PromptedCLIPClassifier):
    """Frozen CLIP + HiCroPL prompts; logits for a set of classes. `frozen_text_features` are
    t_fix, frozen CLIP's class text features (from descriptions or templates)."""

    uses_frozen_image_features = True  # i_zs of evaluation images can be cached

    def __init__(self, clip_model: nn.Module, settings: HiCroPLSettings, classnames: Sequence[str],
                 frozen_text_features: Tensor):
        checked(settings, backbone_shape(clip_model))
        super().__init__(clip_model, settings.n_ctx, settings.ctx_init, classnames, frozen_text_features,
                         exact_shortcuts=settings.exact_shortcuts)
        self.settings = settings
        self.prompt_learner = HiCroPLPromptLearner(settings, self.text_encoder.width, self.image_encoder.width,
                                                   self.first_context)

    @property
    def classes_cacheable(self) -> bool:
        # the release rewrites the prompts at every forward, evaluation batches included
        return self.settings.mapper_mode != "release"

    # ---- features ------------------------------------------------------------------------
    def text_features(self, text_prompts: Sequence[Tensor]) -> Tensor:
        """t = norm(norm(prompted text) + t_fix); [C, E] fp32."""
        prompted = self.text_encoder(self.token_ids, text_prompts).float()
        return normalize(normalize(prompted) + self.frozen_text_features)

    def image_features(self, images: Tensor, visual_prompts: Sequence[Tensor],
                       zero_shot: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(i = norm(norm(prompted image) + i_zs), i_zs); [B, E] fp32."""
        if zero_shot is None:
            zero_shot = self.frozen_image_features(images)
        prompted = self.image_encoder(images, visual_prompts).float()
        return normalize(normalize(prompted) + zero_shot), zero_shot

    # ---- classes, images, loss -----------------------------------------------------------
    def encode_classes(self) -> Tuple[Tensor, List[Tensor]]:
        """(t [C, E], the visual prompts of this forward)."""
        text_prompts, visual_prompts = self.prompt_learner()
        return self.text_features(text_prompts), visual_prompts

    def classify(self, images: Tensor, classes, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        text, visual_prompts = classes
        image, _ = self.image_features(images, visual_prompts, frozen_image_features)
        return self.logits(image, text)

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput:
        """CE(logits, y) + LAMBD * [(1 - mean cos(t, t_fix)) + (1 - mean cos(i, i_zs))]."""
        text, visual_prompts = self.encode_classes()
        image, zero_shot = self.image_features(images, visual_prompts)
        logits = self.logits(image, text)
        with torch.autocast(images.device.type, enabled=False):
            ce = F.cross_entropy(logits, labels)
            distill_text = 1.0 - F.cosine_similarity(text, self.frozen_text_features, dim=1, eps=1e-7).mean()
            distill_image = 1.0 - F.cosine_similarity(image, zero_shot, dim=1, eps=1e-7).mean()
            loss = ce + self.settings.lambd * (distill_text + distill_image)
        return LossOutput(loss, logits, {"loss_ce": ce.detach(), "loss_distill": (distill_text + distill_image).detach()})


# ---- the release's checkpoints ---------------------------------------------------------------
def _release_key_to_ours(key: str) -> Optional[str]:
    """Name in HiCroPLPromptLearner of a release `prompt_learner.*` key; None = not learned state."""
    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    renames = {"linear_q": "q_proj", "linear_k": "k_proj", "linear_v": "v_proj", "ffn": "mlp"}
    if head in ("ctx", "token_prefix", "token_suffix", "ZS_image_encoder"):
        return None  # ctx duplicates cross_prompts_text.0; the rest is frozen or class-bound
    if head == "cross_prompts_text":
        return f"text_prompts.{rest[0]}"
    if head == "cross_prompts_visual":
        return f"visual_prompts.{rest[0]}"
    if head == "text_proxy_token":
        return f"text_proxies.{rest[0]}.query"
    if head == "visual_proxy_token":
        return f"visual_proxies.{rest[0]}.query"
    if head == "attn_pooling_text_nets":
        return ".".join(["text_proxies"] + rest)
    if head == "attn_pooling_visual_nets":
        return ".".join(["visual_proxies"] + rest)
    if head in ("text2visual_net", "visual2text_net"):
        target = "text_to_image" if head == "text2visual_net" else "image_to_text"
        return ".".join([target, renames.get(rest[0], rest[0])] + rest[1:])
    raise KeyError(f"unknown key prompt_learner.{key} in a release checkpoint")


def convert_release_state_dict(release_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The release's `VLPromptLearner` state dict -> our HiCroPLPromptLearner state dict (fp32)."""
    ours = {}
    for key, value in entries_under(release_state):
        name = _release_key_to_ours(key)
        if name is not None:
            ours[name] = value.float()
    if "text_prompts.0" not in ours and "prompt_learner.ctx" in release_state:
        ours["text_prompts.0"] = release_state["prompt_learner.ctx"].float()
    return ours


is_release_state_dict = keys_under("prompt_learner.")


register_method(
    "HiCroPL", settings=HiCroPLSettings, model=HiCroPL, checkpoint_folder="VLPromptLearner",  # the release's
    default_configs={"base2new": "vit_b16_c2_ep50_batch32_16ctx",
                     "xd": "vit_b16_c2_ep5_batch32_2ctx_cross_datasets",
                     "fewshot": "vit_b16_c2_ep50_batch32_16ctx_few_shot"},
    # t_fix: the release's GPT-written class descriptions when present, else a template ensemble
    class_texts=lambda settings, dataset: ClassTexts(GENERIC_TEMPLATES, descriptions=True),
    release_checkpoint=ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict),
    doc="docs/hicropl.md")
