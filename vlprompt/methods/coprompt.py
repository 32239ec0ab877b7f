"""CoPrompt: Consistency-guided Prompt learning (Roy and Etemad, ICLR 2024) on frozen CLIP.

MaPLe's coupled deep prompts (reused from maple.py), plus a CLIP-Adapter-style residual adapter
on each tower's output (image: 0.1 adapter + 0.9 feature, text: 0.2 + 0.8), trained with

    loss = CE(logits) + W * (d(text, frozen text of one GPT description) + d(image, frozen image of a second view))

d is 1 - mean cosine (DISTILL cosine) or the mean squared difference (mse) of normalised features.
The description is drawn at random, one index for all classes per step (python's `random`, as
the release). docs/coprompt.md has the equations, shapes and our departures from the release
(github.com/ShuvenduRoy/CoPrompt, trainers/coprompt.py).
"""
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.loading import backbone_shape
from ..clip.templates import GENERIC_TEMPLATES
from .base import LossOutput, PromptedCLIPClassifier
from .common import normalize
from .maple import MaPLe, MaPLePromptLearner, MaPLeSettings
from .maple import convert_release_state_dict as convert_maple_state_dict
from .registry import (ClassTexts, ConfigLayout, ReleaseCheckpoint, entries_under, keys_under, register_method,
                       without_data_parallel)
from .settings import checked, option

DISTANCES = ("cosine", "mse")


@dataclass(frozen=True)
class CoPromptSettings(MaPLeSettings):  # N_CTX, CTX_INIT, PROMPT_DEPTH: MaPLe's keys and defaults
    w: float = option(1.0, "weight of the consistency terms (the release's TRAINER.W; 1.0 in its coprompt.yaml, "
                           "per-dataset values in its trainers/constants.py)", low=0.0)
    distill: str = option("cosine", "distance of the consistency terms (the release's TRAINER.DISTILL): cosine "
                                    "(1 - mean cosine) or mse (mean squared difference of normalised features)",
                          choices=DISTANCES)
    image_adapter_ratio: float = option(0.1, "share of the image adapter's output in the image feature", low=0.0,
                                        high=1.0)
    text_adapter_ratio: float = option(0.2, "share of the text adapter's output in the text feature", low=0.0,
                                       high=1.0)
    adapter_reduction: int = option(4, "adapter bottleneck: embedding width / this", low=1)


class Adapter(nn.Module):
    """CLIP-Adapter's bottleneck, as the release: E -> E/r -> E, no biases, ReLU after both."""

    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, width // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(width // reduction, width, bias=False), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class CoPromptLearner(MaPLePromptLearner):
    """Everything CoPrompt trains: MaPLe's prompts (same names) and the two adapters, named as the
    release's CustomCLIP attributes (adapter_image, adapter_text), created after the prompts as there."""

    def __init__(self, n_ctx: int, depth: int, text_width: int, vision_width: int, embed_dim: int, reduction: int,
                 first_context: Optional[Tensor] = None):
        super().__init__(n_ctx, depth, text_width, vision_width, first_context)
        self.adapter_image = Adapter(embed_dim, reduction)
        self.adapter_text = Adapter(embed_dim, reduction)


def residual_mix(adapter: Adapter, features: Tensor, ratio: float) -> Tensor:
    """ratio * adapter(x) + (1 - ratio) * x, in fp32 (the adapters are fp32 in every PREC)."""
    features = features.float()
    return ratio * adapter(features) + (1 - ratio) * features


