"""One table and the usual figures for a task, across methods, from their output folders.

    python -m vlprompt.report --task base2new --output demo_output/output --datasets toy_objects --seeds 1 2 \\
        --method CLIP=ZeroshotCLIP/demo_toy --method CoOp/demo_toy --method HiCroPL/demo_toy  # after scripts/demo.sh
    python -m vlprompt.report --task base2new --output output --method CLIP=ZeroshotCLIP \\
        --method MaPLe/vit_b16_c2_ep5_batch4_2ctx --method HiCroPL --out report/
    python -m vlprompt.report --task fewshot --method HiCroPL \\
        --method "CoOp={output}/{dataset}/CoOp/vit_b16_{shots}shots/nctx16_cscFalse_ctpend/seed{seed}"

A method is NAME (a trainer the sweep knows, with its default config for the task), NAME/CFG (any
Dassl trainer whose folders follow CoOp/MaPLe's layout, as ours do: CoOp, CoCoOp, IVLP, MaPLe,
PromptSRC, DCP, HiCroPL, ZeroshotCLIP...), LABEL=NAME[/CFG] to print it under another name, or
LABEL=TEMPLATE, a run-folder template with {output} {dataset} {seed} {shots} and, for base2new,
{stage} (train_base, test_base or test_new); a template without {seed} is one deterministic run.

Each cell is the mean +- std over the seeds found; a cell missing seeds says how many it has, a
cell with no finished run says `missing` (labelled so in the figures, never drawn as a bar).
Averages over datasets use every dataset with a result and say how many datasets and seeds they
cover. Datasets named toy_* are the synthetic toy world: every table and figure says so.
Writes <out>/<task>.md, <task>.csv (and base2new_wide.csv) and <task>.png/.pdf.
"""
import argparse
import csv
import glob
import io
import os
import re
import string
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import layout, record
from ..errors import UserError
from ..files import OutputWriteError, atomic_write
from ..methods.registry import PAPER_METHODS, get_method, prompt_methods
from .cells import Average, Cell, pm, spread
from .names import SYNTHETIC_MARK, display, is_synthetic, title
from .results import TEST_END, TRAIN_END, harmonic_mean, read_run

TASKS = ("base2new", "xd", "dg", "fewshot")
TEMPLATE_FIELDS = ("output", "dataset", "seed", "shots", "stage")
NAME = re.compile(r"[\w.+-]+")  # a trainer or config folder name
PAPER_ORDER = (layout.BASE2NEW_DATASETS + layout.DG_TARGETS + layout.TOY_BASE2NEW_DATASETS
               + layout.TOY_DG_TARGETS)


class ReportError(UserError, ValueError):
    """A user mistake or nothing to report; the message names the value and the fix."""


def ordered(datasets: Sequence[str]) -> List[str]:
    """Papers' order for the known datasets, then the others in the order given; no repeats."""
    unique = list(dict.fromkeys(datasets))
    known = sorted((d for d in unique if d in PAPER_ORDER), key=PAPER_ORDER.index)
    return known + [d for d in unique if d not in PAPER_ORDER]


