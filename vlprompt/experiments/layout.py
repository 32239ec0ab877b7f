"""Where each run writes (CoOp/MaPLe/PromptSRC's output layout) and the papers' dataset lists.
vlprompt.run writes runs there; the sweep (to skip and order runs) and the report (to read them)
go through the same functions."""
import os
from typing import List, Optional, Sequence, Tuple

# The 11 base-to-new datasets in the papers' order, the cross-dataset targets (ImageNet is the
# source) and the domain-generalisation targets (ImageNet's variants).
BASE2NEW_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                     "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_TARGETS = [d for d in BASE2NEW_DATASETS if d != "imagenet"]
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]

# The toy world (datasets/toy_world.py; SYNTHETIC) as a quick stand-in for them: ToyObjects in
# ImageNet's role, its shifted domain as the domain-generalisation target, the two other class
# sets as cross-dataset targets.
TOY_BASE2NEW_DATASETS = ["toy_objects", "toy_patterns", "toy_textiles"]
TOY_XD_TARGETS = ["toy_patterns", "toy_textiles"]
TOY_DG_TARGETS = ["toy_objects_shifted"]

# `--datasets all` or `--datasets toy` of the sweep and the report: (source, datasets) per task;
# the source is what xd and dg train on.
DATASET_KEYWORDS = {
    "all": ("imagenet", {"base2new": BASE2NEW_DATASETS, "fewshot": BASE2NEW_DATASETS,
                         "xd": XD_TARGETS, "dg": DG_TARGETS}),
    "toy": ("toy_objects", {"base2new": TOY_BASE2NEW_DATASETS, "fewshot": TOY_BASE2NEW_DATASETS,
                            "xd": TOY_XD_TARGETS, "dg": TOY_DG_TARGETS}),
}
SOURCES = [source for source, _ in DATASET_KEYWORDS.values()]


def known_datasets(repo: str) -> List[str]:
    """Dataset names a run accepts: the configs in configs/datasets/."""
    folder = os.path.join(repo, "configs", "datasets")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def keyword_datasets(task: str, keyword: str) -> Tuple[str, List[str]]:
    """(source, datasets) a task uses under a keyword of DATASET_KEYWORDS."""
    source, per_task = DATASET_KEYWORDS[keyword]
    return source, list(per_task[task])


def expand_datasets(task: str, names: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """--datasets of the sweep and the report: one keyword gives (its source, the task's
    datasets); names are taken as they are, with no source (None)."""
    if len(names) == 1 and names[0] in DATASET_KEYWORDS:
        return keyword_datasets(task, names[0])
    return None, list(names)


def config_name(cfg: str) -> str:
    """The name a config has in run folders: a config name as it is, a .yaml path by its stem."""
    if cfg.endswith((".yaml", ".yml")):
        return os.path.splitext(os.path.basename(cfg))[0]
    return cfg


def base2new(output: str, stage: str, dataset: str, trainer: str, cfg: str, seed: int) -> str:
    """stage: train_base (training, tested on base), test_base (eval-only methods), test_new."""
    return f"{output}/base2new/{stage}/{dataset}/shots_16/{trainer}/{cfg}/seed{seed}"


def xd_train(output: str, source: str, trainer: str, cfg: str, seed: int) -> str:
    return f"{output}/{source}/{trainer}/{cfg}_16shots/seed{seed}"


def xd_test(output: str, dataset: str, trainer: str, cfg: str, seed: int) -> str:
    return f"{output}/evaluation/{trainer}/{cfg}_16shots/{dataset}/seed{seed}"


def eval_only(output: str, dataset: str, trainer: str, cfg: str) -> str:
    """An evaluation-only method (zero-shot CLIP) on all classes of a dataset: one deterministic run."""
    return f"{output}/evaluation/{trainer}/{cfg}/{dataset}/seed1"


def few_shot(output: str, dataset: str, trainer: str, cfg: str, shots: int, seed: int) -> str:
    return f"{output}/{dataset}/{trainer}/{cfg}_{shots}shots/seed{seed}"


def train(output: str, dataset: str, trainer: str, cfg: str, seed: int) -> str:
    """Plain supervised training and testing on one dataset (EdgeCNN)."""
    return f"{output}/{dataset}/{trainer}/{cfg}/seed{seed}"
