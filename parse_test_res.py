"""Average test results over seed folders of Dassl runs (CoOp's parse_test_res.py, and more).

    python parse_test_res.py output/.../HiCroPL/<cfg>               # seed folders of training runs
    python parse_test_res.py output/.../<cfg> --test-log             # seed folders of --eval-only runs
    python parse_test_res.py output/evaluation/.../<cfg> --test-log --multi-exp   # one folder per dataset
    python parse_test_res.py output/base2new --base2new [--trainer HiCroPL --cfg <cfg>]

Reads the `log.txt*` files Dassl writes (ours, CoOp's, MaPLe's, PromptSRC's, the HiCroPL
release's). A training log counts from its "Finish training" line (Dassl's wording since 2022;
CoOp's copy of this script waits for "Finished training", which we accept too); a test log from
its "=> result" line. A resumed run leaves several log files: the newest with a result counts.
"""
import argparse
import csv
import io
import os
import sys
from collections import OrderedDict
from typing import Dict, List

import numpy as np
from tabulate import tabulate

from vlprompt.experiments import record
from vlprompt.experiments.layout import BASE2NEW_DATASETS
from vlprompt.files import atomic_write_text
from vlprompt.experiments.results import TEST_END, TRAIN_END, ResultsError, ci95, harmonic_mean, read_run

def parse_seeds(directory: str, end_signal, keyword="accuracy", use_ci95=False, out=print) -> Dict[str, float]:
    """CoOp's parse_function: each subfolder of `directory` is one run (one seed)."""
    if not os.path.isdir(directory):
        raise ResultsError(f"{directory} is not a folder of seed runs")
    out(f"Parsing files in {directory}")
    values = []
    for name in sorted(f for f in os.listdir(directory) if not f.startswith(".")):
        run = read_run(os.path.join(directory, name), end_signal, keyword)
        if run.value is None:
            out(f"{name}: skipped, {run.problem}")
            continue
        out(f"file: {run.log}. {keyword}: {run.value:.2f}%. ")
        for note in record.notes(record.read(run.folder)):  # what the folder's name does not say
            out(f"{name}: note: {note}")
        values.append(run.value)
    if not values:
        raise ResultsError(f"Nothing found in {directory}: no finished run with a '* {keyword}' line")
    spread = ci95(values) if use_ci95 else float(np.std(values))
    mean = float(np.mean(values))
    out("===")
    out(f"Summary of directory: {directory}")
    out(f"* {keyword}: {mean:.2f}% +- {spread:.2f}%")
    out("===")
    return {keyword: mean, "std": spread, "n": len(values)}


def parse_multi_exp(directory: str, end_signal, keyword="accuracy", use_ci95=False, out=print):
    means = []
    for name in sorted(f for f in os.listdir(directory) if not f.startswith(".")):
        try:
            means.append(parse_seeds(os.path.join(directory, name), end_signal, keyword, use_ci95, out)[keyword])
        except ResultsError as err:
            out(f"{name}: {err}")
    if not means:
        raise ResultsError(f"Nothing found in any experiment folder of {directory}")
    out("Average performance")
    out(f"* {keyword}: {np.mean(means):.2f}%")
    return float(np.mean(means))


# ---- base-to-new summary -------------------------------------------------------------------
def _method_dirs(root: str, shots: int):
    """(dataset, trainer, cfg) under root/{train_base,test_base,test_new}/<dataset>/shots_<S>/<trainer>/<cfg>."""
    found = set()
    for stage in ("train_base", "test_base", "test_new"):
        stage_dir = os.path.join(root, stage)
        for dataset in os.listdir(stage_dir) if os.path.isdir(stage_dir) else []:
            shot_dir = os.path.join(stage_dir, dataset, f"shots_{shots}")
            for trainer in os.listdir(shot_dir) if os.path.isdir(shot_dir) else []:
                trainer_dir = os.path.join(shot_dir, trainer)
                for cfg in os.listdir(trainer_dir) if os.path.isdir(trainer_dir) else []:
                    if os.path.isdir(os.path.join(trainer_dir, cfg)):
                        found.add((dataset, trainer, cfg))
    if not found:
        raise ResultsError(f"no runs under {root}: expected <root>/train_base (or test_base) and "
                           f"<root>/test_new, each <dataset>/shots_{shots}/<trainer>/<cfg>/seed*")
    return sorted(found)


def _pick(found, trainer, cfg):
    methods = sorted({(t, c) for _, t, c in found if (trainer is None or t == trainer) and (cfg is None or c == cfg)})
    if len(methods) != 1:
        listed = ", ".join(f"--trainer {t} --cfg {c}" for t, c in sorted({(t, c) for _, t, c in found})) or "none"
        raise ResultsError(f"{'no' if not methods else 'several'} runs match; choose one of: {listed}")
    return methods[0]


def _seed_values(folder: str, end_signal, problems: List[str]) -> Dict[str, float]:
    """{seed folder name: result} of the finished runs in `folder`; the others go to `problems`."""
    if not os.path.isdir(folder):
        problems.append(f"{folder}: missing")
        return {}
    values = {}
    for name in sorted(f for f in os.listdir(folder) if not f.startswith(".")):
        run = read_run(os.path.join(folder, name), end_signal)
        if run.value is None:
            problems.append(f"{run.folder}: {run.problem}")
        else:
            values[name] = run.value
            problems += [f"{run.folder}: note: {note}" for note in record.notes(record.read(run.folder))]
    return values