# ---- methods --------------------------------------------------------------------------------
@dataclass
class Method:
    label: str
    trainer: str = ""
    cfg: str = ""
    template: Optional[str] = None  # explicit run-folder template
    spec: str = ""

    @classmethod
    def parse(cls, spec: str, task: str, shots: Sequence[int] = (16,)) -> "Method":
        label, has_label, target = spec.partition("=")
        if not has_label:
            label, target = "", spec
        elif not label.strip() or not target.strip():
            raise ReportError(f"--method {spec!r}: LABEL=... needs both a label and what it names, "
                              f"e.g. --method CLIP=ZeroshotCLIP/vit_b16")
        if "{" in target or "}" in target:
            if not has_label:
                raise ReportError(f"--method {spec!r}: a run-folder template needs a label: --method LABEL={spec}")
            return cls(label.strip(), template=_checked_template(spec, target, task, shots), spec=spec)
        trainer, _, cfg = target.partition("/")
        if not NAME.fullmatch(trainer) or (cfg and not NAME.fullmatch(cfg)):
            raise ReportError(f"--method {spec!r}: expected NAME, NAME/CFG (folder names: letters, digits, "
                              f"_ . + -), LABEL=NAME[/CFG] or LABEL=TEMPLATE with {{dataset}} {{seed}}...")
        if not cfg:
            cfg = _default_cfg(spec, trainer, task)
        return cls(label.strip() or trainer, trainer=trainer, cfg=cfg, spec=spec)

    @property
    def name(self) -> str:
        return f"{self.label} ({self.template})" if self.template else f"{self.trainer}/{self.cfg}"

    def seeds(self, seeds: Sequence[int]) -> List[int]:
        one_run = evaluation_only(self.trainer) or (self.template is not None and "seed" not in _fields(self.template))
        return [1] if one_run else list(seeds)

    def folders(self, output: str, task: str, dataset: str, seed: int, shots: int = 16) -> List[Tuple[str, object]]:
        """Candidate (run folder, end signal) for one cell of xd, dg or fewshot, best first."""
        if self.template:
            folder = self.template.format(output=output, dataset=dataset, seed=seed, shots=shots, stage="")
            return [(folder, TEST_END if task in ("xd", "dg") else TRAIN_END)]
        t, cfg = self.trainer, self.cfg
        if task in ("xd", "dg"):
            if evaluation_only(t):
                return [(layout.eval_only(output, dataset, t, cfg), TEST_END)]
            if dataset in layout.SOURCES:  # the source accuracy: the training run's own test
                return [(layout.xd_train(output, dataset, t, cfg, seed), TRAIN_END)]
            return [(layout.xd_test(output, dataset, t, cfg, seed), TEST_END)]
        return [(layout.few_shot(output, dataset, t, cfg, shots, seed), TRAIN_END)]

    def base2new_folders(self, output: str, dataset: str, seed: int, side: str) -> List[Tuple[str, object]]:
        """Base: the training run's final test (trained methods) or a test_base run (eval-only ones)."""
        if self.template:
            stages = ["train_base", "test_base"] if side == "base" else ["test_new"]
            return [(self.template.format(output=output, dataset=dataset, seed=seed, shots=16, stage=s),
                     TRAIN_END if s == "train_base" else TEST_END) for s in stages]
        run = lambda stage: layout.base2new(output, stage, dataset, self.trainer, self.cfg, seed)
        if side == "new":
            return [(run("test_new"), TEST_END)]
        return [(run("train_base"), TRAIN_END), (run("test_base"), TEST_END)]


def _fields(template: str) -> set:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _checked_template(spec: str, template: str, task: str, shots: Sequence[int]) -> str:
    example = "LABEL={output}/{dataset}/CoOp/vit_b16_{shots}shots/nctx16_cscFalse_ctpend/seed{seed}"
    try:
        names = _fields(template)
        unknown = sorted(names - set(TEMPLATE_FIELDS))
        if not unknown:
            template.format(output="o", dataset="d", seed=1, shots=16, stage="s")
    except (ValueError, IndexError, KeyError) as err:
        raise ReportError(f"--method {spec!r}: the template does not parse ({err}); write it like {example}")
    if unknown:
        raise ReportError(f"--method {spec!r}: unknown placeholder(s) {', '.join('{%s}' % u for u in unknown)}; "
                          f"a template may use {', '.join('{%s}' % f for f in TEMPLATE_FIELDS)}")
    needed = ["dataset"] + (["stage"] if task == "base2new" else []) + \
             (["shots"] if task == "fewshot" and len(shots) > 1 else [])
    absent = [f for f in needed if f not in names]
    if absent:
        raise ReportError(f"--method {spec!r}: a {task} template needs {', '.join('{%s}' % a for a in absent)}, "
                          f"otherwise every cell would read the same folder")
    return template


