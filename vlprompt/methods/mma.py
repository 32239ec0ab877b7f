"""MMA: Multi-Modal Adapter (Yang et al., "MMA: Multi-Modal Adapter for Vision-Language Models",
CVPR 2024; release ZjjConan/Multi-Modal-Adapter, trainer `MultiModalAdapter`, node
TRAINER.MMADAPTER) on frozen CLIP.

No prompt is learned: the classes are the fixed texts "<TEXT_CTX_INIT> <class name>.". What is
learned are bottleneck adapters on the outputs of layers ADAPTER_START..ADAPTER_END (1-based) of
both towers, whose middle layer is shared by the two towers:
  a_i(x) = up_i(shared_i(down_i(ln_1_i(x))))      down: Linear(D, d) + ReLU, shared: Linear(d, d)
                                                 + ReLU (one per layer, both towers), up: Linear(d, D)
  x_{i+1} = block_i(x_i) + s * a_i(x_i)            s = ADAPTER_SCALE; ln_1_i is block i's own
The adapter reads the block's input through the block's first LayerNorm and its output is added
after the block (next to its two residual branches). As in the release, its parameters' gradients
are divided by s (the gradient reaching x through the adapter is the true one): a small s scales
the adapter's effect on the features, not its learning rate. docs/mma.md has the details.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from clip import clip as clip_api
from torch import Tensor, nn

from ..clip.class_features import readable_name
from ..clip.loading import backbone_shape
from .base import PromptedCLIPClassifier
from .common import CONTEXT_LENGTH
from .registry import ConfigLayout, ReleaseCheckpoint, register_method, without_data_parallel
from .settings import BackboneShape, ConfigError, checked, option


@dataclass(frozen=True)
class MMASettings:
    """TRAINER.MMADAPTER.* with the release's train.py defaults (its recipes set 5, 12, 32, 0.001
    and "a photo of a")."""
    text_ctx_init: str = option("", "the fixed words before each class name in the class texts")
    adapter_start: int = option(4, "first layer (1-based) whose output gets an adapter, in both towers", low=1)
    adapter_end: int = option(12, "last layer (1-based, inclusive) whose output gets an adapter", low=1)
    adapter_dim: int = option(32, "width of the adapters' bottleneck (and of the shared layer)", low=1)
    # s > 0 (gradients are divided by it); at most 10, a hundred times the release's default (recipes: 0.001)
    adapter_scale: float = option(0.1, "factor s of every adapter's output (its gradients are divided by s)",
                                  low=1e-6, high=10.0)

    def validate(self, shape: BackboneShape) -> None:
        # The release also allows ADAPTER_START 0: adapters on the token embeddings (text, before the
        # positional embedding) and after ln_pre (image); we do not offer that layer (docs/mma.md).
        if not self.adapter_start <= self.adapter_end <= shape.layers:
            raise ConfigError("adapter_end", self.adapter_end,
                              f"must be in [ADAPTER_START={self.adapter_start}, {shape.layers}]: this backbone has "
                              f"{shape.text_layers} text and {shape.vision_layers} vision layers (1-based)")
        if self.adapter_dim in (shape.text_width, shape.vision_width):
            # the release then builds a one-layer adapter without down/up, which its forward cannot run
            raise ConfigError("adapter_dim", self.adapter_dim,
                              f"must differ from the towers' widths ({shape.text_width}, {shape.vision_width})")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def _bottleneck(width: int, dim: int) -> nn.Module:
    return nn.Sequential(OrderedDict([("down", nn.Sequential(nn.Linear(width, dim), nn.ReLU())),
                                      ("up", nn.Linear(dim, width))]))


def _per_layer(build, n_layers: int, start: int, end: int) -> nn.ModuleList:
    """Slot i (0..n_layers) holds layer i's module, None outside start..end (the release's layout,
    so that the checkpoint keys are `<name>.<layer>.*`); Linear weights Kaiming-normal (fan_out),
    biases zero, as the release initialises them."""
    modules = nn.ModuleList([build() if start <= i <= end else None for i in range(n_layers + 1)])
    for m in modules.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
    return modules


class MultiModalAdapters(nn.Module):
    """Everything MMA trains, under the release's names: text_adapter.i, visual_adapter.i (down/up
    per tower) and shared_adapter.i (Linear + ReLU between them) for layers i = start..end."""

    def __init__(self, settings: MMASettings, text_width: int, text_layers: int, vision_width: int,
                 vision_layers: int):
        super().__init__()
        s = settings
        span = (s.adapter_start, s.adapter_end)
        # built in the release's order (text, visual, shared): the same seed draws the same weights
        self.text_adapter = _per_layer(lambda: _bottleneck(text_width, s.adapter_dim), text_layers, *span)
        self.visual_adapter = _per_layer(lambda: _bottleneck(vision_width, s.adapter_dim), vision_layers, *span)
        self.shared_adapter = _per_layer(lambda: nn.Sequential(nn.Linear(s.adapter_dim, s.adapter_dim), nn.ReLU()),
                                         vision_layers, *span)


class MMA(PromptedCLIPClassifier):
    """Frozen CLIP with MMA's adapters in both towers; logits for a set of classes."""

    def __init__(self, clip_model: nn.Module, settings: MMASettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        shape = backbone_shape(clip_model)
        checked(settings, shape)
        self.settings = settings
        # No learned context (n_ctx 0): the class texts are fixed words (class_token_ids below).
        # Exact shortcuts stay on: with no prompt there is no shared prefix, and the adapters act
        # per token, so cutting the sequences at the last EOT changes nothing.
        super().__init__(clip_model, 0, "", classnames, frozen_text_features)
        self.prompt_prefix = settings.text_ctx_init  # what the run's log shows before the class names
        self.prompt_learner = MultiModalAdapters(settings, shape.text_width, shape.text_layers,
                                                 shape.vision_width, shape.vision_layers)

    def class_token_ids(self, classnames: Sequence[str]) -> Tensor:
        """[C, 77] "<TEXT_CTX_INIT> <class name>." (the release's texts, its spacing included)."""
        texts = [f"{self.settings.text_ctx_init} {readable_name(c)}." for c in classnames]
        try:
            return clip_api.tokenize(texts)
        except RuntimeError as err:
            raise ConfigError("text_ctx_init", self.settings.text_ctx_init,
                              f"a class text does not fit CLIP's {CONTEXT_LENGTH} tokens: {err}") from err

    def adapted(self, tower: nn.ModuleList, encoder: nn.Module):
        """The layer_output hook of one tower: block i (0-based) is the release's layer i + 1."""
        scale = self.settings.adapter_scale
        learner = self.prompt_learner

        def layer_output(i: int, x: Tensor, y: Tensor) -> Tensor:
            adapter = tower[i + 1]
            if adapter is None:
                return y
            h = encoder.blocks[i].ln_1(_ScaleGradient.apply(x, scale))   # gradient into x: s * true
            h = adapter.down(h.to(adapter.up.weight.dtype))               # [N, L, d]
            h = adapter.up(learner.shared_adapter[i + 1](h)) * scale      # [N, L, D]
            return y + _ScaleGradient.apply(h, 1.0 / scale).to(y.dtype)   # adapters' gradients / s

        return layer_output

    def encode_classes(self) -> Tensor:
        """Adapted text features [C, E] (unnormalised)."""
        return self.text_encoder(self.token_ids, layer_output=self.adapted(self.prompt_learner.text_adapter,
                                                                           self.text_encoder))

    def classify(self, images: Tensor, text_features: Tensor, frozen_image_features: Optional[Tensor] = None) -> Tensor:
        image_features = self.image_encoder(images, layer_output=self.adapted(self.prompt_learner.visual_adapter,
                                                                              self.image_encoder))
        return self.logits(image_features, text_features)


# ---- the release's checkpoints ---------------------------------------------------------------------
# The release registers its AdapterLearner as "adapter_learner": our names, plus the class-bound
# buffers token_embedding and tokenized_prompts, which its load_model drops as we do.
CLASS_BOUND_BUFFERS = ("token_embedding", "tokenized_prompts")


def is_release_state_dict(keys: Iterable[str]) -> bool:
    return any(without_data_parallel(key) in CLASS_BOUND_BUFFERS for key in keys)


def convert_release_state_dict(release_state: Dict[str, Any]) -> Dict[str, Tensor]:
    """The release's `adapter_learner` state dict -> ours: the same names without the class-bound
    buffers, fp32 (an fp16 run saves fp16 adapters)."""
    ours = {}
    for key, value in release_state.items():
        key = without_data_parallel(key)
        if key not in CLASS_BOUND_BUFFERS:
            ours[key] = value.float()
    return ours


RELEASE_CHECKPOINT = ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict)

register_method(
    "MMA", settings=MMASettings, model=MMA, checkpoint_folder="adapter_learner",  # the release's
    # MMA and the release's trainer name read the release's node, so its YAML files and command
    # lines (TRAINER.MMADAPTER.ADAPTER_SCALE 0.001) work under either name
    node="MMADAPTER", release_names={"MultiModalAdapter": ConfigLayout(node="MMADAPTER")},
    # the release's run_examples.sh: vit_b16_ep5 for ten datasets, vit_b16_ep5_imnet (batch 128) for ImageNet
    default_configs={"base2new": "vit_b16_ep5", "xd": "vit_b16_ep5_imnet"},
    release_checkpoint=RELEASE_CHECKPOINT,
    doc="docs/mma.md")
