"""Every shipped recipe (configs/trainers/<Trainer>/*.yaml) loads into its trainer's config and
passes the start-of-run checks, which for named backbones (ViT-B/16, ..., and "toy", the toy
world's CLIP) include the layer counts and widths: a recipe that cannot run fails here, not on a
user's GPU after the weights have loaded."""
import glob
import os
from argparse import Namespace

import pytest

from conftest import ROOT, requires_dassl

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "trainers", "*", "*.yaml")))


@requires_dassl
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs", "trainers")))
def test_recipe_loads_and_passes_the_start_checks(recipe, tmp_path):
    import train
    trainer = os.path.basename(os.path.dirname(recipe))
    dataset = "fer2013" if trainer == "EdgeCNN" and "fer" in recipe else "rafdb" if trainer == "EdgeCNN" else (
        "toy_objects" if "demo_toy" in recipe else "caltech101")
    args = Namespace(root=str(tmp_path), output_dir=str(tmp_path / "out"), resume="", seed=1, source_domains=None,
                     target_domains=None, transforms=None, trainer=trainer, backbone="", head="",
                     dataset_config_file=os.path.join(ROOT, "configs", "datasets", f"{dataset}.yaml"),
                     config_file=recipe, opts=[], deterministic=False)
    cfg = train.setup_cfg(args)
    assert cfg.TRAINER.NAME == trainer
    assert train.trainer_class(cfg) is not None


def test_every_trainer_folder_has_a_recipe_and_the_demo_covers_every_prompt_method():
    from vlprompt.methods.registry import methods
    shipped = [spec for spec in methods() if spec.model is not None and spec.model.__module__.startswith("vlprompt.")]
    prompt_methods = {spec.name for spec in shipped if spec.name != "EdgeCNN"}  # (a test may register its own)
    with_demo = {os.path.basename(os.path.dirname(p)) for p in RECIPES if p.endswith("demo_toy.yaml")}
    assert prompt_methods <= with_demo, sorted(prompt_methods - with_demo)
