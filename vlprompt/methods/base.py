"""The shared base of prompt methods over frozen CLIP, and the contract between a model and the
trainer that drives it.

A method subclasses `PromptedCLIPClassifier` and says how it encodes the classes and how it
classifies images against them; the base owns the frozen encoders, the logit scale, the
first-layer context, the class set, fp32 logits and the once-per-evaluation class cache.
"""
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Dict, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clip.encoders import PromptedImageEncoder, PromptedTextEncoder
from .common import class_token_ids, initial_context, normalize

# Text sequences encoded per pass by methods with per-image class features (images x classes):
# bounds an evaluation batch's memory (ImageNet's 500 base classes: 16 images per pass) without
# changing any result.
SEQUENCES_PER_PASS = 8192


class LossOutput(NamedTuple):
    loss: Tensor  # the scalar that is back-propagated
    logits: Tensor  # [B, C] fp32, for the training accuracy
    # named terms for the log: detached 0-d tensors, which the trainer reads only at its print
    # steps (`.item()` here would make every training step wait for the GPU)
    parts: Dict[str, Tensor]


@runtime_checkable
class PromptModel(Protocol):
    """What a trainer needs from a method's model."""

    prompt_learner: nn.Module  # everything the method trains (optimised and checkpointed)
    image_encoder: PromptedImageEncoder  # frozen CLIP's image tower
    # True: forward accepts frozen image features, which the trainer caches per evaluation image
    uses_frozen_image_features: bool

    def set_classes(self, classnames: Sequence[str], frozen_text_features: Optional[Tensor] = None) -> None: ...

    def frozen_image_features(self, images: Tensor) -> Tensor: ...

    def forward(self, images: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor: ...

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput: ...

    def evaluation(self) -> ContextManager: ...

    # Optional (the trainer calls them when the model has them; PromptedCLIPClassifier has
    # defaults): end_epoch(epoch, max_epoch), run_state() -> dict, load_run_state(dict).
    # A model class with `takes_views = True` has a `loss` that also accepts a list of augmented
    # views of the batch [K x [B, 3, H, W]] (DATALOADER.K_TRANSFORMS K > 1); others refuse K > 1.


class PromptedCLIPClassifier(nn.Module):
    """Frozen CLIP and learned prompts: logits [B, C] for a set of classes.

    Subclasses build `self.prompt_learner` and implement `encode_classes()` (what images are
    compared with, from the classes and the prompts alone) and `classify(images, classes,
    frozen_image_features)`. The class set is state outside the learned parameters:
    `set_classes` retargets a trained model to new classes.
    """

    uses_frozen_image_features = False

    def __init__(self, clip_model: nn.Module, n_ctx: int, ctx_init: str, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None, exact_shortcuts: bool = True):
        super().__init__()
        # exact shortcuts (cut at the last EOT, shared prompt prefix) change costs, not results
        self.text_encoder = PromptedTextEncoder(clip_model, shared_prefix=exact_shortcuts, cut_at_eot=exact_shortcuts)
        self.image_encoder = PromptedImageEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale
        self.n_ctx = n_ctx
        # [n_ctx, D] embedding of CTX_INIT's first words, or None (random); the prefix reserves positions
        self.first_context, self.prompt_prefix = initial_context(clip_model.token_embedding, n_ctx, ctx_init)
        self._classes: Optional[Any] = None  # encode_classes() cached for one evaluation
        self.set_classes(classnames, frozen_text_features)

    # ---- the class set ---------------------------------------------------------------------------
    def set_classes(self, classnames: Sequence[str], frozen_text_features: Optional[Tensor] = None) -> None:
        """Token ids of "<prompt prefix> <class name>." and, if given, frozen CLIP's class text
        features [C, E] (normalised, fp32). Not persistent: checkpoints hold learned state only."""
        if frozen_text_features is not None and frozen_text_features.shape[0] != len(classnames):
            raise ValueError(f"{frozen_text_features.shape[0]} class features for {len(classnames)} classes")
        device = self.logit_scale.device
        self.classnames = list(classnames)
        self.register_buffer("token_ids", self.class_token_ids(classnames).to(device), persistent=False)
        if frozen_text_features is not None:
            self.register_buffer("frozen_text_features", normalize(frozen_text_features.float()).to(device),
                                 persistent=False)

    def class_token_ids(self, classnames: Sequence[str]) -> Tensor:
        return class_token_ids(self.prompt_prefix, classnames, self.n_ctx)

    # ---- what a method defines ------------------------------------------------------------------
    def encode_classes(self) -> Any:
        raise NotImplementedError

    def classify(self, images: Tensor, classes: Any, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    @property
    def classes_cacheable(self) -> bool:
        """False where the class side cannot be computed once per evaluation (a release mode
        that couples the classes to each batch or rewrites prompts at every forward)."""
        return True

    # ---- shared ----------------------------------------------------------------------------------
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """Frozen CLIP's normalised image features [B, E] fp32 (the same tower without prompts)."""
        with torch.no_grad():
            return normalize(self.image_encoder(images).float())

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """exp(logit_scale) * cos(image, text) in fp32 under any autocast: image [B, E] against class
        features shared by the batch [C, E] or one set per image [B, C, E] -> [B, C]."""
        with torch.autocast(image_features.device.type, enabled=False):
            image, text = normalize(image_features.float()), normalize(text_features.float())
            if text.dim() == 3:
                return self.logit_scale.exp().float() * torch.einsum("be,bce->bc", image, text)
            return self.logit_scale.exp().float() * image @ text.t()

    def in_image_chunks(self, compute: Callable[..., Tensor], *per_image: Tensor) -> Tensor:
        """compute(*chunks) over chunks of the images, concatenated: for methods that encode the
        classes once per image, so that images x classes stays within SEQUENCES_PER_PASS."""
        chunk = max(1, SEQUENCES_PER_PASS // len(self.classnames))
        return torch.cat([compute(*parts) for parts in zip(*(t.split(chunk) for t in per_image))])

    def forward(self, images: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        """Logits [B, C]."""
        classes = self._classes if self._classes is not None else self.encode_classes()
        return self.classify(images, classes, frozen_image_features)

    def loss(self, images: Tensor, labels: Tensor) -> LossOutput:
        """Cross-entropy of the logits (methods with regularisers override it)."""
        logits = self(images)
        with torch.autocast(images.device.type, enabled=False):
            loss = F.cross_entropy(logits, labels)
        return LossOutput(loss, logits, {})

    # ---- the run around the model: the trainer calls these -------------------------------------
    def end_epoch(self, epoch: int, max_epoch: int) -> None:
        """Training epoch `epoch` (0-based) of `max_epoch` has ended; called before that epoch's
        checkpoint is written, so what it changes is saved and evaluated (`epoch == max_epoch - 1`:
        the end of training). Default: nothing; PromptSRC aggregates its prompts here."""

    def run_state(self) -> Dict[str, Any]:
        """What a resumed run needs, beyond the learned parameters, to end as an uninterrupted one
        would (e.g. a running average over epochs): tensors, numbers, strings, lists and dicts,
        saved in the trainer's resume file and read back with weights_only=True. Default: none."""
        return {}

    def load_run_state(self, state: Dict[str, Any]) -> None:
        """Restore what `run_state` returned (a resumed run, before its next epoch)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no run state, got {sorted(state)}")

    @contextmanager
    def evaluation(self):
        """Within: the class side is computed once, not per batch (where it can be)."""
        if not self.classes_cacheable:
            yield
            return
        with torch.no_grad():
            self._classes = self.encode_classes()
        try:
            yield
        finally:
            self._classes = None
