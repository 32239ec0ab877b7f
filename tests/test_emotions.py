"""FER-2013 and RAF-DB readers, the EdgeCNN trainer, and CLIP trainers on the emotion data."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import requires_dassl, write_workspace
from helpers import accuracies, build_dataset, make_cfg, run

pytestmark = requires_dassl
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def face(value):
    return " ".join([str(value)] * 2304)


def write_csv(folder, rows, header="emotion,pixels,Usage"):
    os.makedirs(folder / "fer2013", exist_ok=True)
    path = folder / "fer2013" / "fer2013.csv"
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_fer_csv_splits_labels_and_decoded_pixels(tmp_path, capsys):
    write_csv(tmp_path, [f"3,{face(10)},Training", f"0,{face(20)},Training", f"6,{face(30)},PublicTest",
                         f"5,{face(40)},PrivateTest"])
    ds = build_dataset(tmp_path, "FER2013")
    assert ds.classnames == ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]
    assert ds.num_classes == 7  # all seven, although this tiny CSV lacks some
    assert [(d.label, d.classname) for d in ds.train_x] == [(3, "happy"), (0, "angry")]
    assert [d.label for d in ds.val] == [6] and [d.label for d in ds.test] == [5]
    assert np.asarray(Image.open(ds.test[0].impath)).tolist() == [[40] * 48] * 48
    assert ds.test[0].impath.startswith(str(tmp_path / "fer2013" / "images"))
    assert "Decoding" in capsys.readouterr().out
    build_dataset(tmp_path, "FER2013")  # decoded once: the image cache is reused
    assert "Decoding" not in capsys.readouterr().out


def test_changed_csv_is_decoded_again(tmp_path):
    write_csv(tmp_path, [f"1,{face(1)},Training", f"2,{face(2)},PrivateTest", f"2,{face(2)},PublicTest"])
    assert [d.label for d in build_dataset(tmp_path, "FER2013").train_x] == [1]
    os.utime(write_csv(tmp_path, [f"4,{face(1)},Training", f"2,{face(2)},PrivateTest", f"2,{face(2)},PublicTest"]),
             ns=(1, 2))
    assert [d.label for d in build_dataset(tmp_path, "FER2013").train_x] == [4]


@pytest.mark.parametrize("row,message", [
    (f"9,{face(1)},Training", "line 3: emotion '9' is not an integer 0-6"),
    ("2,1 2 3,Training", "line 3: 3 pixel values, expected 2304"),
    (f"2,{face(1)},Validation", "line 3: Usage 'Validation' is not one of"),
    (f"2,{face(300)},Training", "line 3: pixel values must lie in 0-255"),
    (f"2,{face('x')},Training", "line 3: pixels must be integers"),
    (f"2,{face(1)}", "line 3: 2 fields, expected 3"),
])
def test_malformed_fer_row_names_line_and_problem(tmp_path, row, message):
    from datasets.emotions import FerRowError
    write_csv(tmp_path, [f"0,{face(0)},Training", row])
    with pytest.raises(FerRowError, match=re.escape(message)):
        build_dataset(tmp_path, "FER2013")
    assert not (tmp_path / "fer2013" / "images").exists()  # nothing half-written


def test_missing_csv_and_bad_header(tmp_path):
    from datasets.coop_split import DatasetLayoutError
    from datasets.emotions import FerRowError
    (tmp_path / "fer2013").mkdir()
    with pytest.raises(DatasetLayoutError, match="fer2013.csv not found: the Kaggle FER-2013 file"):
        build_dataset(tmp_path, "FER2013")
    write_csv(tmp_path, [f"0,{face(0)},Training"], header="label,image,split")
    with pytest.raises(FerRowError, match=r"line 1: the header lacks column\(s\)"):
        build_dataset(tmp_path, "FER2013")


def write_raf(tmp_path, lines):
    base = tmp_path / "RAF-DB" / "basic"
    (base / "EmoLabel").mkdir(parents=True)
    (base / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{line}\n" for line in lines))
    for line in lines:
        name = line.split()[0].replace(".jpg", "_aligned.jpg")
        os.makedirs(base / "Image" / "aligned", exist_ok=True)
        Image.new("RGB", (100, 100)).save(base / "Image" / "aligned" / name)
    return base


def test_raf_labels_in_raf_and_fer_order(tmp_path):
    write_raf(tmp_path, [f"train_{i:05d}.jpg {i}" for i in range(1, 8)] + ["test_00001.jpg 6"])
    raf = build_dataset(tmp_path, "RAFDB")
    assert [d.label for d in raf.train_x] == list(range(7))
    assert raf.classnames == ["surprised", "fearful", "disgusted", "happy", "sad", "angry", "neutral"]
    assert raf.val is None and [d.classname for d in raf.test] == ["angry"]
    fer = build_with(tmp_path, "RAFDB", RAF_LABEL_ORDER="fer")
    # RAF 1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral -> FER 5, 2, 1, 3, 4, 0, 6
    assert [d.label for d in fer.train_x] == [5, 2, 1, 3, 4, 0, 6]
    assert [(d.label, d.classname) for d in fer.test] == [(0, "angry")]


def build_with(root, name, **dataset_keys):
    import datasets  # noqa: F401
    from dassl.data.datasets import build_dataset
    cfg = make_cfg(root, name)
    for key, value in dataset_keys.items():
        setattr(cfg.DATASET, key, value)
    return build_dataset(cfg)


def test_raf_bad_label_line_and_missing_image(tmp_path):
    from datasets.coop_split import DatasetLayoutError
    base = write_raf(tmp_path, ["train_00001.jpg 1", "test_00001.jpg 8"])
    with pytest.raises(DatasetLayoutError, match=r"line 2: expected '<train\|test>_NNNNN.jpg <label 1-7>'"):
        build_dataset(tmp_path, "RAFDB")
    (base / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 1\ntrain_00009.jpg 2\n")
    with pytest.raises(DatasetLayoutError, match="train_00009_aligned.jpg listed in .* does not exist"):
        build_dataset(tmp_path, "RAFDB")


@pytest.fixture(scope="module")
def emotion_data(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("emotions"), {"FER2013": (7, (6, 2, 3)), "RAFDB": (7, (6, 2, 3))})


def edgecnn_command(data, out, dataset="fer2013", *options, model_dir=None):
    """train.py for EdgeCNN; with `model_dir`, an evaluation of the model there."""
    config = "fer2013" if dataset == "fer2013" else "rafdb"
    evaluate = ["--eval-only", "--model-dir", str(model_dir)] if model_dir else []
    return [os.sys.executable, os.path.join(ROOT, "train.py"), *evaluate, "--root", str(data), "--seed", "1",
            "--trainer", "EdgeCNN", "--dataset-config-file", os.path.join(ROOT, f"configs/datasets/{dataset}.yaml"),
            "--config-file", os.path.join(ROOT, f"configs/trainers/EdgeCNN/{config}.yaml"), "--output-dir", str(out),
            "OPTIM.MAX_EPOCH", "3", "OPTIM.LR", "0.05", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "14", *options]


@pytest.fixture(scope="module")
def edgecnn_run(emotion_data):
    out = emotion_data / "edgecnn"
    return out, run(edgecnn_command(emotion_data / "data", out))


def test_edgecnn_trainer_trains_and_tests_with_ten_crops(edgecnn_run):
    out, proc = edgecnn_run
    assert "EdgeCNN parameters: 418,487" in proc.stdout
    assert "* total: 21" in proc.stdout  # PrivateTest: 7 classes x 3, each ten-cropped
    assert "Evaluate on the *val* set" in proc.stdout  # model selection on PublicTest
    assert (out / "model" / "model-best.pth.tar").exists() and (out / "model" / "model.pth.tar-3").exists()
    from benchmarks.edge_report import load_trained_edgecnn
    model = load_trained_edgecnn(str(out / "model" / "model.pth.tar-3"))
    assert sum(p.numel() for p in model.parameters()) == 418_487


def write_release_t7(folder, state_dict, pickled_module=False):
    """`<dataset>_EdgeCNN/PrivateTest_model.t7` as the release's training script saves it: our
    weights under the release's layer names (from the fixture frozen from its code), in order."""
    import collections
    import torch
    from helpers import load_fixture
    names = [name for name, _, _ in load_fixture("edgecnn")["t7"]["FER2013"]["state_dict"]]
    net = collections.OrderedDict(zip(names, state_dict.values()))
    if pickled_module:  # a CPU-only run of the release pickles its module itself: one with its names
        module = torch.nn.Module()
        for name, value in net.items():
            *path, leaf = name.split(".")
            parent = module
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_buffer(leaf, value.clone())
        net = module
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"net": net, "best_PrivateTest_acc": 71.8, "best_PrivateTest_acc_epoch": 263},
               folder / "PrivateTest_model.t7")
    return folder


