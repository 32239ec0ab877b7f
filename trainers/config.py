"""Config keys this toolkit adds to Dassl's defaults (yacs): its own, and one node per method."""
from dataclasses import fields

from dassl.engine import TRAINER_REGISTRY
from yacs.config import CfgNode as CN

from vlprompt.methods.registry import methods, shared_defaults

from .clip_prompt import ClipPromptTrainer


def extend_cfg(cfg: CN) -> CN:
    # Bitwise-reproducible GPU runs (train.py --deterministic): deterministic algorithms only and
    # no cuDNN autotuning, slower. Off: cuDNN autotunes (as in CoOp) and GPU results vary in the
    # last digits between runs; CPU runs are reproducible either way.
    cfg.DETERMINISTIC = False

    # Adam's epsilon: the release's configs set it (1e-3); upstream Dassl has no such key.
    cfg.OPTIM.EPS = 1e-8

    # CLIP weights: by name (downloaded by the clip package) or a local file (offline nodes).
    cfg.MODEL.BACKBONE.PATH = ""
    cfg.MODEL.BACKBONE.DOWNLOAD_ROOT = ""  # "" = ~/.cache/clip
    # On-disk cache of frozen features (class text features); "" = $VLPROMPT_CACHE or ~/.cache/vlprompt
    cfg.MODEL.FEATURE_CACHE_DIR = ""
    # Recompute the frozen encoder blocks' activations in backward instead of keeping them: less
    # memory for a longer step, the same gradients (benchmarks/bench_hicropl.py --checkpointing)
    cfg.MODEL.GRADIENT_CHECKPOINTING = False

    # Unreadable images stop the run with their path; True leaves them out with a warning
    # (every image is then decoded once when the loaders are built).
    cfg.DATALOADER.SKIP_BROKEN_IMAGES = False

    # Reuse frozen CLIP features of val/test images across evaluations, seeds and configs
    # (cached in FEATURE_CACHE_DIR, keyed by backbone weights, test transform and image file).
    cfg.TEST.CACHE_FROZEN_FEATURES = True

    # CoOp's base-to-new protocol: all, base (first half of the labels) or new (second half).
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    # Per-class descriptions for frozen class features, the release's gpt_file format:
    # DESCRIPTIONS_FILE if set, else DESCRIPTIONS_DIR/<dataset key>_prompt.json if it exists,
    # else prompt templates.
    cfg.DATASET.DESCRIPTIONS_DIR = "gpt_file"
    cfg.DATASET.DESCRIPTIONS_FILE = ""
    # True: no descriptions file is an error (the paper's setting guaranteed), not the templates
    cfg.DATASET.REQUIRE_DESCRIPTIONS = False
    # DATASET.NAME ImageFolder (your own images, datasets/image_folder.py): a folder of class
    # folders, or a .csv/.json list of (path, label); absolute or relative to DATASET.ROOT ("" = the
    # root itself). CLASSNAMES_FILE: "<folder> <class name>" lines, in label order ("" = folder names).
    cfg.DATASET.IMAGE_FOLDER = ""
    cfg.DATASET.CLASSNAMES_FILE = ""
    # Few-shot runs: a class with fewer training images than NUM_SHOTS is refused (the run would be
    # labelled with shots it did not use); True trains on the images there are and says how many.
    cfg.DATASET.ALLOW_FEWER_SHOTS = False
    # RAF-DB's labels: "raf" (its own order) or "fer" (FER-2013's, for cross-dataset tests)
    cfg.DATASET.RAF_LABEL_ORDER = "raf"

    # Trust checkpoints that need full unpickling (the releases' pickle their LR scheduler):
    # such a file can run code when read, so reading one is an explicit choice.
    cfg.MODEL.TRUST_RELEASE_CHECKPOINT = False

    # TRAINER.<NODE>.*: one node per registered method (and per release name of it), generated from
    # its settings dataclass, which holds the defaults and their help (python train.py --trainer X
    # --help-config lists them); prompt methods over CLIP also have PREC. Where a release reads
    # another method's node or keys outside its own (its ConfigLayout), they are added there.
    for path, value in shared_defaults(config_claims()).items():
        set_key(cfg.TRAINER, path, value)
    return cfg


def dataset_config_options(cfg: CN) -> list:
    """[KEY, VALUE, ...]: what the release of TRAINER.NAME sets for DATASET.NAME (its layout's
    `dataset_config`; train.py merges it after the config files, before the command line)."""
    for spec in methods():
        for name, layout in spec.trainer_names():
            if name == cfg.TRAINER.NAME:
                values = layout.dataset_config.get(cfg.DATASET.NAME, {})
                return [item for key, value in values.items() for item in (key, value)]
    return []


def config_claims() -> dict:
    """{path under TRAINER: [(default, has a legacy converter or a per-dataset default)]} over every
    registered trainer."""
    claims = {}
    for spec in methods():
        for name, layout in spec.trainer_names():
            for setting in fields(spec.settings):
                claims.setdefault(layout.path(setting.name), []).append(
                    (layout.default(setting.name, spec.settings),
                     setting.name in layout.legacy or setting.name in layout.per_dataset))
            if issubclass(TRAINER_REGISTRY.get(name), ClipPromptTrainer):
                claims.setdefault(layout.path("prec"), []).append(("fp16", False))  # fp32 | fp16 | bf16 | amp
    return claims


def set_key(node: CN, path: str, value) -> None:
    *parents, key = path.split(".")
    for part in parents:
        if part not in node:
            node[part] = CN()
        node = node[part]
    node[key] = value
