"""The comparison report on hand-written output folders laid out as MaPLe/PromptSRC/CoOp lay them out."""
import csv
import math

import numpy as np
import pytest
from PIL import Image

from vlprompt.experiments import report_figures
from vlprompt.experiments.report import build, main, report
from helpers import eval_log, train_log, write
from test_parse_test_res import base2new_layout

QUIET = dict(echo=lambda *_: None, warn=lambda *_: None)


def assert_picture(path):
    """A real figure: opens as an image, and is not a blank canvas."""
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 300 and image.shape[1] > 400
    assert (image < 128).mean() > 0.01 and len(np.unique(image)) > 20


def zero_shot_layout(root, results):
    for dataset, (base, new) in results.items():
        write(root / "base2new/test_base" / dataset / "shots_16/ZeroshotCLIP/vit_b16/seed1/log.txt", eval_log(base))
        write(root / "base2new/test_new" / dataset / "shots_16/ZeroshotCLIP/vit_b16/seed1/log.txt", eval_log(new))


@pytest.fixture
def three_methods(tmp_path):
    """3 methods x 3 datasets: MaPLe lacks eurosat's seed 3, zero-shot CLIP lacks eurosat."""
    base2new_layout(tmp_path / "base2new", {"caltech101": ((98.0, 98.0, 98.3), (95.0, 95.0, 95.3)),
                                            "dtd": ((82.0, 84.0, 83.0), (60.0, 62.0, 61.0)),
                                            "eurosat": ((95.0, 96.0, 97.0), (70.0, 72.0, 74.0))}, "HiCroPL", "c16")
    base2new_layout(tmp_path / "base2new", {"caltech101": ((97.0, 97.0, 97.0), (94.0, 94.0, 94.0)),
                                            "dtd": ((80.0, 81.0, 82.0), (58.0, 59.0, 60.0)),
                                            "eurosat": ((94.0, 95.0), (73.0, 74.0))},
                    "MaPLe", "vit_b16_c2_ep5_batch4_2ctx")
    zero_shot_layout(tmp_path, {"caltech101": (96.8, 94.0), "dtd": (53.2, 59.9)})
    return tmp_path


METHODS = ["CLIP=ZeroshotCLIP/vit_b16", "MaPLe/vit_b16_c2_ep5_batch4_2ctx", "HiCroPL/c16"]
DATASETS = ["eurosat", "dtd", "caltech101"]  # printed in the papers' order whatever the order given


def test_base2new_table_has_the_hicropl_paper_layout(three_methods):
    report("base2new", METHODS, str(three_methods), DATASETS, out=str(three_methods / "report"), **QUIET)
    md = (three_methods / "report" / "base2new.md").read_text()
    blocks = [line for line in md.splitlines() if line.startswith("## ")]
    assert blocks == ["## Average over 3 datasets", "## Caltech101", "## DTD", "## EuroSAT", "## HM per dataset"]
    dtd = md.split("## DTD")[1].split("##")[0].strip().splitlines()
    assert dtd[0] == "| Method | Base | New | HM |"
    assert [row.split(" | ")[0] for row in dtd[2:]] == ["| CLIP", "| MaPLe", "| HiCroPL"]  # one row per method
    per_seed_hm = [2 * b * n / (b + n) for b, n in ((82.0, 60.0), (84.0, 62.0), (83.0, 61.0))]
    assert f"| HiCroPL | 83.00 ± 0.82 | 61.00 ± 0.82 | 70.32 ± {np.std(per_seed_hm):.2f} |" in dtd
    assert "| CLIP | 53.20 | 59.90 | 56.35 |" in dtd  # one deterministic run: no ± at all
    eurosat = md.split("## EuroSAT")[1]
    assert "| MaPLe | 94.50 ± 0.50 (incomplete: 2/3 seeds) | 73.50 ± 0.50 (incomplete: 2/3 seeds) |" in eurosat
    assert "| CLIP | missing | missing | missing |" in eurosat
    wide = md.split("## HM per dataset")[1]
    assert "| Method | Average | Caltech101 | DTD | EuroSAT |" in wide
    table = list(csv.DictReader(open(three_methods / "report" / "base2new.csv")))
    maple = [r for r in table if r["method"] == "MaPLe" and r["dataset"] == "eurosat" and r["metric"] == "base"][0]
    assert [maple[k] for k in ("mean", "seeds_found", "seeds_expected", "complete")] == ["94.50", "2", "3", "False"]
    by_method = {r["method"]: r for r in csv.DictReader(open(three_methods / "report" / "base2new_wide.csv"))}
    assert list(by_method) == ["CLIP", "MaPLe", "HiCroPL"]
    assert by_method["HiCroPL"]["dtd_hm"] == "70.32" and by_method["CLIP"]["eurosat_base"] == ""
    assert by_method["MaPLe"]["incomplete"] == "eurosat:base(2/3 seeds) eurosat:new(2/3 seeds)"
    assert_picture(three_methods / "report" / "base2new.png")
    assert (three_methods / "report" / "base2new.pdf").read_bytes()[:4] == b"%PDF"


