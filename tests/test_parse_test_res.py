"""parse_test_res.py on hand-written Dassl logs."""
import math

import numpy as np
import pytest

import parse_test_res as ptr
from helpers import eval_log, train_log, write


def test_seed_mean_and_std_like_coop(tmp_path, capsys):
    for seed, acc in zip((1, 2, 3), (70.0, 72.5, 74.0)):
        write(tmp_path / f"seed{seed}" / "log.txt", train_log(acc))
    result = ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END)
    assert result["accuracy"] == pytest.approx(np.mean([70, 72.5, 74]))
    assert result["std"] == pytest.approx(np.std([70, 72.5, 74])) and result["n"] == 3
    assert f"* accuracy: {np.mean([70, 72.5, 74]):.2f}% +- {np.std([70, 72.5, 74]):.2f}%" in capsys.readouterr().out


def test_ci95_and_other_keywords(tmp_path):
    for seed, acc in zip((1, 2), (60.0, 64.0)):
        write(tmp_path / f"seed{seed}" / "log.txt", train_log(acc))
    result = ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END, use_ci95=True)
    assert result["std"] == pytest.approx(1.96 * 2.0 / math.sqrt(2))
    assert ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END, keyword="macro_f1")["macro_f1"] == 40.0


def test_coops_finished_training_wording_is_accepted(tmp_path):
    write(tmp_path / "seed1" / "log.txt", train_log(81.0, end="Finished training"))
    write(tmp_path / "seed2" / "log.txt", train_log(83.0))
    assert ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END)["accuracy"] == 82.0


def test_missing_and_unfinished_seeds_are_reported_not_averaged(tmp_path, capsys):
    write(tmp_path / "seed1" / "log.txt", train_log(80.0))
    write(tmp_path / "seed2" / "log.txt", train_log(0.0, end=None))  # killed before the end
    (tmp_path / "seed3").mkdir()  # never started
    result = ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END)
    assert result["accuracy"] == 80.0 and result["n"] == 1
    out = capsys.readouterr().out
    assert "seed2: skipped, no '* accuracy' after 'Finish(ed)? training' (unfinished run?)" in out
    assert "seed3: skipped, no log.txt" in out


def test_resumed_run_uses_the_newest_finished_log(tmp_path):
    write(tmp_path / "seed1" / "log.txt", train_log(0.0, end=None))
    write(tmp_path / "seed1" / "log.txt-2026-11-30-10-00-00", train_log(77.0))
    assert ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END)["accuracy"] == 77.0


def test_test_logs_and_multi_exp(tmp_path, capsys):
    for dataset, values in {"dtd": (50.0, 52.0), "eurosat": (70.0, 74.0)}.items():
        for seed, acc in enumerate(values, 1):
            write(tmp_path / dataset / f"seed{seed}" / "log.txt", eval_log(acc))
    assert ptr.parse_multi_exp(str(tmp_path), ptr.TEST_END) == pytest.approx((51 + 72) / 2)
    assert "Average performance\n* accuracy: 61.50%" in capsys.readouterr().out


def test_test_only_logs_without_test_log_suggest_the_flag(tmp_path, capsys):
    for seed in (1, 2):
        write(tmp_path / f"seed{seed}" / "log.txt", eval_log(50.0))
    assert ptr.main([str(tmp_path)]) != 0
    captured = capsys.readouterr()
    assert "seed1: skipped, a test-only log (an --eval-only run), not a training run's: parse it with --test-log" \
        in captured.out + captured.err
    assert "unfinished" not in captured.out + captured.err
    assert ptr.main([str(tmp_path), "--test-log"]) == 0


def test_nothing_found_is_an_error_with_the_folder(tmp_path):
    write(tmp_path / "seed1" / "log.txt", train_log(0.0, end=None))
    with pytest.raises(ptr.ResultsError, match=f"Nothing found in {tmp_path}"):
        ptr.parse_seeds(str(tmp_path), ptr.TRAIN_END)
    assert ptr.main([str(tmp_path)]) == 1


