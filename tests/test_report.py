"""The results report on hand-written output folders laid out as MaPLe/PromptSRC/CoOp lay them out."""
import csv

import numpy as np
import pytest
from PIL import Image

from test_parse_test_res import base2new_layout, eval_log, train_log, write
from vlprompt.report import report


def assert_picture(path):
    """A real figure: opens as an image, and is not a blank canvas."""
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 300 and image.shape[1] > 400
    assert (image < 128).mean() > 0.01 and len(np.unique(image)) > 20


def test_base2new_report_beside_maple_with_incomplete_seeds_marked(tmp_path):
    base2new_layout(tmp_path / "base2new", {"dtd": ((82.0, 84.0, 83.0), (60.0, 62.0, 61.0)),
                               "eurosat": ((95.0, 96.0, 97.0), (70.0, 72.0, 74.0))}, "HiCroPL", "c16")
    base2new_layout(tmp_path / "base2new", {"dtd": ((80.0, 81.0, 82.0), (58.0, 59.0, 60.0)), "eurosat": ((94.0, 95.0), (73.0, 74.0))},
                    "MaPLe", "vit_b16_c2_ep5_batch4_2ctx")
    zero_shot = "shots_16/ZeroshotCLIP/vit_b16/seed1/log.txt"
    for dataset, (b, n) in {"dtd": (53.2, 59.9), "eurosat": (56.5, 64.1)}.items():
        write(tmp_path / "base2new/test_base" / dataset / zero_shot, eval_log(b))
        write(tmp_path / "base2new/test_new" / dataset / zero_shot, eval_log(n))
    rows = report("base2new", ["HiCroPL/c16", "MaPLe/vit_b16_c2_ep5_batch4_2ctx", "ZeroshotCLIP"], str(tmp_path),
                  ["eurosat", "dtd"], out=str(tmp_path / "report"), echo=lambda *_: None)
    md = (tmp_path / "report" / "base2new.md").read_text()
    assert "| HiCroPL | dtd | 83.00 ± 0.82 | 61.00 ± 0.82 | 70.32 |" in md  # papers' dataset order
    assert "| MaPLe | eurosat | 94.50 ± 0.50 (incomplete: 2/3 seeds) | 73.50 ± 0.50 (incomplete: 2/3 seeds)" in md
    assert "| MaPLe | Average (1/2 datasets) |" in md  # averages only complete datasets, and says so
    assert "| ZeroshotCLIP | dtd | 53.20 ± 0.00 | 59.90 ± 0.00 |" in md  # one deterministic run
    average = [r for r in rows if r["method"] == "HiCroPL" and r["dataset"].startswith("Average")][0]
    assert average["base"].mean == pytest.approx(89.5) and average["new"].mean == pytest.approx(66.5)
    table = list(csv.DictReader(open(tmp_path / "report" / "base2new.csv")))
    maple = [r for r in table if r["method"] == "MaPLe" and r["dataset"] == "eurosat" and r["metric"] == "base"][0]
    assert (maple["mean"], maple["seeds_found"], maple["seeds_expected"], maple["complete"]) == ("94.50", "2", "3", "False")
    assert_picture(tmp_path / "report" / "base2new.png")
    assert (tmp_path / "report" / "base2new.pdf").read_bytes()[:4] == b"%PDF"


def test_few_shot_curves_with_coop_layout_template(tmp_path):
    coop = "{output}/{dataset}/CoOp/vit_b16_{shots}shots/nctx16_cscFalse_ctpend/seed{seed}"
    for dataset in ("dtd", "ucf101"):
        for shots, acc in zip((1, 2, 4), (40.0, 50.0, 60.0)):
            for seed in (1, 2, 3):
                if not (dataset == "ucf101" and shots == 4 and seed == 3):  # one run missing
                    write(tmp_path / dataset / "HiCroPL" / f"f_{shots}shots" / f"seed{seed}" / "log.txt",
                          train_log(acc + seed))
                write(tmp_path / coop.format(output="", dataset=dataset, shots=shots, seed=seed).lstrip("/") / "log.txt",
                      train_log(acc - 5))
    rows = report("fewshot", ["HiCroPL/f", f"CoOp={tmp_path}/" + coop.replace("{output}/", "")], str(tmp_path),
                  ["dtd", "ucf101"], shots=[1, 2, 4], out=str(tmp_path / "r"), echo=lambda *_: None)
    ours = {r["shots"]: r for r in rows if r["method"] == "HiCroPL"}
    assert ours[2]["cells"]["dtd"].mean == pytest.approx(52.0)
    assert not ours[4]["cells"]["ucf101"].complete and ours[4]["average_of"] == 1
    md = (tmp_path / "r" / "fewshot.md").read_text()
    assert "| HiCroPL | 4 | 62.00 ± 0.82 | 61.50 ± 0.50 (incomplete: 2/3 seeds) | 62.00 (over 1/2 complete) |" in md
    assert "| CoOp | 1 | 35.00 ± 0.00 | 35.00 ± 0.00 | 35.00 |" in md
    assert_picture(tmp_path / "r" / "fewshot.png")


def test_cross_dataset_report_includes_the_source(tmp_path):
    for seed in (1, 2):
        write(tmp_path / "imagenet/HiCroPL/x_16shots" / f"seed{seed}" / "log.txt", train_log(72.0 + seed))
        for dataset, acc in {"dtd": 45.0, "eurosat": 48.0}.items():
            write(tmp_path / "evaluation/HiCroPL/x_16shots" / dataset / f"seed{seed}" / "log.txt", eval_log(acc + seed))
    rows = report("xd", ["HiCroPL/x"], str(tmp_path), ["imagenet", "dtd", "eurosat"], seeds=[1, 2],
                  out=str(tmp_path / "r"), echo=lambda *_: None)
    assert rows[0]["cells"]["imagenet"].mean == 73.5
    assert rows[0]["average"] == pytest.approx((46.5 + 49.5) / 2)  # targets only, not the source
    assert_picture(tmp_path / "r" / "xd.png")


def test_method_without_a_config_must_name_it():
    with pytest.raises(SystemExit, match="give its config as MaPLe/CFG"):
        report("base2new", ["MaPLe"], "out", ["dtd"], echo=lambda *_: None)
