"""Pretrain a small CLIP contrastively on the toy world; write it as a plain fp16 state dict.

    python -m vlprompt.toyworld.pretrain --out vlprompt/toyworld/toy_clip.pt

OpenAI's architecture (`clip.model.CLIP`, ViT image tower, the real BPE tokenizer, context 77,
vocabulary 49408) at a small size; `vlprompt.clip.loading.load_clip(name, path=OUT)` reads the
result. Token-embedding rows of tokens the world never uses are zero from the start and get no
gradient, so they stay zero and the file compresses well.

The shipped toy_clip.pt is this command's output with its defaults (seed 0, 1500 steps of 128
pairs, one thread): 11.5 min of CPU time on a shared 2-core machine (12 to 29 min wall there,
depending on the load); a rerun reproduced the file byte for byte.

Deterministic for a seed given the thread count (--threads) and the CPU's kernels: the same
machine, torch build, thread count and ATEN_CPU_CAPABILITY give the same bytes; another thread
count or other kernels (AVX2 vs AVX-512) round differently and give a slightly different model.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from clip import clip as clip_api
from clip.model import CLIP

from ..clip.loading import ARCHITECTURES
from ..clip.encoders import PromptedTextEncoder
from ..files import atomic_torch_save
from .render import render_batch, to_model_input
from .world import PRETRAINING, Scene, caption, sample_scene, vocabulary_sentences

# The shape named "toy" (MODEL.BACKBONE.NAME; vlprompt/clip/loading.py) with OpenAI's context and
# vocabulary; heads = width // 64 as clip.model.build_model infers them; both widths divisible by 8
# (HiCroPL's N_HEADS). The token embedding (49408 x text width) dominates the file: text width 64.
ARCHITECTURE = dict(ARCHITECTURES["toy"], context_length=77, vocab_size=49408,
                    transformer_heads=ARCHITECTURES["toy"]["transformer_width"] // 64)


def world_token_ids() -> torch.Tensor:
    """Sorted ids of every token a toy-world text can hold (SOT, EOT and the words)."""
    tokens = clip_api.tokenize(vocabulary_sentences())
    return torch.unique(tokens[tokens > 0])


def build_toy_clip(seed: int, architecture: dict = ARCHITECTURE) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(**architecture)
    used = world_token_ids()
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[used] = True
        model.token_embedding.weight[~keep] = 0.0
    return model


# attributes a variant of a scene may change: the ones classes are made of
VARIED_ATTRIBUTES = ("shape", "colour", "pattern", "size")


def scene_group(rng: np.random.Generator, size: int) -> List[Scene]:
    """A random scene and `size - 1` variants, each differing from it in one attribute. In a
    batch of such groups, telling an image from its neighbours needs every attribute (hard
    negatives); random batches mostly differ in colour alone."""
    anchor = sample_scene(rng, PRETRAINING)
    group = [anchor]
    for _ in range(size - 1):
        attribute = VARIED_ATTRIBUTES[rng.integers(len(VARIED_ATTRIBUTES))]
        other = sample_scene(rng, PRETRAINING)
        while getattr(other, attribute) == getattr(anchor, attribute):
            other = sample_scene(rng, PRETRAINING)
        group.append(replace(anchor, **{attribute: getattr(other, attribute)}))
    return group


class CaptionedPool:
    """A fixed pool of rendered groups of scenes (see scene_group); every draw gets fresh
    captions (alt text varies)."""

    def __init__(self, size: int, seed: int, group: int = 4):
        rng = np.random.default_rng(seed)
        self.group = group
        self.scenes = [scene for _ in range(size // group) for scene in scene_group(rng, group)]
        self.images = to_model_input(render_batch(self.scenes, rng))
        self.rng = np.random.default_rng(seed + 1)
        self._token_cache: Dict[str, torch.Tensor] = {}

    def tokens(self, captions: List[str]) -> torch.Tensor:
        for text in captions:
            if text not in self._token_cache:
                self._token_cache[text] = clip_api.tokenize(text)[0]
        return torch.stack([self._token_cache[t] for t in captions])

    def batch(self, size: int):
        groups = self.rng.choice(len(self.scenes) // self.group, size // self.group, replace=False)
        index = (groups[:, None] * self.group + np.arange(self.group)).reshape(-1)
        captions = [caption(self.scenes[i], self.rng) for i in index]
        return self.images[torch.from_numpy(index)], self.tokens(captions), captions


def contrastive_loss(model: CLIP, text_encoder: PromptedTextEncoder, images, tokens, captions):
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(text_encoder(tokens), dim=-1)
    logits = model.logit_scale.exp() * image @ text.t()
    # identical captions in a batch are all positives for each other's images
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def parameter_groups(model: CLIP, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        matrix = p.dim() >= 2 and "embedding" not in name
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pretrain(seed: int = 0, steps: int = 400, batch: int = 256, pool: int = 30000, lr: float = 2e-3,
             architecture: dict = ARCHITECTURE, log=print) -> CLIP:
    model = build_toy_clip(seed, architecture)
    text_encoder = PromptedTextEncoder(model)  # stops at the last EOT: exact, and much faster
    start = time.time()
    data = CaptionedPool(pool, seed)
    log(f"rendered {pool} scenes in {time.time() - start:.0f} s")
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        loss = contrastive_loss(model, text_encoder, *data.batch(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - start:.0f} s")
    return model.eval()


def fp16_state_dict(model: CLIP) -> dict:
    """OpenAI's checkpoints hold fp16 weights; so does ours (half the bytes)."""
    return {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "toy_clip.pt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pool", type=int, default=20000, help="rendered scenes drawn from")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the result is reproducible for a given thread count")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "pool", "threads"):
        if getattr(args, name) < 1:
            print(f"--{name}={getattr(args, name)} is invalid: must be >= 1", file=sys.stderr)
            return 2
    if args.batch > args.pool:
        print(f"--batch={args.batch} is larger than --pool={args.pool}: raise --pool", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model = pretrain(args.seed, args.steps, args.batch, args.pool, args.lr)
    atomic_torch_save(fp16_state_dict(model), args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