def registered(trainer: str):
    try:
        return get_method(trainer)
    except KeyError:
        return None  # a trainer of another code base (CoOp's, MaPLe's...) read from its folders


def evaluation_only(trainer: str) -> bool:
    """One deterministic run (seed1), no training log (zero-shot CLIP)."""
    spec = registered(trainer)
    return spec is not None and not spec.trains


def _default_cfg(spec: str, trainer: str, task: str) -> str:
    method = registered(trainer)
    if method is None:
        raise ReportError(f"--method {spec}: give its config as {trainer}/CFG (the config folder name in "
                          f"its run folders)")
    try:
        return layout.config_name(method.config_for(task))
    except KeyError:
        raise ReportError(f"--method {spec}: {trainer} has no {task} runs; drop it") from None


METHOD_KEYWORDS = ("paper", "all")


def expand_method_keywords(specs: Sequence[str], task: str) -> List[str]:
    """`paper[/CFG]`: the ten rows of HiCroPL's base-to-new table (zero-shot CLIP as CLIP);
    `all[/CFG]`: every registered prompt method. With /CFG each runs in that config (the demo's
    demo_toy), else in its default config for the task."""
    expanded = []
    for spec in specs:
        keyword, _, cfg = spec.partition("/")
        if keyword not in METHOD_KEYWORDS or "=" in spec:
            expanded.append(spec)
            continue
        if keyword == "paper":
            rows = list(PAPER_METHODS)
        else:
            labels = dict((trainer, label) for label, trainer in PAPER_METHODS)
            rows = [(labels.get(m.name, m.name), m.name) for m in prompt_methods(task)]
        for label, trainer in rows:
            if registered(trainer) is None:
                raise ReportError(f"--method {spec}: {trainer} is not a registered method")
            target = f"{trainer}/{cfg}" if cfg else trainer
            expanded.append(target if label == trainer else f"{label}={target}")
    return expanded


def parse_methods(specs: Sequence[str], task: str, shots: Sequence[int]) -> List[Method]:
    methods = [Method.parse(spec, task, shots) for spec in expand_method_keywords(specs, task)]
    trainers = [m.trainer for m in methods if not m.template and m.label == m.trainer]
    for m in methods:  # one trainer in several configs: tell them apart by their config
        if not m.template and m.label == m.trainer and trainers.count(m.trainer) > 1:
            m.label = f"{m.trainer}/{m.cfg}"
    labels = [m.label for m in methods]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ReportError(f"--method: {', '.join(repeated)} given twice; drop the repeat or give each "
                          f"a label (LABEL=NAME/CFG)")
    return methods


# ---- cells and averages ---------------------------------------------------------------------
def seedwise_average(cells: Sequence[Cell]) -> Dict[int, float]:
    """seed -> mean over the cells, for the seeds every cell has."""
    if not cells:
        return {}
    common = set.intersection(*(set(c.by_seed) for c in cells))
    return {s: float(np.mean([c.by_seed[s] for c in cells])) for s in sorted(common)}


def average_cells(cells: Sequence[Cell]) -> Average:
    found = [c for c in cells if c.values]
    per_seed = seedwise_average(found)
    return Average(float(np.mean([c.mean for c in found])) if found else None,
                   spread(list(per_seed.values())),
                   len(found), len(cells), sum(len(c.values) for c in found), sum(c.expected for c in found))


@dataclass
class BaseNew:
    """One method on one dataset in base-to-new: HM of the two means, as papers report it."""
    base: Cell
    new: Cell

    @property
    def complete(self) -> bool:
        return self.base.complete and self.new.complete

    @property
    def hm(self) -> Optional[float]:
        return harmonic_mean(self.base.mean, self.new.mean) if self.base.values and self.new.values else None

    @property
    def hm_std(self) -> Optional[float]:
        """Std over seeds of the per-seed HM (the seeds with both a base and a new result)."""
        common = set(self.base.by_seed) & set(self.new.by_seed)
        return spread([harmonic_mean(self.base.by_seed[s], self.new.by_seed[s]) for s in common])

    def hm_text(self) -> str:
        if self.hm is None:
            return "missing"
        text = f"{self.hm:.2f}" + pm(self.hm_std)
        return text + ("" if self.complete else " (incomplete)")


