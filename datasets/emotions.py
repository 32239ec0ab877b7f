"""Facial expression datasets: FER-2013 (Kaggle CSV) and RAF-DB (basic set).

FER-2013: <root>/fer2013/fer2013.csv with columns emotion (0-6), pixels (2304 grey values of a
48x48 face) and Usage; Training -> train, PublicTest -> val (model selection), PrivateTest ->
test. Dassl reads images from paths, so the CSV is decoded once into PNG files next to it
(`fer2013/images/`, rebuilt when the CSV changes; in the feature cache folder if the data folder
is read-only).

RAF-DB: <root>/RAF-DB/basic/Image/aligned/*_aligned.jpg and EmoLabel/list_patition_label.txt
("train_00001.jpg 5", labels 1-7). DATASET.RAF_LABEL_ORDER "raf" keeps RAF's order, "fer" maps to
FER-2013's order (for training on one and testing on the other). RAF-DB has no validation split.

Class names are the seven emotions, so CLIP-based trainers run on the same data (at 224 px).
"""
import csv
import hashlib
import json
import os
import shutil
from typing import Dict, List, Tuple

import numpy as np
from dassl.data.datasets import DATASET_REGISTRY
from PIL import Image

from vlprompt.methods.edgecnn import EMOTIONS_FER

from vlprompt.errors import InvalidValue, UserError
from vlprompt.files import cache_root

from .coop_split import CoOpDataset, DatasetLayoutError, make_datum, require

FER_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER_SIDE = 48
RAF_EMOTIONS = ("surprised", "fearful", "disgusted", "happy", "sad", "angry", "neutral")  # labels 1..7
RAF_TO_FER = {raf: EMOTIONS_FER.index(name) for raf, name in enumerate(RAF_EMOTIONS, start=1)}
RAF_LABEL_ORDERS = ("raf", "fer")


class FerRowError(UserError, ValueError):
    """A malformed row of fer2013.csv; the message names the line and what is wrong."""


def read_fer_csv(path: str) -> List[Tuple[int, int, np.ndarray, str]]:
    """(line number, emotion, 48x48 uint8 face, split) for every row of a fer2013.csv."""
    rows = []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        columns = {name.strip(): i for i, name in enumerate(header or [])}
        missing = [c for c in ("emotion", "pixels", "Usage") if c not in columns]
        if missing:
            raise FerRowError(f"{path}, line 1: the header lacks column(s) {missing}; expected emotion,pixels,Usage")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            rows.append((line, *_parse_fer_row(path, line, row, columns)))
    return rows


def _parse_fer_row(path, line, row, columns):
    def fail(what):
        raise FerRowError(f"{path}, line {line}: {what}")

    if len(row) != len(columns):
        fail(f"{len(row)} fields, expected {len(columns)} (emotion,pixels,Usage)")
    emotion, pixels, usage = (row[columns[c]].strip() for c in ("emotion", "pixels", "Usage"))
    if not emotion.isdigit() or not 0 <= int(emotion) <= 6:
        fail(f"emotion {emotion!r} is not an integer 0-6")
    if usage not in FER_USAGE:
        fail(f"Usage {usage!r} is not one of {sorted(FER_USAGE)}")
    values = pixels.split()
    if len(values) != FER_SIDE * FER_SIDE:
        fail(f"{len(values)} pixel values, expected {FER_SIDE * FER_SIDE} (48x48)")
    try:
        face = np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        fail("pixels must be integers 0-255 separated by spaces")
    if face.min() < 0 or face.max() > 255:
        fail("pixel values must lie in 0-255")
    return int(emotion), face.astype(np.uint8).reshape(FER_SIDE, FER_SIDE), FER_USAGE[usage]


