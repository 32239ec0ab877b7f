"""Hand-written prompt templates for frozen CLIP class text features.

Used when no per-class description file is available. `{}` is the class name.
"""

# A small ensemble of generic photo templates (CLIP's zero-shot recipe averages the normalised
# text features of several phrasings of each class).
GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a cropped photo of the {}.",
    "a low resolution photo of a {}.",
    "a blurry photo of the {}.",
    "art of the {}.",
    "a drawing of a {}.",
)

# One hand-written prompt per dataset, as zero-shot CLIP baselines in the CoOp family use them.
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
    "FER2013": "a photo of a face looking {}.",
    "RAFDB": "a photo of a face looking {}.",
}


def dataset_template(dataset_name: str) -> str:
    return DATASET_TEMPLATES.get(dataset_name, "a photo of a {}.")
