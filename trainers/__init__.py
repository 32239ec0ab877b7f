"""Dassl trainers, registered in TRAINER_REGISTRY on import."""
from . import hicropl, zsclip  # noqa: F401
