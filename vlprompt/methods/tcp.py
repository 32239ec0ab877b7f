"""TCP: Textual-based Class-aware Prompt tuning (Yao, Zhang and Xu, CVPR 2024; release
htyao89/Textual-based_Class-aware_prompt_tuning, trainers/tcp.py) on frozen CLIP.

CoOp's learned context ctx [n, D] enters the first text layer of "<ctx> <class words>"; the
textual knowledge embedding (TKE), a two-layer net, maps frozen CLIP's class text feature f_c
[E] to n class-aware tokens, which replace the hidden states of the context positions before
text layer TKE_LAYER (the release's 8 of 12):
  T_c = reshape(W2 QuickGELU(W1 f_c + b1) + b2) [n, D]
  t_c = TextEncoder([SOS, ctx, words_c], T_c before layer TKE_LAYER)
  L   = CE(s cos(i, t), y) + KG_WEIGHT * (1 - mean_c cos(t_c, f_c))      (KgCoOp's regulariser)
The image side is frozen CLIP's. docs/tcp.md has the shapes and where we depart from the release.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from clip import clip as clip_api
from clip.model import QuickGELU
from torch import Tensor, nn

from ..clip.class_features import readable_name
from ..clip.loading import backbone_shape
from .base import LossOutput, PromptedCLIPClassifier
from .common import MAX_CONTEXT_TOKENS, normalize
from .coop import RELEASE_CHECKPOINT, check_ctx_init, context_length
from .registry import ClassTexts, ConfigLayout, register_method
from .settings import BackboneShape, ConfigError, checked, option

# The release's words after the context ("{}": the class name), per Dassl dataset: its
# CUSTOM_TEMPLATES with their four leading placeholders ("X X X X" or "a photo of a", which the
# context replaces) cut off. Other datasets: "{}." (as its ImageNet entry).
CLASS_PROMPTS = {
    "OxfordPets": "{}, a type of pet.",
    "OxfordFlowers": "{}, a type of flower.",
    "FGVCAircraft": "{}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "StanfordCars": "{}, a type of car",  # sic: no full stop in the release
    "Food101": "{}, a type of food.",
    "UCF101": "person doing {}.",
}
# The release's hand-written prompt per dataset for frozen CLIP's class features (its
# CUSTOM_TEMPLATES_ori, KgCoOp's table); other datasets: "a photo of a {}.".
FROZEN_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of an aircraft {}.",
    "DescribableTextures": "a photo of a {}, a type of texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "Food101": "a photo of a {}, a type of food.",
    "UCF101": "a photo of a person doing {}.",
}
RELEASE_TKE_LAYER = 8  # hard-coded in the release's text blocks (clip_text/model.py)


def class_prompt(dataset: str) -> str:
    return CLASS_PROMPTS.get(dataset, "{}.")


def frozen_template(dataset: str) -> str:
    return FROZEN_TEMPLATES.get(dataset, "a photo of a {}.")


@dataclass(frozen=True)
class TCPSettings:
    """TRAINER.COOP.* as TCP's release reads them, plus TCP's own constants made settings."""
    n_ctx: int = option(4, "learned context tokens, and class-aware tokens the TKE makes (the release: 4, "
                           "what its scripts pass)", low=1, high=MAX_CONTEXT_TOKENS)
    csc: bool = option(False, "class-specific context: not part of TCP (the release fails with True); "
                              "accepted as False so the release's command lines run", choices=(False,))
    ctx_init: str = option("", "words the context starts from (their number sets its length); the release's "
                               "CTX_INIT True means 'a photo of a'")
    class_token_position: str = option("end", "TCP's class words always follow the context; the release reads "
                                              "this key and ignores it", choices=("end",))
    w: float = option(1.0, "read by the release and without effect there (its text encoder overrides it with "
                           "1.0, its loss weight is the constant 8.0): accepted so its command lines "
                           "(TRAINER.COOP.W 1.0) run; the regulariser's weight is KG_WEIGHT")
    kg_weight: float = option(8.0, "weight of the regulariser 1 - mean cos(prompted, frozen class text "
                                   "features) (the release's constant 8.0)", low=0)
    tke_layer: int = option(RELEASE_TKE_LAYER, "text layer before which the class-aware tokens replace the "
                                               "context's hidden states (the release's 8: ViT-B/16's 9th of 12)",
                            low=1)
    class_template: str = option("", "words after the context, '{}' the class name; '' = the release's for the "
                                     "dataset (e.g. '{}, a type of pet.'; '{}.' for unlisted datasets)")

    def validate(self, shape: BackboneShape) -> None:
        check_ctx_init(self.ctx_init)
        if self.tke_layer >= shape.text_layers:
            raise ConfigError("tke_layer", self.tke_layer,
                              f"must be in [1, {shape.text_layers - 1}]: this backbone has {shape.text_layers} "
                              f"text layers and the class-aware tokens enter before one of layers "
                              f"1..{shape.text_layers - 1}")
        if self.class_template and self.class_template.count("{}") != 1:
            raise ConfigError("class_template", self.class_template, "must hold '{}' (the class name) exactly once")


def kg_regulariser(text_features: Tensor, frozen_text_features: Tensor) -> Tensor:
    """KgCoOp's 1 - mean_c cos(t_c, f_c) over the classes, in fp32, with the release's eps."""
    cos = F.cosine_similarity(normalize(text_features.float()), frozen_text_features.float(), dim=1, eps=1e-7)
    return 1.0 - cos.mean()


class TCPPromptLearner(nn.Module):
    """What TCP trains: the context `ctx` [n, D] and the TKE `meta_net` (E -> E/4 -> n*D)."""

    def __init__(self, n_ctx: int, width: int, embed_dim: int, first_context: Optional[Tensor]):
        super().__init__()
        random = first_context is None
        start = nn.init.normal_(torch.empty(n_ctx, width), std=0.02) if random else first_context.clone()
        self.ctx = nn.Parameter(start)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(embed_dim, embed_dim // 4)),
            ("gelu", QuickGELU()),  # named "relu" in the release
            ("linear2", nn.Linear(embed_dim // 4, n_ctx * width))]))

    def class_aware_tokens(self, class_features: Tensor) -> Tensor:
        """T [C, n, D] from frozen class text features [C, E]."""
        tokens = self.meta_net(class_features.to(self.ctx.dtype))
        return tokens.view(class_features.shape[0], *self.ctx.shape)


class TCP(PromptedCLIPClassifier):
    """Frozen CLIP + a learned context + class-aware tokens from frozen class features."""

    uses_frozen_image_features = True  # the image tower is CLIP's own

    def __init__(self, clip_model: nn.Module, settings: TCPSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        if frozen_text_features is None:
            raise ValueError("TCP needs frozen CLIP's class text features (its descriptor's class_texts)")
        checked(settings, backbone_shape(clip_model))
        self.settings = settings  # before the base's set_classes, which tokenizes with the class template
        n_ctx = context_length(settings.n_ctx, settings.ctx_init)
        super().__init__(clip_model, n_ctx, settings.ctx_init, classnames, frozen_text_features)
        self.prompt_learner = TCPPromptLearner(n_ctx, self.text_encoder.width, frozen_text_features.shape[1],
                                               self.first_context)

    def set_classes(self, classnames: Sequence[str], frozen_text_features: Optional[Tensor] = None) -> None:
        """New classes need their frozen features: the class-aware tokens are made from them."""
        if frozen_text_features is None:
            raise ValueError("TCP makes its class-aware tokens from frozen CLIP's class text features: pass "
                             "them with the class names")
        super().set_classes(classnames, frozen_text_features)

    def class_token_ids(self, classnames: Sequence[str]) -> Tensor:
        """[C, 77] "<context placeholders> <class words>" (the context replaces the placeholders)."""
        template = self.settings.class_template or "{}."
        prompts = [f"{self.prompt_prefix} {template.format(readable_name(c))}" for c in classnames]
        try:
            return clip_api.tokenize(prompts)
        except RuntimeError as err:
            raise ConfigError("class_template", template,
                              f"a class prompt does not fit CLIP's 77 tokens: {err}") from err

    def encode_classes(self) -> Tensor:
        """Text features [C, E]: ctx at the input, the class-aware tokens T before layer TKE_LAYER."""
        class_aware = self.prompt_learner.class_aware_tokens(self.frozen_text_features)  # [C, n, D]
        deep = [None] * (self.settings.tke_layer - 1) + [class_aware]
        return self.text_encoder(self.token_ids, [self.prompt_learner.ctx] + deep)

    def classify(self, images: Tensor, text_features: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        image = self.frozen_image_features(images) if frozen_image_features is None else frozen_image_features
        return self.logits(image, text_features)

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput:
        """CE + KG_WEIGHT * (1 - mean cos(t_c, f_c)), summed in the release's order."""
        text = self.encode_classes()
        logits = self.classify(images, text)
        with torch.autocast(images.device.type, enabled=False):
            ce = F.cross_entropy(logits, labels)
            kg = self.settings.kg_weight * kg_regulariser(text, self.frozen_text_features)
            loss = ce + kg
        return LossOutput(loss, logits, {"loss_ce": ce.detach(), "loss_kg": kg.detach()})


