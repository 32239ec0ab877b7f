"""KgCoOp: Knowledge-guided Context Optimization (Yao, Zhang and Xu, "Visual-Language Prompt
Tuning with Knowledge-guided Context Optimization", CVPR 2023; release htyao89/KgCoOp) on frozen
CLIP. docs/kgcoop.md has the equations and where we depart from the release.

CoOp's prompted model, trained with a pull toward frozen CLIP's hand-crafted class prompts:
  L = CE(z, y) + W * (1 - 1/C sum_i cos(t_i, t_i^clip))
with t_i the class text features from the learned context and t_i^clip frozen CLIP's features of
the dataset's hand-written prompt ("a photo of a {}, a type of pet."). The term is the release's:
half the paper's mean squared distance between the unit vectors (||a - b||^2 = 2 - 2 cos).
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.templates import dataset_template
from .base import LossOutput
from .common import normalize
from .coop import CLASS_BOUND_BUFFERS, CoOp, CoOpSettings, is_release_state_dict
from .registry import ClassTexts, ConfigLayout, ReleaseCheckpoint, register_method, without_buffers
from .settings import option

# The release's CUSTOM_TEMPLATES (trainers/kgcoop.py): one hand-written prompt per dataset. It
# differs from the zero-shot table (clip/templates.py DATASET_TEMPLATES) for DTD only.
RELEASE_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "a photo of a {}, a type of texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# The release reads CTX_INIT as a switch: any true value starts the context from these words
# (hard-coded in its PromptLearner), whatever the dataset; its YAML files set `CTX_INIT: True`.
RELEASE_CTX_INIT_WORDS = "a photo of a"


def hand_crafted_template(dataset: str) -> str:
    """The release's prompt for a dataset; datasets outside its table (the release stops with a
    KeyError on them) get the zero-shot table's prompt, "a photo of a {}." by default."""
    return RELEASE_TEMPLATES.get(dataset, dataset_template(dataset))


def release_ctx_init(value: Any, dataset: str) -> Any:
    """The release's CTX_INIT (a bool) as ours (words): True -> "a photo of a", False -> "" (random
    context). Words pass through and mean what they mean for CoOp (the release would replace any
    non-empty string by "a photo of a" too)."""
    if value is True:
        return RELEASE_CTX_INIT_WORDS
    if value is False:
        return ""
    return value


@dataclass(frozen=True)
class KgCoOpSettings(CoOpSettings):
    """CoOp's settings (TRAINER.COOP.* in the release) and the weight of the knowledge term."""
    ctx_init: str = option("", "words the context starts from (their number sets the context length); the "
                               "release's True means 'a photo of a', False a random context")
    # 8.0: the release's scripts (base2new_train.sh, xd_train.sh, run.sh) and the paper's lambda;
    # the release's train.py default, 1.0, is overridden by every script
    w: float = option(8.0, "weight W of the knowledge-guided term W * (1 - mean cosine to frozen CLIP's "
                           "hand-crafted class features)", low=0)


def knowledge_gap(text_features: Tensor, frozen_text_features: Tensor) -> Tensor:
    """1 - 1/C sum_i cos(t_i, t_i^clip) of [C, E] learned and [C, E] frozen class features (the
    release's torch.nn.CosineSimilarity(dim=1, eps=1e-07) on both normalised)."""
    return 1.0 - F.cosine_similarity(normalize(text_features), normalize(frozen_text_features),
                                     dim=1, eps=1e-7).mean()


class KgCoOp(CoOp):
    """CoOp whose training loss also keeps the class features near frozen CLIP's hand-crafted ones."""

    def __init__(self, clip_model: nn.Module, settings: KgCoOpSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        if frozen_text_features is None:
            raise ValueError("KgCoOp needs frozen CLIP's class text features of the hand-crafted prompts "
                             "(its descriptor's class_texts: the release's template of the dataset)")
        super().__init__(clip_model, settings, classnames, frozen_text_features)

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput:
        """CE(z, y) + W * (1 - mean_i cos(t_i, t_i^clip))."""
        text = self.encode_classes()  # [C, E]
        logits = self.classify(images, text)  # [B, C] fp32
        with torch.autocast(images.device.type, enabled=False):
            ce = F.cross_entropy(logits, labels)
            gap = knowledge_gap(text.float(), self.frozen_text_features)
            loss = ce + self.settings.w * gap
        return LossOutput(loss, logits, {"loss_ce": ce.detach(), "loss_kg": gap.detach()})


# ---- the release's checkpoints ------------------------------------------------------------------
# Built by the release's PromptLearner and saved in its state dict, but never trained nor used in
# any forward (only names containing "ctx" get gradients): dropped on conversion.
RELEASE_UNUSED = ("bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias")


def convert_release_state_dict(release_state: Dict[str, Any]) -> Dict[str, Tensor]:
    """The release's `prompt_learner` state dict (ctx, the token buffers, its unused bias_vectors and
    meta_net) -> ours: {"ctx": fp32}."""
    return without_buffers(release_state, CLASS_BOUND_BUFFERS + RELEASE_UNUSED)


RELEASE_CHECKPOINT = ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict)

register_method(
    "KgCoOp", settings=KgCoOpSettings, model=KgCoOp, checkpoint_folder="prompt_learner",  # the release's
    # the release reads CoOp's node, TRAINER.COOP.*, plus TRAINER.COOP.W; its YAML files set
    # `CTX_INIT: True`, a bool (CoOp's own CTX_INIT stays words)
    layout=ConfigLayout(node="COOP", legacy={"ctx_init": release_ctx_init}),
    # the release's only ViT recipe, which its scripts use for base-to-new and its xd_train.sh
    default_configs={"base2new": "vit_b16_ep100_ctxv1", "xd": "vit_b16_ep100_ctxv1",
                     "fewshot": "vit_b16_ep100_ctxv1"},
    class_texts=lambda settings, dataset: ClassTexts((hand_crafted_template(dataset),)),
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/kgcoop.md")
