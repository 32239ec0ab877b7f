"""Dassl trainers, registered in TRAINER_REGISTRY on import."""
from . import dcp, edgecnn, hicropl, zsclip  # noqa: F401
