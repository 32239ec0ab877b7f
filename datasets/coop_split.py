"""Datasets laid out as CoOp's DATASETS.md describes, read the way CoOp reads them.

- `split_zhou_<Name>.json`: {"train"|"val"|"test": [[relative image path, label, class name], ...]}
- few-shot subsets cached as `<dataset>/split_fewshot/shot_{K}-seed_{S}.pkl` (a pickle of
  {"train": [Datum], "val": [Datum]} made by Dassl's `generate_fewshot_dataset`), so a cache made
  by CoOp/MaPLe/PromptSRC is reused and the same seed selects the same images;
- base/new: the first ceil(n/2) labels / the rest, relabelled from 0 (CoOp's subsample_classes).
"""
import json
import math
import os
import pickle
from typing import List, Sequence, Tuple

from dassl.data.datasets import Datum, DatasetBase

from vlprompt.errors import InvalidValue, UserError
from vlprompt.files import OutputWriteError, atomic_write, cache_root, read_cache

DATASETS_DOC = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset folder, split file or image is missing or malformed."""


def require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DatasetLayoutError(f"{path} not found: {what} (layout: {DATASETS_DOC}; "
                                 f"the data root is --root / DATASET.ROOT).")
    return path


def make_datum(impath: str, label: int, classname: str, source: str) -> Datum:
    if not os.path.isfile(impath):
        raise DatasetLayoutError(f"image {impath} listed in {source} does not exist")
    return Datum(impath=impath, label=int(label), classname=classname)


def read_split_json(path: str, image_root: str) -> Tuple[List[Datum], List[Datum], List[Datum]]:
    try:
        with open(path, encoding="utf-8") as handle:
            split = json.load(handle)
    except json.JSONDecodeError as err:
        raise DatasetLayoutError(f"{path} is not valid JSON ({err}); re-download it ({DATASETS_DOC})") from err
    out = []
    for part in ("train", "val", "test"):
        items = split.get(part) if isinstance(split, dict) else None
        if not isinstance(items, list):
            raise DatasetLayoutError(f"{path} has no '{part}' list; expected CoOp's split format "
                                     f"{{'train': [[path, label, classname], ...], 'val': ..., 'test': ...}}")
        data = []
        for row, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 3):
                raise DatasetLayoutError(f"{path}: {part}[{row}] = {item!r} is not [path, label, classname]")
            data.append(make_datum(os.path.join(image_root, item[0]), item[1], item[2], path))
        out.append(data)
    return tuple(out)


def subsample_classes(*splits: Sequence[Datum], subsample: str = "all"):
    """CoOp's base-to-new split: labels of the first split sorted, first ceil(n/2) = base."""
    if subsample not in ("all", "base", "new"):
        raise InvalidValue(f"DATASET.SUBSAMPLE_CLASSES={subsample!r} is invalid: must be all, base or new")
    if subsample == "all":
        return splits
    labels = sorted({item.label for item in splits[0]})
    half = math.ceil(len(labels) / 2)
    selected = labels[:half] if subsample == "base" else labels[half:]
    relabel = {old: new for new, old in enumerate(selected)}
    return tuple(
        [Datum(impath=item.impath, label=relabel[item.label], classname=item.classname)
         for item in split if item.label in relabel]
        for split in splits)


def _read_pickle(path: str):
    with open(path, "rb") as handle:
        return pickle.load(handle)


class FewShotCache:
    """`split_fewshot/shot_{K}-seed_{S}.pkl` next to the data, or in a writable fallback folder
    when the dataset folder is read-only (shared storage)."""

    def __init__(self, dataset_dir: str, fallback_root: str):
        self.primary = os.path.join(dataset_dir, "split_fewshot")
        name = os.path.basename(os.path.normpath(dataset_dir))
        self.fallback = os.path.join(fallback_root, "split_fewshot", name)

    def _name(self, shots: int, seed: int) -> str:
        return f"shot_{shots}-seed_{seed}.pkl"

    def load(self, shots: int, seed: int):
        for folder in (self.primary, self.fallback):
            path = os.path.join(folder, self._name(shots, seed))
            data = read_cache(path, _read_pickle)
            if isinstance(data, dict) and "train" in data:
                print(f"Loading preprocessed few-shot data from {path}")
                return data
        return None

    def save(self, data: dict, shots: int, seed: int) -> str:
        payload = lambda handle: pickle.dump(data, handle, protocol=pickle.HIGHEST_PROTOCOL)
        path = os.path.join(self.primary, self._name(shots, seed))
        try:
            atomic_write(path, payload)
        except OutputWriteError as err:
            path = os.path.join(self.fallback, self._name(shots, seed))
            print(f"Cannot write the few-shot cache next to the data ({err.__cause__}); "
                  f"writing it to {path} instead")
            atomic_write(path, payload)
        print(f"Saving preprocessed few-shot data to {path}")
        return path


