"""Learning quality in the toy world, with the framework-free API (no Dassl).

Zero-shot CLIP and HiCroPL on a class set's base and new classes: the evidence that base-to-new
generalisation happens in this world, and the helpers of tests/test_toy_world.py.
"""
import os
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import torch
from torch import Tensor

from ..clip.class_features import encode_texts_per_class, texts_per_class
from ..clip.encoders import PromptedTextEncoder
from ..clip.loading import load_clip
from ..methods.hicropl import HiCroPL, HiCroPLSettings
from ..methods.zero_shot import ZeroShotCLIP, ZeroShotSettings
from .render import render_batch, to_model_input
from .world import SOURCE, ClassSet, Domain, class_descriptions, sample_class_scene

TOY_CLIP_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_clip.pt")


def load_toy_clip(path: str = TOY_CLIP_PATH):
    """The shipped toy CLIP, frozen, fp32, through the loader real weights use."""
    return load_clip("toy", path=path)


def class_images(class_set: ClassSet, per_class: int, seed: int, domain: Domain = SOURCE) -> Tuple[Tensor, Tensor]:
    """(images [C*per_class, 3, 32, 32] normalised, labels [C*per_class]) of a class set."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(class_set.classes)), per_class)
    scenes = [sample_class_scene(class_set, int(label), rng, domain) for label in labels]
    return to_model_input(render_batch(scenes, rng)), torch.from_numpy(labels)


def class_features(clip_model, class_set: ClassSet, seed: int = 0) -> Tensor:
    """Frozen class text features [C, E] from the class set's descriptions (the gpt_file role)."""
    descriptions = class_descriptions(class_set, seed=seed)
    texts = texts_per_class(class_set.classnames, descriptions)
    return encode_texts_per_class(PromptedTextEncoder(clip_model), texts)


@torch.no_grad()
def accuracy(model, images: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in percent; the model is evaluated as the trainers do (eval mode)."""
    model.eval()
    correct = 0
    with model.evaluation():
        for start in range(0, len(images), batch):
            logits = model(images[start:start + batch])
            correct += int((logits.argmax(dim=1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(images)


def zero_shot_accuracy(clip_model, class_set: ClassSet, images: Tensor, labels: Tensor) -> float:
    model = ZeroShotCLIP(clip_model, ZeroShotSettings(), class_set.classnames, class_features(clip_model, class_set))
    return accuracy(model, images, labels)


# The recipe scaled to the toy CLIP (4 layers): prompts on every layer, the cross layer halfway.
TOY_HICROPL = HiCroPLSettings(n_ctx=4, ctx_init="a photo of a", prompt_depth=4, cross_layer=2, lambd=12.0)


@dataclass(frozen=True)
class Recipe:
    epochs: int = 5
    batch: int = 16
    lr: float = 0.0025
    seed: int = 1


def train_hicropl(clip_model, base: ClassSet, images: Tensor, labels: Tensor,
                  cfg: HiCroPLSettings = TOY_HICROPL, recipe: Recipe = Recipe(),
                  model_class: Callable[..., HiCroPL] = HiCroPL) -> HiCroPL:
    """Build HiCroPL for the base classes and train its prompt learner with a plain loop: the
    release's optimiser (Adam, eps 1e-3, weight decay 5e-4, cosine decay) on shuffled
    mini-batches of CE + distillation.
    `model_class` lets a test substitute a deliberately broken subclass."""
    torch.manual_seed(recipe.seed)
    model = model_class(clip_model, cfg, base.classnames, class_features(clip_model, base))
    parameters = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=recipe.lr, eps=1e-3, weight_decay=5e-4)
    steps = max(1, recipe.epochs * -(-len(images) // recipe.batch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for _ in range(recipe.epochs):
        for index in torch.randperm(len(images), generator=order).split(recipe.batch):
            loss, _, _ = model.loss(images[index], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def retarget(model: HiCroPL, class_set: ClassSet, clip_model) -> HiCroPL:
    """The trained model pointed at another class set (new classes), as the test script does."""
    model.set_classes(class_set.classnames, class_features(clip_model, class_set))
    return model