def test_incomplete_seeds_still_give_an_average_marked_with_its_coverage(three_methods):
    rows = build("base2new", METHODS, str(three_methods), DATASETS, figures=False).rows
    clip, maple, hicropl = (r.average for r in rows)
    # MaPLe's eurosat has 2 of 3 seeds: still averaged in, and the row says so
    assert maple.base.mean == pytest.approx(np.mean([97.0, 81.0, 94.5]))
    assert (maple.base.datasets, maple.base.of_datasets, maple.base.seeds, maple.base.of_seeds) == (3, 3, 8, 9)
    assert not maple.complete and hicropl.complete
    assert (clip.base.datasets, clip.base.seeds, clip.base.of_seeds) == (2, 2, 2)  # eurosat missing
    md = build("base2new", METHODS, str(three_methods), DATASETS, figures=False).markdown
    average = md.split("## Average over 3 datasets")[1].split("##")[0]
    base = np.mean([[98.0, 98.0, 98.3], [82.0, 84.0, 83.0], [95.0, 96.0, 97.0]], axis=0)  # per seed, over datasets
    new = np.mean([[95.0, 95.0, 95.3], [60.0, 62.0, 61.0], [70.0, 72.0, 74.0]], axis=0)
    hm = lambda b, n: 2 * b * n / (b + n)
    assert (f"| HiCroPL | {base.mean():.2f} ± {base.std():.2f} | {new.mean():.2f} ± {new.std():.2f} | "
            f"{hm(base.mean(), new.mean()):.2f} ± {np.std(hm(base, new)):.2f} | 3/3 datasets, 9/9 seeds |") in average
    assert "| MaPLe |" in average and "| 3/3 datasets, 8/9 seeds (incomplete) |" in average
    assert "| CLIP | 75.00 | 76.95 | 75.96 | 2/3 datasets, 2/2 seeds (incomplete) |" in average


