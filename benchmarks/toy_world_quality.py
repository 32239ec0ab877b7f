"""Base-to-new generalisation in the toy world: zero-shot CLIP, HiCroPL (learned and release
mappers) and deliberately broken variants, over several seeds, with the framework-free API.

    python benchmarks/toy_world_quality.py --seeds 1 2 3 [--clip PATH] [--class-set ToyObjects]

Each seed draws other training shots (16 per base class) and another prompt initialisation;
the test images (per class, base and new) are the same for every seed. Prints one row per
variant and seed, then mean / min / max of Base, New and HM: the distributions the
thresholds of tests/test_toy_world.py come from.
"""
import argparse
import os
import sys
import time
import warnings
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from vlprompt.methods.hicropl import HiCroPL  # noqa: E402
from vlprompt.toyworld.broken import BROKEN_VARIANTS  # noqa: E402
from vlprompt.experiments.results import harmonic_mean  # noqa: E402
from vlprompt.toyworld.evaluate import (TOY_CLIP_PATH, TOY_HICROPL, Recipe, accuracy, class_images,  # noqa: E402
                                        load_toy_clip, retarget, train_hicropl, zero_shot_accuracy)
from vlprompt.toyworld.world import CLASS_SETS  # noqa: E402

VARIANTS = {"learned": (HiCroPL, "learned"), "release": (HiCroPL, "release")}
VARIANTS.update({name: (cls, "learned") for name, cls in BROKEN_VARIANTS.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default=TOY_CLIP_PATH)
    parser.add_argument("--class-set", default="ToyObjects", choices=sorted(CLASS_SETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--lambd", type=float, default=TOY_HICROPL.lambd)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip_model = load_toy_clip(args.clip)
    class_set = CLASS_SETS[args.class_set]
    base, new = class_set.base(), class_set.new()
    tests = {"base": class_images(base, args.test_per_class, seed=9001),
             "new": class_images(new, args.test_per_class, seed=9002)}
    zero_shot = {part: zero_shot_accuracy(clip_model, cs, *tests[part]) for part, cs in (("base", base), ("new", new))}
    print(f"{args.class_set}: {len(base.classes)} base / {len(new.classes)} new classes, chance "
          f"{100 / len(base.classes):.1f}%; zero-shot base {zero_shot['base']:.1f} new {zero_shot['new']:.1f} "
          f"HM {harmonic_mean(zero_shot['base'], zero_shot['new']):.1f}", flush=True)
    results = {}
    for name in args.variants:
        model_class, mode = VARIANTS[name]
        cfg = replace(TOY_HICROPL, mapper_mode=mode, lambd=args.lambd)
        for seed in args.seeds:
            start = time.time()
            images, labels = class_images(base, args.shots, seed=seed)
            recipe = Recipe(epochs=args.epochs, lr=args.lr, seed=seed)
            model = train_hicropl(clip_model, base, images, labels, cfg, recipe, model_class)
            base_acc = accuracy(model, *tests["base"])
            new_acc = accuracy(retarget(model, new, clip_model), *tests["new"])
            results.setdefault(name, []).append((base_acc, new_acc, harmonic_mean(base_acc, new_acc)))
            print(f"{name:16s} seed {seed}: base {base_acc:5.1f} new {new_acc:5.1f} "
                  f"HM {harmonic_mean(base_acc, new_acc):5.1f}  ({time.time() - start:.0f} s)", flush=True)
    print("\nvariant           base mean [min, max]    new mean [min, max]     HM mean [min, max]")
    for name, rows in results.items():
        cells = []
        for column in zip(*rows):
            cells.append(f"{sum(column) / len(column):5.1f} [{min(column):5.1f}, {max(column):5.1f}]")
        print(f"{name:16s} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
