"""Frozen CLIP backbones: by name through the `clip` package, from a local file, or random.

Every function returns an unmodified `clip.model.CLIP`; prompt methods wrap it from outside.
"""
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from clip import clip as clip_api
from clip.model import CLIP, build_model

from ..errors import UserError

DEFAULT_DOWNLOAD_ROOT = os.path.expanduser("~/.cache/clip")


class BackboneUnavailable(UserError, RuntimeError):
    """CLIP weights could not be found, downloaded or read."""


@dataclass(frozen=True)
class BackboneShape:
    """What a method's settings may depend on: the layer counts and widths of a CLIP backbone,
    known before its weights are loaded for the named architectures."""
    text_layers: int
    vision_layers: int
    text_width: int
    vision_width: int
    image_resolution: int

    @property
    def layers(self) -> int:
        """Layers both towers have (ViT-L/14: 12 text, 24 vision)."""
        return min(self.text_layers, self.vision_layers)


def backbone_shape(clip_model: nn.Module) -> BackboneShape:
    visual = clip_model.visual
    return BackboneShape(text_layers=len(clip_model.transformer.resblocks),
                         vision_layers=len(visual.transformer.resblocks) if hasattr(visual, "transformer") else 0,
                         text_width=clip_model.ln_final.weight.shape[0],
                         vision_width=visual.ln_post.weight.shape[0] if hasattr(visual, "ln_post") else 0,
                         image_resolution=visual.input_resolution)


def architecture_shape(name: str) -> Optional[BackboneShape]:
    """The shape of a named architecture (OpenAI's ViTs and our tiny ones), None if unknown."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        return None
    return BackboneShape(text_layers=arch["transformer_layers"], vision_layers=arch["vision_layers"],
                         text_width=arch["transformer_width"], vision_width=arch["vision_width"],
                         image_resolution=arch["image_resolution"])


def resolve_checkpoint(name: str, path: str = "", download_root: Optional[str] = None) -> str:
    """The local file holding the weights of backbone `name` (downloading it if needed)."""
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise BackboneUnavailable(
                f"MODEL.BACKBONE.PATH={path!r} is not a file. Point it at a CLIP checkpoint "
                f"(an OpenAI JIT archive such as ViT-B-16.pt, or a plain state dict), or set it to '' "
                f"to download MODEL.BACKBONE.NAME={name!r}.")
        return path
    if name not in clip_api._MODELS:
        raise BackboneUnavailable(
            f"MODEL.BACKBONE.NAME={name!r} is not a CLIP backbone the clip package can download "
            f"(known: {', '.join(clip_api.available_models())}). Use one of those names or set "
            f"MODEL.BACKBONE.PATH to a local checkpoint.")
    root = os.path.expanduser(download_root or DEFAULT_DOWNLOAD_ROOT)
    url = clip_api._MODELS[name]
    target = os.path.join(root, os.path.basename(url))
    try:
        return clip_api._download(url, root)
    except Exception as err:  # offline node, proxy, read-only cache, bad checksum
        raise BackboneUnavailable(
            f"Could not obtain the weights of CLIP backbone {name!r}: no valid file at {target} and "
            f"downloading {url} failed ({type(err).__name__}: {err}). On an offline machine, download "
            f"that file elsewhere and copy it to {target}, or set MODEL.BACKBONE.PATH to it "
            f"(a JIT archive or a plain state dict).") from err


def is_torchscript_archive(path: str) -> bool:
    """OpenAI ships JIT archives: zip files holding TorchScript code and constants."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def read_state_dict(path: str) -> dict:
    """Weights from an OpenAI JIT archive or a (possibly wrapped) plain state dict."""
    if is_torchscript_archive(path):
        with warnings.catch_warnings():  # deprecated in torch 2.x, yet the only reader of these files
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneUnavailable(
            f"{path} is neither a TorchScript archive nor a tensor-only state dict "
            f"({type(err).__name__}: {err}).") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BackboneUnavailable(f"{path} holds a {type(obj).__name__}, not a CLIP state dict.")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def clip_from_state_dict(state_dict: dict, source: str = "state dict") -> CLIP:
    """Build CLIP in fp32 on the CPU; only ViT backbones carry per-layer prompts."""
    if "visual.proj" not in state_dict:
        kind = "a ResNet CLIP" if "visual.layer1.0.conv1.weight" in state_dict else "not a CLIP state dict"
        raise BackboneUnavailable(
            f"{source} is {kind}; prompted encoders need a ViT backbone (ViT-B/32, ViT-B/16, ViT-L/14).")
    model = build_model(dict(state_dict))  # OpenAI's layout; returns fp16 matmul weights
    return model.float().eval()


