"""One table and the usual figures for a task, across methods, from their output folders.

    python -m vlprompt.report --task base2new --method HiCroPL --method DCP \\
        --method MaPLe/vit_b16_c2_ep5_batch4_2ctx --out report/
    python -m vlprompt.report --task fewshot --method HiCroPL \\
        --method "CoOp=output/{dataset}/CoOp/vit_b16_{shots}shots/nctx16_cscFalse_ctpend/seed{seed}"

A method is NAME (our trainer, default config of the task), NAME/CFG (any Dassl trainer whose
folders follow CoOp/MaPLe's layout, as ours do), or LABEL=TEMPLATE, a run-folder template with
{output} {dataset} {seed} {shots} and, for base2new, {stage} (train_base, test_base or test_new).
Each cell is the mean +- std over the seeds; a cell missing seeds is marked incomplete (in the
tables and hatched in the figures), and averages over datasets use complete cells only and say so.
Writes <out>/<task>.md, <task>.csv and <task>.png/.pdf.
"""
import argparse
import csv
import io
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import layout
from .io import atomic_write, atomic_write_text
from .results import DATASET_ORDER, TEST_END, TRAIN_END, harmonic_mean, read_run
from .sweep import DG_TARGETS, METHODS, XD_TARGETS

TASKS = ("base2new", "xd", "dg", "fewshot")
EVAL_ONLY = {"ZeroshotCLIP"}  # one deterministic run (seed1), no training log


@dataclass
class Method:
    label: str
    template: Optional[str] = None  # explicit run-folder template
    trainer: str = ""
    cfg: str = ""

    @classmethod
    def parse(cls, spec: str, task: str) -> "Method":
        if "=" in spec:
            label, template = spec.split("=", 1)
            return cls(label, template=template)
        trainer, _, cfg = spec.partition("/")
        if not cfg:
            if trainer not in METHODS or task not in METHODS[trainer][1]:
                raise SystemExit(f"--method {spec}: give its config as {trainer}/CFG")
            cfg = METHODS[trainer][1][task]
        return cls(trainer, trainer=trainer, cfg=cfg)

    def folders(self, output: str, task: str, dataset: str, seed: int, shots: int = 16) -> List[Tuple[str, object]]:
        """Candidate (run folder, end signal) for one cell, best first."""
        if self.template:
            folder = self.template.format(output=output, dataset=dataset, seed=seed, shots=shots, stage="")
            return [(folder, TEST_END if task in ("xd", "dg") else TRAIN_END)]
        t, cfg = self.trainer, self.cfg
        if task in ("xd", "dg"):
            if t in EVAL_ONLY:
                return [(layout.zero_shot_test(output, dataset, cfg), TEST_END)]
            if dataset == "imagenet":  # the source accuracy: the training run's own test
                return [(layout.xd_train(output, "imagenet", t, cfg, seed), TRAIN_END)]
            return [(layout.xd_test(output, dataset, t, cfg, seed), TEST_END)]
        return [(layout.few_shot(output, dataset, t, cfg, shots, seed), TRAIN_END)]

    def base2new_folders(self, output: str, dataset: str, seed: int, side: str):
        if self.template:
            stages = ["train_base", "test_base"] if side == "base" else ["test_new"]
            return [(self.template.format(output=output, dataset=dataset, seed=seed, shots=16, stage=s),
                     TRAIN_END if s == "train_base" else TEST_END) for s in stages]
        run = lambda stage: layout.base2new(output, stage, dataset, self.trainer, self.cfg, seed)
        if side == "new":
            return [(run("test_new"), TEST_END)]
        return [(run("train_base"), TRAIN_END), (run("test_base"), TEST_END)]

    def seeds(self, seeds: Sequence[int]) -> List[int]:
        return [1] if self.trainer in EVAL_ONLY else list(seeds)


@dataclass
class Cell:
    values: List[float]
    expected: int

    @property
    def complete(self) -> bool:
        return len(self.values) == self.expected

    @property
    def mean(self) -> Optional[float]:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float:
        return float(np.std(self.values)) if self.values else 0.0

    def text(self) -> str:
        if not self.values:
            return "missing"
        mark = "" if self.complete else f" (incomplete: {len(self.values)}/{self.expected} seeds)"
        return f"{self.mean:.2f} ± {self.std:.2f}{mark}"


def first_result(candidates) -> Optional[float]:
    for folder, end in candidates:
        result = read_run(folder, end)
        if result.value is not None:
            return result.value
    return None


def collect_cell(candidates_per_seed) -> Cell:
    values = [v for v in (first_result(c) for c in candidates_per_seed) if v is not None]
    return Cell(values, len(candidates_per_seed))


def average(cells: Sequence[Cell]) -> Tuple[Optional[float], int]:
    complete = [c.mean for c in cells if c.complete]
    return (float(np.mean(complete)) if complete else None), len(complete)