class CoOpDataset(DatasetBase):
    """Base of the CoOp-format datasets: subclasses name their folders and split file."""

    dataset_dir = ""  # folder under the data root
    image_dir = "images"  # image root inside dataset_dir ("" = dataset_dir itself)
    split_file = ""  # split_zhou_<Name>.json inside dataset_dir
    # "own": a validation split of its own; "test": the test set doubles as val (ImageNet, as in
    # CoOp); "none": no validation split (RAF-DB)
    val_split = "own"
    all_classnames = ()  # set by datasets whose label set is fixed (the seven emotions)

    def __init__(self, cfg):
        self.cfg = cfg
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.dataset_dir = require(os.path.join(root, type(self).dataset_dir),
                                   f"the folder of DATASET.NAME={type(self).__name__}")
        self.image_dir = os.path.join(self.dataset_dir, type(self).image_dir)
        train, val, test = self.read_splits()
        train, val = self.few_shot(cfg, train, val)
        subsample = cfg.DATASET.SUBSAMPLE_CLASSES
        if self.val_split == "own":
            train, val, test = subsample_classes(train, val, test, subsample=subsample)
        else:
            train, test = subsample_classes(train, test, subsample=subsample)
            val = test if self.val_split == "test" else None
        super().__init__(train_x=train, val=val, test=test)
        if self.all_classnames and subsample == "all":
            # a fixed vocabulary: all classes count even if a small split lacks some of them
            self._classnames = list(self.all_classnames)
            self._lab2cname = dict(enumerate(self.all_classnames))
            self._num_classes = len(self.all_classnames)

    def read_splits(self):
        path = require(os.path.join(self.dataset_dir, self.split_file),
                       f"CoOp's split file {self.split_file} for {type(self).__name__}")
        return read_split_json(path, self.image_dir)

    def few_shot(self, cfg, train, val):
        shots = cfg.DATASET.NUM_SHOTS
        if shots < 1:
            return train, val
        # DATASET.* keys only (as CoOp's classes), so the datasets build under a stock Dassl
        # config too: the fallback for a read-only data folder is $VLPROMPT_CACHE or ~/.cache/vlprompt
        allow_fewer = bool(cfg.DATASET.get("ALLOW_FEWER_SHOTS", False))
        cache = FewShotCache(self.dataset_dir, cache_root())
        data = cache.load(shots, cfg.SEED)
        if data is None:
            train = self.generate_fewshot_dataset(train, num_shots=shots)
            check_shots(train, shots, allow_fewer, type(self).__name__)  # before the subset is cached
            data = {"train": train}
            if self.val_split == "own":
                data["val"] = self.generate_fewshot_dataset(val, num_shots=min(shots, 4))
            cache.save(data, shots, cfg.SEED)
        else:
            check_shots(data["train"], shots, allow_fewer, type(self).__name__)
        return data["train"], data.get("val", val)


def check_shots(few_shot_train: Sequence[Datum], shots: int, allow_fewer: bool, dataset: str) -> None:
    """Dassl's sampling takes every image of a class with fewer than `shots`: such a run would
    carry a NUM_SHOTS it did not train with. Refused, unless DATASET.ALLOW_FEWER_SHOTS, and then said."""
    counts = {}
    for item in few_shot_train:
        counts[item.classname] = counts.get(item.classname, 0) + 1
    short = {name: n for name, n in counts.items() if n < shots}
    if not short:
        return
    listed = ", ".join(f"{name} {n}" for name, n in sorted(short.items(), key=lambda kv: (kv[1], kv[0]))[:8])
    more = f" and {len(short) - 8} more" if len(short) > 8 else ""
    what = (f"DATASET.NUM_SHOTS={shots} but {len(short)} of {len(counts)} classes of {dataset} have fewer "
            f"training images ({listed}{more})")
    if not allow_fewer:
        raise InvalidValue(f"{what}: the run would train on fewer and be labelled {shots}-shot. Use DATASET.NUM_SHOTS "
                           f"{min(short.values())} or less, or set DATASET.ALLOW_FEWER_SHOTS True to train on the "
                           f"images there are (the log, run.json and the report then say how many)")
    print(f"warning: {what}; DATASET.ALLOW_FEWER_SHOTS is True: those classes train on fewer "
          f"(at least {min(short.values())} of {shots} per class)")
