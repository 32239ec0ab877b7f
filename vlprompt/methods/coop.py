"""CoOp: Context Optimization (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022) on frozen CLIP. docs/coop.md has the equations and where we depart from the release.

A learned context of n word embeddings replaces the words of a class prompt: the text encoder
reads [SOS, ctx_1..ctx_n, class tokens, ".", EOT], the image encoder is CLIP's own, and the
logits are the scaled cosines. Options as in the release (trainers/coop.py of
muzairkhattak/multimodal-prompt-learning, KaiyangZhou/CoOp): one context for all classes or one
per class (CSC), the class name at the end, in the middle or in front of the context, and
CTX_INIT, whose words give both the initial context and its length.
"""
import functools
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from clip.simple_tokenizer import SimpleTokenizer
from torch import Tensor, nn

from ..clip.class_features import readable_name
from ..clip.loading import backbone_shape
from .base import PromptedCLIPClassifier
from .common import CONTEXT_LENGTH, MAX_CONTEXT_TOKENS
from .registry import ReleaseCheckpoint, register_method, without_buffers
from .settings import BackboneShape, ConfigError, checked, option

POSITIONS = ("end", "middle", "front")


@functools.lru_cache(maxsize=None)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()  # reads CLIP's BPE vocabulary: only when a class position needs it


@dataclass(frozen=True)
class CoOpSettings:
    n_ctx: int = option(16, "learned context tokens (with CTX_INIT: its number of words instead)",
                        low=1, high=MAX_CONTEXT_TOKENS)
    csc: bool = option(False, "class-specific context: one context per class (ignored with CTX_INIT, "
                              "as in the release)")
    ctx_init: str = option("", "words the context starts from, separated by single spaces; their number "
                               "sets the context length")
    class_token_position: str = option("end", "where the class name goes: after the context, inside it "
                                              "(after its first N_CTX // 2 tokens) or before it", choices=POSITIONS)

    def validate(self, shape: BackboneShape) -> None:
        check_ctx_init(self.ctx_init)


# ---- the release's CTX_INIT rule for CoOp and CoCoOp -----------------------------------------------
def check_ctx_init(ctx_init: str) -> None:
    """Words separated by single spaces: the release counts `split(" ")` pieces as context tokens,
    so an empty piece would become a learned token initialised from EOT or padding."""
    words = ctx_init.replace("_", " ")
    if words and "" in words.split(" "):
        raise ConfigError("ctx_init", ctx_init, "words must be separated by single spaces, without leading or "
                                                "trailing spaces (each piece becomes one context token)")
    if len(words.split(" ")) > MAX_CONTEXT_TOKENS:
        raise ConfigError("ctx_init", ctx_init, f"at most {MAX_CONTEXT_TOKENS} words fit CLIP's context")


def context_length(n_ctx: int, ctx_init: str) -> int:
    """CoOp/CoCoOp: with CTX_INIT the context has one token per word (N_CTX is ignored). The
    context is then the embedding of CTX_INIT's first that many BPE tokens, and any further
    tokens of a word split by BPE stay fixed after it, as in the release."""
    words = ctx_init.replace("_", " ")
    return len(words.split(" ")) if words else n_ctx


def name_lengths(classnames: Sequence[str]) -> Tensor:
    """[C] BPE tokens of each class name, without the final "." (the release's name_lens)."""
    return torch.tensor([len(_tokenizer().encode(readable_name(c))) for c in classnames])


def class_token_order(position: str, n_ctx: int, name_lens: Tensor) -> Tensor:
    """[C, 77] rearrangement of "[SOS, ctx (n), name (k), rest]" into the release's sequences:
    middle [SOS, ctx[:n//2], name, ctx[n//2:], rest], front [SOS, name, ctx, rest]."""
    rows = []
    for k in name_lens.tolist():
        sos, ctx, name = [0], list(range(1, 1 + n_ctx)), list(range(1 + n_ctx, 1 + n_ctx + k))
        rest = list(range(1 + n_ctx + k, CONTEXT_LENGTH))
        half = n_ctx // 2
        if position == "middle":
            rows.append(sos + ctx[:half] + name + ctx[half:] + rest)
        else:  # front
            rows.append(sos + name + ctx + rest)
    return torch.tensor(rows, dtype=torch.long)