def ordered(datasets: Sequence[str]) -> List[str]:
    return sorted(datasets, key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else 99, d))


# ---- tables ---------------------------------------------------------------------------------
def base2new_table(methods, output, datasets, seeds):
    """rows: one per (method, dataset) with base/new cells and HM, plus each method's average."""
    rows = []
    for method in methods:
        cells = []
        for d in datasets:
            base = collect_cell([method.base2new_folders(output, d, s, "base") for s in method.seeds(seeds)])
            new = collect_cell([method.base2new_folders(output, d, s, "new") for s in method.seeds(seeds)])
            hm = harmonic_mean(base.mean, new.mean) if base.values and new.values else None
            cells.append((d, base, new, hm))
            rows.append({"method": method.label, "dataset": d, "base": base, "new": new, "hm": hm,
                         "complete": base.complete and new.complete})
        full = [(b, n) for _, b, n, _ in cells if b.complete and n.complete]
        if full:
            b = float(np.mean([x.mean for x, _ in full]))
            n = float(np.mean([y.mean for _, y in full]))
            rows.append({"method": method.label, "dataset": f"Average ({len(full)}/{len(datasets)} datasets)",
                         "base": Cell([b], 1), "new": Cell([n], 1), "hm": harmonic_mean(b, n),
                         "complete": len(full) == len(datasets)})
    return rows


def accuracy_table(task, methods, output, datasets, seeds, shots_list):
    """rows: one per (method, shots) with a cell per dataset and the average over complete ones."""
    rows = []
    for method in methods:
        for shots in shots_list:
            cells = {d: collect_cell([method.folders(output, task, d, s, shots) for s in method.seeds(seeds)])
                     for d in datasets}
            targets = [c for d, c in cells.items() if d != "imagenet" or task == "fewshot"]
            mean, n_complete = average(targets)
            rows.append({"method": method.label, "shots": shots, "cells": cells, "average": mean,
                         "average_of": n_complete, "of": len(targets)})
    return rows


def markdown_and_csv(task, rows, datasets) -> Tuple[str, str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "dataset", "metric", "mean", "std", "seeds_found", "seeds_expected", "complete"])
    lines = []
    if task == "base2new":
        lines += ["| Method | Dataset | Base | New | HM |", "|---|---|---|---|---|"]
        for r in rows:
            hm = "missing" if r["hm"] is None else f"{r['hm']:.2f}" + ("" if r["complete"] else " (incomplete)")
            lines.append(f"| {r['method']} | {r['dataset']} | {r['base'].text()} | {r['new'].text()} | {hm} |")
            for metric in ("base", "new"):
                c = r[metric]
                writer.writerow([r["method"], r["dataset"], metric, _num(c.mean), f"{c.std:.2f}", len(c.values),
                                 c.expected, c.complete])
            writer.writerow([r["method"], r["dataset"], "hm", _num(r["hm"]), "", "", "", r["complete"]])
    else:
        shots_col = task == "fewshot"
        header = ["Method"] + (["Shots"] if shots_col else []) + datasets + ["Average"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            avg = "missing" if r["average"] is None else f"{r['average']:.2f}"
            if r["average_of"] < r["of"] and r["average"] is not None:
                avg += f" (over {r['average_of']}/{r['of']} complete)"
            cells = [r["cells"][d].text() for d in datasets]
            lines.append("| " + " | ".join([r["method"]] + ([str(r["shots"])] if shots_col else []) + cells + [avg]) + " |")
            for d in datasets:
                c = r["cells"][d]
                writer.writerow([r["method"], d, f"{r['shots']}shots" if shots_col else "accuracy", _num(c.mean),
                                 f"{c.std:.2f}", len(c.values), c.expected, c.complete])
    return "\n".join(lines) + "\n", buffer.getvalue()


def _num(value) -> str:
    return "" if value is None else f"{value:.2f}"


# ---- figures --------------------------------------------------------------------------------
def _grouped_bars(ax, groups: List[str], series: Dict[str, List[Optional[float]]],
                  complete: Dict[str, List[bool]], title: str) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label)
        for bar, ok, value in zip(bars, complete[label], values):
            if value is None:
                bar.set_alpha(0.0)
            elif not ok:  # incomplete: hatched and lighter, never silently averaged
                bar.set_hatch("//")
                bar.set_alpha(0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def base2new_figure(rows, methods, datasets, path_stem):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.9 * (len(datasets) + 1) * max(1, len(methods))), 10))
    for ax, metric in zip(axes, ("base", "new", "hm")):
        series, complete = {}, {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method.label]
            by_dataset = {r["dataset"]: r for r in mine}
            avg = [r for r in mine if r["dataset"].startswith("Average")]
            values, oks = [], []
            for d in datasets:
                r = by_dataset.get(d)
                v = None if r is None else (r["hm"] if metric == "hm" else r[metric].mean)
                values.append(v)
                oks.append(bool(r and r["complete"]))
            values.append(None if not avg else (avg[0]["hm"] if metric == "hm" else avg[0][metric].mean))
            oks.append(bool(avg and avg[0]["complete"]))
            series[method.label], complete[method.label] = values, oks
        _grouped_bars(ax, list(datasets) + ["Average"], series, complete, {"base": "Base classes", "new": "New classes",
                                                                          "hm": "Harmonic mean"}[metric])
    _legend(axes[0], methods)
    fig.suptitle("Base-to-new generalisation (hatched: incomplete seeds)")
    _save(fig, path_stem)


