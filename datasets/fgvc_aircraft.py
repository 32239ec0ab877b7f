from dassl.data.datasets import DATASET_REGISTRY

from .coop_split import CoOpDataset, DatasetLayoutError, make_datum, require


@DATASET_REGISTRY.register()
class FGVCAircraft(CoOpDataset):
    """<root>/fgvc_aircraft/: images/<id>.jpg, variants.txt (class names, one a line) and
    images_variant_{train,val,test}.txt ("<id> <variant>" a line), as in the FGVC release."""

    dataset_dir = "fgvc_aircraft"
    image_dir = "images"

    def read_splits(self):
        path = require(f"{self.dataset_dir}/variants.txt", "the FGVC-Aircraft class list")
        with open(path) as handle:
            classnames = [line.strip() for line in handle if line.strip()]
        label_of = {name: label for label, name in enumerate(classnames)}
        return tuple(self.read_list(f"images_variant_{part}.txt", label_of) for part in ("train", "val", "test"))

    def read_list(self, file_name, label_of):
        path = require(f"{self.dataset_dir}/{file_name}", "an FGVC-Aircraft split list")
        items = []
        with open(path) as handle:
            for row, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                image_id, _, classname = line.strip().partition(" ")
                if classname not in label_of:
                    raise DatasetLayoutError(f"{path}, line {row}: variant {classname!r} is not in variants.txt")
                items.append(make_datum(f"{self.image_dir}/{image_id}.jpg", label_of[classname], classname, path))
        return items
