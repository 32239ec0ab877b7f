"""HiCroPL computed the way the official release computes it: the baseline of
benchmarks/bench_hicropl.py and an oracle for tests.

- text: all 77 tokens of every class through CLIP's own blocks (nn.MultiheadAttention with the
  stored 77x77 causal mask, sequence-first), at every step;
- a second copy of CLIP's image tower as the frozen teacher for zero-shot image features;
- class text features recomputed for every test batch; no caches.
The numbers are the same as `HiCroPL`'s up to float rounding; only the cost differs.
"""
import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from ..clip.encoders import PromptedImageEncoder, PromptedTextEncoder
from .common import normalize
from .hicropl import HiCroPL


def _splice(x: Tensor, start: int, prompt: Tensor) -> Tensor:
    """Sequence-first x [L, N, D]: positions start..start+n replaced by prompt [n, D]."""
    n = prompt.shape[0]
    prompt = prompt.to(x.dtype)[:, None].expand(-1, x.shape[1], -1)
    return torch.cat([x[:start], prompt, x[start + n:]], dim=0)


class CLIPBlocksTextEncoder(PromptedTextEncoder):
    """Same weights and interface; forward as the release: 77 tokens, CLIP's blocks and mask."""

    def forward(self, token_ids: Tensor, prompts: Sequence[Tensor] = ()) -> Tensor:
        x = self.token_embedding(token_ids).to(self.dtype).permute(1, 0, 2)  # [77, C, D]
        if prompts:
            x = _splice(x, 1, prompts[0])
        x = x + self.positional_embedding.to(x.dtype)[:, None]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(prompts):
                x = _splice(x, 1, prompts[i])
            x = block(x)
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ self.text_projection


class CLIPBlocksImageEncoder(PromptedImageEncoder):
    """Same weights and interface; forward as the release: sequence-first through CLIP's blocks."""

    def forward(self, images: Tensor, prompts: Sequence[Tensor] = ()) -> Tensor:
        x = self.conv1(images.to(self.dtype)).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        n = prompts[0].shape[0] if prompts else 0
        if prompts:
            x = torch.cat([x, prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)  # [L, B, D]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(prompts):
                x = _splice(x, x.shape[0] - n, prompts[i])
            x = block(x)
        return self.ln_post(x[0]) @ self.proj


class ReleaseStyleHiCroPL(HiCroPL):
    def __init__(self, clip_model: nn.Module, *args, **kwargs):
        super().__init__(clip_model, *args, **kwargs)
        self.text_encoder = CLIPBlocksTextEncoder(clip_model)
        self.image_encoder = CLIPBlocksImageEncoder(clip_model)
        self.teacher = copy.deepcopy(clip_model.visual)  # the release loads CLIP's image tower twice

    def frozen_image_features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return normalize(self.teacher(images.to(self.teacher.conv1.weight.dtype)).float())

    @property
    def classes_cacheable(self) -> bool:
        return False  # class text features are recomputed for every batch