# ---- the model ---------------------------------------------------------------------------------------
class CoOpPromptLearner(nn.Module):
    """The learned context `ctx`: [n, D] shared by all classes, or [C, n, D] with CSC."""

    def __init__(self, n_ctx: int, width: int, n_classes: Optional[int], first_context: Optional[Tensor]):
        super().__init__()
        if first_context is not None:
            start = first_context.clone()
        else:
            shape = (n_ctx, width) if n_classes is None else (n_classes, n_ctx, width)
            start = nn.init.normal_(torch.empty(*shape), std=0.02)
        self.ctx = nn.Parameter(start)


class CoOp(PromptedCLIPClassifier):
    """Frozen CLIP + CoOp's learned context; logits for a set of classes."""

    uses_frozen_image_features = True  # the image tower is CLIP's own: its features can be cached

    def __init__(self, clip_model: nn.Module, settings: CoOpSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        checked(settings, backbone_shape(clip_model))
        self.settings = settings
        n_ctx = context_length(settings.n_ctx, settings.ctx_init)
        super().__init__(clip_model, n_ctx, settings.ctx_init, classnames, frozen_text_features)
        class_specific = settings.csc and not settings.ctx_init
        self.prompt_learner = CoOpPromptLearner(n_ctx, self.text_encoder.width,
                                                len(classnames) if class_specific else None, self.first_context)

    def set_classes(self, classnames: Sequence[str], frozen_text_features: Optional[Tensor] = None) -> None:
        learner = getattr(self, "prompt_learner", None)
        if learner is not None and learner.ctx.dim() == 3 and learner.ctx.shape[0] != len(classnames):
            raise ValueError(f"class-specific contexts (CSC) were learned for {learner.ctx.shape[0]} classes; "
                             f"they cannot serve {len(classnames)} other classes")
        super().set_classes(classnames, frozen_text_features)
        order = None
        if self.settings.class_token_position != "end":
            order = class_token_order(self.settings.class_token_position, self.n_ctx, name_lengths(classnames))
        self.register_buffer("token_order", None if order is None else order.to(self.token_ids.device),
                             persistent=False)

    def encode_classes(self) -> Tensor:
        """Text features [C, E]."""
        return self.text_encoder(self.token_ids, [self.prompt_learner.ctx], order=self.token_order)

    def classify(self, images: Tensor, text_features: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        image = self.frozen_image_features(images) if frozen_image_features is None else frozen_image_features
        return self.logits(image, text_features)


# ---- the release's checkpoints (CoOp and CoCoOp) ------------------------------------------------------
CLASS_BOUND_BUFFERS = ("token_prefix", "token_suffix")  # embeddings of the training classes' prompts


def is_release_state_dict(keys: Iterable[str]) -> bool:
    """The release's `prompt_learner` state dict holds the class-bound token buffers; ours does not."""
    return any(key.split(".")[-1] in CLASS_BOUND_BUFFERS for key in keys)


def convert_release_state_dict(release_state: Dict[str, Any]) -> Dict[str, Tensor]:
    """The release's `prompt_learner` state dict -> ours: the same names without the token buffers
    (rebuilt from the current class names, as the release's load_model does), fp32."""
    return without_buffers(release_state, CLASS_BOUND_BUFFERS)


RELEASE_CHECKPOINT = ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict)

register_method(
    "CoOp", settings=CoOpSettings, model=CoOp, checkpoint_folder="prompt_learner",  # the release's
    # base-to-new and cross-dataset: the CoCoOp authors' recipe for CoOp (KaiyangZhou/CoOp,
    # scripts/cocoop/*.sh: vit_b16_ctxv1, vit_b16_ep50_ctxv1 for ImageNet); few-shot: the CoOp
    # paper's 16-shot schedule (docs/coop.md lists the others)
    default_configs={"base2new": "vit_b16_ctxv1", "xd": "vit_b16_ep50_ctxv1", "fewshot": "vit_b16"},
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/coop.md")
