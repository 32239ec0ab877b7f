"""Config fuzzing: random values and types for every TRAINER.<METHOD>.* key and the dataset keys
give a valid run (a training step and an evaluation batch) or one clear error naming the key."""
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT, requires_dassl, write_workspace
from vlprompt.errors import UserError

pytestmark = requires_dassl


def trainers():
    """Every registered method's trainers (release names included); every key of each one's
    generated node is fuzzed (the settings' fields, and PREC)."""
    from vlprompt.methods.registry import methods
    return sorted(name for spec in methods() for name, _ in spec.trainer_names())


DATASET_KEYS = ["DATASET.NUM_SHOTS", "DATASET.SUBSAMPLE_CLASSES", "DATASET.NAME", "DATASET.DESCRIPTIONS_FILE",
                "DATASET.ROOT", "MODEL.TRUST_RELEASE_CHECKPOINT"]
PLAUSIBLE = ["0", "1", "2", "3", "4", "-1", "64", "0.5", "1e9", "nan", "inf", "-inf", "True", "False", "''",
             "fp16", "fp32", "bf16", "amp", "per_image", "image_free", "mean", "max", "release", "learned", "base",
             "new", "all", "front", "middle",
             "ensemble", "Caltech101", "OxfordPets", "FER2013", "a photo of a", "[1, 2]", "(3,)", "{}"]

any_value = st.one_of(st.sampled_from(PLAUSIBLE), st.integers(-10 ** 6, 10 ** 6).map(str),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr),
                      st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))


def default_of(key):
    from dassl.config import get_cfg_default
    from trainers.config import extend_cfg
    node = extend_cfg(get_cfg_default())
    for part in key.split("."):
        node = node[part]
    return node


def values_for(key):
    """Mostly values of the key's own type (so our range checks and real runs are exercised),
    sometimes anything at all (so type errors are too)."""
    default = default_of(key)
    if isinstance(default, bool):
        typed = st.booleans().map(str)
    elif isinstance(default, int):
        typed = st.one_of(st.integers(-3, 80), st.integers(-10 ** 9, 10 ** 9)).map(str)
    elif isinstance(default, float):
        typed = st.one_of(st.floats(-5, 1e5), st.sampled_from([float("nan"), float("inf"), 0.0, 1e30])).map(repr)
    else:
        typed = st.one_of(st.sampled_from(PLAUSIBLE[15:] + [default]), st.text(max_size=12))
    return st.one_of(typed, typed, typed, any_value)


def base_command(trainer, root):
    """A valid tiny run of `trainer`: its demo config if it has one, else its base-to-new recipe,
    on the tiny CLIP at 32 px in fp32."""
    from vlprompt.methods.registry import get_method
    if trainer == "EdgeCNN":
        return ["--trainer", "EdgeCNN", "--dataset-config-file", os.path.join(ROOT, "configs/datasets/fer2013.yaml"),
                "--config-file", os.path.join(ROOT, "configs/trainers/EdgeCNN/fer2013.yaml"),
                "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DATALOADER.TEST.BATCH_SIZE", "4"]
    spec = get_method(trainer)
    folder = os.path.join(ROOT, "configs", "trainers", trainer if os.path.isdir(os.path.join(ROOT, "configs", "trainers",
                                                                                             trainer)) else spec.name)
    demo = os.path.join(folder, "demo_tiny_clip.yaml")
    config = demo if os.path.isfile(demo) else os.path.join(folder, sorted(os.listdir(folder))[0])
    node = node_of(trainer)
    # the recipes' depths (9, 12) exceed the tiny CLIP's 3 layers
    depths = [] if os.path.isfile(demo) else [v for key in default_of(f"TRAINER.{node}") if "DEPTH" in key
                                              for v in (f"TRAINER.{node}.{key}", "2")]
    return ["--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
            "--config-file", config, "MODEL.BACKBONE.PATH", str(root / "tiny_clip.pt"), "INPUT.SIZE", "(32, 32)",
            "DATALOADER.TEST.BATCH_SIZE", "4", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", f"TRAINER.{layout_of(trainer).path('prec')}", "fp32",
            *depths]


def node_of(trainer):
    return layout_of(trainer).node


def layout_of(trainer):
    from vlprompt.methods.registry import get_method
    return next(layout for name, layout in get_method(trainer).trainer_names() if name == trainer)


def trainer_keys(trainer):
    """The full keys a trainer reads: its node's, and those its layout puts elsewhere."""
    from dataclasses import fields
    from vlprompt.methods.registry import get_method
    layout, spec = layout_of(trainer), get_method(trainer)
    prec = [f"TRAINER.{layout.path('prec')}"] if layout.path("prec").split(".")[-1] in default_of(
        "TRAINER." + layout.path("prec").rpartition(".")[0]) else []  # EdgeCNN has no PREC
    return [f"TRAINER.{layout.path(f.name)}" for f in fields(spec.settings)] + prec


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("fuzz"), {"Caltech101": (4, (2, 1, 1)), "FER2013": (7, (1, 1, 1))})


def one_step_and_one_eval_batch(trainer):
    if trainer.get_model_names():  # ZeroshotCLIP has nothing to train
        trainer.set_model_mode("train")
        trainer.num_batches, trainer.batch_idx = len(trainer.train_loader_x), 0
        trainer.forward_backward(next(iter(trainer.train_loader_x)))
    trainer.test()  # the whole (tiny) test split, through the trainer's evaluation path


def check(trainer_name, fuzz_root, perturbed):
    import train
    from dassl.engine import build_trainer
    keys = [key for key, _ in perturbed]
    argv = ["--root", str(fuzz_root / "data"), "--seed", "1", "--output-dir", str(fuzz_root / "out")]
    argv += base_command(trainer_name, fuzz_root) + ["DATALOADER.NUM_WORKERS", "0", "MODEL.FEATURE_CACHE_DIR",
                                                      str(fuzz_root / "cache")]
    for key, value in perturbed:
        argv += [key, value]
    try:
        cfg = train.setup_cfg(train.build_parser().parse_args(argv))
        trainer = build_trainer(cfg)
        one_step_and_one_eval_batch(trainer)
    except UserError as err:  # anything else is a bug, and fails the test with its traceback
        message = str(err)
        assert any(key in message for key in keys), (
            f"{type(err).__name__} does not name the key among {perturbed}: {message[:500]}")


@pytest.mark.parametrize("trainer_name", trainers())
def test_fuzzed_config_gives_a_valid_run_or_a_clear_error(trainer_name, fuzz_root):
    keys = trainer_keys(trainer_name) + DATASET_KEYS

    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(keys).flatmap(lambda key: st.tuples(st.just(key), values_for(key))),
                    min_size=1, max_size=3, unique_by=lambda kv: kv[0]))
    def run(perturbed):
        check(trainer_name, fuzz_root, perturbed)

    run()