@dataclass
class Base2NewAverage:
    base: Average
    new: Average
    hm: Optional[float]
    hm_std: Optional[float]

    @property
    def complete(self) -> bool:
        return self.base.complete and self.new.complete


def average_base2new(per_dataset: Sequence[BaseNew]) -> Base2NewAverage:
    """Over the datasets with both a base and a new result; seeds counted where both sides have one."""
    both = [bn for bn in per_dataset if bn.base.values and bn.new.values]
    paired = sum(len(set(bn.base.by_seed) & set(bn.new.by_seed)) for bn in both)
    coverage = dict(of_datasets=len(per_dataset), seeds=paired,
                    of_seeds=sum(bn.base.expected for bn in both))
    base = replace(average_cells([bn.base for bn in both]), **coverage)
    new = replace(average_cells([bn.new for bn in both]), **coverage)
    hm = harmonic_mean(base.mean, new.mean) if both else None
    base_seeds, new_seeds = seedwise_average([bn.base for bn in both]), seedwise_average([bn.new for bn in both])
    per_seed_hm = [harmonic_mean(base_seeds[s], new_seeds[s]) for s in base_seeds if s in new_seeds]
    return Base2NewAverage(base, new, hm, spread(per_seed_hm))


# ---- reading runs ---------------------------------------------------------------------------
def first_result(candidates) -> Optional[float]:
    for folder, end in candidates:
        result = read_run(folder, end)
        if result.value is not None:
            return result.value
    return None


def collect_cell(method: Method, seeds: Sequence[int], candidates: Callable[[int], list]) -> Cell:
    """candidates(seed): the run folders that may hold that seed's result, best first."""
    wanted = method.seeds(seeds)
    found = {s: first_result(candidates(s)) for s in wanted}
    return Cell({s: v for s, v in found.items() if v is not None}, len(wanted))


@dataclass
class Base2NewRow:
    method: Method
    datasets: Dict[str, BaseNew]
    average: Base2NewAverage

    def cells(self) -> List[Cell]:
        return [c for bn in self.datasets.values() for c in (bn.base, bn.new)]


@dataclass
class AccuracyRow:
    method: Method
    shots: int
    cells_by_dataset: Dict[str, Cell]
    average: Average

    def cells(self) -> List[Cell]:
        return list(self.cells_by_dataset.values())


def base2new_rows(methods, output, datasets, seeds) -> List[Base2NewRow]:
    rows = []
    for m in methods:
        per_dataset = {d: BaseNew(collect_cell(m, seeds, lambda s: m.base2new_folders(output, d, s, "base")),
                                  collect_cell(m, seeds, lambda s: m.base2new_folders(output, d, s, "new")))
                       for d in datasets}
        rows.append(Base2NewRow(m, per_dataset, average_base2new(list(per_dataset.values()))))
    return rows


def accuracy_rows(task, methods, output, datasets, seeds, shots_list) -> List[AccuracyRow]:
    """One row per (method, shots); in xd and dg the source (ImageNet) is outside the average."""
    rows = []
    for m in methods:
        for shots in shots_list:
            cells = {d: collect_cell(m, seeds, lambda s: m.folders(output, task, d, s, shots)) for d in datasets}
            targets = [c for d, c in cells.items() if d not in layout.SOURCES or task == "fewshot"]
            rows.append(AccuracyRow(m, shots, cells, average_cells(targets)))
    return rows


