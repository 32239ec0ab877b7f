"""Frozen CLIP class text features: per class, the renormalised mean of normalised features of
several texts (GPT-written descriptions, or prompt templates), cached on disk. A method may ask
for the renormalised mean of the raw features instead (`normalize_each=False`, PromptSRC's), or
for every text's normalised feature, unaveraged (`keep_each=True`, CoPrompt's: [C, T, E]).
"""
import hashlib
import json
import logging
import os
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch
from clip import clip as clip_api
from torch import Tensor

from ..errors import UserError
from ..files import atomic_torch_save, read_tensor_cache, tensors_fingerprint
from .encoders import PromptedTextEncoder
from .templates import GENERIC_TEMPLATES

log = logging.getLogger(__name__)


class DescriptionsError(UserError, ValueError):
    """A descriptions file is unreadable or does not cover the classes."""


def readable_name(classname: str) -> str:
    return classname.replace("_", " ")


def load_descriptions(path: str) -> Dict[str, List[str]]:
    """Read `{"class name": ["description", ...], ...}` (the release's gpt_file format)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DescriptionsError(f"{path} is not valid JSON ({err}); expected "
                                '{"class name": ["description", ...]}') from err
    if not isinstance(data, dict):
        raise DescriptionsError(f"{path} holds a {type(data).__name__}; expected an object "
                                '{"class name": ["description", ...]}')
    for name, texts in data.items():
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise DescriptionsError(f"{path}: the value of {name!r} must be a non-empty list of strings")
    return data


def texts_per_class(classnames: Sequence[str], descriptions: Optional[Dict[str, List[str]]] = None,
                    templates: Sequence[str] = GENERIC_TEMPLATES, source: str = "descriptions") -> List[List[str]]:
    """The texts whose features are averaged for each class."""
    names = [readable_name(c) for c in classnames]
    if descriptions is None:
        return [[t.format(name) for t in templates] for name in names]
    missing = [name for name in names if name not in descriptions]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DescriptionsError(
            f"{source} has no descriptions for {len(missing)} of {len(names)} classes ({shown}). "
            f"Add them, or remove the file to fall back to prompt templates.")
    return [list(descriptions[name]) for name in names]


PROGRESS_MIN_CHUNKS = 10  # class sets this large report their progress (every tenth)


@torch.no_grad()
def encode_texts_per_class(text_encoder: PromptedTextEncoder, texts: List[List[str]], chunk: int = 256,
                           progress: Optional[Callable[[str], None]] = None, normalize_each: bool = True,
                           keep_each: bool = False) -> Tensor:
    """[C, E] fp32: normalise each text feature (unless `normalize_each` is False: the raw
    features are averaged, as PromptSRC does), average per class, renormalise. Computed on the
    encoder's device, `chunk` texts at a time. `keep_each`: [C, T, E], every text's normalised
    feature (every class needs the same number T of texts)."""
    if keep_each and len({len(group) for group in texts}) > 1:
        counts = sorted({len(group) for group in texts})
        raise DescriptionsError(f"one feature per text needs the same number of texts for every class; "
                                f"the classes have {counts} texts: give each class as many descriptions")
    flat = [t for group in texts for t in group]
    device = text_encoder.text_projection.device
    n_chunks = -(-len(flat) // chunk)
    features = []
    for index, start in enumerate(range(0, len(flat), chunk)):
        tokens = clip_api.tokenize(flat[start:start + chunk], truncate=True).to(device)
        features.append(text_encoder(tokens).float())
        tenth_passed = (index + 1) * 10 // n_chunks > index * 10 // n_chunks
        if progress and n_chunks >= PROGRESS_MIN_CHUNKS and tenth_passed:
            done = min(start + chunk, len(flat))
            progress(f"class text features: {done}/{len(flat)} texts of {len(texts)} classes encoded")
    features = torch.cat(features)
    if normalize_each or keep_each:
        features = features / features.norm(dim=-1, keepdim=True)
    if keep_each:
        return features.reshape(len(texts), len(texts[0]), -1)
    out, start = [], 0
    for group in texts:
        mean = features[start:start + len(group)].mean(dim=0)
        out.append(mean / mean.norm())
        start += len(group)
    return torch.stack(out)


def text_tower_fingerprint(text_encoder: PromptedTextEncoder) -> str:
    return tensors_fingerprint(text_encoder.state_dict().items())


class ClassFeatureStore:
    """On-disk cache of class text features, keyed by backbone weights, class names and texts."""

    def __init__(self, directory: Optional[str], report: Callable[[str], None] = log.info):
        self.directory = os.path.expanduser(directory) if directory else None
        self.report = report
        # hashing the weights once per encoder is enough (frozen weights)
        self._fingerprints: "weakref.WeakKeyDictionary[PromptedTextEncoder, str]" = weakref.WeakKeyDictionary()

    def _fingerprint(self, text_encoder: PromptedTextEncoder) -> str:
        if text_encoder not in self._fingerprints:
            self._fingerprints[text_encoder] = text_tower_fingerprint(text_encoder)
        return self._fingerprints[text_encoder]

    def path_for(self, text_encoder, classnames, texts, normalize_each: bool = True,
                 keep_each: bool = False) -> Optional[str]:
        if not self.directory:
            return None
        key = {"backbone": self._fingerprint(text_encoder), "dtype": str(text_encoder.dtype),
               "classnames": list(classnames), "texts": texts}
        if not normalize_each:  # only then: the keys of features cached before stay valid
            key["mean"] = "raw"
        if keep_each:
            key["mean"] = "none: one feature per text"
        payload = json.dumps(key)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:32]
        return os.path.join(self.directory, "class_features", f"{digest}.pt")

    def features(self, text_encoder: PromptedTextEncoder, classnames: Sequence[str],
                 texts: List[List[str]], chunk: int = 256, normalize_each: bool = True,
                 keep_each: bool = False) -> Tensor:
        path = self.path_for(text_encoder, classnames, texts, normalize_each, keep_each)
        cached = read_tensor_cache(path, self.report)
        if isinstance(cached, dict) and "features" in cached:
            if cached.get("classnames") == list(classnames):
                self.report(f"class text features read from cache {path}")
                return cached["features"]
        features = encode_texts_per_class(text_encoder, texts, chunk, progress=self.report,
                                          normalize_each=normalize_each, keep_each=keep_each).cpu()
        if path:
            atomic_torch_save({"classnames": list(classnames), "features": features}, path)
            self.report(f"class text features cached at {path}")
        return features


def frozen_class_features(text_encoder: PromptedTextEncoder, classnames: Sequence[str],
                          descriptions_path: Optional[str] = None,
                          templates: Sequence[str] = GENERIC_TEMPLATES,
                          store: Optional[ClassFeatureStore] = None, chunk: int = 256,
                          normalize_each: bool = True, keep_each: bool = False) -> Tensor:
    """Class text features of frozen CLIP [C, E] fp32 on the CPU, from descriptions when the file
    exists, else templates, computed on the encoder's device (`normalize_each`, `keep_each` ([C,
    T, E]): see encode_texts_per_class). Which source was used, and the
    progress over large class sets, is reported through the store's `report` (logging by default)."""
    store = store or ClassFeatureStore(None)
    if descriptions_path and os.path.isfile(descriptions_path):
        texts = texts_per_class(classnames, load_descriptions(descriptions_path), source=descriptions_path)
        store.report(f"frozen class text features from descriptions in {descriptions_path} "
                     f"({sum(map(len, texts))} texts)")
    elif descriptions_path:
        texts = texts_per_class(classnames, None, templates)
        # prominent: the frozen features, and so the results, differ from the paper's setting
        store.report(f"WARNING: NO CLASS DESCRIPTIONS ({descriptions_path} not found): the frozen class text "
                     f"features come from {len(templates)} prompt templates instead, which changes the results. "
                     f"Point DATASET.DESCRIPTIONS_DIR at the release's gpt_file/ folder, or set "
                     f"DATASET.REQUIRE_DESCRIPTIONS True to make this an error.")
    else:  # the method's own recipe uses templates: nothing is missing
        texts = texts_per_class(classnames, None, templates)
        store.report(f"frozen class text features from {len(templates)} prompt templates")
    return store.features(text_encoder, classnames, texts, chunk, normalize_each, keep_each)
