"""The 15 CoOp datasets, written in miniature in their on-disk layouts and read back."""
import json
import math
import os
import pickle
import random

import pytest

from conftest import requires_dassl
from helpers import build_dataset

pytestmark = requires_dassl

SPLIT_FILE = ["OxfordPets", "OxfordFlowers", "StanfordCars", "Food101", "SUN397", "DescribableTextures",
              "EuroSAT", "UCF101", "Caltech101"]
VARIANTS = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
N_CLASSES, PER_SPLIT = 6, (5, 3, 2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from datasets.synthetic import write_dataset
    root = tmp_path_factory.mktemp("coop")
    for name in SPLIT_FILE + ["FGVCAircraft", "ImageNet"] + VARIANTS:
        write_dataset(str(root), name, N_CLASSES, PER_SPLIT)
    return root


def expected_names(name):
    from datasets.synthetic import default_classnames
    names = default_classnames(N_CLASSES)
    return [n.replace("_", "-") if name == "FGVCAircraft" else n.replace("_", " ") for n in names]


@pytest.mark.parametrize("name", SPLIT_FILE + ["FGVCAircraft"])
def test_split_datasets_classes_labels_and_splits(data_root, name):
    ds = build_dataset(data_root, name)
    assert ds.classnames == expected_names(name) and ds.num_classes == N_CLASSES
    for split, count in zip((ds.train_x, ds.val, ds.test), PER_SPLIT):
        assert len(split) == N_CLASSES * count
        assert all(ds.classnames[d.label] == d.classname and os.path.isfile(d.impath) for d in split)


def test_imagenet_reads_folders_and_caches_the_lists(data_root):
    ds = build_dataset(data_root, "ImageNet")
    assert ds.classnames == expected_names("ImageNet")
    assert len(ds.train_x) == N_CLASSES * PER_SPLIT[0] and ds.val == ds.test  # val doubles as test
    assert (data_root / "imagenet" / "preprocessed.pkl").exists()
    again = build_dataset(data_root, "ImageNet")  # from preprocessed.pkl, as CoOp does
    assert [d.impath for d in again.train_x] == [d.impath for d in ds.train_x]


@pytest.mark.parametrize("name", VARIANTS)
def test_imagenet_variants(data_root, name):
    ds = build_dataset(data_root, name)
    names = expected_names(name)
    kept = names[::2] if name in ("ImageNetA", "ImageNetR") else names  # A and R: a class subset
    assert ds.classnames == kept and len(ds.test) == len(kept) * PER_SPLIT[2]
    assert sorted({d.label for d in ds.test}) == list(range(len(kept)))


def test_few_shot_same_seed_same_images_as_coop_and_cache_reused(data_root, monkeypatch):
    from dassl.data.datasets import DatasetBase
    from dassl.utils import set_random_seed
    cache = data_root / "eurosat" / "split_fewshot" / "shot_2-seed_7.pkl"
    cache.unlink(missing_ok=True)
    full = build_dataset(data_root, "EuroSAT")
    set_random_seed(7)  # what CoOp's train.py does before building the dataset
    coop_train = full.generate_fewshot_dataset(full.train_x, num_shots=2)
    coop_val = full.generate_fewshot_dataset(full.val, num_shots=2)
    set_random_seed(7)
    ours = build_dataset(data_root, "EuroSAT", shots=2, seed=7)
    assert [d.impath for d in ours.train_x] == [d.impath for d in coop_train]
    assert [d.impath for d in ours.val] == [d.impath for d in coop_val]
    assert cache.exists()

    def must_not_sample(*args, **kwargs):
        raise AssertionError("the cached few-shot split should have been reused")
    monkeypatch.setattr(DatasetBase, "generate_fewshot_dataset", must_not_sample)
    random.seed(12345)  # a different global state: the cache decides
    again = build_dataset(data_root, "EuroSAT", shots=2, seed=7)
    assert [d.impath for d in again.train_x] == [d.impath for d in ours.train_x]


def test_few_shot_cache_written_by_coop_is_reused_unchanged(data_root):
    """A cache as CoOp writes it (pickle of Dassl Datum lists) with a selection our sampler would
    not make: our dataset must take it as is and leave the file alone."""
    from dassl.data.datasets import Datum
    full = build_dataset(data_root, "DescribableTextures")
    chosen = [d for d in full.train_x if d.label % 2 == 0][:3] + [full.train_x[-1]]
    chosen = [Datum(impath=d.impath, label=d.label, classname=d.classname) for d in chosen]
    val = [Datum(impath=d.impath, label=d.label, classname=d.classname) for d in full.val[:2]]
    path = data_root / "dtd" / "split_fewshot" / "shot_4-seed_3.pkl"
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"train": chosen, "val": val}, handle, protocol=pickle.HIGHEST_PROTOCOL)
    before = path.read_bytes()
    # its classes hold 1 and 3 of the 4 shots: used as they are only when allowed (else refused)
    ds = build_dataset(data_root, "DescribableTextures", shots=4, seed=3, allow_fewer_shots=True)
    assert [d.impath for d in ds.train_x] == [d.impath for d in chosen]
    assert [d.impath for d in ds.val] == [d.impath for d in val]
    assert path.read_bytes() == before