def _csv_stamp(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def decode_fer_images(csv_path: str, folder: str) -> Dict[str, List[Tuple[str, int]]]:
    """Write every face of the CSV as a PNG under `folder` (once) and return split -> (path, label).

    The folder is built under a temporary name and renamed, so an interrupted decode leaves
    nothing half-written; `index.json` records the CSV's size and time to detect a new CSV.
    """
    index_path = os.path.join(folder, "index.json")
    stamp = _csv_stamp(csv_path)
    if os.path.isfile(index_path):
        with open(index_path) as handle:
            index = json.load(handle)
        if index.get("csv_stamp") == stamp:
            return {split: [(os.path.join(folder, rel), label) for rel, label in items]
                    for split, items in index["splits"].items()}
    print(f"Decoding {csv_path} into {folder} (once)")
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    splits: Dict[str, List[Tuple[str, int]]] = {split: [] for split in FER_USAGE.values()}
    for line, emotion, face, split in read_fer_csv(csv_path):
        rel = os.path.join(split, f"{line:06d}.png")
        os.makedirs(os.path.join(tmp, split), exist_ok=True)
        Image.fromarray(face, mode="L").save(os.path.join(tmp, rel))
        splits[split].append((rel, emotion))
    with open(os.path.join(tmp, "index.json"), "w") as handle:
        json.dump({"csv_stamp": stamp, "splits": splits}, handle)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return {split: [(os.path.join(folder, rel), label) for rel, label in items] for split, items in splits.items()}


@DATASET_REGISTRY.register()
class FER2013(CoOpDataset):
    dataset_dir = "fer2013"
    image_dir = "images"
    all_classnames = EMOTIONS_FER

    def read_splits(self):
        csv_path = require(os.path.join(self.dataset_dir, "fer2013.csv"),
                           "the Kaggle FER-2013 file fer2013.csv (columns emotion, pixels, Usage)")
        try:
            splits = decode_fer_images(csv_path, self.image_dir)
        except OSError as err:  # read-only data folder: decode into the cache folder instead
            digest = hashlib.sha256(os.path.abspath(csv_path).encode()).hexdigest()[:16]
            folder = os.path.join(cache_root(), "fer2013_images", digest)
            print(f"Cannot write images next to {csv_path} ({err}); decoding them into {folder}")
            splits = decode_fer_images(csv_path, folder)
        return tuple([make_datum(path, label, EMOTIONS_FER[label], csv_path) for path, label in splits[part]]
                     for part in ("train", "val", "test"))


@DATASET_REGISTRY.register()
class RAFDB(CoOpDataset):
    dataset_dir = "RAF-DB/basic"
    image_dir = "Image/aligned"
    val_split = "none"

    def read_splits(self):
        # a stock Dassl config (CoOp/MaPLe code) has no such key: RAF-DB's own order then
        order = self.cfg.DATASET.get("RAF_LABEL_ORDER", "raf")
        if order not in RAF_LABEL_ORDERS:
            raise InvalidValue(f"DATASET.RAF_LABEL_ORDER={order!r} is invalid: must be one of {RAF_LABEL_ORDERS}")
        names = RAF_EMOTIONS if order == "raf" else EMOTIONS_FER
        self.all_classnames = names
        labels_file = require(os.path.join(self.dataset_dir, "EmoLabel", "list_patition_label.txt"),
                              "RAF-DB's label list (basic set)")
        splits = {"train": [], "test": []}
        with open(labels_file) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                name, label = parse_raf_line(labels_file, line_number, line)
                label = label - 1 if order == "raf" else RAF_TO_FER[label]
                image = os.path.join(self.image_dir, name.replace(".jpg", "_aligned.jpg"))
                splits[name.split("_")[0]].append(make_datum(image, label, names[label], labels_file))
        return splits["train"], None, splits["test"]


def parse_raf_line(path: str, line_number: int, line: str) -> Tuple[str, int]:
    parts = line.split()
    if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
        raise DatasetLayoutError(f"{path}, line {line_number}: expected '<train|test>_NNNNN.jpg <label 1-7>', "
                                 f"got {line.strip()!r}")
    if not parts[0].startswith(("train_", "test_")):
        raise DatasetLayoutError(f"{path}, line {line_number}: image {parts[0]!r} is neither train_* nor test_*")
    return parts[0], int(parts[1])
