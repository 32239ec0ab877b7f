import importlib.util
import os
import sys
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
sys.modules.setdefault("outdated", None)  # as train.py: no PyPI version check from wilds
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Share the cores among pytest-xdist's workers (and the train.py processes they start, through
# OMP_NUM_THREADS) instead of oversubscribing them: two workers of two threads on two cores run
# slower than two of one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(min(_THREADS, torch.get_num_threads()))
# The suite runs on the CPU unless asked (VLPROMPT_DEVICE=cuda pytest ...): its bitwise checks hold
# there only, and parallel workers must not each open a CUDA context on GPU 0. train.py and the
# runs the tests start read it.
os.environ.setdefault("VLPROMPT_DEVICE", "cpu")
if os.environ["VLPROMPT_DEVICE"] == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # see vlprompt.device.hide_gpus

HAS_DASSL = importlib.util.find_spec("dassl") is not None
requires_dassl = pytest.mark.skipif(
    not HAS_DASSL, reason="needs Dassl.pytorch (not on PyPI): install it as the README says")


@pytest.fixture(scope="session")
def tiny_clip():
    from vlprompt.clip.loading import random_clip
    return random_clip("tiny", seed=0)


@pytest.fixture(scope="session")
def release_clip():
    """The release fixtures' CLIP (tiny-B: ViT-B widths, 3 layers), as their generator built it."""
    from helpers import fixture_clip
    return fixture_clip()


@pytest.fixture(scope="session")
def tiny_l_clip():
    from vlprompt.clip.loading import random_clip
    return random_clip("tiny-L", seed=1)


def write_workspace(root, datasets):
    """root/data/ with synthetic datasets {name: (classes, (train, val, test) per class)} in
    their on-disk layouts, and root/tiny_clip.pt, a tiny random CLIP; returns root."""
    from datasets.synthetic import write_dataset
    from vlprompt.clip.loading import save_random_clip
    for name, (n_classes, per_split) in datasets.items():
        write_dataset(str(root / "data"), name, n_classes, per_split)
    save_random_clip(str(root / "tiny_clip.pt"), "tiny")
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny CoOp-format dataset (Caltech101 layout, 6 classes) and a tiny random CLIP file."""
    return write_workspace(tmp_path_factory.mktemp("workspace"), {"Caltech101": (6, (4, 2, 3))})