def distance(kind: str, student: Tensor, teacher: Tensor) -> Tensor:
    """Between rows of normalised features [N, E]: 1 - mean cosine, or the mean squared difference."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-7).mean()
    return F.mse_loss(student, teacher)


def two_views(images: Union[Tensor, Sequence[Tensor]]) -> Tuple[Tensor, Tensor]:
    """(the view that is classified, the view frozen CLIP sees). One tensor (K_TRANSFORMS 1) is
    both; the release needs two views (K_TRANSFORMS 2)."""
    if isinstance(images, Tensor):
        return images, images
    return images[0], images[1] if len(images) > 1 else images[0]


class CoPrompt(MaPLe):
    """Frozen CLIP + MaPLe prompts + output adapters; the consistency terms need frozen CLIP's
    features of every class description, [C, T, E] (`class_texts` with keep_each)."""

    takes_views = True  # loss() takes the K_TRANSFORMS views: [classified view, frozen CLIP's view]

    def __init__(self, clip_model: nn.Module, settings: CoPromptSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        checked(settings, backbone_shape(clip_model))
        # MaPLe's base without MaPLe's own learner: the prompts' random draws come first, then the adapters'
        PromptedCLIPClassifier.__init__(self, clip_model, settings.n_ctx, settings.init_words, classnames,
                                        frozen_text_features)
        self.settings = settings
        embed_dim = clip_model.text_projection.shape[1]  # the release hard-codes ViT-B's 512
        self.prompt_learner = CoPromptLearner(settings.n_ctx, settings.prompt_depth, self.text_encoder.width,
                                              self.image_encoder.width, embed_dim, settings.adapter_reduction,
                                              self.first_context)

    # ---- the classifier: MaPLe's features through the adapters -----------------------------------
    def encode_classes(self) -> Tuple[Tensor, List[Tensor]]:
        """(adapted text features [C, E] fp32, the visual prompts of this forward)."""
        text, visual_prompts = super().encode_classes()
        return residual_mix(self.prompt_learner.adapter_text, text, self.settings.text_adapter_ratio), visual_prompts

    def image_features(self, images: Tensor, visual_prompts: List[Tensor]) -> Tensor:
        """Adapted image features [B, E] fp32."""
        features = self.image_encoder(images, visual_prompts)
        return residual_mix(self.prompt_learner.adapter_image, features, self.settings.image_adapter_ratio)

    def classify(self, images: Tensor, classes, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        text, visual_prompts = classes
        return self.logits(self.image_features(images, visual_prompts), text)

    # ---- training ----------------------------------------------------------------------------
    def teacher_text_features(self) -> Tensor:
        """Frozen CLIP's features of one description per class [C, E]: the same random index for
        every class, drawn from python's `random` as the release does (so the same seed draws the
        same descriptions, and our resume file restores that generator)."""
        if getattr(self, "frozen_text_features", None) is None:
            raise ValueError("CoPrompt needs frozen CLIP's class text features (its descriptor's class_texts: "
                             "descriptions, one feature per text)")
        per_text = self.frozen_text_features
        if per_text.dim() == 2:  # [C, E]: one text per class
            return per_text
        return per_text[:, random.randint(0, per_text.shape[1] - 1)]

    def loss(self, images: Union[Tensor, Sequence[Tensor]], labels: Tensor) -> LossOutput:
        """CE + W * (text consistency + image consistency); `images`: one batch or its views."""
        first, second = two_views(images)
        text, visual_prompts = self.encode_classes()
        image = self.image_features(first, visual_prompts)
        logits = self.logits(image, text)
        teacher_text = self.teacher_text_features()
        teacher_image = self.frozen_image_features(second)  # frozen CLIP, no prompts, no gradient
        with torch.autocast(first.device.type, enabled=False):
            ce = F.cross_entropy(logits, labels)
            text_term = distance(self.settings.distill, normalize(text.float()), teacher_text)
            image_term = distance(self.settings.distill, normalize(image.float()), teacher_image)
            loss = ce + self.settings.w * (text_term + image_term)
        parts = {"loss_ce": ce.detach(), "loss_text": text_term.detach(), "loss_image": image_term.detach()}
        return LossOutput(loss, logits, parts)


# ---- the release's checkpoints ---------------------------------------------------------------
# The release registers its whole CustomCLIP as "MultiModalPromptLearner": MaPLe's prompt_learner.*
# (with the class-bound token buffers), adapter_image.fc.{0,2}.weight, adapter_text.fc.{0,2}.weight,
# and frozen CLIP twice (image_encoder/text_encoder, model_distill) with logit_scale, never loaded here.
ADAPTERS = ("adapter_image.", "adapter_text.")


def convert_release_state_dict(release_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The release's checkpoint state dict -> our learner's (fp32; fp16 runs save fp16 adapters)."""
    adapters = {f"{adapter}{name}": value.float() for adapter in ADAPTERS
                for name, value in entries_under(release_state, adapter)}
    if not adapters:  # MaPLe's release saves the same prompt names in the same folder
        raise KeyError("no adapter_image.* or adapter_text.* entries: not a CoPrompt release checkpoint")
    rest = {k: v for k, v in release_state.items() if not without_data_parallel(k).startswith(ADAPTERS)}
    rest = {k: v for k, v in rest.items() if not without_data_parallel(k).startswith("model_distill.")}
    return {**convert_maple_state_dict(rest), **adapters}


# The release's train.py merges these after the command line (its trainers/constants.py,
# get_dataset_specified_config); here they replace the config file's values and the command line wins.
RELEASE_PER_DATASET = {
    dataset: {"TRAINER.CoPrompt.PROMPT_DEPTH": depth, "TRAINER.CoPrompt.N_CTX": n_ctx, "TRAINER.W": w, **extra}
    for dataset, (depth, n_ctx, w, extra) in {
        "ImageNet": (12, 4, 8.0, {}), "Caltech101": (12, 4, 4.0, {}), "OxfordPets": (12, 2, 0.1, {}),
        "StanfordCars": (12, 4, 4.0, {}), "OxfordFlowers": (9, 4, 8.0, {}),
        "Food101": (9, 4, 0.5, {"OPTIM.MAX_EPOCH": 5}), "FGVCAircraft": (9, 4, 2.0, {}), "SUN397": (12, 4, 8.0, {}),
        "DescribableTextures": (12, 2, 8.0, {}), "EuroSAT": (12, 2, 0.1, {}), "UCF101": (12, 4, 2.0, {}),
    }.items()}

register_method(
    "CoPrompt", settings=CoPromptSettings, model=CoPrompt, checkpoint_folder="MultiModalPromptLearner",  # the release's
    # the release's mixed-case node TRAINER.CoPrompt, with its weight and distance at TRAINER.W, TRAINER.DISTILL
    layout=ConfigLayout(node="CoPrompt", keys={"w": "W", "distill": "DISTILL"}, dataset_config=RELEASE_PER_DATASET),
    # the release ships base-to-new only; no xd default: its per-dataset table would give the target
    # datasets other prompt shapes than the ImageNet-trained model has
    default_configs={"base2new": "coprompt", "fewshot": "coprompt"},
    class_texts=lambda settings, dataset: ClassTexts(GENERIC_TEMPLATES, descriptions=True, keep_each=True),
    release_checkpoint=ReleaseCheckpoint(keys_under("prompt_learner."), convert_release_state_dict),
    doc="docs/coprompt.md")
