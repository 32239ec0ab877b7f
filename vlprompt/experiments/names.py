"""How datasets and tasks are named in the report's tables and figures (one home for both)."""
from typing import Sequence

DISPLAY_NAMES = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
                 "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
                 "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT",
                 "ucf101": "UCF101", "imagenetv2": "ImageNetV2", "imagenet_sketch": "ImageNet-Sketch",
                 "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R", "toy_objects": "ToyObjects",
                 "toy_patterns": "ToyPatterns", "toy_textiles": "ToyTextiles",
                 "toy_objects_shifted": "ToyObjectsShifted"}
TASK_TITLES = {"base2new": "Base-to-new generalisation", "xd": "Cross-dataset transfer",
               "dg": "Domain generalisation", "fewshot": "Few-shot classification"}
SYNTHETIC_MARK = "SYNTHETIC toy-world data, not comparable with published results"


def display(dataset: str) -> str:
    return DISPLAY_NAMES.get(dataset, dataset)


def is_synthetic(datasets: Sequence[str]) -> bool:
    return any(d.startswith("toy_") for d in datasets)


def title(task: str, datasets: Sequence[str]) -> str:
    return TASK_TITLES[task] + (f" ({SYNTHETIC_MARK})" if is_synthetic(datasets) else "")
