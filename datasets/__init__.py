"""CoOp-format datasets, registered in Dassl's DATASET_REGISTRY under CoOp's names."""
from . import emotions, fgvc_aircraft, image_folder, imagenet, split_file_datasets  # noqa: F401  (registration)
