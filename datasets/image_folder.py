"""Your own images as a CoOp dataset: `DATASET.NAME ImageFolder`.

DATASET.IMAGE_FOLDER (absolute, or relative to --root / DATASET.ROOT; "" = the root itself) is
one of:
- a folder of class folders, `<class name>/*.jpg|png|...`;
- the same divided into `train/`, `test/` and optionally `val/` (CoOp's 20% of train otherwise);
- a .csv or .json list of (image path, class name) rows, paths relative to the list's folder
  (CSV: `path,label` per line, a header line allowed; JSON: [[path, label], ...] or
  [{"path": ..., "label": ...}, ...]).

On first use a split file in CoOp's format (`split_zhou_ImageFolder.json`, or
`split_zhou_<list stem>.json` for a list) is written next to the data, or under the cache folder
when the data folder is read-only; later runs read it, so the few-shot cache, base/new and every
seed see the same split. The split is CoOp's per-class one (DTD's read_and_split_data: 50% train,
20% val, 30% test, shuffled per class), seeded by the class folder's name, so adding a class does
not reshuffle the others.

Class names: folder names (or labels) with underscores and dashes as spaces, or
DATASET.CLASSNAMES_FILE (relative to the root as IMAGE_FOLDER; `<folder or label> <class name>` per line, in the label order wanted:
the first half are the base classes). Labels follow that file's order, else sorted folder names.

Bad data stops the run before anything is written, with one message: an empty class folder, a
single class, unreadable or non-image files, a class with fewer training images than
DATASET.NUM_SHOTS, two folders whose names normalise to one class name. Nothing the toolkit writes
(the split file, `split_fewshot/`) or any hidden entry is taken for a class.
"""
import csv
import hashlib
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from dassl.data.datasets import DATASET_REGISTRY

from vlprompt.errors import UserError
from vlprompt.files import OutputWriteError, atomic_write_text, cache_root

from .coop_split import CoOpDataset, FewShotCache, read_split_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_FILE = "split_zhou_ImageFolder.json"
FEWSHOT_FOLDER = "split_fewshot"
SUBFOLDERS = ("train", "val", "test")
P_TRAIN, P_VAL = 0.5, 0.2  # CoOp's per-class proportions (DTD's read_and_split_data): 50/20/30
P_VAL_OF_TRAIN = 0.2  # CoOp's split_trainval: val taken from a train folder when there is no val/
SPLIT_SEED = 1  # CoOp's splits were made with seed 1


class BadDataError(UserError, ValueError):
    """The images or their labels cannot make a dataset; the message says which and the fix."""


def class_name(folder: str) -> str:
    """'red_circle' / 'red-circle' -> 'red circle'."""
    return re.sub(r"\s+", " ", folder.replace("_", " ").replace("-", " ")).strip()


def _toolkit_written(name: str) -> bool:
    """Entries this toolkit writes among the data (or hidden ones): never a class."""
    return name.startswith(".") or name == FEWSHOT_FOLDER or (name.startswith("split_") and name.endswith(".json"))