def accuracy_figure(task, rows, methods, datasets, path_stem):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if task == "fewshot":
        panels = list(datasets) + ["Average"]
        cols = min(4, len(panels))
        fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((len(panels) + cols - 1) // cols)),
                                 squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for method in methods:
                mine = [r for r in rows if r["method"] == method.label]
                shots = [r["shots"] for r in mine]
                if panel == "Average":
                    ys, errs, oks = [r["average"] for r in mine], [0.0] * len(mine), [r["average_of"] == r["of"] for r in mine]
                else:
                    cells = [r["cells"][panel] for r in mine]
                    ys, errs, oks = [c.mean for c in cells], [c.std for c in cells], [c.complete for c in cells]
                points = [(s, y, e, ok) for s, y, e, ok in zip(shots, ys, errs, oks) if y is not None]
                if not points:
                    continue
                line = ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                                   marker="o", capsize=3, label=method.label)
                colour = line[0].get_color()
                hollow = [p for p in points if not p[3]]  # incomplete points: hollow markers
                ax.scatter([p[0] for p in hollow], [p[1] for p in hollow], s=80, facecolors="white",
                           edgecolors=colour, zorder=3)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["shots"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title(panel)
            ax.set_xlabel("shots per class")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.suptitle("Few-shot classification (hollow: incomplete seeds)")
    else:
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * (len(datasets) + 1) * max(1, len(methods))), 4))
        series, complete = {}, {}
        for method in methods:
            r = [x for x in rows if x["method"] == method.label][0]
            series[method.label] = [r["cells"][d].mean for d in datasets] + [r["average"]]
            complete[method.label] = [r["cells"][d].complete for d in datasets] + [r["average_of"] == r["of"]]
        title = "Cross-dataset transfer" if task == "xd" else "Domain generalisation"
        _grouped_bars(ax, list(datasets) + ["Average"], series, complete, f"{title} (hatched: incomplete seeds)")
        _legend(ax, methods)
    _save(fig, path_stem)


def _legend(ax, methods):
    """Plain colour swatches (the bars themselves may be hatched), outside the plotting area."""
    from matplotlib.patches import Patch
    colours = [f"C{i}" for i in range(len(methods))]
    ax.legend([Patch(color=c) for c in colours], [m.label for m in methods], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _save(fig, path_stem):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    for ext in ("png", "pdf"):
        atomic_write(f"{path_stem}.{ext}", lambda handle, ext=ext: fig.savefig(handle, format=ext, dpi=120))
    plt.close(fig)


# ---- command line ---------------------------------------------------------------------------
def report(task, method_specs, output="output", datasets=None, seeds=(1, 2, 3), shots=(1, 2, 4, 8, 16),
           out="report", figures=True, echo=print):
    methods = [Method.parse(spec, task) for spec in method_specs]
    if not datasets:
        datasets = {"base2new": DATASET_ORDER, "fewshot": DATASET_ORDER, "xd": ["imagenet"] + XD_TARGETS,
                    "dg": ["imagenet"] + DG_TARGETS}[task]
    datasets = ordered(datasets)
    if task == "base2new":
        rows = base2new_table(methods, output, datasets, seeds)
    else:
        rows = accuracy_table(task, methods, output, datasets, seeds, shots if task == "fewshot" else [16])
    md, csv_text = markdown_and_csv(task, rows, datasets)
    stem = os.path.join(out, task)
    atomic_write_text(stem + ".md", md)
    atomic_write_text(stem + ".csv", csv_text)
    if figures:
        if task == "base2new":
            base2new_figure(rows, methods, datasets, stem)
        else:
            accuracy_figure(task, rows, methods, datasets, stem)
    echo(md)
    echo(f"Saved {stem}.md, {stem}.csv" + (f", {stem}.png, {stem}.pdf" if figures else ""))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlprompt.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--method", action="append", required=True, help="NAME, NAME/CFG or LABEL=TEMPLATE")
    parser.add_argument("--output", default="output", help="the runs' output root")
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", default="report", help="folder for the table and figures")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    report(args.task, args.method, args.output, args.datasets, args.seeds, args.shots, args.out,
           figures=not args.no_figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
