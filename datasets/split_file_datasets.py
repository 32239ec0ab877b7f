"""The CoOp datasets read from a `split_zhou_*.json` file: one row of data each."""
from dassl.data.datasets import DATASET_REGISTRY

from .coop_split import CoOpDataset

# Dassl name: (folder under the data root, image root inside it, split file inside it)
SPLIT_FILE_DATASETS = {
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "OxfordFlowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "Food101": ("food-101", "images", "split_zhou_Food101.json"),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DescribableTextures": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    # the toy world (python -m datasets.toy_world ROOT writes them)
    "ToyObjects": ("toy_objects", "images", "split_zhou_ToyObjects.json"),
    "ToyObjectsShifted": ("toy_objects_shifted", "images", "split_zhou_ToyObjectsShifted.json"),
    "ToyPatterns": ("toy_patterns", "images", "split_zhou_ToyPatterns.json"),
    "ToyTextiles": ("toy_textiles", "images", "split_zhou_ToyTextiles.json"),
}

for _name, (_folder, _images, _split) in SPLIT_FILE_DATASETS.items():
    DATASET_REGISTRY.register(type(_name, (CoOpDataset,), {
        "dataset_dir": _folder, "image_dir": _images, "split_file": _split,
        "__doc__": f"<root>/{_folder}/{_images or '.'}/ images listed in <root>/{_folder}/{_split}",
        "__module__": __name__,
    }))
