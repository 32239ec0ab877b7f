"""The toy world's datasets in CoOp's on-disk layout, for the four tasks.

    python -m datasets.toy_world ROOT

writes under ROOT, deterministically (same bytes for the same version of the world):
  toy_objects/          ToyObjects: 40 colour-shape classes, the source (ImageNet's role)
  toy_objects_shifted/  ToyObjectsShifted: the same classes drawn as outlines on noisy
                        backgrounds (domain generalisation, the ImageNet variants' role)
  toy_patterns/ toy_textiles/
                        targets with other class sets (pattern-shape, colour-pattern)
                        for cross-dataset transfer
each as <folder>/images/<class>/<split>_NNN.png and <folder>/split_zhou_<Name>.json, plus
ROOT/gpt_file/<name>_prompt.json, class descriptions in the release's format (pass
DATASET.DESCRIPTIONS_DIR ROOT/gpt_file). Base-to-new and few-shot use any of them as CoOp
does (the first half of the labels are the base classes; Dassl caches few-shot subsets).
"""
import argparse
import json
import os
import sys
from typing import Dict

import numpy as np
from PIL import Image

from vlprompt.toyworld.render import render
from vlprompt.toyworld.world import (CLASS_SETS, SHIFTED, SOURCE, ClassSet, Domain, class_descriptions,
                                     sample_class_scene)

# Dassl name: (class set, domain, images per class in train/val/test, seed)
TOY_DATASETS = {
    "ToyObjects": ("ToyObjects", SOURCE, (20, 4, 12), 101),
    "ToyObjectsShifted": ("ToyObjects", SHIFTED, (4, 2, 12), 102),
    "ToyPatterns": ("ToyPatterns", SOURCE, (20, 4, 12), 103),
    "ToyTextiles": ("ToyTextiles", SOURCE, (20, 4, 12), 104),
}
SPLITS = ("train", "val", "test")


def folder_of(name: str) -> str:
    """ToyObjectsShifted -> toy_objects_shifted"""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def descriptions_file(name: str) -> str:
    """The file the HiCroPL trainer looks for: DESCRIPTIONS_DIR/<dataset name in lower case>_prompt.json."""
    return f"{name.lower()}_prompt.json"


def write_split(class_set: ClassSet, domain: Domain, part: str, count: int, seed: int, image_dir: str):
    """Render `count` images per class; returns the split's rows [relpath, label, classname]."""
    rng = np.random.default_rng([seed, SPLITS.index(part)])  # each split its own stream
    rows = []
    for label, classname in enumerate(class_set.classnames):
        folder = classname.replace(" ", "_")
        os.makedirs(os.path.join(image_dir, folder), exist_ok=True)
        for i in range(count):
            scene = sample_class_scene(class_set, label, rng, domain)
            relpath = f"{folder}/{part}_{i:03d}.png"
            Image.fromarray(render(scene, rng)).save(os.path.join(image_dir, relpath), optimize=False)
            rows.append([relpath, label, classname])
    return rows


def write_toy_dataset(root: str, name: str) -> str:
    """One dataset in CoOp's layout under root; returns its folder."""
    set_name, domain, counts, seed = TOY_DATASETS[name]
    class_set = CLASS_SETS[set_name]
    base = os.path.join(root, folder_of(name))
    split = {part: write_split(class_set, domain, part, count, seed, os.path.join(base, "images"))
             for part, count in zip(SPLITS, counts)}
    with open(os.path.join(base, f"split_zhou_{name}.json"), "w", encoding="utf-8") as handle:
        json.dump(split, handle)
    write_descriptions(os.path.join(root, "gpt_file", descriptions_file(name)), class_set)
    return base


def write_descriptions(path: str, class_set: ClassSet) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(class_descriptions(class_set), handle, indent=1)


def write_image_folder(folder: str, n_classes: int = 0, per_class: int = 36, seed: int = 105) -> str:
    """ToyObjects' photos as a folder of class folders (`<folder>/<class_name>/NNN.png`), the
    layout of DATASET.NAME ImageFolder, and `<folder>/classes.txt` naming the classes in the toy
    world's order (its first half are the base classes, as in ToyObjects); `n_classes` 0 = all 36."""
    class_set = CLASS_SETS["ToyObjects"]
    names = class_set.classnames[:n_classes or None]
    rng = np.random.default_rng(seed)
    for label, classname in enumerate(names):
        os.makedirs(os.path.join(folder, classname.replace(" ", "_")), exist_ok=True)
        for i in range(per_class):
            image = render(sample_class_scene(class_set, label, rng, SOURCE), rng)
            Image.fromarray(image).save(os.path.join(folder, classname.replace(" ", "_"), f"{i:03d}.png"))
    with open(os.path.join(folder, "classes.txt"), "w", encoding="utf-8") as handle:
        handle.writelines(f"{name.replace(' ', '_')} {name}\n" for name in names)
    return folder


def write_toy_world(root: str, names=tuple(TOY_DATASETS)) -> Dict[str, str]:
    return {name: write_toy_dataset(root, name) for name in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the data root (DATA): the dataset folders go inside it")
    parser.add_argument("--dataset", nargs="+", default=list(TOY_DATASETS), metavar="NAME",
                        help=f"which datasets (default: all of {', '.join(TOY_DATASETS)})")
    parser.add_argument("--image-folder", action="store_true",
                        help="write ToyObjects' photos into ROOT as class folders instead (DATASET.NAME "
                             "ImageFolder's layout, with ROOT/classes.txt in the toy world's class order)")
    parser.add_argument("--classes", type=int, default=0, help="--image-folder: the first N classes (default all 36)")
    args = parser.parse_args(argv)
    if args.image_folder:
        print(f"ToyObjects as class folders: {write_image_folder(args.root, args.classes)}")
        return 0
    unknown = [n for n in args.dataset if n not in TOY_DATASETS]
    if unknown:
        print(f"--dataset {' '.join(unknown)}: unknown; choose from {', '.join(TOY_DATASETS)}", file=sys.stderr)
        return 2
    for name, folder in write_toy_world(args.root, args.dataset).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
