"""What a checkpoint says about its model (`info`), so that it can be rebuilt from the file alone:
the method and its settings, the backbone and a fingerprint of its weights, the test transform
and the class names. Plain values only, so that torch.load(weights_only=True) reads them.

    {"format": "vlprompt-info-1", "method": "HiCroPL", "trainer": "HiCroPL", "settings": {...},
     "precision": "fp32", "backbone": {"name", "path", "download_root", "fingerprint"},
     "input": {"size": [224, 224], "interpolation": "bicubic", "mean": [...], "std": [...],
               "normalize": true}, "classnames": [...], "dataset": "ImageFolder", "descriptions": ""}
"""
import ast
from typing import Any, Dict, Mapping

INFO_FORMAT = "vlprompt-info-1"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: what weights_only loading (and JSON) read back unchanged."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def input_info(node: Mapping[str, Any]) -> Dict[str, Any]:
    """The test transform's parameters from a config's INPUT node (Dassl's keys)."""
    size, mean, std, transforms = (_sequence(node[key]) for key in ("SIZE", "PIXEL_MEAN", "PIXEL_STD", "TRANSFORMS"))
    return {"size": [int(v) for v in size], "interpolation": str(node["INTERPOLATION"]),
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "normalize": "normalize" in transforms}


def _sequence(value: Any) -> list:
    """A list from a config value; a run log's printed config has "(224, 224)" and "['normalize']"
    where the config had a tuple or a list, which YAML reads back as strings."""
    if isinstance(value, str) and value[:1] in "([":
        value = ast.literal_eval(value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def default_input(resolution: int) -> Dict[str, Any]:
    """CLIP's own test transform at a backbone's resolution (Dassl's defaults with CLIP's statistics)."""
    return {"size": [resolution, resolution], "interpolation": "bicubic", "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD), "normalize": True}


def test_transform(info: Mapping[str, Any]):
    """Dassl's test transform (resize the shorter side to max(size), centre crop, to tensor,
    normalise) built with torchvision alone: the same tensors as the test loop."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
             "nearest": InterpolationMode.NEAREST}
    size = tuple(info["size"])
    steps = [Resize(max(size), interpolation=modes[info["interpolation"]]), CenterCrop(size), ToTensor()]
    if info.get("normalize", True):
        steps.append(Normalize(mean=info["mean"], std=info["std"]))
    return Compose(steps)
