"""Reading the numbers frozen from the official releases (tests/fixtures/releases/*.pt).

A fixture holds the release's trainable state under the release's own key names; tensors larger
than STORE_LIMIT elements (MaPLe's 512->768 projections) are not stored but rebuilt here from the
same seeded rule the generator used, and checked against the recorded sha256.
"""
import functools
import importlib.util
import os
from typing import Dict

import torch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "releases")
CLIP_METHODS = ("coop", "cocoop", "ivlp", "maple", "promptsrc")
ALL_FIXTURES = CLIP_METHODS + ("cmpa", "edgecnn")


@functools.lru_cache(maxsize=None)
def generator():
    """The generator script as a module, for its seeded rules (it imports only numpy and torch
    at module level; the releases are imported in its worker processes only)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURE_DIR, "make_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def load_fixture(method: str) -> dict:
    return torch.load(os.path.join(FIXTURE_DIR, f"{method}.pt"), map_location="cpu", weights_only=True)


def seeded_state(spec: Dict[str, dict], seed: int) -> Dict[str, torch.Tensor]:
    """Every tensor of a trainable-state description, rebuilt from its seed and checked."""
    state = {}
    for key, entry in spec.items():
        value = generator().seeded_normal(key, entry["shape"], seed)
        if generator().sha256_of(value) != entry["sha256"]:
            raise AssertionError(f"{key}: the seeded rule no longer gives the recorded values "
                                 f"(numpy's normal stream changed?)")
        state[key] = value
    return state


def release_state(case: dict) -> Dict[str, torch.Tensor]:
    """The release's whole trainable state of a fixture case (stored or rebuilt), fp32."""
    state = seeded_state(case["trainable_spec"], load_seed())
    for key, stored in case["trainable_state"].items():
        if not torch.equal(stored, state[key]):
            raise AssertionError(f"{key}: stored values differ from the seeded rule")
    return state


def load_seed() -> int:
    return generator().STATE_SEED