# ---- nothing found: say what is there -------------------------------------------------------
def discover(output: str, task: str) -> Dict[str, set]:
    """'TRAINER/CFG' -> datasets, for the run folders of a task under the output root."""
    found: Dict[str, set] = {}
    add = lambda trainer, cfg, dataset: found.setdefault(f"{trainer}/{cfg}", set()).add(dataset)
    if task == "base2new":
        for path in glob.glob(os.path.join(glob.escape(output), "base2new", "*", "*", "shots_*", "*", "*")):
            dataset, _, trainer, cfg = path.split(os.sep)[-4:]
            if os.path.isdir(path):
                add(trainer, cfg, dataset)
    elif task == "fewshot":
        for path in glob.glob(os.path.join(glob.escape(output), "*", "*", "*_*shots")):
            dataset, trainer, leaf = path.split(os.sep)[-3:]
            if dataset not in ("base2new", "evaluation") and os.path.isdir(path):
                add(trainer, re.sub(r"_\d+shots$", "", leaf), dataset)
    else:
        for path in glob.glob(os.path.join(glob.escape(output), "evaluation", "*", "*", "*")):
            trainer, cfg, dataset = path.split(os.sep)[-3:]
            if os.path.isdir(path):
                add(trainer, re.sub(r"_16shots$", "", cfg), dataset)
    return found


def _candidates(method: Method, output: str, task: str, dataset: str, seed: int, shots: int):
    if task == "base2new":
        return [c for side in ("base", "new") for c in method.base2new_folders(output, dataset, seed, side)]
    return method.folders(output, task, dataset, seed, shots)


def _first_problem(method: Method, output: str, task: str, datasets, seeds, shots_list) -> str:
    """The first run folder that exists but has no result, with why; '' if none exists."""
    for d in datasets:
        for s in method.seeds(seeds):
            for k in shots_list:
                for folder, end in _candidates(method, output, task, d, s, k):
                    if os.path.isdir(folder):
                        return f"{folder}: {read_run(folder, end).problem}"
    return ""


def no_runs_message(method: Method, output: str, task: str, datasets, seeds, shots_list) -> str:
    example = _candidates(method, output, task, datasets[0], method.seeds(seeds)[0], shots_list[0])[0][0]
    shots = f" --shots {' '.join(map(str, shots_list))}" if task == "fewshot" else ""
    lines = [f"--method {method.spec}: no finished {task} run of {method.name} under {output} for "
             f"--datasets {' '.join(datasets)} --seeds {' '.join(map(str, seeds))}{shots} (looked for {example})."]
    unfinished = _first_problem(method, output, task, datasets, seeds, shots_list)
    if unfinished:
        lines.append(f"Its run folders exist but none has finished, e.g. {unfinished}.")
    found = discover(output, task)
    if found:
        lines.append(f"{task} runs under {output}:")
        lines += [f"  --method {name} --datasets {' '.join(ordered(sorted(ds)))}" for name, ds in sorted(found.items())]
        lines.append("Use one of these (a run in another folder layout needs --method LABEL=TEMPLATE), "
                     "or drop this --method.")
    else:
        lines.append(f"No {task} run folder at all under {output}: is --output the OUTPUT the runs wrote to?")
    return "\n".join(lines)


# ---- tables ---------------------------------------------------------------------------------
def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


CSV_HEADER = ["method", "dataset", "shots", "metric", "mean", "std", "seeds_found", "seeds_expected",
              "datasets_found", "datasets_expected", "complete", "synthetic"]

BASE2NEW_NOTES = (
    "Mean ± std over seeds (population std, as CoOp's parse_test_res.py; no ± from a single run). "
    "HM is the harmonic mean of the mean Base and the mean New accuracy, as papers report it; its ± is "
    "the std over seeds of the per-seed HM. `(incomplete: 2/3 seeds)`: a cell averaged over the seeds "
    "found; `missing`: no finished run. Average: the mean over the datasets with both a Base and a New "
    "result (its ± is the std over seeds of the per-seed average); Covers says how many datasets and "
    "(dataset, seed) results it includes.")
