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
torch.set_num_threads(min(2, torch.get_num_threads()))

HAS_DASSL = importlib.util.find_spec("dassl") is not None
requires_dassl = pytest.mark.skipif(
    not HAS_DASSL, reason="needs Dassl.pytorch (not on PyPI): install it as the README says")


@pytest.fixture(scope="session")
def tiny_clip():
    from vlprompt.clip_loading import random_clip
    return random_clip("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_l_clip():
    from vlprompt.clip_loading import random_clip
    return random_clip("tiny-L", seed=1)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny CoOp-format dataset (Caltech101 layout, 6 classes) and a tiny random CLIP file."""
    from datasets.synthetic import write_dataset
    from vlprompt.clip_loading import save_random_clip
    root = tmp_path_factory.mktemp("workspace")
    write_dataset(str(root / "data"), "Caltech101", n_classes=6, per_split=(4, 2, 3))
    save_random_clip(str(root / "tiny_clip.pt"), "tiny")
    return root
