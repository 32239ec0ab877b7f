"""A trained run as a classifier of images, framework-free (torch, torchvision, clip; no Dassl):

    classifier = vlprompt.load_classifier("output/base2new/train_base/my_toys/.../seed1")
    probabilities = classifier.probabilities(["photo.png", pil_image, tensor])   # [B, C]
    classifier.set_classes(["red star", "blue ring"])                          # any class names

The model is rebuilt from the method registry (get_method(...).model with its settings) and the
checkpoint's `info` (vlprompt.model_card): backbone, settings, precision, test transform, class
names. A checkpoint without it (written before, or by a release) takes that from the run's
log (the config Dassl prints at the start), or from `config=` (a YAML with TRAINER/INPUT/MODEL
keys), with `method=` and `classes=` from the caller.

The classes are encoded once per class list inside the model's own `evaluation()` context
(per image where the method's rule says so: CoCoOp, DCP's per_image mode), so a call costs what a
test batch costs, and the logits equal the test loop's.
"""
import glob
import os
import re
from contextlib import ExitStack
from dataclasses import fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .clip.class_features import ClassFeatureStore, frozen_class_features, load_descriptions, readable_name
from .clip.encoders import PromptedTextEncoder
from .clip.loading import cast_clip, load_clip, weights_fingerprint
from .errors import UserError
from .files import CheckpointError, cache_root, load_strict, read_checkpoint, written_by
from .methods import settings as method_settings
from .methods.registry import get_method, lookup
from .model_card import default_input, input_info, test_transform

PRECISIONS = ("fp32", "fp16", "bf16", "amp")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
ImageLike = Union[str, os.PathLike, Tensor, Any]  # a path, a PIL image or a [3, H, W] / [B, 3, H, W] tensor


class ClassifierError(UserError, ValueError):
    """A run, checkpoint, backbone or class list that cannot make a classifier; says which and the fix."""


