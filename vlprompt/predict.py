"""Classify images with a trained run: the top classes per image, with their probabilities.

    python -m vlprompt.predict RUN_DIR IMAGE_OR_FOLDER... [--classes "a,b,c" | --classes-file F]
                               [--topk 5] [--json] [--backbone-path FILE]

RUN_DIR is a training run's folder (--output-dir; a zero-shot CLIP evaluation's too) or one of
its checkpoint files. The classes are those the run was trained on unless --classes or
--classes-file (one name per line) gives others: a prompt trained on base classes classifies
names it never saw. Folders are searched for images recursively and classified in batches, with a
progress bar. Output: one line per image, or with --json one JSON object per image,
{"image": path, "top": [[class, probability], ...]}. --backbone-path is needed only when the
run's CLIP weights are no longer where the run found them.
"""
import argparse
import json
import os
import sys
from typing import Iterator, List, Sequence

from .errors import report_user_errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_paths(inputs: Sequence[str]) -> List[str]:
    from .classifier import ClassifierError
    paths = []
    for given in inputs:
        if os.path.isdir(given):
            for folder, subfolders, files in os.walk(given):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "split_fewshot")
                paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(given):
            paths.append(given)
        else:
            raise ClassifierError(f"{given}: no such image or folder")
    if not paths:
        raise ClassifierError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return paths


def class_list(args) -> List[str]:
    from .classifier import ClassifierError
    if args.classes_file:
        if not os.path.isfile(args.classes_file):
            raise ClassifierError(f"--classes-file {args.classes_file}: no such file")
        with open(args.classes_file, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    return [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else []


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlprompt.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR", help="a training run's folder or a checkpoint file")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--classes", help='class names separated by commas, e.g. "red star,blue ring"')
    names.add_argument("--classes-file", help="a file of class names, one per line")
    parser.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    parser.add_argument("--backbone-path", help="the run's CLIP weights, if moved since it ran")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16", "amp"), help="default: the run's")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--method", help="checkpoints that do not describe themselves: the method's trainer name")
    parser.add_argument("--config", help="checkpoints that do not describe themselves: the run's config YAML")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read a release checkpoint that pickles Python objects (it can run code: only if trusted)")
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error("--topk and --batch-size must be at least 1")
    return args


def line(path: str, top) -> str:
    return f"{path}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)


def predict(args, out=None) -> int:
    from tqdm import tqdm
    out = out or sys.stdout
    from .classifier import load_classifier
    paths = image_paths(args.images)
    classifier = load_classifier(args.run, classes=class_list(args) or None, backbone_path=args.backbone_path,
                                 device=args.device, precision=args.precision, method=args.method,
                                 config=args.config, trust_pickle=args.trust_pickle)
    show_progress = any(os.path.isdir(given) for given in args.images) and len(paths) > args.batch_size
    with tqdm(total=len(paths), disable=not show_progress, file=sys.stderr, unit="image") as bar:
        for part in batches(paths, args.batch_size):
            for path, top in zip(part, classifier.top(list(part), args.topk)):
                out.write((json.dumps({"image": path, "top": top}) if args.json else line(path, top)) + "\n")
            out.flush()
            bar.update(len(part))
    return 0


def main(argv=None) -> int:
    """The command: a user mistake is one line on stderr and exit status 2."""
    return report_user_errors(lambda: predict(parse_args(argv)))()


if __name__ == "__main__":
    sys.exit(main())
