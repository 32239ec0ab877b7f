"""ImageNet (train on it) and its four test-only variants, laid out as in CoOp's DATASETS.md."""
import os
import pickle
from collections import OrderedDict

from dassl.data.datasets import DATASET_REGISTRY, DatasetBase

from vlprompt.files import atomic_write

from .coop_split import CoOpDataset, DatasetLayoutError, make_datum, require


def read_classnames(path: str) -> "OrderedDict[str, str]":
    """classnames.txt: "<wnid> <class name>" a line, in label order."""
    names = OrderedDict()
    with open(require(path, "ImageNet's classnames.txt (from CoOp's DATASETS.md)")) as handle:
        for row, line in enumerate(handle, 1):
            wnid, _, name = line.strip().partition(" ")
            if not name:
                raise DatasetLayoutError(f"{path}, line {row}: expected '<wnid> <class name>', got {line.strip()!r}")
            names[wnid] = name
    return names


def read_class_folders(image_dir: str, classnames, source: str, folders=None):
    """Images in <image_dir>/<folder>/, folder i (sorted) = label i unless `folders` is given."""
    require(image_dir, f"the image folder of {source}")
    if folders is None:
        folders = sorted(f for f in os.listdir(image_dir)
                         if not f.startswith(".") and os.path.isdir(os.path.join(image_dir, f)))
    items = []
    for label, folder in enumerate(folders):
        if folder not in classnames:
            raise DatasetLayoutError(f"{image_dir}/{folder} is not a class listed in {source}'s classnames.txt")
        class_dir = require(os.path.join(image_dir, folder), f"class folder of {source}")
        names = sorted(f for f in os.listdir(class_dir) if not f.startswith("."))
        if not names:  # the class would silently vanish from the label set
            raise DatasetLayoutError(f"class folder {class_dir} ({classnames[folder]}) is empty: {source} would "
                                     f"lose that class (and every later label would shift). Restore its images")
        for name in names:
            items.append(make_datum(os.path.join(class_dir, name), label, classnames[folder], class_dir))
    return items


@DATASET_REGISTRY.register()
class ImageNet(CoOpDataset):
    """<root>/imagenet/: images/{train,val}/<wnid>/, classnames.txt; the parsed lists are cached
    in preprocessed.pkl as CoOp does. Its val images are the test set and double as val."""

    dataset_dir = "imagenet"
    image_dir = "images"
    val_split = "test"

    def read_splits(self):
        preprocessed = os.path.join(self.dataset_dir, "preprocessed.pkl")
        if os.path.isfile(preprocessed):
            with open(preprocessed, "rb") as handle:
                data = pickle.load(handle)
            return data["train"], data["test"], data["test"]
        classnames = read_classnames(os.path.join(self.dataset_dir, "classnames.txt"))
        train = read_class_folders(os.path.join(self.image_dir, "train"), classnames, "ImageNet")
        test = read_class_folders(os.path.join(self.image_dir, "val"), classnames, "ImageNet")
        try:
            atomic_write(preprocessed, lambda h: pickle.dump({"train": train, "test": test}, h,
                                                             protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as err:  # read-only data: parse again next time
            print(f"Not caching the ImageNet file lists: {err}")
        return train, test, test


class ImageNetVariant(DatasetBase):
    """A test-only ImageNet variant: <root>/<dataset_dir>/<image_dir>/<class folder>/ + classnames.txt."""

    dataset_dir = ""
    image_dir = ""

    def __init__(self, cfg):
        root = os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT))
        self.dataset_dir = require(os.path.join(root, type(self).dataset_dir),
                                   f"the folder of DATASET.NAME={type(self).__name__}")
        self.image_dir = os.path.join(self.dataset_dir, type(self).image_dir)
        classnames = read_classnames(os.path.join(self.dataset_dir, "classnames.txt"))
        data = self.read_data(classnames)
        super().__init__(train_x=data, test=data)

    def read_data(self, classnames):
        return read_class_folders(self.image_dir, classnames, type(self).__name__)


# variants whose class folders are WordNet ids: (folder under the root, image folder inside it).
# A and R hold 200 of the 1000 classes; label = index of the class folder in sorted order.
WNID_FOLDER_VARIANTS = {
    "ImageNetSketch": ("imagenet-sketch", "images"),
    "ImageNetA": ("imagenet-adversarial", "imagenet-a"),
    "ImageNetR": ("imagenet-rendition", "imagenet-r"),
}
for _name, (_folder, _images) in WNID_FOLDER_VARIANTS.items():
    DATASET_REGISTRY.register(type(_name, (ImageNetVariant,), {
        "dataset_dir": _folder, "image_dir": _images, "__module__": __name__,
        "__doc__": f"<root>/{_folder}/{_images}/<wnid>/ images, <root>/{_folder}/classnames.txt"}))


@DATASET_REGISTRY.register()
class ImageNetV2(ImageNetVariant):
    """Folders 0..999 named by label (matched-frequency format)."""
    dataset_dir = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"

    def read_data(self, classnames):
        wnids = list(classnames)
        by_label = OrderedDict((str(label), classnames[wnid]) for label, wnid in enumerate(wnids))
        return read_class_folders(self.image_dir, by_label, "ImageNetV2", folders=list(by_label))
