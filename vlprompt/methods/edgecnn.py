"""EdgeCNN (Yang et al., arXiv 1909.13522): a small-input CNN for facial expression recognition
on devices with slow memory access. Plain 3x3 convolutions in dense layers (no group
convolutions, no 1x1 bottlenecks), 44x44 inputs. docs/edgecnn.md has the architecture, the
recipe and where we depart from the release.

The toolkit's sibling system: CLIP prompt learning and EdgeCNN run on the same emotion datasets.
"""
import math
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from ..files import CheckpointError
from .registry import ReleaseCheckpoint, keys_under, register_method
from .settings import option

EMOTIONS_FER = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
INITS = ("he", "pytorch")
MAX_IMAGE_SIZE = 512  # EdgeCNN is built for small faces; larger inputs are a typo, not a setting


@dataclass(frozen=True)
class EdgeCNNSettings:
    """The release's recipe: SGD (OPTIM.*) with this schedule, clamp and augmentation."""
    image_size: int = option(48, "faces are resized to this, then cropped to INPUT.SIZE", low=1, high=MAX_IMAGE_SIZE)
    ten_crop: bool = option(True, "test on the ten crops (corners, centre, flips), logits averaged")
    grad_clamp: float = option(0.1, "element-wise gradient clamp (0 = off)", low=0)
    decay_start: int = option(80, "lr constant up to this epoch,", low=0)
    decay_every: int = option(5, "then multiplied by DECAY_RATE every DECAY_EVERY epochs", low=1)
    decay_rate: float = option(0.9, "lr factor of each decay step", low=1e-12, high=1.0)
    init: str = option("he", "he: the initialisation the release's code intends (He-normal convolutions); "
                             "pytorch: PyTorch's defaults, which its published models were trained from "
                             "(its init loop never matched a module)", choices=INITS)


class DenseLayer(nn.Module):
    """conv Cin->4g 3x3 + BN + ReLU, conv 4g->g 3x3 + BN; the output is concatenated to the input."""

    def __init__(self, in_channels: int, growth: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4 * growth, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(4 * growth)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * growth, growth, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(growth)

    def forward(self, x: Tensor) -> Tensor:
        new = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return torch.cat([x, new], dim=1)


class EdgeCNN(nn.Module):
    """[B, 3, H, W] -> logits [B, num_classes] (or features [B, 152] when num_classes == 0).

    Stem conv 3->32 + max-pool /2; stages of 4, 4, 7 dense layers (growth 8) separated by 2x2
    average pools; ReLU, global average pool, linear. 418,487 parameters with 7 classes.
    """

    def __init__(self, num_classes: int = 7, stem_channels: int = 32, growth: int = 8,
                 stages: Sequence[int] = (4, 4, 7), init: str = "he"):
        super().__init__()
        layers = [nn.Conv2d(3, stem_channels, kernel_size=3, stride=1, padding=1),
                  nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
        channels = stem_channels
        for index, depth in enumerate(stages):
            if index > 0:
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            for _ in range(depth):
                layers.append(DenseLayer(channels, growth))
                channels += growth
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = channels
        self.classifier = nn.Linear(channels, num_classes) if num_classes else None
        if init not in INITS:
            raise ValueError(f"init={init!r}: use one of {INITS}")
        if init == "he":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's intended initialisation: He-normal convolutions (fan-out), unit BN, zero
        linear bias. Its loop over named_parameters never matched a module, so its published models
        started from PyTorch's defaults instead (init="pytorch")."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.pool(self.features(x))
        return features if self.classifier is None else self.classifier(features)


def ten_crop_logits(model: nn.Module, crops: Tensor) -> Tensor:
    """crops [B, 10, 3, h, w] (corners, centre and their flips) -> logits averaged over crops."""
    batch, n_crops = crops.shape[:2]
    logits = model(crops.flatten(0, 1))
    return logits.view(batch, n_crops, -1).mean(dim=1)


# ---- the release's checkpoints ---------------------------------------------------------------
# Its training scripts save `<dataset>_EdgeCNN/PrivateTest_model.t7` = {"net": state dict (or, from
# a CPU-only run, the pickled module), "best_PrivateTest_acc", "best_PrivateTest_acc_epoch"}. Its
# layers are ours in the same order and shapes (features.conv0, features.dense{s}_{j}.denselayer
# {s}_{j}.{conv0,norm0,conv1,norm1}, classifier), so names map by position. Its class order is
# FER-2013's, RAF-DB's models included (its preprocessing remaps RAF-DB's labels).
RELEASE_FILE = "PrivateTest_model.t7"


is_release_state_dict = keys_under("features.conv0.")


def convert_release_state_dict(release_state: Dict[str, Tensor], num_classes: int = 7) -> Dict[str, Tensor]:
    """The release's EdgeCNN state dict -> ours (EdgeCNN(num_classes) names), by position."""
    ours = EdgeCNN(num_classes=num_classes).state_dict()
    release = list(release_state.items())
    if len(release) != len(ours):
        raise CheckpointError(f"{len(release)} tensors in the release state dict, {len(ours)} in EdgeCNN({num_classes})")
    converted = {}
    for (name, expected), (key, value) in zip(ours.items(), release):
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(f"release tensor {key} {tuple(value.shape)} does not fit {name} {tuple(expected.shape)}")
        converted[name] = value
    return converted


register_method("EdgeCNN", settings=EdgeCNNSettings, model=EdgeCNN, checkpoint_folder="model",
                default_configs={"train": "{dataset}"}, doc="docs/edgecnn.md",
                release_checkpoint=ReleaseCheckpoint(is_release_state_dict, convert_release_state_dict))