@pytest.mark.parametrize("n_classes", [6, 7])
def test_base_new_split_is_coops(tmp_path, n_classes):
    from datasets.synthetic import default_classnames, write_dataset
    write_dataset(str(tmp_path), "OxfordPets", n_classes, (2, 1, 1))
    names = [n.replace("_", " ") for n in default_classnames(n_classes)]
    half = math.ceil(n_classes / 2)
    base = build_dataset(tmp_path, "OxfordPets", subsample="base")
    new = build_dataset(tmp_path, "OxfordPets", subsample="new")
    assert base.classnames == names[:half] and new.classnames == names[half:]
    for ds, offset in ((base, 0), (new, half)):
        for split in (ds.train_x, ds.val, ds.test):
            assert all(names[d.label + offset] == d.classname for d in split)  # relabelled from 0
    assert len(new.test) == n_classes - half


def test_missing_folder_split_file_and_image_name_the_path(tmp_path):
    from datasets.coop_split import DatasetLayoutError
    from datasets.synthetic import write_dataset
    with pytest.raises(DatasetLayoutError, match=f"{tmp_path / 'food-101'} not found: the folder of DATASET.NAME=Food101"):
        build_dataset(tmp_path, "Food101")
    folder = write_dataset(str(tmp_path), "Food101", 3, (1, 1, 1))
    split_file = os.path.join(folder, "split_zhou_Food101.json")
    split = json.load(open(split_file))
    os.rename(split_file, split_file + ".bak")
    with pytest.raises(DatasetLayoutError, match="split_zhou_Food101.json not found: CoOp's split file"):
        build_dataset(tmp_path, "Food101")
    split["test"].append(["ghost/none.jpg", 0, "x"])
    json.dump(split, open(split_file, "w"))
    with pytest.raises(DatasetLayoutError, match="ghost/none.jpg listed in .*split_zhou_Food101.json does not exist"):
        build_dataset(tmp_path, "Food101")
    open(split_file, "w").write("{broken")
    with pytest.raises(DatasetLayoutError, match="not valid JSON"):
        build_dataset(tmp_path, "Food101")


def test_read_only_dataset_folder_puts_the_few_shot_cache_elsewhere(tmp_path, monkeypatch, capsys):
    import datasets.coop_split as coop
    from datasets.synthetic import write_dataset
    from dassl.utils import set_random_seed
    from vlprompt.files import OutputWriteError
    write_dataset(str(tmp_path / "data"), "UCF101", 4, (3, 2, 1))
    real_write = coop.atomic_write

    def read_only_data(path, write):  # as on shared storage: the data folder refuses writes
        if str(tmp_path / "data") in path:
            raise OutputWriteError(f"could not write {path}") from PermissionError(13, "Permission denied")
        real_write(path, write)
    monkeypatch.setattr(coop, "atomic_write", read_only_data)
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    set_random_seed(5)
    first = build_dataset(tmp_path / "data", "UCF101", shots=2, seed=5)
    fallback = tmp_path / "cache" / "split_fewshot" / "ucf101" / "shot_2-seed_5.pkl"
    assert fallback.exists() and str(fallback) in capsys.readouterr().out
    random.seed(99)
    second = build_dataset(tmp_path / "data", "UCF101", shots=2, seed=5)
    assert [d.impath for d in second.train_x] == [d.impath for d in first.train_x]


def test_datasets_build_under_a_stock_dassl_config_with_subsample_classes(tmp_path, monkeypatch):
    """CoOp/MaPLe code builds datasets from Dassl's default config plus DATASET.SUBSAMPLE_CLASSES:
    our classes read DATASET.* keys only, so they work there too."""
    import datasets  # noqa: F401  registration
    from dassl.config import get_cfg_default
    from dassl.data.datasets import build_dataset as dassl_build_dataset
    from datasets.synthetic import write_dataset
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    write_dataset(str(tmp_path / "data"), "EuroSAT", 4, (3, 2, 2))
    cfg = get_cfg_default()
    cfg.DATASET.SUBSAMPLE_CLASSES = "new"
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.DATASET.NUM_SHOTS, cfg.SEED = str(tmp_path / "data"), "EuroSAT", 2, 1
    ds = dassl_build_dataset(cfg)
    from datasets.synthetic import default_classnames
    assert ds.classnames == [n.replace("_", " ") for n in default_classnames(4)[2:]]
    assert len(ds.train_x) == 2 * 2 and (tmp_path / "data/eurosat/split_fewshot/shot_2-seed_1.pkl").exists()