# ---- finding the checkpoint ----------------------------------------------------------------------
def find_checkpoint(path: str) -> str:
    """A checkpoint file, or the one a run folder's test would load: model-best.pth.tar, else the
    file Dassl's `checkpoint` pointer names (the last epoch), in the run's checkpoint folder."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ClassifierError(f"{path} is neither a run folder nor a checkpoint file")
    for folder in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "checkpoint"))
                          + glob.glob(os.path.join(path, "*", "model-best.pth.tar"))}):
        best = os.path.join(folder, "model-best.pth.tar")
        if os.path.isfile(best):
            return best
        with open(os.path.join(folder, "checkpoint")) as handle:
            return os.path.join(folder, handle.readline().strip())
    raise ClassifierError(f"no checkpoint in {path} (looked for */model-best.pth.tar and */checkpoint): give a "
                          f"finished training run's folder (--output-dir) or a checkpoint file")


# ---- info of checkpoints that carry none -----------------------------------------------------------
def config_in_log(run_dir: str) -> Optional[Dict[str, Any]]:
    """The config Dassl printed at the start of a run (log.txt: between '** Config **' and the
    env info), or None."""
    import yaml
    for log in sorted(glob.glob(os.path.join(run_dir, "log.txt*")), key=os.path.getmtime, reverse=True):
        with open(log, errors="replace") as handle:
            text = handle.read()
        match = re.search(r"\*\* Config \*\*\n\*+\n(.*?)\nCollecting env info", text, re.S)
        if match:
            try:
                return yaml.safe_load(match.group(1))
            except yaml.YAMLError:
                continue
    return None


def info_from_config(config: Mapping[str, Any], method: Optional[str], source: str) -> Dict[str, Any]:
    """A checkpoint's `info` from a config (a run's printed config or a user's YAML): what it says,
    defaults for the rest."""
    trainer = method or lookup(config, "TRAINER.NAME")
    if not trainer:
        raise ClassifierError(f"{source} names no method: pass method= (--method) with the trainer's name")
    try:
        spec = get_method(trainer)
    except KeyError as err:
        raise ClassifierError(f"{source}: {err.args[0]}") from err
    layout = dict(spec.trainer_names())[trainer]
    dataset = lookup(config, "DATASET.NAME") or ""
    settings = layout.read(config.get("TRAINER") or {}, spec.settings, dataset)
    node = config.get("INPUT")
    return {"method": spec.name, "trainer": trainer, "settings": settings, "dataset": dataset,
            "precision": lookup(config.get("TRAINER") or {}, layout.path("prec")) or "fp32",
            "backbone": {"name": lookup(config, "MODEL.BACKBONE.NAME") or "", "path": lookup(config, "MODEL.BACKBONE.PATH") or "",
                         "download_root": lookup(config, "MODEL.BACKBONE.DOWNLOAD_ROOT") or ""},
            "input": input_info(node) if node and "SIZE" in node else None, "classnames": None, "descriptions": ""}


def read_info(path: str, checkpoint: Mapping[str, Any], method: Optional[str], config: Optional[str]) -> Dict[str, Any]:
    if config:
        import yaml
        if not os.path.isfile(config):
            raise ClassifierError(f"config={config}: no such file")
        with open(config) as handle:
            return info_from_config(yaml.safe_load(handle) or {}, method, config)
    info = checkpoint.get("info")
    if info:
        return dict(info)
    logged = config_in_log(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    if logged is not None:
        return info_from_config(logged, method, f"the log of the run of {path}")
    if method:
        return info_from_config({}, method, path)
    raise ClassifierError(f"{path} does not say which model it holds (a checkpoint written before checkpoints "
                          f"described themselves, or a release's) and no run log is next to it: pass method= "
                          f"(--method) and config= (--config, the run's trainer config YAML)")


# ---- the classifier ----------------------------------------------------------------------------------
class Classifier:
    """Logits and probabilities of images over a list of class names, from a trained model."""

    def __init__(self, model, spec, settings, info: Dict[str, Any], precision: str,
                 device: torch.device, text_encoder: Optional[PromptedTextEncoder]):
        self.model, self.spec, self.settings, self.info = model, spec, settings, info
        self.precision, self.device = precision, device
        self._text_encoder = text_encoder  # fp32 frozen text tower for frozen class features, or None
        self.transform = test_transform(info["input"])
        self._evaluation = ExitStack()
        self.classnames: List[str] = list(model.classnames)
        self._enter_evaluation()

    # ---- classes ---------------------------------------------------------------------------
    @property
    def classes_depend_on_the_image(self) -> bool:
        return not getattr(self.model, "classes_cacheable", True)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Retarget to `classes` (any names); their features are computed once, here."""
        classes = check_classes(classes)
        self._evaluation.close()
        self.model.set_classes(classes, self.frozen_text_features(classes))
        self.classnames = list(classes)
        self._enter_evaluation()

    def frozen_text_features(self, classes: Sequence[str]) -> Optional[Tensor]:
        return frozen_features(self.spec, self.settings, self.info, self._text_encoder, classes)

    def _enter_evaluation(self) -> None:
        self._evaluation = ExitStack()
        with self.autocast():
            self._evaluation.enter_context(self.model.evaluation())

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "amp")

    # ---- images ----------------------------------------------------------------------------
    def load_images(self, images: Union[ImageLike, Sequence[ImageLike]]) -> Tensor:
        """[B, 3, H, W] on the device: paths and PIL images through the run's test transform,
        tensors taken as already transformed."""
        if isinstance(images, Tensor):
            return (images if images.dim() == 4 else images.unsqueeze(0)).to(self.device)
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.load_image(image) for image in images]).to(self.device)

    def load_image(self, image: ImageLike) -> Tensor:
        from PIL import Image
        if isinstance(image, Tensor):
            return image
        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except Exception as err:  # noqa: BLE001  PIL raises many kinds
                raise ClassifierError(f"cannot read image {image} ({type(err).__name__}: {err})") from err
        return self.transform(image.convert("RGB"))

    @torch.no_grad()
    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> Tensor:
        """Logits [B, C] fp32 (CPU) over self.classnames."""
        batch = self.load_images(images)
        with self.autocast():
            return self.model(batch).float().cpu()

    logits = __call__

    def probabilities(self, images) -> Tensor:
        return self(images).softmax(dim=-1)

    def top(self, images, k: int = 5) -> List[List[List[Any]]]:
        """Per image, the k most probable [class, probability] pairs."""
        probs = self.probabilities(images)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=-1)
        return [[[self.classnames[i], round(float(v), 6)] for v, i in zip(vs, ids)]
                for vs, ids in zip(values.tolist(), indices.tolist())]


def check_classes(classes: Sequence[str]) -> List[str]:
    classes = [c.strip() for c in classes if c and c.strip()]
    if len(classes) < 1:
        raise ClassifierError("no class names given: give at least one (two for a meaningful choice)")
    seen = {}
    for name in classes:
        if seen.setdefault(readable_name(name).lower(), name) != name:
            raise ClassifierError(f"class names {seen[readable_name(name).lower()]!r} and {name!r} are the same class")
    return classes


def frozen_features(spec, settings, info, text_encoder, classes) -> Optional[Tensor]:
    """Frozen CLIP's class text features [C, E] by the method's rule (spec.class_texts): the run's
    descriptions file when it describes every class, else the method's templates, as the test
    loop computes them for a dataset without descriptions."""
    texts = spec.class_texts(settings, info.get("dataset") or "") if spec.class_texts else None
    if texts is None:
        return None
    path = info.get("descriptions") or ""
    if texts.descriptions and path and os.path.isfile(path):
        described = load_descriptions(path)
        path = path if all(readable_name(c) in described for c in classes) else ""
    store = ClassFeatureStore(cache_root(), report=lambda message: None)
    return frozen_class_features(text_encoder, classes, path if texts.descriptions and path else None,
                                 templates=texts.templates, store=store, normalize_each=texts.normalize_each)