def bars_of(ax):
    """method label -> its bar heights, in group order (Average first)."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers if hasattr(c, "patches")}


def test_figure_labels_missing_cells_and_shows_std_and_one_range(three_methods):
    rows = build("base2new", METHODS, str(three_methods), DATASETS, figures=False).rows
    fig = report_figures.base2new_figure(rows, ["caltech101", "dtd", "eurosat"])
    panels = fig.axes[:3]
    assert [ax.get_title() for ax in panels] == ["Base classes", "New classes", "Harmonic mean (HM)"]
    for ax in panels:
        heights = bars_of(ax)
        assert math.isnan(heights["CLIP"][3]) and not any(math.isnan(h) for h in heights["HiCroPL"])
        missing = [t for t in ax.texts if t.get_text() == "missing"]
        assert len(missing) == 1  # at CLIP's eurosat bar, nothing drawn there
        clip_eurosat = [c for c in ax.containers if c.get_label() == "CLIP"][0].patches[3]
        assert missing[0].xy[0] == pytest.approx(clip_eurosat.get_x() + clip_eurosat.get_width() / 2)
    base = panels[0]
    labels = [t.get_text() for t in base.texts]
    assert "83.0" in labels and "94.5 (2/3)" in labels  # values on the bars; incomplete ones say so
    maple = [c for c in base.containers if c.get_label() == "MaPLe"][0]
    assert maple.patches[3].get_hatch() == "////" and maple.patches[2].get_hatch() is None
    error_bars = {c.get_label(): c.errorbar.lines[2][0].get_segments() for c in base.containers
                  if hasattr(c, "patches")}  # per bar: the (x, mean - std), (x, mean + std) segment
    dtd = error_bars["HiCroPL"][2]  # groups: Average, Caltech101, DTD, EuroSAT
    std = np.std([82.0, 84.0, 83.0])
    assert (dtd[0][1], dtd[1][1]) == pytest.approx((83.0 - std, 83.0 + std))
    assert all(np.size(segment) == 0 for segment in error_bars["CLIP"])  # one run each: no error bar drawn
    assert len({ax.get_ylim() for ax in panels}) == 1 and panels[0].get_ylim()[0] == 0.0
    report_figures.render(fig)


def test_few_shot_curves_with_coop_layout_template(tmp_path):
    coop = "{output}/{dataset}/CoOp/vit_b16_{shots}shots/nctx16_cscFalse_ctpend/seed{seed}"
    for dataset in ("dtd", "ucf101"):
        for shots, acc in zip((1, 2, 4), (40.0, 50.0, 60.0)):
            for seed in (1, 2, 3):
                if not (dataset == "ucf101" and shots == 4 and seed == 3):  # one run missing
                    write(tmp_path / dataset / "HiCroPL" / f"f_{shots}shots" / f"seed{seed}" / "log.txt",
                          train_log(acc + seed))
                if not (dataset == "dtd" and shots == 2):  # one cell missing
                    write(tmp_path / coop.format(output="", dataset=dataset, shots=shots, seed=seed).lstrip("/")
                          / "log.txt", train_log(acc - 5))
    result = report("fewshot", ["HiCroPL/f", "CoOp=" + coop], str(tmp_path), ["dtd", "ucf101"], shots=[1, 2, 4],
                    out=str(tmp_path / "r"), **QUIET)
    ours = {r.shots: r for r in result.rows if r.method.label == "HiCroPL"}
    assert ours[2].cells_by_dataset["dtd"].mean == pytest.approx(52.0)
    assert not ours[4].cells_by_dataset["ucf101"].complete and ours[4].average.coverage == "2/2 datasets, 5/6 seeds"
    md = (tmp_path / "r" / "fewshot.md").read_text()
    assert ("| HiCroPL | 4 | 62.00 ± 0.82 | 61.50 ± 0.50 (incomplete: 2/3 seeds) | "
            "61.75 ± 0.50 (incomplete: 2/2 datasets, 5/6 seeds) |") in md
    assert "| CoOp | 1 | 35.00 ± 0.00 | 35.00 ± 0.00 | 35.00 ± 0.00 |" in md
    assert "| CoOp | 2 | missing | 45.00 ± 0.00 | 45.00 ± 0.00 (incomplete: 1/2 datasets, 3/3 seeds) |" in md
    assert_picture(tmp_path / "r" / "fewshot.png")

    fig = report_figures.few_shot_figure(result.rows, result.datasets)
    average, dtd, ucf = fig.axes[:3]
    assert [ax.get_title() for ax in (average, dtd, ucf)] == ["Average", "DTD", "UCF101"]
    coop_curve = [c for c in dtd.containers if c.get_label() == "CoOp"][0].lines[0]
    assert list(coop_curve.get_xdata()) == [1, 2, 4] and math.isnan(coop_curve.get_ydata()[1])  # it breaks there
    assert "CoOp: missing at 2 shots" in [t.get_text() for t in dtd.texts]
    assert "CoOp at 2 shots: over 1/2 datasets" in [t.get_text() for t in average.texts]
    assert len({ax.get_ylim() for ax in fig.axes[:3]}) == 1
    report_figures.render(fig)


def test_cross_dataset_report_includes_the_source(tmp_path):
    for seed in (1, 2):
        write(tmp_path / "imagenet/HiCroPL/x_16shots" / f"seed{seed}" / "log.txt", train_log(72.0 + seed))
        for dataset, acc in {"dtd": 45.0, "eurosat": 48.0}.items():
            write(tmp_path / "evaluation/HiCroPL/x_16shots" / dataset / f"seed{seed}" / "log.txt", eval_log(acc + seed))
    result = report("xd", ["HiCroPL/x"], str(tmp_path), ["imagenet", "dtd", "eurosat"], seeds=[1, 2],
                    out=str(tmp_path / "r"), **QUIET)
    assert result.rows[0].cells_by_dataset["imagenet"].mean == 73.5
    assert result.rows[0].average.mean == pytest.approx((46.5 + 49.5) / 2)  # targets only, not the source
    assert "| Method | Source: ImageNet | DTD | EuroSAT | Average |" in result.markdown
    assert_picture(tmp_path / "r" / "xd.png")


def test_toy_keyword_reports_the_toy_transfer_with_its_source(tmp_path):
    write(tmp_path / "toy_objects/HiCroPL/x_16shots/seed1/log.txt", train_log(80.0))
    for dataset, acc in {"toy_patterns": 40.0, "toy_textiles": 30.0}.items():
        write(tmp_path / "evaluation/HiCroPL/x_16shots" / dataset / "seed1/log.txt", eval_log(acc))
    result = report("xd", ["HiCroPL/x"], str(tmp_path), ["toy"], seeds=[1], out=str(tmp_path / "r"), **QUIET)
    assert result.datasets == ["toy_objects", "toy_patterns", "toy_textiles"]
    assert result.rows[0].average.mean == 35.0  # the targets only, not the source
    assert "| Method | Source: ToyObjects | ToyPatterns | ToyTextiles | Average |" in result.markdown
    assert "SYNTHETIC" in result.markdown.splitlines()[0]


def test_toy_datasets_are_labelled_synthetic_everywhere(tmp_path):
    base2new_layout(tmp_path / "base2new", {"toy_objects": ((70.0, 71.0), (50.0, 51.0)),
                                            "toy_shapes": ((60.0, 61.0), (40.0, 41.0))}, "CoOp", "toy")
    result = report("base2new", ["CoOp/toy"], str(tmp_path), ["toy_objects", "toy_shapes"], seeds=[1, 2],
                    out=str(tmp_path / "r"), **QUIET)
    headings = [line for line in result.markdown.splitlines() if line.startswith("#")]
    assert headings[0].startswith("# Base-to-new generalisation (SYNTHETIC toy-world data")
    assert all("synthetic" in h.lower() for h in headings) and len(headings) == 5
    assert {r["synthetic"] for r in csv.DictReader(open(tmp_path / "r" / "base2new.csv"))} == {"True"}
    fig = report_figures.base2new_figure(result.rows, result.datasets)
    assert "SYNTHETIC" in fig._suptitle.get_text()
    report_figures.render(fig)
    real = tmp_path / "real"
    base2new_layout(real / "base2new", {"dtd": ((70.0,), (50.0,))}, "CoOp", "c")
    assert "SYNTHETIC" not in build("base2new", ["CoOp/c"], str(real), ["dtd"], seeds=[1], figures=False).markdown


def test_no_runs_or_no_root_exit_2_naming_what_exists(tmp_path, capsys):
    out = tmp_path / "r"
    run = lambda root, method: main(["--task", "base2new", "--output", str(root), "--method", method, "--out", str(out)])
    assert run(tmp_path / "nope", "HiCroPL") == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path / 'nope'}: no such folder" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty", "HiCroPL/c") == 2
    err = capsys.readouterr().err
    assert "--method HiCroPL/c: no finished base2new run of HiCroPL/c" in err and "No base2new run folder at all" in err
    base2new_layout(tmp_path / "runs" / "base2new", {"caltech101": ((80.0,), (20.0,))}, "HiCroPL", "demo_tiny_clip")
    assert run(tmp_path / "runs", "HiCroPL") == 2
    err = capsys.readouterr().err
    assert "--method HiCroPL/demo_tiny_clip --datasets caltech101" in err  # what is there, as flags
    # one method found, another not: the report names the one with nothing rather than a block of `missing`
    argv = ["--task", "base2new", "--output", str(tmp_path / "runs"), "--datasets", "caltech101", "--seeds", "1",
            "--method", "HiCroPL/demo_tiny_clip", "--method", "MaPLe/other", "--out", str(out)]
    assert main(argv) == 2 and "--method MaPLe/other: no finished base2new run" in capsys.readouterr().err
    assert not out.exists()  # nothing written
    assert main(argv[:-4] + ["--out", str(out)]) == 0
    assert (out / "base2new.md").exists()


def test_unfinished_runs_are_named_as_unfinished(tmp_path, capsys):
    write(tmp_path / "base2new/train_base/dtd/shots_16/HiCroPL/c/seed1/log.txt", train_log(0.0, end=None))
    assert main(["--task", "base2new", "--output", str(tmp_path), "--method", "HiCroPL/c", "--datasets", "dtd",
                 "--seeds", "1", "--no-figures", "--out", str(tmp_path / "r")]) == 2
    assert "none has finished, e.g. " in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [
    ("ProGrad", "give its config as ProGrad/CFG"),  # not registered (KgCoOp is now)
    ("ZeroshotCLIP", "ZeroshotCLIP has no fewshot runs"),
    ("X={output}/{foo}/{dataset}", "unknown placeholder(s) {foo}"),
    ("X={output}/{dataset", "the template does not parse"),
    ("X={output}/{dataset}/{seed}", None),  # fine: no {shots} needed with one shot count
    ("{output}/{dataset}/seed{seed}", "a run-folder template needs a label"),
    ("=HiCroPL/c", "needs both a label and what it names"),
    ("HiCroPL/c/extra", "expected NAME, NAME/CFG"),
    ("X=Hi CroPL/c", "expected NAME, NAME/CFG"),
])
def test_malformed_methods_exit_2_with_the_fix(tmp_path, capsys, spec, message):
    write(tmp_path / "d/X/x_16shots/seed1/log.txt", train_log(50.0))
    code = main(["--task", "fewshot", "--shots", "16", "--output", str(tmp_path), "--method", spec,
                 "--datasets", "d", "--seeds", "1", "--no-figures", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if message is None:  # the template is valid; it just finds nothing there
        assert code == 2 and "no finished fewshot run" in err
    else:
        assert code == 2 and message in err and spec in err


def test_base2new_template_needs_its_stage(tmp_path, capsys):
    assert main(["--task", "base2new", "--output", str(tmp_path), "--method", "X={output}/{dataset}/seed{seed}"]) == 2
    assert "a base2new template needs {stage}" in capsys.readouterr().err


def test_unknown_task_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--task", "base2newx", "--method", "HiCroPL"])
    assert exit_.value.code == 2 and "invalid choice: 'base2newx'" in capsys.readouterr().err


def test_same_trainer_in_two_configs_and_renamed_methods(tmp_path):
    base2new_layout(tmp_path / "base2new", {"dtd": ((80.0,), (60.0,))}, "HiCroPL", "a")
    base2new_layout(tmp_path / "base2new", {"dtd": ((82.0,), (61.0,))}, "HiCroPL", "b")
    rows = build("base2new", ["HiCroPL/a", "HiCroPL/b", "Ours=HiCroPL/b"], str(tmp_path), ["dtd"], seeds=[1],
                 figures=False).rows
    assert [r.method.label for r in rows] == ["HiCroPL/a", "HiCroPL/b", "Ours"]
    assert [r.datasets["dtd"].base.mean for r in rows] == [80.0, 82.0, 82.0]


def test_a_failing_figure_writes_no_file(three_methods, monkeypatch):
    out = three_methods / "report"
    report("base2new", METHODS, str(three_methods), DATASETS, out=str(out), figures=False, **QUIET)
    before = (out / "base2new.md").read_text()

    def broken(fig):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(report_figures, "render", broken)
    with pytest.raises(RuntimeError):
        report("base2new", METHODS[1:], str(three_methods), DATASETS, out=str(out), **QUIET)
    assert (out / "base2new.md").read_text() == before  # the tables are written only with their figures
    assert not (out / "base2new.png").exists()


def test_paper_keyword_prints_the_ten_rows_of_hicropls_table(tmp_path):
    """`--method paper/CFG`: zero-shot CLIP, CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC, TCP, MMA, CoPrompt
    and HiCroPL, in the paper's order, each read from its own runs."""
    from vlprompt.methods.registry import PAPER_METHODS
    trained = [trainer for _, trainer in PAPER_METHODS if trainer != "ZeroshotCLIP"]
    for offset, trainer in enumerate(trained):
        base2new_layout(tmp_path / "base2new", {"dtd": ((70.0 + offset,), (50.0 + offset,))}, trainer, "demo_toy")
    write(tmp_path / "base2new/test_base/dtd/shots_16/ZeroshotCLIP/demo_toy/seed1/log.txt", eval_log(53.2))
    write(tmp_path / "base2new/test_new/dtd/shots_16/ZeroshotCLIP/demo_toy/seed1/log.txt", eval_log(59.9))
    report("base2new", ["paper/demo_toy"], str(tmp_path), ["dtd"], seeds=[1], out=str(tmp_path / "report"), **QUIET)
    dtd = (tmp_path / "report" / "base2new.md").read_text().split("## DTD")[1].split("##")[0].strip().splitlines()
    assert [row.split(" | ")[0][2:] for row in dtd[2:]] == [
        "CLIP", "CoOp", "CoCoOp", "KgCoOp", "MaPLe", "PromptSRC", "TCP", "MMA", "CoPrompt", "HiCroPL"]
    assert "| MMA | 76.00 | 56.00 |" in "\n".join(dtd) and "| CLIP | 53.20 | 59.90 |" in "\n".join(dtd)


def test_all_keyword_lists_every_registered_prompt_method():
    from vlprompt.methods.registry import prompt_methods
    from vlprompt.experiments.report import expand_method_keywords
    expanded = expand_method_keywords(["all/demo_toy"], "base2new")
    assert expanded[0] == "CLIP=ZeroshotCLIP/demo_toy"
    assert [spec.split("=")[-1] for spec in expanded] == [f"{m.name}/demo_toy" for m in prompt_methods()]
    assert "EdgeCNN/demo_toy" not in expanded and {"DCP/demo_toy", "IVLP/demo_toy"} <= set(expanded)