ACCURACY_NOTES = (
    "Mean ± std over seeds (population std, as CoOp's parse_test_res.py; no ± from a single run). "
    "`(incomplete: 2/3 seeds)`: a cell averaged over the seeds found; `missing`: no finished run. "
    "Average: the mean over the target datasets with a result (its ± is the std over seeds of the "
    "per-seed average), marked with the datasets and (dataset, seed) results it covers when it does not "
    "cover them all.")


def base2new_markdown(rows: List[Base2NewRow], datasets: Sequence[str]) -> str:
    """The HiCroPL paper's Table 1 layout: Average first, then one block per dataset; rows are
    methods, columns Base, New, HM. Then a wide HM table, one row per method."""
    synthetic = " (synthetic)" if is_synthetic(datasets) else ""
    lines = [f"# {title('base2new', datasets)}", "", BASE2NEW_NOTES, "",
             f"## Average over {len(datasets)} datasets{synthetic}", ""]
    lines += _md_table(["Method", "Base", "New", "HM", "Covers"],
                       [[r.method.label, r.average.base.text(mark=False), r.average.new.text(mark=False),
                         "missing" if r.average.hm is None else f"{r.average.hm:.2f}" + pm(r.average.hm_std),
                         r.average.base.coverage + ("" if r.average.complete else " (incomplete)")] for r in rows])
    for d in datasets:
        lines += ["", f"## {display(d)}{synthetic}", ""]
        lines += _md_table(["Method", "Base", "New", "HM"],
                           [[r.method.label, r.datasets[d].base.text(), r.datasets[d].new.text(),
                             r.datasets[d].hm_text()] for r in rows])
    lines += ["", f"## HM per dataset{synthetic}", ""]
    lines += _md_table(["Method", "Average"] + [display(d) for d in datasets],
                       [[r.method.label, _short(r.average.hm, not r.average.complete)]
                        + [_short(r.datasets[d].hm, not r.datasets[d].complete) for d in datasets] for r in rows])
    if any(not r.average.complete or not all(bn.complete for bn in r.datasets.values()) for r in rows):
        lines += ["", "`*`: incomplete (see the blocks above)."]
    return "\n".join(lines) + "\n"


def _short(value: Optional[float], incomplete: bool) -> str:
    return "missing" if value is None else f"{value:.2f}" + ("*" if incomplete else "")


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def base2new_csv(rows: List[Base2NewRow], datasets: Sequence[str]) -> str:
    return csv_text(CSV_HEADER, _base2new_csv_rows(rows, datasets))


def _base2new_csv_rows(rows: List[Base2NewRow], datasets: Sequence[str]) -> Iterator[list]:
    synthetic = is_synthetic(datasets)
    for r in rows:
        a = r.average
        for metric, side in (("base", a.base), ("new", a.new)):
            yield [r.method.label, "average", 16, metric, _num(side.mean), _num(side.std), side.seeds,
                   side.of_seeds, side.datasets, side.of_datasets, side.complete, synthetic]
        yield [r.method.label, "average", 16, "hm", _num(a.hm), _num(a.hm_std), a.base.seeds,
               a.base.of_seeds, a.base.datasets, a.base.of_datasets, a.complete, synthetic]
        for d in datasets:
            bn = r.datasets[d]
            for metric, c in (("base", bn.base), ("new", bn.new)):
                yield [r.method.label, d, 16, metric, _num(c.mean), _num(c.std), len(c.values), c.expected,
                       "", "", c.complete, synthetic]
            paired = len(set(bn.base.by_seed) & set(bn.new.by_seed))
            yield [r.method.label, d, 16, "hm", _num(bn.hm), _num(bn.hm_std), paired, bn.base.expected,
                   "", "", bn.complete, synthetic]