def base2new_layout(root, results, trainer="HiCroPL", cfg="c16"):
    for dataset, (base, new) in results.items():
        common = f"{dataset}/shots_16/{trainer}/{cfg}"
        for seed, acc in enumerate(base, 1):
            write(root / "train_base" / common / f"seed{seed}" / "log.txt", train_log(acc))
        for seed, acc in enumerate(new, 1):
            write(root / "test_new" / common / f"seed{seed}" / "log.txt", eval_log(acc))


def test_base2new_summary_table_and_files(tmp_path):
    base2new_layout(tmp_path, {"eurosat": ((90.0, 92.0), (70.0, 72.0)), "imagenet": ((78.0, 78.0), (70.0, 70.0)),
                               "dtd": ((80.0,), ())})  # dtd: new results missing
    rows, average, problems = ptr.base2new_summary(str(tmp_path), out=lambda *_: None)
    assert [r["dataset"] for r in rows] == ["imagenet", "dtd", "eurosat"]  # the papers' order
    eurosat = rows[2]
    assert (eurosat["base"], eurosat["new"]) == (91.0, 71.0)
    assert eurosat["hm"] == pytest.approx(2 * 91 * 71 / (91 + 71))
    assert rows[1]["new"] is None and rows[1]["hm"] is None
    assert any("test_new/dtd" in p and "missing" in p for p in problems)
    assert average["base"] == pytest.approx((91 + 78) / 2) and average["new"] == pytest.approx((71 + 70) / 2)
    assert average["hm"] == pytest.approx(ptr.harmonic_mean(84.5, 70.5))
    csv_text = (tmp_path / "base2new_HiCroPL_c16.csv").read_text().splitlines()
    assert csv_text[0] == "dataset,base,new,hm,seeds" and csv_text[2] == "dtd,80.00,,,0 (no New: seed1)"
    md = (tmp_path / "base2new_HiCroPL_c16.md").read_text()
    assert "| eurosat" in md and "missing" in md and "| 79.77 " in md


def test_base2new_hm_is_over_the_seeds_with_both_halves(tmp_path, capsys):
    """Base from seeds 3 and 4, New from seed 4 only: all three numbers from seed 4, seed 3 named."""
    common = "eurosat/shots_16/HiCroPL/c16"
    for seed, acc in ((3, 90.0), (4, 80.0)):
        write(tmp_path / "train_base" / common / f"seed{seed}" / "log.txt", train_log(acc))
    write(tmp_path / "test_new" / common / "seed4" / "log.txt", eval_log(60.0))
    write(tmp_path / "test_new" / common / "seed5" / "log.txt", eval_log(50.0))
    rows, average, _ = ptr.base2new_summary(str(tmp_path))
    assert (rows[0]["base"], rows[0]["new"]) == (80.0, 60.0)
    assert rows[0]["hm"] == pytest.approx(ptr.harmonic_mean(80.0, 60.0))
    assert rows[0]["seeds"] == "1 (no New: seed3; no Base: seed5)"
    assert "| eurosat              | 80.00  | 60.00 | 68.57 | 1 (no New: seed3; no Base: seed5) |" in capsys.readouterr().out


def test_base2new_needs_a_choice_between_methods(tmp_path):
    base2new_layout(tmp_path, {"dtd": ((80.0,), (60.0,))}, trainer="HiCroPL")
    base2new_layout(tmp_path, {"dtd": ((75.0,), (65.0,))}, trainer="MaPLe", cfg="vit_b16_c2_ep5_batch4_2ctx")
    with pytest.raises(ptr.ResultsError, match="--trainer MaPLe --cfg vit_b16_c2_ep5_batch4_2ctx"):
        ptr.base2new_summary(str(tmp_path), out=lambda *_: None)
    rows, _, _ = ptr.base2new_summary(str(tmp_path), trainer="MaPLe", out=lambda *_: None)
    assert rows[0]["base"] == 75.0


def test_zero_shot_base_comes_from_test_base(tmp_path):
    common = "dtd/shots_16/ZeroshotCLIP/vit_b16/seed1/log.txt"
    write(tmp_path / "test_base" / common, eval_log(53.2))
    write(tmp_path / "test_new" / common, eval_log(60.4))
    rows, _, _ = ptr.base2new_summary(str(tmp_path), out=lambda *_: None)
    assert (rows[0]["base"], rows[0]["new"]) == (53.2, 60.4)