def _shown(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _unreadable(path: str) -> str:
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.convert("RGB")
        return ""
    except Exception as err:  # noqa: BLE001  PIL raises many kinds
        return type(err).__name__


# (absolute path, label key) rows per part; the label key is a folder name or a list's label
Rows = Dict[str, List[Tuple[str, str]]]


class ImageFolderSource:
    """What DATASET.IMAGE_FOLDER points at: its images and labels, checked; the split to write."""

    def __init__(self, cfg):
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT or "."))
        given = os.path.expanduser(cfg.DATASET.get("IMAGE_FOLDER", ""))  # a stock Dassl config lacks the key
        self.path = os.path.normpath(os.path.join(root, given)) if given else root
        self.key = "DATASET.IMAGE_FOLDER" if given else "--root / DATASET.ROOT"
        self.is_list = os.path.isfile(self.path) and self.path.lower().endswith((".csv", ".json"))
        if not self.is_list and not os.path.isdir(self.path):
            raise BadDataError(f"{self.key}={self.path} is neither a folder of class folders nor a .csv/.json "
                               f"list of (path, label): set DATASET.IMAGE_FOLDER to one")
        self.folder = os.path.dirname(self.path) if self.is_list else self.path
        stem = os.path.splitext(os.path.basename(self.path))[0]
        self.split_name = f"split_zhou_{stem}.json" if self.is_list else SPLIT_FILE
        self.fewshot_folder = os.path.join(self.folder, FEWSHOT_FOLDER, stem) if self.is_list else \
            os.path.join(self.folder, FEWSHOT_FOLDER)
        names = os.path.expanduser(cfg.DATASET.get("CLASSNAMES_FILE", ""))
        self.classnames_file = os.path.normpath(os.path.join(root, names)) if names else ""
        # a read-only data folder: the split goes under the cache folder, keyed by the data's path
        digest = hashlib.sha256(self.path.encode()).hexdigest()[:16]
        self.fallback = os.path.join(cache_root(), "image_folder", f"{os.path.basename(self.folder)}-{digest}")

    # ---- where the split lives --------------------------------------------------------------
    def existing_split(self) -> Optional[str]:
        for folder in (self.folder, self.fallback):
            path = os.path.join(folder, self.split_name)
            if os.path.isfile(path):
                return path
        return None

    def write_split(self, split: dict) -> str:
        text = json.dumps(split, indent=1)
        path = os.path.join(self.folder, self.split_name)
        try:
            atomic_write_text(path, text)
        except OutputWriteError as err:
            path = os.path.join(self.fallback, self.split_name)
            print(f"Cannot write the split file next to the data ({err.__cause__}); writing it to {path}")
            atomic_write_text(path, text)
        print(f"Split of {self.path} written to {path} (CoOp's format; delete it to split again)")
        return path

    # ---- reading the images -----------------------------------------------------------------
    def rows(self) -> Rows:
        """{"all": rows} for a plain folder or a list, {"train", "test"[, "val"]} for subfolders."""
        if self.is_list:
            return {"all": self._list_rows()}
        parts = [p for p in SUBFOLDERS if os.path.isdir(os.path.join(self.path, p))]
        if "train" in parts:
            if "test" not in parts:
                raise BadDataError(f"{self.path} has a train/ folder but no test/ folder: add test/<class>/ "
                                   f"images, or put the class folders directly in {self.path}")
            return {part: self._folder_rows(os.path.join(self.path, part)) for part in parts}
        return {"all": self._folder_rows(self.path)}

    def _folder_rows(self, folder: str) -> List[Tuple[str, str]]:
        classes = sorted(n for n in os.listdir(folder)
                         if not _toolkit_written(n) and os.path.isdir(os.path.join(folder, n)))
        rows, empty, foreign = [], [], []
        for name in classes:
            files = sorted(f for f in os.listdir(os.path.join(folder, name)) if not f.startswith("."))
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            foreign += [os.path.join(folder, name, f) for f in files if f not in images]
            if not images:
                empty.append(os.path.join(folder, name))
            rows += [(os.path.join(folder, name, f), name) for f in images]
        if empty:
            raise BadDataError(f"empty class folder(s) {_shown(empty)}: every class needs images "
                               f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
        if foreign:
            raise BadDataError(f"not image files among the classes: {_shown(foreign)} (images end in "
                               f"{', '.join(IMAGE_EXTENSIONS)}); move them out of the class folders")
        return rows

    def _list_rows(self) -> List[Tuple[str, str]]:
        try:
            with open(self.path, encoding="utf-8", newline="") as handle:
                if self.path.lower().endswith(".json"):
                    raw = json.load(handle)
                    items = [(r.get("path"), r.get("label")) if isinstance(r, dict) else tuple(r) for r in raw]
                else:
                    items = [tuple(r) for r in csv.reader(handle) if r]
                    if items and [c.strip().lower() for c in items[0][:2]] == ["path", "label"]:
                        items = items[1:]
        except (ValueError, TypeError, AttributeError) as err:
            raise BadDataError(f"{self.path} is not a list of (path, label) rows ({err}); write CSV lines "
                               f"'path,label' or JSON [[path, label], ...]") from err
        rows = []
        for number, item in enumerate(items, 1):
            if len(item) != 2 or not all(isinstance(v, str) and v.strip() for v in item):
                raise BadDataError(f"{self.path}: row {number} = {list(item)!r} is not (path, label)")
            rows.append((os.path.join(self.folder, item[0].strip()), item[1].strip()))
        missing = [p for p, _ in rows if not os.path.isfile(p)]
        if missing:
            raise BadDataError(f"{self.path} lists images that do not exist: {_shown(missing)}")
        return rows

    def names(self, keys: Sequence[str]) -> Dict[str, str]:
        """{label key: class name}, in label order (the classes file's order, else sorted keys)."""
        if not self.classnames_file:
            return {key: class_name(key) for key in sorted(keys)}
        if not os.path.isfile(self.classnames_file):
            raise BadDataError(f"DATASET.CLASSNAMES_FILE={self.classnames_file} does not exist")
        named = {}
        with open(self.classnames_file, encoding="utf-8") as handle:
            for line in filter(None, (line.strip() for line in handle)):
                key, _, name = line.partition(" ")
                named[key] = name.strip() or class_name(key)
        unnamed = sorted(set(keys) - set(named))
        if unnamed:
            raise BadDataError(f"DATASET.CLASSNAMES_FILE={self.classnames_file} names no class for "
                               f"{_shown(unnamed)}: add a line '<folder> <class name>' for each")
        return {key: name for key, name in named.items() if key in set(keys)}

    # ---- checks and the split ---------------------------------------------------------------
    def split(self, shots: int, check_images: bool = True, allow_fewer: bool = False) -> dict:
        """CoOp's split {"train"|"val"|"test": [[relpath, label, classname], ...]}, every bad-data
        case checked first."""
        rows = self.rows()
        keys = sorted({key for part in rows.values() for _, key in part})
        names = self.names(keys)
        if len(names) < 2:
            raise BadDataError(f"{self.path} has {len(names)} class ({_shown(list(names.values())) or 'none'}): "
                               f"a classifier needs at least 2 classes (one folder of images per class)")
        seen: Dict[str, str] = {}
        for key, name in names.items():
            other = seen.setdefault(name.lower(), key)
            if other != key:
                raise BadDataError(f"{other!r} and {key!r} both give the class name {name!r}: rename one "
                                   f"folder (or name them in DATASET.CLASSNAMES_FILE)")
        if check_images:
            self.check_images([p for part in rows.values() for p, _ in part])
        labels = {key: label for label, key in enumerate(names)}
        parts = self._divide(rows)
        check_shots([names[key] for _, key in parts["train"]], shots, allow_fewer)
        relative = lambda p: os.path.relpath(p, self.folder)  # noqa: E731
        return {part: [[relative(p), labels[key], names[key]] for p, key in items] for part, items in parts.items()}

    def _divide(self, rows: Rows) -> Rows:
        by_class = lambda items: {k: [p for p, key in items if key == k] for k in sorted({k for _, k in items})}  # noqa
        out = {"train": [], "val": [], "test": []}
        if "all" in rows:
            for key, paths in by_class(rows["all"]).items():
                paths = self._shuffled(paths, key)
                n_train, n_val = round(len(paths) * P_TRAIN), round(len(paths) * P_VAL)
                if n_train < 1 or n_val < 1 or len(paths) - n_train - n_val < 1:
                    raise BadDataError(f"class {key!r} has {len(paths)} images: at least 4 are needed to split "
                                       f"it into train, val and test (CoOp's 50/20/30%)")
                out["train"] += [(p, key) for p in paths[:n_train]]
                out["val"] += [(p, key) for p in paths[n_train:n_train + n_val]]
                out["test"] += [(p, key) for p in paths[n_train + n_val:]]
            return out
        out["test"] = rows["test"]
        if "val" in rows:
            out["train"], out["val"] = rows["train"], rows["val"]
            return out
        for key, paths in by_class(rows["train"]).items():  # CoOp's split_trainval
            paths = self._shuffled(paths, key)
            n_val = max(1, round(len(paths) * P_VAL_OF_TRAIN))
            out["train"] += [(p, key) for p in paths[n_val:]]
            out["val"] += [(p, key) for p in paths[:n_val]]
        return out

    @staticmethod
    def _shuffled(paths: List[str], key: str) -> List[str]:
        paths = sorted(paths)
        random.Random(f"{SPLIT_SEED}:{key}").shuffle(paths)  # per class: a new class reshuffles no other
        return paths

    @staticmethod
    def check_images(paths: Sequence[str]) -> None:
        with ThreadPoolExecutor(8) as pool:  # PIL decodes outside the GIL
            reasons = list(pool.map(_unreadable, paths))
        bad = [f"{p} ({r})" for p, r in zip(paths, reasons) if r]
        if bad:
            raise BadDataError(f"{len(bad)} file(s) cannot be read as images: {_shown(bad)}; replace or remove them")


def check_shots(train_classnames: Sequence[str], shots: int, allow_fewer: bool = False) -> None:
    """NUM_SHOTS training images per class, or one message naming the classes that have fewer
    (with DATASET.ALLOW_FEWER_SHOTS the run goes on, and the few-shot sampling says so)."""
    counts: Dict[str, int] = {}
    for name in train_classnames:
        counts[name] = counts.get(name, 0) + 1
    few = [f"{name} ({n})" for name, n in counts.items() if n < shots]
    if shots >= 1 and few and not allow_fewer:
        raise BadDataError(
            f"DATASET.NUM_SHOTS={shots} but these classes have fewer training images: {_shown(few, 8)}; "
            f"the run does not go on with fewer: add images, lower DATASET.NUM_SHOTS to at most "
            f"{min(counts.values())}, or set DATASET.ALLOW_FEWER_SHOTS True to train on the images there are")


_CHECKED = set()  # (path, shots) checked in this process: check_cfg then the dataset need not decode twice


def check_image_folder(cfg) -> None:
    """Every bad-data case, before the run writes anything (train.py's start checks call it)."""
    source = ImageFolderSource(cfg)
    path = source.existing_split()
    allow_fewer = bool(cfg.DATASET.get("ALLOW_FEWER_SHOTS", False))
    if path is None:
        source.split(cfg.DATASET.NUM_SHOTS, allow_fewer=allow_fewer)
        _CHECKED.add((source.path, cfg.DATASET.NUM_SHOTS))
        return
    with open(path, encoding="utf-8") as handle:
        split = json.load(handle)
    check_shots([row[2] for row in split.get("train", []) if isinstance(row, list) and len(row) == 3],
                cfg.DATASET.NUM_SHOTS, allow_fewer)


@DATASET_REGISTRY.register()
class ImageFolder(CoOpDataset):
    """Your own images: a folder of class folders or a list of (path, label); see the module doc."""

    check_cfg = staticmethod(check_image_folder)

    def __init__(self, cfg):
        self.source = ImageFolderSource(cfg)
        super().__init__(cfg)

    def dataset_folder(self, cfg) -> str:
        return self.source.folder

    def read_splits(self):
        path = self.source.existing_split()
        if path is None:
            shots = self.cfg.DATASET.NUM_SHOTS
            split = self.source.split(shots, check_images=(self.source.path, shots) not in _CHECKED,
                                      allow_fewer=bool(self.cfg.DATASET.get("ALLOW_FEWER_SHOTS", False)))
            path = self.source.write_split(split)
        return read_split_json(path, self.source.folder)

    def few_shot_cache(self) -> FewShotCache:
        cache = FewShotCache(self.source.folder, cache_root())
        cache.primary = self.source.fewshot_folder
        return cache