def base2new_wide_csv(rows: List[Base2NewRow], datasets: Sequence[str]) -> str:
    """One row per method: average then each dataset's base, new, hm (means); what is incomplete."""
    header = (["method", "average_base", "average_new", "average_hm", "average_covers"]
              + [f"{d}_{m}" for d in datasets for m in ("base", "new", "hm")] + ["incomplete", "synthetic"])
    lines = []
    for r in rows:
        incomplete = [f"{d}:{side}({c.seeds_note})" for d in datasets
                      for side, c in (("base", r.datasets[d].base), ("new", r.datasets[d].new)) if c.seeds_note]
        lines.append([r.method.label, _num(r.average.base.mean), _num(r.average.new.mean), _num(r.average.hm),
                      r.average.base.coverage]
                     + [_num(v) for d in datasets for v in (r.datasets[d].base.mean, r.datasets[d].new.mean,
                                                             r.datasets[d].hm)]
                     + [" ".join(incomplete), is_synthetic(datasets)])
    return csv_text(header, lines)


def accuracy_markdown(task: str, rows: List[AccuracyRow], datasets: Sequence[str]) -> str:
    shots_col = task == "fewshot"
    names = [("Source: " if d in layout.SOURCES and task in ("xd", "dg") else "") + display(d) for d in datasets]
    header = ["Method"] + (["Shots"] if shots_col else []) + names + ["Average"]
    body = [[r.method.label] + ([str(r.shots)] if shots_col else []) + [r.cells_by_dataset[d].text() for d in datasets]
            + [r.average.text()] for r in rows]
    return "\n".join([f"# {title(task, datasets)}", "", ACCURACY_NOTES, ""] + _md_table(header, body)) + "\n"


def accuracy_csv(task: str, rows: List[AccuracyRow], datasets: Sequence[str]) -> str:
    return csv_text(CSV_HEADER, _accuracy_csv_rows(rows, datasets))


def _accuracy_csv_rows(rows: List[AccuracyRow], datasets: Sequence[str]) -> Iterator[list]:
    synthetic = is_synthetic(datasets)
    for r in rows:
        a = r.average
        yield [r.method.label, "average", r.shots, "accuracy", _num(a.mean), _num(a.std), a.seeds, a.of_seeds,
               a.datasets, a.of_datasets, a.complete, synthetic]
        for d in datasets:
            c = r.cells_by_dataset[d]
            yield [r.method.label, d, r.shots, "accuracy", _num(c.mean), _num(c.std), len(c.values),
                   c.expected, "", "", c.complete, synthetic]


# ---- the report -----------------------------------------------------------------------------
@dataclass
class Report:
    task: str
    datasets: List[str]
    rows: list  # Base2NewRow per method, or AccuracyRow per (method, shots)
    markdown: str
    files: Dict[str, bytes] = field(default_factory=dict)  # file name -> content

    @property
    def synthetic(self) -> bool:
        return is_synthetic(self.datasets)