def settings_of(spec, values: Mapping[str, Any]):
    """The settings dataclass from stored values (lists back to tuples where the field is one)."""
    types = method_settings.field_types(spec.settings)
    known = {f.name for f in fields(spec.settings)}
    chosen = {k: tuple(v) if types.get(k) is tuple and isinstance(v, list) else v
              for k, v in values.items() if k in known}
    try:
        return method_settings.checked_values(spec.settings, chosen)
    except method_settings.ConfigError as err:
        raise ClassifierError(f"the checkpoint's settings of {spec.name}: {err}") from err


def backbone_of(info: Dict[str, Any], backbone_path: Optional[str], source: str):
    """Frozen CLIP in fp32 on the CPU: `backbone_path`, else the file or name the run used; the
    weights must be those the run was trained with (their fingerprint), when it recorded one."""
    backbone = info.get("backbone") or {}
    path = backbone_path or backbone.get("path") or ""
    if not backbone_path and path and not os.path.isfile(path):
        raise ClassifierError(f"the run's CLIP weights {path} are not there any more: pass backbone_path= "
                              f"(--backbone-path) with the file they were copied to")
    if not path and not backbone.get("name"):
        raise ClassifierError(f"{source} does not name its CLIP backbone: pass backbone_path= (--backbone-path)")
    clip_model = load_clip(backbone.get("name") or "", path, backbone.get("download_root") or None)
    expected = backbone.get("fingerprint")
    if expected and weights_fingerprint(clip_model) != expected:
        raise ClassifierError(f"the CLIP weights in {path or backbone.get('name')} are not the ones {source} was "
                              f"trained with (fingerprint {expected[:12]}...): pass backbone_path= "
                              f"(--backbone-path) with the run's weights")
    return clip_model


def fp32_text_tower(clip_model) -> PromptedTextEncoder:
    import copy
    visual, clip_model.visual = clip_model.visual, None
    try:
        return PromptedTextEncoder(copy.deepcopy(clip_model))
    finally:
        clip_model.visual = visual


def load_classifier(run_dir_or_checkpoint: str, classes: Optional[Sequence[str]] = None,
                    backbone_path: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                    precision: Optional[str] = None, method: Optional[str] = None, config: Optional[str] = None,
                    trust_pickle: bool = False) -> Classifier:
    """A Classifier from a run folder or checkpoint (any registered prompt method, zero-shot CLIP's
    evaluation runs, release checkpoints with `method`/`config` and `trust_pickle`).

    classes: class names (default: those it was trained on); backbone_path: the CLIP weights when
    they are no longer where the run found them; precision: fp32, fp16, bf16 or amp (default: the
    run's); method/config: for checkpoints that do not describe themselves."""
    path = find_checkpoint(run_dir_or_checkpoint)
    try:
        checkpoint = read_checkpoint(path, trust_pickle=trust_pickle, trust_key="trust_pickle (--trust-pickle)")
    except CheckpointError as err:
        raise ClassifierError(str(err)) from err
    info = read_info(path, checkpoint, method, config)
    spec = get_method(info["method"])
    if spec.model is None:
        raise ClassifierError(f"{spec.name} is not a prompt method over CLIP: it has no classifier of class names")
    settings = settings_of(spec, info.get("settings") or {})
    classes = check_classes(classes) if classes else info.get("classnames")
    if not classes:
        raise ClassifierError(f"{path} does not list the classes it was trained on: pass classes= (--classes)")
    precision = precision or info.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise ClassifierError(f"precision={precision!r} is invalid: must be one of {PRECISIONS}")
    device = torch.device(device)
    clip_model = backbone_of(info, backbone_path, path).to(device)
    info["input"] = info.get("input") or default_input(clip_model.visual.input_resolution)
    text_encoder = PromptedTextEncoder(clip_model) if spec.class_texts else None
    frozen = frozen_features(spec, settings, info, text_encoder, classes)
    if precision in HALF:  # as the trainer: frozen class features in fp32 first, then the cast
        # later class lists need the fp32 text tower: a copy of it, the image tower left out
        text_encoder = fp32_text_tower(clip_model) if text_encoder is not None else None
        cast_clip(clip_model, HALF[precision])
    model = spec.model(clip_model, settings, classes, frozen)
    weights = checkpoint.get("state_dict", checkpoint)
    if spec.release_checkpoint is not None and spec.release_checkpoint.recognizes(weights):
        try:
            weights = spec.release_checkpoint.convert(weights)
        except (KeyError, ValueError) as err:  # a release file of another method
            raise ClassifierError(f"{path} is not a {spec.name} release checkpoint ({err.args[0]}). "
                                  f"{written_by(weights, path)}") from err
    load_strict(model.prompt_learner, weights, path)
    model.to(device).eval()
    return Classifier(model, spec, settings, info, precision, device, text_encoder)
