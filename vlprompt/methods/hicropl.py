"""HiCroPL: Hierarchical Cross-modal Prompt Learning (Zheng et al., ICCV 2025) on frozen CLIP.

Prompts at layers 0..L-1 of both encoders. Layers < k: text -> image (text prompts, compressed
per layer by a knowledge proxy, refine the visual prompts of all early layers at once through
one mapper). Layers >= k: image -> text, mirrored. Final features are fused with frozen CLIP
features and distilled toward them. See shared/docs/hicropl.md for the equations.
"""
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from clip.model import QuickGELU
from torch import Tensor, nn

from ..clip.encoders import PromptedImageEncoder, PromptedTextEncoder
from .common import (ConfigError, check_field_types, check_n_ctx, class_token_ids,  # noqa: F401
                           initial_context, normalize)

MAPPER_MODES = ("learned", "release")
MAX_LAMBD = 1e4  # beyond this the distillation term alone overflows fp16 losses


@dataclass(frozen=True)
class HiCroPLConfig:
    """The method's hyper-parameters; field NAME is config key TRAINER.HICROPL.NAME."""
    n_ctx: int = 16
    ctx_init: str = ""
    prompt_depth: int = 12
    cross_layer: int = 6
    lambd: float = 12.0
    mapper_mode: str = "learned"
    n_heads: int = 8

    @staticmethod
    def key(field_name: str) -> str:
        return f"TRAINER.HICROPL.{field_name.upper()}"

    def validate(self, text_depth: int, vision_depth: int, text_width: int, vision_width: int) -> None:
        def fail(name, allowed):
            raise ConfigError(f"{self.key(name)}={getattr(self, name)!r} is invalid: {allowed}")

        check_field_types(self, self.key)
        check_n_ctx(self.n_ctx, self.key("n_ctx"))
        layers = min(text_depth, vision_depth)
        if not 2 <= self.prompt_depth <= layers:
            fail("prompt_depth", f"must be in [2, {layers}]: both flows need a layer, and this backbone "
                                 f"has {text_depth} text and {vision_depth} vision layers")
        if not 1 <= self.cross_layer <= self.prompt_depth - 1:
            fail("cross_layer", f"must be in [1, PROMPT_DEPTH-1] = [1, {self.prompt_depth - 1}]")
        if not (math.isfinite(self.lambd) and 0 <= self.lambd <= MAX_LAMBD):
            fail("lambd", f"must be in [0, {MAX_LAMBD:g}] (the paper uses 12)")
        if self.mapper_mode not in MAPPER_MODES:
            fail("mapper_mode", f"must be one of {MAPPER_MODES}")
        if self.n_heads < 1 or text_width % self.n_heads or vision_width % self.n_heads:
            fail("n_heads", f"must divide both prompt widths ({text_width} text, {vision_width} vision)")


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

    def __init__(self, cfg: HiCroPLConfig, text_width: int, vision_width: int,
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


class HiCroPL(nn.Module):
    """Frozen CLIP + HiCroPL prompts; logits for a set of classes.

    The class set (token ids and frozen class text features t_fix) is state outside the learned
    parameters: `set_classes` retargets a trained model to new classes.
    """

    uses_frozen_image_features = True  # its frozen image features can be cached for evaluation

    def __init__(self, clip_model: nn.Module, cfg: HiCroPLConfig, classnames: Sequence[str],
                 fixed_text_features: Tensor, exact_shortcuts: bool = True):
        super().__init__()
        self.text_encoder = PromptedTextEncoder(clip_model, shared_prefix=exact_shortcuts,
                                                cut_at_eot=exact_shortcuts)
        self.image_encoder = PromptedImageEncoder(clip_model)
        cfg.validate(self.text_encoder.depth, self.image_encoder.depth,
                     self.text_encoder.width, self.image_encoder.width)
        self.cfg = cfg
        self.logit_scale = clip_model.logit_scale
        first_context, self.prompt_prefix = initial_context(clip_model.token_embedding, cfg.n_ctx, cfg.ctx_init,
                                                            cfg.key("ctx_init"))
        self.prompt_learner = HiCroPLPromptLearner(
            cfg, self.text_encoder.width, self.image_encoder.width, first_context)
        self._eval_cache: Optional[Tuple[Tensor, List[Tensor]]] = None
        self.set_classes(classnames, fixed_text_features)

    # ---- classes -------------------------------------------------------------------------
    def set_classes(self, classnames: Sequence[str], fixed_text_features: Tensor) -> None:
        if fixed_text_features.shape[0] != len(classnames):
            raise ValueError(f"{fixed_text_features.shape[0]} class features for {len(classnames)} classes")
        token_ids = class_token_ids(self.prompt_prefix, classnames, self.cfg.key("n_ctx"), self.cfg.n_ctx)
        device = self.logit_scale.device
        self.classnames = list(classnames)
        # not persistent: checkpoints hold learned state only, classes are rebuilt on load
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)
        self.register_buffer("fixed_text_features", normalize(fixed_text_features.float()).to(device),
                             persistent=False)

    # ---- features ------------------------------------------------------------------------
    def text_features(self, text_prompts: Sequence[Tensor]) -> Tensor:
        """t = norm(norm(prompted text) + t_fix); [C, E] fp32."""
        prompted = self.text_encoder(self.token_ids, text_prompts).float()
        return normalize(normalize(prompted) + self.fixed_text_features)

    def zero_shot_image_features(self, images: Tensor) -> Tensor:
        """i_zs: the same frozen encoder without prompts (no second copy of CLIP)."""
        with torch.no_grad():
            return normalize(self.image_encoder(images).float())

    def image_features(self, images: Tensor, visual_prompts: Sequence[Tensor],
                       zero_shot: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(i = norm(norm(prompted image) + i_zs), i_zs); [B, E] fp32."""
        if zero_shot is None:
            zero_shot = self.zero_shot_image_features(images)
        prompted = self.image_encoder(images, visual_prompts).float()
        return normalize(normalize(prompted) + zero_shot), zero_shot

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        with torch.autocast(image_features.device.type, enabled=False):
            return self.logit_scale.exp().float() * image_features.float() @ text_features.float().t()

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, images: Tensor, zero_shot: Optional[Tensor] = None) -> Tensor:
        """Logits [B, C]."""
        if self._eval_cache is not None:
            text, visual_prompts = self._eval_cache
        else:
            text_prompts, visual_prompts = self.prompt_learner()
            text = self.text_features(text_prompts)
        image, _ = self.image_features(images, visual_prompts, zero_shot)
        return self.logits(image, text)

    def loss(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Dict[str, float]]:
        """CE(logits, y) + LAMBD * [(1 - mean cos(t, t_fix)) + (1 - mean cos(i, i_zs))]."""
        text_prompts, visual_prompts = self.prompt_learner()
        text = self.text_features(text_prompts)
        image, zero_shot = self.image_features(images, visual_prompts)
        logits = self.logits(image, text)
        with torch.autocast(images.device.type, enabled=False):
            ce = F.cross_entropy(logits, labels)
            distill_text = 1.0 - F.cosine_similarity(text, self.fixed_text_features, dim=1, eps=1e-7).mean()
            distill_image = 1.0 - F.cosine_similarity(image, zero_shot, dim=1, eps=1e-7).mean()
            loss = ce + self.cfg.lambd * (distill_text + distill_image)
        parts = {"loss_ce": ce.item(), "loss_distill": (distill_text + distill_image).item()}
        return loss, logits, parts

    @contextmanager
    def evaluation(self):
        """Within: prompts and class text features are computed once, not per batch.

        In release mode the prompts are rewritten at every forward (as the release does, eval
        batches included), so nothing is cached there.
        """
        if self.cfg.mapper_mode == "release":
            yield
            return
        with torch.no_grad():
            text_prompts, visual_prompts = self.prompt_learner()
            self._eval_cache = (self.text_features(text_prompts), visual_prompts)
        try:
            yield
        finally:
            self._eval_cache = None


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
    for key, value in release_state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if not key.startswith("prompt_learner."):
            continue  # frozen CLIP towers and logit_scale
        name = _release_key_to_ours(key[len("prompt_learner."):])
        if name is not None:
            ours[name] = value.float()
    if "text_prompts.0" not in ours and "prompt_learner.ctx" in release_state:
        ours["text_prompts.0"] = release_state["prompt_learner.ctx"].float()
    return ours


def load_release_checkpoint(path: str, trust_pickle: bool = False) -> Dict[str, Tensor]:
    """Read a release checkpoint (`VLPromptLearner/model*.pth.tar`) as our state dict.

    The release's Dassl pickles its LR scheduler object into every checkpoint, which only a full
    unpickling can read; that can run code stored in the file, so it needs `trust_pickle=True`.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust_pickle:
            raise RuntimeError(
                f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}). "
                f"Release checkpoints pickle Python objects (the LR scheduler); full unpickling can "
                f"execute code from the file. If you trust it, pass trust_pickle=True "
                f"(TRAINER.HICROPL.TRUST_RELEASE_CHECKPOINT True).") from err
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} holds no state dict")
    return convert_release_state_dict(state)
