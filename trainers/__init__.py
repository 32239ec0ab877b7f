"""Dassl trainers, registered in TRAINER_REGISTRY on import: one per registered method (and per
release name of it), made from its descriptor, plus EdgeCNN's own."""
from dassl.engine import TRAINER_REGISTRY

from vlprompt.methods.registry import MethodSpec, on_register

from . import edgecnn  # noqa: F401  (a trainer of its own)
from .clip_prompt import make_trainer


def _register_trainers(spec: MethodSpec) -> None:
    for name, layout in spec.trainer_names():
        if name not in TRAINER_REGISTRY.registered_names():
            TRAINER_REGISTRY.register(make_trainer(spec, name, layout))


on_register(_register_trainers)  # methods registered later (plugins) get their trainer too