def load_clip(name: str, path: str = "", download_root: Optional[str] = None) -> CLIP:
    """CLIP `name` (or the checkpoint at `path`) in fp32, frozen, in eval mode."""
    checkpoint = resolve_checkpoint(name, path, download_root)
    model = clip_from_state_dict(read_state_dict(checkpoint), source=checkpoint)
    return freeze(model)


def weights_fingerprint(clip_model: nn.Module) -> str:
    """sha256 of a CLIP model's weights (names, shapes, dtypes, bytes) as loaded in fp32: which
    weights a run used, whatever file format held them."""
    from ..files import tensors_fingerprint
    return tensors_fingerprint(clip_model.state_dict().items())


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def cast_clip(model: CLIP, dtype: torch.dtype) -> CLIP:
    """Cast matmul weights to `dtype` as OpenAI's `convert_weights` does for fp16.

    LayerNorms and embeddings stay fp32: CLIP's LayerNorm computes in fp32 and the encoders
    cast embeddings to the activation dtype.
    """
    def cast(module):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                         "v_proj_weight", "bias_k", "bias_v"):
                tensor = getattr(module, attr)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for attr in ("text_projection", "proj"):
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.to(dtype)

    model.apply(cast)
    return model


# Shapes of real backbones and of tiny stand-ins for tests and demos.
# heads are width // 64, as clip.model.build_model infers them.
ARCHITECTURES = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, transformer_width=512, transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, transformer_width=512, transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, transformer_width=768, transformer_layers=12),
    # text and vision of different widths (as ViT-B), small enough for CPU tests
    "tiny": dict(embed_dim=32, image_resolution=32, vision_layers=3, vision_width=128,
                 vision_patch_size=8, transformer_width=64, transformer_layers=3),
    # ViT-B/16's widths (768 vision, 512 text) with 3 layers at 32 px: the releases of MaPLe and
    # its family hard-code 768, so comparisons with them need these widths
    "tiny-B": dict(embed_dim=512, image_resolution=32, vision_layers=3, vision_width=768,
                   vision_patch_size=16, transformer_width=512, transformer_layers=3),
    # ViT-L-like: other widths, more vision than text layers, patch 14
    "tiny-L": dict(embed_dim=48, image_resolution=28, vision_layers=4, vision_width=192,
                   vision_patch_size=14, transformer_width=128, transformer_layers=3),
    # the toy world's pretrained CLIP (vlprompt/toyworld/toy_clip.pt): MODEL.BACKBONE.NAME "toy"
    # names its shape, so recipes for it are checked before the weights load
    "toy": dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128,
                vision_patch_size=8, transformer_width=64, transformer_layers=4),
}


def random_clip_state_dict(arch: str = "tiny", seed: int = 0, device: str = "cpu") -> dict:
    """State dict of a randomly initialised CLIP with the shapes of `arch` (no download).
    device="meta" gives the shapes alone, instantly."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    shape = ARCHITECTURES[arch]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = CLIP(context_length=77, vocab_size=49408,
                         transformer_heads=shape["transformer_width"] // 64, **shape)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.state_dict()


def random_clip(arch: str = "tiny", seed: int = 0) -> CLIP:
    """A frozen fp32 CLIP with random weights, built through `clip.model.build_model`."""
    return freeze(clip_from_state_dict(random_clip_state_dict(arch, seed), source=f"random {arch}"))


def save_random_clip(path: str, arch: str = "tiny", seed: int = 0) -> str:
    """Write a random CLIP state dict that `load_clip(..., path=path)` reads (demos, tests)."""
    from ..files import atomic_torch_save
    atomic_torch_save(random_clip_state_dict(arch, seed), path)
    return path