def frozen_class_texts(settings: TCPSettings, dataset: str) -> ClassTexts:
    """f_c: frozen CLIP's feature of the release's one hand-written prompt for the dataset."""
    return ClassTexts((frozen_template(dataset),))


def release_ctx_init(value, dataset: str) -> str:
    """The release's CTX_INIT is a bool: True starts the context from "a photo of a" (whatever the
    dataset), False from random values; words are ours."""
    if isinstance(value, bool):
        return "a photo of a" if value else ""
    return value


# The release reads CoOp's node, TRAINER.COOP (N_CTX, CSC, CTX_INIT as a bool, W,
# CLASS_TOKEN_POSITION, PREC); TCP's own keys (KG_WEIGHT, TKE_LAYER, CLASS_TEMPLATE) go there too.
LAYOUT = ConfigLayout(node="COOP", legacy={"ctx_init": release_ctx_init}, per_dataset={"class_template": class_prompt})

register_method(
    "TCP", settings=TCPSettings, model=TCP, checkpoint_folder="prompt_learner",  # the release's
    default_configs={"base2new": "vit_b16_ep100_ctxv1"},  # the release's one recipe (base-to-new)
    layout=LAYOUT,
    class_texts=frozen_class_texts,
    # the release saves its prompt learner with the class-bound token buffers, as CoOp's does
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/tcp.md")
