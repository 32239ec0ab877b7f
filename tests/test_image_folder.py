"""DATASET.NAME ImageFolder: your own images as a CoOp dataset (datasets/image_folder.py), and
each bad-data case stopping train.py with one line, exit status 2 and nothing written."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, requires_dassl

pytestmark = requires_dassl


def write_images(folder, counts, size=8):
    """{class folder: number of images} of small solid-colour PNGs under `folder`."""
    for index, (name, count) in enumerate(counts.items()):
        os.makedirs(folder / name, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (size, size), (20 * index, 3 * i, 100)).save(folder / name / f"{i:02d}.png")
    return folder


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def build(root, shots=-1, subsample="all", **keys):
    import datasets  # noqa: F401  registration
    from dassl.data.datasets import build_dataset
    from dassl.utils import set_random_seed
    from helpers import make_cfg
    cfg = make_cfg(root, "ImageFolder", shots=shots, subsample=subsample, cache=root.parent / "cache")
    for key, value in keys.items():
        cfg.DATASET[key] = value
    set_random_seed(1)
    return build_dataset(cfg)


def test_class_folders_give_coops_split_once_and_the_toolkits_files_are_never_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    data = write_images(tmp_path / "data", {"red_circle": 10, "blue-square": 20, "green star": 10, "zebra": 10})
    ds = build(data, shots=2)
    split = json.loads((data / "split_zhou_ImageFolder.json").read_text())
    # CoOp's proportions per class: round(50%) train, round(20%) val, the rest test
    per_class = {part: {c: sum(1 for row in rows if row[2] == c) for c in ("red circle", "blue square")}
                 for part, rows in split.items()}
    assert per_class == {"train": {"red circle": 5, "blue square": 10}, "val": {"red circle": 2, "blue square": 4},
                         "test": {"red circle": 3, "blue square": 6}}
    # labels follow the sorted folder names; names with underscores and dashes as spaces
    assert ds.classnames == ["blue square", "green star", "red circle", "zebra"]
    assert all(os.path.isfile(data / row[0]) for rows in split.values() for row in rows)
    assert len(ds.train_x) == 8 and (data / "split_fewshot" / "shot_2-seed_1.pkl").is_file()
    # the next run: the split file and split_fewshot/ are not classes, the split is read back
    again = build(data, shots=2, subsample="new")
    assert again.classnames == ["red circle", "zebra"]
    assert json.loads((data / "split_zhou_ImageFolder.json").read_text()) == split


def test_train_test_subfolders_a_classes_file_and_a_csv_list(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_images(data / "train", {"cat": 10, "dog": 10})
    write_images(data / "test", {"cat": 3, "dog": 4})
    (data / "names.txt").write_text("dog a small dog\ncat cat\n")
    ds = build(data, CLASSNAMES_FILE="names.txt")
    assert ds.classnames == ["a small dog", "cat"]  # the file's order is the label order
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (16, 4, 7)  # val: 20% of train, as CoOp's split_trainval
    rows = [f"train/{c}/{i:02d}.png,{c}" for c in ("cat", "dog") for i in range(10)]
    (data / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    listed = build(data, IMAGE_FOLDER="list.csv")
    assert listed.classnames == ["cat", "dog"] and (data / "split_zhou_list.json").is_file()
    assert (len(listed.train_x), len(listed.val), len(listed.test)) == (10, 4, 6)


def test_a_read_only_data_folder_gets_its_split_file_in_the_cache(tmp_path, monkeypatch):
    import datasets.image_folder as image_folder
    from vlprompt.files import OutputWriteError
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    data = write_images(tmp_path / "data", {"a": 5, "b": 5})
    real_write = image_folder.atomic_write_text

    def read_only_data(path, text):
        if str(data) in path:
            raise OutputWriteError(f"could not write {path}") from PermissionError(13, "Permission denied")
        real_write(path, text)
    monkeypatch.setattr(image_folder, "atomic_write_text", read_only_data)
    build(data)
    written = list((tmp_path / "cache" / "image_folder").glob("data-*/split_zhou_ImageFolder.json"))
    assert len(written) == 1 and tree(data) == [f"{c}/{i:02d}.png" for c in "ab" for i in range(5)]
    assert build(data).classnames == ["a", "b"]  # read back from the cache


def run_train(data, out, *options):
    """train.py in this process as a user runs it; (exit status, stdout, stderr)."""
    import train
    from vlprompt.errors import report_user_errors
    argv = ["--root", str(data), "--trainer", "CoOp", "--seed", "1",
            "--config-file", os.path.join(ROOT, "configs/trainers/CoOp/demo_toy.yaml"), "--output-dir", str(out),
            "DATASET.NAME", "ImageFolder", "MODEL.BACKBONE.PATH", os.path.join(ROOT, "vlprompt/toyworld/toy_clip.pt"),
            *options]
    saved = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        report_user_errors(lambda: train.main(train.build_parser().parse_args(argv)))()
        return 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = saved


BAD_DATA = {
    "empty class folder": ({"cat": 6, "dog": 0}, [], "empty class folder"),
    "a single class": ({"cat": 6}, [], "at least 2 classes"),
    "unreadable image": ({"cat": 6, "dog": 6}, [], r"cannot be read as images: .*dog/broken\.png"),
    "not an image": ({"cat": 6, "dog": 6}, [], r"not image files among the classes: .*cat/notes\.txt"),
    "fewer images than NUM_SHOTS": ({"cat": 6, "dog": 20}, ["DATASET.NUM_SHOTS", "4"],
                                    r"NUM_SHOTS=4 but .*: cat \(3\); the run does not go on with fewer"),
    "duplicate class names": ({"ice_cream": 6, "ice-cream": 6}, [], "both give the class name 'ice cream'"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_the_run_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    counts, options, message = BAD_DATA[case]
    data = write_images(tmp_path / "data", counts)
    if case == "unreadable image":
        (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    if case == "not an image":
        (data / "cat" / "notes.txt").write_text("taken on holiday")
    before = tree(data)
    code = run_train(data, tmp_path / "out", *options)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert tree(data) == before and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_task_script_takes_a_dataset_yaml_path_and_refuses_bad_data_with_status_2(tmp_path):
    """The scripts accept a dataset YAML outside configs/datasets/ (DATA defaults to its folder)."""
    write_images(tmp_path / "mine", {"cat": 6})
    (tmp_path / "my_pets.yaml").write_text('DATASET:\n  NAME: "ImageFolder"\n  IMAGE_FOLDER: "mine"\n')
    env = dict(os.environ, DATA=str(tmp_path / "elsewhere"))  # not read: the YAML's folder is its root
    env.update(OUTPUT=str(tmp_path / "out"), CFG="demo_toy", PYTHONWARNINGS="ignore",
               VLPROMPT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts/hicropl/base2new_train.sh"),
                           str(tmp_path / "my_pets.yaml"), "1"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "at least 2 classes" in proc.stderr
    assert "my_pets/shots_16/HiCroPL/demo_toy/seed1" in proc.stdout  # named after the YAML's stem
    assert not (tmp_path / "out").exists() and tree(tmp_path / "mine") == [f"cat/{i:02d}.png" for i in range(6)]


def test_the_sweep_takes_a_dataset_yaml_path(tmp_path, monkeypatch, capsys):
    from vlprompt.experiments import sweep
    (tmp_path / "my_pets.yaml").write_text('DATASET:\n  NAME: "ImageFolder"\n  IMAGE_FOLDER: "mine"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA", raising=False)
    assert sweep.main(["--task", "base2new", "--trainer", "HiCroPL", "--datasets", "my_pets.yaml", "--seeds", "1",
                       "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "DATA is not set" not in err  # a YAML's runs need no DATA
    assert f"-m vlprompt.run base2new_train HiCroPL {tmp_path / 'my_pets.yaml'} 1" in out
    # finished runs are found under the YAML's stem, where vlprompt.run writes them
    grid = sweep.Grid("base2new", "HiCroPL", "cfg", "out", [str(tmp_path / "my_pets.yaml")], [1])
    assert grid.expand()[0].outputs[0][0] == "out/base2new/train_base/my_pets/shots_16/HiCroPL/cfg/seed1"