def build(task, method_specs, output="output", datasets=None, seeds=(1, 2, 3), shots=(1, 2, 4, 8, 16),
          figures=True) -> Report:
    """Everything the report writes, in memory: raises ReportError on a mistake or when nothing matches."""
    if task not in TASKS:
        raise ReportError(f"--task {task}: unknown task; choose one of {', '.join(TASKS)}")
    if not method_specs:
        raise ReportError("no --method given: name at least one, e.g. --method HiCroPL/CFG")
    if not os.path.isdir(output):
        raise ReportError(f"--output {output}: no such folder. Point --output at the root the runs wrote to "
                          f"(the scripts' OUTPUT; after scripts/demo.sh: demo_output/output)")
    shots_list = list(shots) if task == "fewshot" else [16]
    methods = parse_methods(method_specs, task, shots_list)
    source, datasets = layout.expand_datasets(task, datasets or ["all"])
    if source and task in ("xd", "dg"):  # a keyword's transfer: its source first
        datasets = [source] + datasets
    datasets = ordered(datasets)
    seeds = list(dict.fromkeys(seeds))
    if task == "base2new":
        rows = base2new_rows(methods, output, datasets, seeds)
    else:
        rows = accuracy_rows(task, methods, output, datasets, seeds, shots_list)
    for m in methods:
        if not any(c.values for r in rows if r.method is m for c in r.cells()):
            raise ReportError(no_runs_message(m, output, task, datasets, seeds, shots_list))
    if task == "base2new":
        md, files = base2new_markdown(rows, datasets), {"base2new.csv": base2new_csv(rows, datasets),
                                                        "base2new_wide.csv": base2new_wide_csv(rows, datasets)}
    else:
        md, files = accuracy_markdown(task, rows, datasets), {f"{task}.csv": accuracy_csv(task, rows, datasets)}
    notes = run_notes(output, {m.trainer for m in methods})
    if notes:  # what the numbers used that the folder names do not say (fewer shots)
        md += "\n## Notes\n\n" + "".join(f"- {note}\n" for note in notes)
    files = {f"{task}.md": md.encode(), **{name: text.encode() for name, text in files.items()}}
    if figures:
        from . import report_figures
        figure = (report_figures.base2new_figure(rows, datasets) if task == "base2new"
                  else report_figures.accuracy_figure(task, rows, datasets))
        files.update({f"{task}.{ext}": data for ext, data in report_figures.render(figure).items()})
    return Report(task, datasets, rows, md, files)


def run_notes(output: str, trainers) -> List[str]:
    """The run records' notes (record.notes) of the runs of these trainers under output."""
    notes = []
    for path in sorted(glob.glob(os.path.join(glob.escape(output), "**", record.RECORD_FILE), recursive=True)):
        recorded = record.read(os.path.dirname(path))
        if recorded and recorded.get("trainer") in trainers:
            notes += [f"{os.path.dirname(path)}: {note}" for note in record.notes(recorded)]
    return notes


def gaps(report_: Report) -> Tuple[int, int]:
    """(missing cells, incomplete cells) over every method and dataset."""
    cells = [c for r in report_.rows for c in r.cells()]
    return sum(not c.values for c in cells), sum(bool(c.values) and not c.complete for c in cells)


def report(task, method_specs, output="output", datasets=None, seeds=(1, 2, 3), shots=(1, 2, 4, 8, 16),
           out="report", figures=True, echo=print, warn=None) -> Report:
    """Builds the whole report, then writes each file atomically (no half-written file)."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    result = build(task, method_specs, output, datasets, seeds, shots, figures)
    for name, data in result.files.items():
        atomic_write(os.path.join(out, name), lambda handle, data=data: handle.write(data))
    echo(result.markdown)
    missing, incomplete = gaps(result)
    if missing or incomplete:
        warn(f"note: {missing} cell(s) missing and {incomplete} incomplete; they are marked in the tables "
             f"and figures")
    if result.synthetic:
        warn(f"note: {SYNTHETIC_MARK}")
    echo("Saved " + ", ".join(os.path.join(out, name) for name in result.files))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlprompt.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--method", action="append", required=True,
                        help="NAME, NAME/CFG, LABEL=NAME[/CFG] or LABEL=TEMPLATE; repeat for each method. "
                             "'paper[/CFG]': the ten rows of HiCroPL's base-to-new table; 'all[/CFG]': every "
                             "registered prompt method")
    parser.add_argument("--output", default="output", help="the runs' output root (default: output)")
    parser.add_argument("--datasets", nargs="+", help="names, 'all' (default: the papers' datasets for the task) "
                                                      "or 'toy' (the synthetic toy world's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="fewshot only")
    parser.add_argument("--out", default="report", help="folder for the tables and figures")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    try:
        report(args.task, args.method, args.output, args.datasets, args.seeds, args.shots, args.out,
               figures=not args.no_figures)
    except (ReportError, OutputWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