def test_release_t7_models_evaluate_like_ours_and_raf_needs_fer_order(edgecnn_run, emotion_data):
    import torch
    out, _ = edgecnn_run
    ours = torch.load(out / "model" / "model-best.pth.tar", weights_only=True)["state_dict"]
    release = write_release_t7(emotion_data / "FER2013_EdgeCNN", ours)
    data = emotion_data / "data"
    ours_eval = run(edgecnn_command(data, emotion_data / "eval_ours", model_dir=out))
    release_eval = run(edgecnn_command(data, emotion_data / "eval_release", model_dir=release))
    assert "is a checkpoint of the official release (best PrivateTest accuracy 71.8 at epoch 263)" in release_eval.stdout
    assert accuracies(release_eval.stdout) == accuracies(ours_eval.stdout) and accuracies(ours_eval.stdout)
    refused = run(edgecnn_command(data, emotion_data / "raf_eval", "rafdb", model_dir=release),
                  expect_ok=False)
    assert refused.returncode == 2 and "set DATASET.RAF_LABEL_ORDER fer" in refused.stderr
    raf = run(edgecnn_command(data, emotion_data / "raf_eval", "rafdb", "DATASET.RAF_LABEL_ORDER", "fer", model_dir=release))
    assert accuracies(raf.stdout)
    pickled = write_release_t7(emotion_data / "CPU_EdgeCNN", ours, pickled_module=True)
    refused = run(edgecnn_command(data, emotion_data / "cpu_eval", model_dir=pickled),
                  expect_ok=False)
    assert refused.returncode == 2 and "set MODEL.TRUST_RELEASE_CHECKPOINT True" in refused.stderr
    trusted = run(edgecnn_command(data, emotion_data / "cpu_eval", "fer2013", "MODEL.TRUST_RELEASE_CHECKPOINT", "True", model_dir=pickled))
    assert accuracies(trusted.stdout) == accuracies(ours_eval.stdout)


def test_clip_trainers_run_on_the_emotion_datasets(emotion_data):
    """The same data at CLIP's resolution, with the seven emotion names as class names."""
    for dataset in ("fer2013", "rafdb"):
        cmd = [os.sys.executable, os.path.join(ROOT, "train.py"), "--root", str(emotion_data / "data"),
               "--trainer", "ZeroshotCLIP", "--dataset-config-file", os.path.join(ROOT, f"configs/datasets/{dataset}.yaml"),
               "--config-file", os.path.join(ROOT, "configs/trainers/ZeroshotCLIP/vit_b16.yaml"),
               "--output-dir", str(emotion_data / f"zs_{dataset}"), "--eval-only",
               "MODEL.BACKBONE.PATH", str(emotion_data / "tiny_clip.pt"), "INPUT.SIZE", "(32, 32)",
               "TRAINER.ZSCLIP.PREC", "fp32", "DATALOADER.NUM_WORKERS", "0",
               "MODEL.FEATURE_CACHE_DIR", str(emotion_data / "cache")]
        proc = run(cmd)
        assert "Class text templates: ['a photo of a face looking {}.']" in proc.stdout
        assert "* total: 21" in proc.stdout and re.search(r"\* accuracy: [\d.]+%", proc.stdout)
