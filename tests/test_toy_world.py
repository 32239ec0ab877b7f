"""The toy world (vlprompt/toyworld): a deterministic generator, compositional class sets, a
shipped pretrained toy CLIP, and learning-quality checks that a real CLIP would pass and a
broken prompt learner fails (issue 15)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from conftest import requires_dassl
from datasets.toy_world import TOY_DATASETS, descriptions_file, folder_of, write_toy_dataset
from vlprompt.toyworld.render import render
from vlprompt.toyworld.world import AXES, CLASS_SETS, PRETRAINING, SHIFTED, caption, sample_scene


# ---- the generator -------------------------------------------------------------------------
def scenes_and_captions(seed, n=24):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, PRETRAINING)
        out.append((scene, render(scene, rng).tobytes(), caption(scene, rng)))
    return out


def test_generator_is_deterministic_for_a_seed():
    first, again, other = scenes_and_captions(7), scenes_and_captions(7), scenes_and_captions(8)
    assert first == again
    assert [image for _, image, _ in first] != [image for _, image, _ in other]


def tree_digest(folder):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def test_dataset_writer_is_deterministic_and_in_coop_layout(tmp_path):
    name = "ToyTextiles"
    folders = [write_toy_dataset(str(tmp_path / run), name) for run in ("a", "b")]
    assert tree_digest(folders[0]) == tree_digest(folders[1])
    assert tree_digest(tmp_path / "a" / "gpt_file") == tree_digest(tmp_path / "b" / "gpt_file")
    classnames = CLASS_SETS[TOY_DATASETS[name][0]].classnames
    with open(os.path.join(folders[0], f"split_zhou_{name}.json")) as handle:
        split = json.load(handle)
    for part, per_class in zip(("train", "val", "test"), TOY_DATASETS[name][2]):
        rows = split[part]
        assert len(rows) == per_class * len(classnames)
        for relpath, label, classname in rows:
            assert classnames[label] == classname
            assert os.path.isfile(os.path.join(folders[0], "images", relpath))
    with open(tmp_path / "a" / "gpt_file" / descriptions_file(name)) as handle:
        descriptions = json.load(handle)
    assert list(descriptions) == classnames
    # every description names its class
    assert all(f" {c}" in text for c, texts in descriptions.items() for text in texts)


def test_every_toy_dataset_is_registered_with_a_config():
    from datasets.split_file_datasets import SPLIT_FILE_DATASETS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in TOY_DATASETS:
        assert SPLIT_FILE_DATASETS[name] == (folder_of(name), "images", f"split_zhou_{name}.json")
        with open(os.path.join(root, "configs", "datasets", f"{folder_of(name)}.yaml")) as handle:
            assert f'NAME: "{name}"' in handle.read()


# ---- compositional class sets --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLASS_SETS))
def test_new_classes_are_unseen_combinations_of_base_attributes(name):
    class_set = CLASS_SETS[name]
    base, new = class_set.base(), class_set.new()
    assert len(base.classes) == -(-len(class_set.classes) // 2)  # CoOp's split: first ceil(n/2)
    assert not set(base.classnames) & set(new.classnames)
    base_words = {w for c in base.classnames for w in c.split(" ")}
    assert {w for c in new.classnames for w in c.split(" ")} <= base_words
    # no single attribute tells the base classes apart: each value occurs in two base classes
    for axis in range(2):
        values = [c[axis] for c in base.classes]
        assert all(values.count(v) >= 2 for v in values), (name, class_set.axes[axis])
    assert all(v in AXES[a] for c in class_set.classes for a, v in zip(class_set.axes, c))


def test_the_shifted_domain_differs_from_the_source():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, SHIFTED) for _ in range(20)]
    assert {(s.style, s.background) for s in scenes} == {("drawing", "noisy")}


# ---- the shipped toy CLIP ------------------------------------------------------------------
def test_shipped_weights_are_a_compact_fp16_clip_state_dict():
    from vlprompt.toyworld.evaluate import TOY_CLIP_PATH
    from vlprompt.toyworld.pretrain import ARCHITECTURE, world_token_ids
    state = torch.load(TOY_CLIP_PATH, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    embedding = state["token_embedding.weight"]
    assert tuple(embedding.shape) == (49408, ARCHITECTURE["transformer_width"])
    assert tuple(state["positional_embedding"].shape) == (77, ARCHITECTURE["transformer_width"])
    used = torch.zeros(len(embedding), dtype=torch.bool)
    used[world_token_ids()] = True
    assert embedding[~used].abs().max() == 0  # unused tokens: zero rows (git compresses them)
    assert (embedding[used].abs().amax(dim=1) > 0).all()
    # MODEL.BACKBONE.NAME "toy" names these shapes (the recipes' preflight checks read them)
    from vlprompt.clip.loading import architecture_shape, backbone_shape, load_clip
    assert architecture_shape("toy") == backbone_shape(load_clip("toy", path=TOY_CLIP_PATH))


# ---- learning quality ----------------------------------------------------------------------
# ToyObjects (18 base / 18 new colour-shape classes, chance 5.6%) under the datasets' warm
# light, 20 test images per class; HiCroPL (TOY_HICROPL: 4 context tokens, prompts on all 4
# layers) trained on 16 shots per base class (seed 1) for 10 epochs (Recipe's defaults).
#
# Thresholds, from `python benchmarks/toy_world_quality.py --seeds 1 2 3 --epochs 10
# --test-per-class 20` (zero-shot here: base 66.7%, new 60.8%):
#   base gain over zero-shot  learned +14.1..+14.7, release +13.3..+15.0,
#                             visual prompts dropped (broken) +6.9..+8.0
#   new minus zero-shot       learned +7.8..+9.2, release +4.8..+9.5
# MIN_BASE_GAIN sits between the working and the broken variants, >= 2.3 points (8 of 360
# images) from the nearest of either; NEW_MARGIN allows new-class accuracy 3 points below
# zero-shot, 7.8 points under the lowest measured. Seed to seed spread is <= 1.7 points on
# base, the scale at which other CPU kernels (AVX2 / default) move these accuracies.
TEST_IMAGES_PER_CLASS = 20
SHOTS_SEED = 1
MIN_ZERO_SHOT = 45.0  # measured 60.8 (new) and 66.7 (base); chance 5.6
MIN_BASE_GAIN = 11.0
NEW_MARGIN = 3.0


@pytest.fixture(scope="module")
def one_thread():
    """The thresholds were measured with one thread; these small matmuls gain nothing from two
    (and lose a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(one_thread):
    from vlprompt.toyworld.evaluate import class_images, load_toy_clip, zero_shot_accuracy
    clip_model = load_toy_clip()
    class_set = CLASS_SETS["ToyObjects"]
    parts = {"base": class_set.base(), "new": class_set.new()}
    tests = {part: class_images(cs, TEST_IMAGES_PER_CLASS, seed=9001 + i) for i, (part, cs) in enumerate(parts.items())}
    zero_shot = {part: zero_shot_accuracy(clip_model, parts[part], *tests[part]) for part in parts}
    shots = class_images(parts["base"], 16, seed=SHOTS_SEED)
    return dict(clip=clip_model, parts=parts, tests=tests, zero_shot=zero_shot, shots=shots, trained={})


def trained(world, variant, epochs=10):
    """(model, base accuracy, new accuracy) of a HiCroPL variant, trained once per module."""
    from dataclasses import replace
    from vlprompt.methods.hicropl import HiCroPL
    from vlprompt.toyworld.broken import BROKEN_VARIANTS
    from vlprompt.toyworld.evaluate import TOY_HICROPL, Recipe, accuracy, retarget, train_hicropl
    key = (variant, epochs)
    if key not in world["trained"]:
        mode = "release" if variant == "release" else "learned"
        model_class = BROKEN_VARIANTS.get(variant, HiCroPL)
        recipe = Recipe(epochs=epochs, seed=SHOTS_SEED)
        model = train_hicropl(world["clip"], world["parts"]["base"], *world["shots"],
                              replace(TOY_HICROPL, mapper_mode=mode), recipe, model_class)
        state = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
        base = accuracy(model, *world["tests"]["base"])
        new = accuracy(retarget(model, world["parts"]["new"], world["clip"]), *world["tests"]["new"])
        world["trained"][key] = (state, base, new)
    return world["trained"][key]


def test_shipped_toy_clip_transfers_zero_shot_to_new_classes(world):
    assert world["zero_shot"]["new"] >= MIN_ZERO_SHOT, world["zero_shot"]
    assert world["zero_shot"]["base"] >= MIN_ZERO_SHOT, world["zero_shot"]


@pytest.mark.parametrize("mode", ["learned", "release"])
def test_hicropl_improves_base_and_keeps_new(world, mode):
    """HiCroPL trained on the base classes beats zero-shot CLIP on them by MIN_BASE_GAIN
    points and stays within NEW_MARGIN of it on new classes (thresholds: see above)."""
    _, base, new = trained(world, mode)
    zero_shot = world["zero_shot"]
    assert base - zero_shot["base"] >= MIN_BASE_GAIN, (base, zero_shot)
    assert new >= zero_shot["new"] - NEW_MARGIN, (new, zero_shot)


def test_a_prompt_learner_that_drops_its_visual_prompts_fails_the_check(world):
    """The check can fail: with the visual prompts never reaching the image encoder (only
    the text side adapts), the gain on base classes stays below MIN_BASE_GAIN."""
    _, base, _ = trained(world, "no_visual_prompts")
    assert base - world["zero_shot"]["base"] < MIN_BASE_GAIN, (base, world["zero_shot"])


def changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_learned_mappers_train_and_release_mappers_stay_as_initialised(world):
    initial, _, _ = trained(world, "learned", epochs=0)
    learned, _, _ = trained(world, "learned")
    release, _, _ = trained(world, "release")
    for module in ("text_to_image", "image_to_text", "text_proxies", "visual_proxies"):
        assert changed(initial, learned, module), module
        assert not changed(initial, release, module), module  # no gradient reaches them
    for prompts in ("text_prompts", "visual_prompts"):
        assert changed(initial, learned, prompts) and changed(initial, release, prompts)


def test_mappers_that_silently_stop_learning_fail_the_check(world):
    initial, _, _ = trained(world, "learned", epochs=0)
    frozen, _, _ = trained(world, "frozen_mappers", epochs=1)
    assert not changed(initial, frozen, "text_to_image") and not changed(initial, frozen, "image_to_text")


@requires_dassl
def test_dassl_reads_a_toy_dataset_with_coop_base_and_new_classes(tmp_path):
    from dassl.config import get_cfg_default
    from datasets.split_file_datasets import SPLIT_FILE_DATASETS  # noqa: F401  (registration)
    from dassl.data.datasets import build_dataset
    from trainers.config import extend_cfg
    write_toy_dataset(str(tmp_path), "ToyPatterns")
    class_set = CLASS_SETS["ToyPatterns"]
    for subsample, expected in (("base", class_set.base()), ("new", class_set.new())):
        cfg = extend_cfg(get_cfg_default())
        cfg.DATASET.NAME, cfg.DATASET.ROOT, cfg.DATASET.SUBSAMPLE_CLASSES = "ToyPatterns", str(tmp_path), subsample
        cfg.DATASET.NUM_SHOTS = 16
        dataset = build_dataset(cfg)
        assert dataset.classnames == expected.classnames
        assert len(dataset.train_x) == 16 * len(expected.classes)
