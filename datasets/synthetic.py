"""Tiny synthetic datasets written in the exact on-disk layouts of CoOp's DATASETS.md.

Each class gets its own colour and stripe orientation plus noise, so a model can learn it. Used
by the tests and the demo; `python -m datasets.synthetic ROOT --dataset Caltech101` writes one.
"""
import argparse
import colorsys
import json
import os
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from .split_file_datasets import SPLIT_FILE_DATASETS

SPLITS = ("train", "val", "test")


def class_image(label: int, n_classes: int, index: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(1000 * label + index)
    hue = label / max(n_classes, 1)
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    grid = np.arange(size)
    stripes = ((grid[:, None] if label % 2 else grid[None, :]) // 4) % 2  # orientation by parity
    pixels = colour[None, None, :] * (0.6 + 0.4 * stripes[..., None])
    pixels = pixels + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _save(image: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=95)


def default_classnames(n: int) -> List[str]:
    words = ["apple", "bridge", "cactus", "dolphin", "engine", "falcon", "guitar", "harbor",
             "igloo", "jaguar", "kettle", "lantern", "meadow", "nebula", "orchid", "piano",
             "quartz", "river_boat", "saddle", "tulip", "umbrella", "violin", "walrus", "yacht"]
    return [words[i % len(words)] + ("" if i < len(words) else f"_{i // len(words)}") for i in range(n)]


def write_split_file_dataset(root: str, dataset: str, classnames: Sequence[str],
                             per_split: Dict[str, int]) -> str:
    """A dataset read through split_zhou_<Name>.json; returns its folder."""
    folder, image_root, split_file = SPLIT_FILE_DATASETS[dataset]
    base = os.path.join(root, folder)
    images = os.path.join(base, image_root)
    split = {}
    for part in SPLITS:
        rows = []
        for label, name in enumerate(classnames):
            for i in range(per_split[part]):
                rel = f"{name}/{part}_{i:03d}.jpg"
                _save(class_image(label, len(classnames), SPLITS.index(part) * 100 + i), os.path.join(images, rel))
                rows.append([rel, label, name.replace("_", " ")])
        split[part] = rows
    with open(os.path.join(base, split_file), "w") as handle:
        json.dump(split, handle)
    return base


def write_fgvc_aircraft(root: str, classnames: Sequence[str], per_split: Dict[str, int]) -> str:
    base = os.path.join(root, "fgvc_aircraft")
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    with open(os.path.join(base, "variants.txt"), "w") as handle:
        handle.write("".join(f"{name}\n" for name in classnames))
    image_id = 1000000
    for part in SPLITS:
        lines = []
        for label, name in enumerate(classnames):
            for i in range(per_split[part]):
                image_id += 1
                _save(class_image(label, len(classnames), SPLITS.index(part) * 100 + i),
                      os.path.join(base, "images", f"{image_id}.jpg"))
                lines.append(f"{image_id} {name}\n")
        with open(os.path.join(base, f"images_variant_{part}.txt"), "w") as handle:
            handle.write("".join(lines))
    return base


def wnids(n: int) -> List[str]:
    return [f"n{1440764 + 17 * i:08d}" for i in range(n)]


def write_classnames(path: str, ids: Sequence[str], classnames: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("".join(f"{w} {c}\n" for w, c in zip(ids, classnames)))


def write_class_folders(image_dir: str, folders: Sequence[str], count: int, offset: int = 0) -> None:
    for label, folder in enumerate(folders):
        for i in range(count):
            _save(class_image(label, len(folders), offset + i), os.path.join(image_dir, folder, f"{i:04d}.JPEG"))


def write_imagenet(root: str, classnames: Sequence[str], n_train: int, n_val: int) -> str:
    base = os.path.join(root, "imagenet")
    ids = wnids(len(classnames))
    write_classnames(os.path.join(base, "classnames.txt"), ids, classnames)
    write_class_folders(os.path.join(base, "images", "train"), ids, n_train)
    write_class_folders(os.path.join(base, "images", "val"), ids, n_val, offset=500)
    return base


# variant name: (folder, image folder, uses label-number folders, keeps a class subset)
IMAGENET_VARIANTS = {
    "ImageNetV2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", True, False),
    "ImageNetSketch": ("imagenet-sketch", "images", False, False),
    "ImageNetA": ("imagenet-adversarial", "imagenet-a", False, True),
    "ImageNetR": ("imagenet-rendition", "imagenet-r", False, True),
}


def write_imagenet_variant(root: str, variant: str, classnames: Sequence[str], count: int) -> str:
    folder, image_folder, numbered, subset = IMAGENET_VARIANTS[variant]
    base = os.path.join(root, folder)
    ids = wnids(len(classnames))
    write_classnames(os.path.join(base, "classnames.txt"), ids, classnames)  # all 1000 in reality
    kept = ids[::2] if subset else ids  # A and R hold 200 of the 1000 classes
    folders = [str(ids.index(w)) for w in kept] if numbered else kept
    write_class_folders(os.path.join(base, image_folder), folders, count, offset=800)
    if subset:
        with open(os.path.join(base, image_folder, "README.txt"), "w") as handle:
            handle.write("not a class\n")
    return base


FER_USAGE_OF_SPLIT = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


def write_fer2013(root: str, counts: Dict[str, int], n_classes: int = 7) -> str:
    """fer2013.csv as Kaggle ships it: emotion, pixels (48x48 grey values), Usage."""
    base = os.path.join(root, "fer2013")
    os.makedirs(base, exist_ok=True)
    lines = ["emotion,pixels,Usage\n"]
    for part in SPLITS:
        for i in range(counts[part]):
            for label in range(n_classes):
                face = np.asarray(class_image(label, n_classes, SPLITS.index(part) * 100 + i, 48).convert("L"))
                lines.append(f"{label},{' '.join(map(str, face.flatten()))},{FER_USAGE_OF_SPLIT[part]}\n")
    with open(os.path.join(base, "fer2013.csv"), "w") as handle:
        handle.write("".join(lines))
    return base


def write_rafdb(root: str, counts: Dict[str, int], n_classes: int = 7) -> str:
    """RAF-DB basic: Image/aligned/<split>_NNNNN_aligned.jpg (100x100) + EmoLabel list (labels 1-7)."""
    base = os.path.join(root, "RAF-DB", "basic")
    lines = []
    for part in ("train", "test"):
        number = 0
        for i in range(counts[part]):
            for label in range(n_classes):
                number += 1
                name = f"{part}_{number:05d}.jpg"
                _save(class_image(label, n_classes, SPLITS.index(part) * 100 + i, 100),
                      os.path.join(base, "Image", "aligned", name.replace(".jpg", "_aligned.jpg")))
                lines.append(f"{name} {label + 1}\n")
    os.makedirs(os.path.join(base, "EmoLabel"), exist_ok=True)
    with open(os.path.join(base, "EmoLabel", "list_patition_label.txt"), "w") as handle:
        handle.write("".join(lines))
    return base


def write_dataset(root: str, dataset: str, n_classes: int = 6, per_split=(4, 2, 3)) -> str:
    classnames = default_classnames(n_classes)
    counts = dict(zip(SPLITS, per_split))
    if dataset in SPLIT_FILE_DATASETS:
        return write_split_file_dataset(root, dataset, classnames, counts)
    if dataset == "FGVCAircraft":
        return write_fgvc_aircraft(root, [c.replace("_", "-") for c in classnames], counts)
    if dataset == "ImageNet":
        return write_imagenet(root, [c.replace("_", " ") for c in classnames], counts["train"], counts["test"])
    if dataset == "FER2013":
        return write_fer2013(root, counts, min(n_classes, 7))
    if dataset == "RAFDB":
        return write_rafdb(root, counts, min(n_classes, 7))
    if dataset in IMAGENET_VARIANTS:
        return write_imagenet_variant(root, dataset, [c.replace("_", " ") for c in classnames], counts["test"])
    raise KeyError(f"no synthetic writer for dataset {dataset!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root")
    parser.add_argument("--dataset", nargs="+", default=["Caltech101"], help="Dassl dataset names")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-split", type=int, nargs=3, default=(8, 4, 6), metavar=("TRAIN", "VAL", "TEST"))
    args = parser.parse_args(argv)
    for dataset in args.dataset:
        print(write_dataset(args.root, dataset, args.classes, args.per_split))


if __name__ == "__main__":
    main()