def _seeds_text(matched, base: Dict[str, float], new: Dict[str, float]) -> str:
    """How many seeds have both halves, and which seeds lack one."""
    lacking = [f"no {half}: {', '.join(sorted(set(other) - set(these)))}"
               for half, these, other in (("New", new, base), ("Base", base, new)) if set(other) - set(these)]
    return f"{len(matched)}" + (f" ({'; '.join(lacking)})" if lacking else "")


def base2new_row(dataset: str, base: Dict[str, float], new: Dict[str, float]) -> OrderedDict:
    """Base, New and HM over the seeds with both halves (a seed with one half would pair one
    seed's Base with other seeds' New); without any such seed, what was found and no HM."""
    matched = sorted(set(base) & set(new))
    if matched:
        b, n = (float(np.mean([half[s] for s in matched])) for half in (base, new))
        hm = harmonic_mean(b, n)
    else:
        b, n, hm = (float(np.mean(list(base.values()))) if base else None,
                    float(np.mean(list(new.values()))) if new else None, None)
    return OrderedDict(dataset=dataset, base=b, new=n, hm=hm, seeds=_seeds_text(matched, base, new))


def base2new_summary(root: str, trainer=None, cfg=None, shots=16, out=print):
    """Rows (dataset, base, new, hm, seeds) and the average row; writes CSV and Markdown."""
    found = _method_dirs(root, shots)
    trainer, cfg = _pick(found, trainer, cfg)
    datasets = sorted({d for d, t, c in found if (t, c) == (trainer, cfg)},
                      key=lambda d: (BASE2NEW_DATASETS.index(d) if d in BASE2NEW_DATASETS else len(BASE2NEW_DATASETS), d))
    rows, problems = [], []
    for dataset in datasets:
        common = os.path.join(dataset, f"shots_{shots}", trainer, cfg)
        trained = os.path.join(root, "train_base", common)
        if os.path.isdir(trained):  # base accuracy: the final test of the training run
            base = _seed_values(trained, TRAIN_END, problems)
        else:  # an eval-only method (zero-shot CLIP) tested on the base classes
            base = _seed_values(os.path.join(root, "test_base", common), TEST_END, problems)
        new = _seed_values(os.path.join(root, "test_new", common), TEST_END, problems)
        rows.append(base2new_row(dataset, base, new))
    complete = [r for r in rows if r["hm"] is not None]
    if not complete:
        raise ResultsError(f"no dataset under {root} has both base and new results for {trainer} {cfg}:\n  "
                           + "\n  ".join(problems))
    avg_base = float(np.mean([r["base"] for r in complete]))
    avg_new = float(np.mean([r["new"] for r in complete]))
    average = OrderedDict(dataset=f"Average ({len(complete)} datasets)", base=avg_base, new=avg_new,
                          hm=harmonic_mean(avg_base, avg_new), seeds="")
    table = _format_table(rows + [average])
    out(f"Base-to-new: {trainer} / {cfg} / {shots} shots  (mean over the seeds with both a Base and a New result; "
        f"seeds = how many, and the seeds lacking a half)")
    out(tabulate(table, headers="keys", tablefmt="github", disable_numparse=True))
    for problem in problems:
        out(f"warning: {problem}")
    stem = os.path.join(root, f"base2new_{trainer}_{cfg}")
    atomic_write_text(stem + ".md", tabulate(table, headers="keys", tablefmt="github", disable_numparse=True) + "\n")
    atomic_write_text(stem + ".csv", _csv(rows + [average]))
    out(f"Saved {stem}.csv and {stem}.md")
    return rows, average, problems


def _format_table(rows):
    fmt = lambda v: "missing" if v is None else f"{v:.2f}" if isinstance(v, float) else v
    return [OrderedDict((k.capitalize() if k != "hm" else "HM", fmt(v)) for k, v in r.items()) for r in rows]


def _csv(rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "base", "new", "hm", "seeds"])
    for r in rows:
        writer.writerow([r["dataset"]] + ["" if r[k] is None else f"{r[k]:.2f}" for k in ("base", "new", "hm")]
                        + [r["seeds"]])
    return buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=str, help="path to directory")
    parser.add_argument("--ci95", action="store_true", help=r"compute 95%% confidence interval")
    parser.add_argument("--test-log", action="store_true", help="parse test-only logs")
    parser.add_argument("--multi-exp", action="store_true", help="parse multiple experiments")
    parser.add_argument("--keyword", default="accuracy", type=str, help="which keyword to extract")
    parser.add_argument("--base2new", action="store_true",
                        help="directory is a base2new output root: print Base/New/HM per dataset")
    parser.add_argument("--trainer", default=None, help="with --base2new: the trainer folder")
    parser.add_argument("--cfg", default=None, help="with --base2new: the config folder")
    parser.add_argument("--shots", default=16, type=int, help="with --base2new: shots folder")
    args = parser.parse_args(argv)
    try:
        if args.base2new:
            base2new_summary(args.directory, args.trainer, args.cfg, args.shots)
            return 0
        end_signal = TEST_END if args.test_log else TRAIN_END
        if args.multi_exp:
            parse_multi_exp(args.directory, end_signal, args.keyword, args.ci95)
        else:
            parse_seeds(args.directory, end_signal, args.keyword, args.ci95)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
