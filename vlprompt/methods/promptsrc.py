"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023; release muzairkhattak/PromptSRC)
on frozen CLIP.

The prompted model is IVLP's (deep independent text and visual prompts). Training adds
self-regularisation toward frozen CLIP, the same towers without prompts:
  L = CE(z, y) + [ KL(p_zs || p) + TEXT_LOSS_WEIGHT * L1(t, t_zs) + IMAGE_LOSS_WEIGHT * L1(i, i_zs) ]
with t, i the normalised prompted features, t_zs frozen CLIP's class features (mean of the raw
features of 60 ImageNet templates, normalised), i_zs frozen CLIP's image features, z and z_zs
their logits. Gaussian prompt aggregation (GPA) then replaces the prompts, after the last epoch,
by the Gaussian-weighted sum of the prompts at the end of every epoch. docs/promptsrc.md has the
equations and where we depart from the release.
"""
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.templates import IMAGENET_TEMPLATES
from .base import LossOutput
from .common import MAX_CONTEXT_TOKENS, normalize
from .ivlp import IVLP, MAX_VISUAL_TOKENS, RELEASE_CHECKPOINT, IVLPSettings
from .registry import ClassTexts, register_method
from .settings import BackboneShape, ConfigError, help_of, option


@dataclass(frozen=True)
class PromptSRCSettings(IVLPSettings):
    """TRAINER.PROMPTSRC.* with the release's defaults. The weights and GPA parameters default to
    integers, as in the release, so that its YAML files (`TEXT_LOSS_WEIGHT: 25`) merge; yacs then
    refuses fractional values for them, in the release too."""
    n_ctx_vision: int = option(4, help_of(IVLPSettings, "n_ctx_vision"), low=0, high=MAX_VISUAL_TOKENS)
    n_ctx_text: int = option(4, help_of(IVLPSettings, "n_ctx_text"), low=1, high=MAX_CONTEXT_TOKENS)
    text_loss_weight: float = option(25, "weight of the L1 distance of the prompted text features to frozen "
                                         "CLIP's", low=0)
    image_loss_weight: float = option(10, "weight of the L1 distance of the prompted image features to "
                                          "frozen CLIP's", low=0)
    gpa_mean: float = option(15, "GPA: epoch (1-based) at which the Gaussian weight of the prompts peaks")
    gpa_std: float = option(1, "GPA: spread of the Gaussian weight over epochs (> 0)")

    def validate(self, shape: BackboneShape) -> None:
        super().validate(shape)
        if not self.gpa_std > 0:
            raise ConfigError("gpa_std", self.gpa_std, "must be > 0 (the Gaussian's standard deviation, in epochs)")


def gpa_weights(mean: float, std: float, epochs: int) -> List[float]:
    """Normalised Gaussian density at epochs 1..`epochs`, computed as the release does (numpy
    float64: trainers/promptsrc.py get_gauss). Where every density underflows to 0 (a mean far
    beyond the epochs) the release divides by zero; here the weights are computed relative to the
    largest density instead, their limit: all weight on the epoch(s) nearest the mean."""
    density = np.array([(1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((e - mean) / std) ** 2)
                        for e in range(1, epochs + 1)])
    total = sum(density)
    if not total > 0:
        exponent = np.array([-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)])
        density = np.exp(exponent - exponent.max())
        total = sum(density)
    return [float(w) for w in density / total]


class PromptSRC(IVLP):
    """IVLP's prompted model with PromptSRC's regularised loss and its prompt aggregation."""

    def __init__(self, clip_model: nn.Module, settings: PromptSRCSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        if frozen_text_features is None:
            raise ValueError("PromptSRC needs frozen CLIP's class text features (its descriptor's class_texts: "
                             "the mean of the raw features of IMAGENET_TEMPLATES)")
        super().__init__(clip_model, settings, classnames, frozen_text_features)
        self._gpa_sum: Optional[Dict[str, Tensor]] = None  # sum of w_e * prompts after epoch e
        self._gpa_epochs: List[int] = []  # the epochs (0-based) in the sum

    # ---- loss --------------------------------------------------------------------------------
    def zero_shot_logits(self, frozen_image_features: Tensor) -> Tensor:
        """Frozen CLIP's logits [B, C] from its normalised image and class features."""
        return self.logit_scale.exp().float() * frozen_image_features @ self.frozen_text_features.t()

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput:
        """CE + (KL(zero-shot || prompted) + text and image L1 terms), the release's reductions:
        L1 means over all elements, the KL summed over batch and classes and divided by B * C."""
        text, image = self.encode_classes(), self.image_features(images)
        frozen_image = self.frozen_image_features(images)
        logits = self.logits(image, text)
        weights = self.settings
        with torch.autocast(images.device.type, enabled=False):
            ce = F.cross_entropy(logits, labels)
            text_term = F.l1_loss(normalize(text.float()), self.frozen_text_features) * weights.text_loss_weight
            image_term = F.l1_loss(normalize(image.float()), frozen_image) * weights.image_loss_weight
            zero_shot = self.zero_shot_logits(frozen_image)
            logits_term = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zero_shot, dim=1), reduction="sum",
                                   log_target=True) / logits.numel()
            loss = ce + (logits_term + text_term + image_term)  # the release's order of the sums
        parts = {"loss_ce": ce, "loss_scl_text": text_term, "loss_scl_image": image_term, "L_SCL_logits": logits_term}
        parts = {name: term.detach() for name, term in parts.items()}
        return LossOutput(loss, logits, parts)

    # ---- Gaussian prompt aggregation ---------------------------------------------------------
    def end_epoch(self, epoch: int, max_epoch: int) -> None:
        """Add w_epoch * prompts to the running sum; after the last epoch, the prompts become the sum."""
        weight = gpa_weights(self.settings.gpa_mean, self.settings.gpa_std, max_epoch)[epoch]
        # fp32 state times the float64 weight, summed epoch by epoch: the release's arithmetic
        weighted = {name: value.detach() * weight for name, value in self.prompt_learner.state_dict().items()}
        if self._gpa_sum is None:
            self._gpa_sum = weighted
        else:
            self._gpa_sum = {name: self._gpa_sum[name] + weighted[name] for name in weighted}
        self._gpa_epochs.append(epoch)
        if epoch + 1 == max_epoch:
            self.prompt_learner.load_state_dict(self._complete_sum(max_epoch))
            print(f"GPA: the prompts are now the Gaussian-weighted sum over {max_epoch} epochs "
                  f"(mean {self.settings.gpa_mean}, std {self.settings.gpa_std})")

    def _complete_sum(self, max_epoch: int) -> Dict[str, Tensor]:
        missing = sorted(set(range(max_epoch)) - set(self._gpa_epochs))
        if not missing:
            return self._gpa_sum
        # a run resumed without its aggregate (the release always loses it on resume)
        weights = gpa_weights(self.settings.gpa_mean, self.settings.gpa_std, max_epoch)
        present = sum(weights[e] for e in set(self._gpa_epochs))
        warnings.warn(f"GPA: epochs {[e + 1 for e in missing]} are missing from the aggregate (a run resumed "
                      f"without it); the prompts are the weighted mean over the other epochs")
        if not present > 0:  # only epochs of zero weight are left: the last epoch's prompts stay
            return self.prompt_learner.state_dict()
        return {name: value / present for name, value in self._gpa_sum.items()}

    def run_state(self) -> Dict[str, Any]:
        if self._gpa_sum is None:
            return {}
        return {"gpa_sum": dict(self._gpa_sum), "gpa_epochs": list(self._gpa_epochs)}

    def load_run_state(self, state: Dict[str, Any]) -> None:
        if not state:
            self._gpa_sum, self._gpa_epochs = None, []
            return
        device = self.logit_scale.device
        self._gpa_sum = {name: value.to(device) for name, value in state["gpa_sum"].items()}
        self._gpa_epochs = list(state["gpa_epochs"])


register_method(
    "PromptSRC", settings=PromptSRCSettings, model=PromptSRC, checkpoint_folder="VLPromptLearner",  # the release's
    default_configs={"base2new": "vit_b16_c2_ep20_batch4_4+4ctx",
                     "xd": "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",
                     "fewshot": "vit_b16_c2_ep50_batch4_4+4ctx_few_shot"},
    # t_zs: the mean of the raw (unnormalised) features of the 60 templates, as the release computes it
    class_texts=lambda settings, dataset: ClassTexts(IMAGENET_TEMPLATES, normalize_each=False),
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/promptsrc.md")
