"""Dassl trainers, registered in TRAINER_REGISTRY on import."""
from . import edgecnn, hicropl, zsclip  # noqa: F401
