"""The report's figures, drawn so they cannot be misread: a missing result is labelled `missing`
(no bar, no point), an incomplete one is hatched or hollow and says what it covers, bars carry
their value and the std over seeds, and panels of one metric share one y-range."""
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; before pyplot, so no display is ever needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from . import layout  # noqa: E402
from .cells import Average, Cell  # noqa: E402
from .names import display, title  # noqa: E402

MISSING = "missing"
BAR_CAPTION = ("Bars: mean over seeds, value on top; error bars: std over seeds ({hm}none from a single run). "
               "Hatched, (n/N): incomplete, n of N seeds found{ds}. 'missing': no finished run, nothing drawn.")


@dataclass
class Bar:
    value: Optional[float]  # None: no result
    std: Optional[float]
    note: str = ""  # what an incomplete bar covers, e.g. "2/3"; "" when complete

    @property
    def label(self) -> str:
        if self.value is None:
            return MISSING
        return f"{self.value:.1f}" + (f" ({self.note})" if self.note else "")


def cell_bar(cell: Cell) -> Bar:
    note = "" if cell.complete or not cell.values else f"{len(cell.values)}/{cell.expected}"
    return Bar(cell.mean, cell.std, note)


def average_bar(average: Average, value: Optional[float] = None, std: Optional[float] = None) -> Bar:
    """An average over datasets; value/std replace its own (the HM of two averages)."""
    value = average.mean if value is None else value
    std = average.std if std is None else std
    if average.complete or value is None:
        return Bar(value, std)
    if average.datasets < average.of_datasets:
        return Bar(value, std, f"{average.datasets}/{average.of_datasets} ds")
    return Bar(value, std, f"{average.seeds}/{average.of_seeds}")


def colours(labels: Sequence[str]) -> Dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def grouped_bars(ax, groups: Sequence[str], series: Dict[str, List[Bar]], colour: Dict[str, str],
                 separators: Sequence[int] = ()) -> None:
    """One group per dataset, one bar per method; missing bars are NaN-high and labelled."""
    width = min(0.3, 0.8 / max(1, len(series)))  # a lone method gets a bar, not a block
    x = np.arange(len(groups))
    fontsize = 7 if len(series) <= 4 else 6
    for i, (label, bars) in enumerate(series.items()):
        xs = x + (i - (len(series) - 1) / 2) * width
        heights = [np.nan if b.value is None else b.value for b in bars]
        errors = [np.nan if b.value is None or b.std is None else b.std for b in bars]
        container = ax.bar(xs, heights, width * 0.9, yerr=errors, color=colour[label], label=label,
                           error_kw=dict(ecolor="black", elinewidth=0.8, capsize=2))
        for rect, bar, xpos in zip(container.patches, bars, xs):
            if bar.value is None:
                ax.annotate(MISSING, (xpos, 0), xytext=(0, 3), textcoords="offset points", rotation=90,
                            ha="center", va="bottom", fontsize=fontsize + 1, color=colour[label], fontweight="bold")
                continue
            if bar.note:  # incomplete: lighter and hatched, and the label says what it covers
                rect.set_facecolor(to_rgba(colour[label], 0.35))
                rect.set_edgecolor(colour[label])
                rect.set_hatch("////")
            ax.annotate(bar.label, (xpos, bar.value + (bar.std or 0.0)), xytext=(0, 3), textcoords="offset points",
                        rotation=90, ha="center", va="bottom", fontsize=fontsize)
    for after in separators:  # between the average (or the source) and the datasets
        ax.axvline(after + 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center",
                       fontsize=8)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def share_bar_range(axes, series_per_panel: Sequence[Dict[str, List[Bar]]]) -> None:
    """Bars start at 0; the top leaves room for the rotated value labels above the tallest bar."""
    tops = [b.value + (b.std or 0.0) for series in series_per_panel for bars in series.values()
            for b in bars if b.value is not None]
    top = max(tops + [1.0]) * 1.4
    for ax in axes:
        ax.set_ylim(0, top)
        ax.set_yticks([t for t in range(0, 101, 20) if t <= top])
        ax.set_ylabel("accuracy (%)")


def _legend(fig, labels: Sequence[str], colour: Dict[str, str], hatched: bool) -> None:
    handles = [Patch(color=colour[label]) for label in labels]
    names = list(labels)
    if hatched:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="////"))
        names.append("incomplete")
    fig.legend(handles, names, loc="upper right", fontsize=8, bbox_to_anchor=(0.995, 0.96))


def _bar_figure_size(n_groups: int, n_methods: int, n_panels: int):
    width = min(30.0, max(8.0, 2.0 + n_groups * (0.35 * n_methods + 0.35)))
    return width, 1.2 + 2.8 * n_panels


def base2new_figure(rows, datasets: Sequence[str]):
    """Three panels (Base, New, HM) sharing one y-range; groups: Average, then each dataset."""
    labels = [r.method.label for r in rows]
    colour = colours(labels)
    groups = ["Average"] + [display(d) for d in datasets]
    panels = []
    for metric in ("base", "new", "hm"):
        series = {}
        for r in rows:
            a = r.average
            average = (average_bar(a.base, a.hm, a.hm_std) if metric == "hm"
                       else average_bar(getattr(a, metric)))
            cells = [_hm_bar(r.datasets[d]) if metric == "hm" else cell_bar(getattr(r.datasets[d], metric))
                     for d in datasets]
            series[r.method.label] = [average] + cells
        panels.append((metric, series))
    fig, axes = plt.subplots(3, 1, figsize=_bar_figure_size(len(groups), len(rows), 3), sharey=True, squeeze=False)
    axes = axes[:, 0]
    names = {"base": "Base classes", "new": "New classes", "hm": "Harmonic mean (HM)"}
    for ax, (metric, series) in zip(axes, panels):
        grouped_bars(ax, groups, series, colour, separators=[0])
        ax.set_title(names[metric], fontsize=10)
    share_bar_range(axes, [series for _, series in panels])
    hatched = any(b.note for _, series in panels for bars in series.values() for b in bars)
    _legend(fig, labels, colour, hatched)
    fig.suptitle(title("base2new", datasets), fontsize=11)
    caption = BAR_CAPTION.format(hm="HM: of the per-seed HM; ", ds="; k/N ds: an average over k of N datasets")
    _finish(fig, caption)
    return fig


def _hm_bar(base_new) -> Bar:
    if base_new.hm is None:
        return Bar(None, None)
    found = len(set(base_new.base.by_seed) & set(base_new.new.by_seed))
    note = "" if base_new.complete else f"{found}/{base_new.base.expected}"
    return Bar(base_new.hm, base_new.hm_std, note)


def accuracy_figure(task: str, rows, datasets: Sequence[str]):
    return few_shot_figure(rows, datasets) if task == "fewshot" else transfer_figure(task, rows, datasets)


def transfer_figure(task: str, rows, datasets: Sequence[str]):
    """xd / dg: one panel, the source first, then the targets and their average."""
    labels = [r.method.label for r in rows]
    colour = colours(labels)
    groups = [("Source: " if d in layout.SOURCES else "") + display(d) for d in datasets] + ["Average"]
    series = {r.method.label: [cell_bar(r.cells_by_dataset[d]) for d in datasets] + [average_bar(r.average)]
              for r in rows}
    fig, ax = plt.subplots(figsize=_bar_figure_size(len(groups), len(rows), 1))
    source = [0] if datasets and datasets[0] in layout.SOURCES else []
    grouped_bars(ax, groups, series, colour, separators=source + [len(groups) - 2])
    share_bar_range([ax], [series])
    _legend(fig, labels, colour, any(b.note for bars in series.values() for b in bars))
    fig.suptitle(title(task, datasets), fontsize=11)
    _finish(fig, BAR_CAPTION.format(hm="", ds="; k/N ds: an average over k of N target datasets"))
    return fig


def few_shot_figure(rows, datasets: Sequence[str]):
    """Accuracy against shots, all methods as curves; one panel per dataset (Average first), one y-range."""
    labels = list(dict.fromkeys(r.method.label for r in rows))
    colour = colours(labels)
    panels = ["Average"] + list(datasets)
    cols = min(4, len(panels))
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols + 1.6, 3.4 * n_rows + 1.2), sharey=True, squeeze=False)
    shots = sorted({r.shots for r in rows})
    drawn: List[Bar] = []
    for ax, panel in zip(axes.flat, panels):
        notes = []
        for label in labels:
            mine = sorted((r for r in rows if r.method.label == label), key=lambda r: r.shots)
            points = [(r.shots, average_bar(r.average) if panel == "Average" else cell_bar(r.cells_by_dataset[panel]))
                      for r in mine]
            drawn += _curve(ax, points, colour[label], label)
            notes += [(label, note) for note in _curve_notes(label, points)]
        for i, (label, text) in enumerate(notes):
            ax.text(0.97, 0.04 + 0.09 * i, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                    color=colour[label], style="italic")
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(display(panel), fontsize=10)
        ax.set_xlabel("shots per class")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _share_curve_range(axes.flat, drawn)
    handles = [plt.Line2D([], [], color=colour[label], marker="o") for label in labels]
    handles.append(plt.Line2D([], [], color="grey", marker="o", markerfacecolor="white", markersize=8, linestyle=""))
    fig.legend(handles, labels + ["incomplete"], loc="upper right", fontsize=8, bbox_to_anchor=(0.995, 0.96))
    fig.suptitle(title("fewshot", datasets), fontsize=11)
    _finish(fig, "Points: mean over seeds; error bars: std over seeds (none from a single run). Hollow: "
                 "incomplete (seeds missing, or an average over fewer datasets: not joined to the curve). "
                 "'missing': no finished run at those shots, no point drawn, the curve breaks.")
    return fig


def _curve(ax, points, colour: str, label: str) -> List[Bar]:
    """One method's curve; it breaks (NaN) at a missing point and at an average over fewer datasets,
    which is shown hollow on its own. Returns the points drawn."""
    drawn = [b for _, b in points if b.value is not None]
    if not drawn:
        return []
    joined = [b.value is not None and "ds" not in b.note for _, b in points]
    ax.errorbar([s for s, _ in points], [b.value if ok else np.nan for (_, b), ok in zip(points, joined)],
                yerr=[(b.std or 0.0) if ok else np.nan for (_, b), ok in zip(points, joined)],
                marker="o", markersize=4, capsize=3, color=colour, label=label)
    hollow = [(s, b.value) for s, b in points if b.value is not None and b.note]
    if hollow:
        ax.scatter(*zip(*hollow), s=60, facecolors="white", edgecolors=colour, zorder=3)
    return drawn


def _curve_notes(label: str, points) -> List[str]:
    """What the panel must say in words: the shots with no result, the partial averages."""
    absent = [s for s, b in points if b.value is None]
    notes = []
    if absent:
        where = "all shots" if len(absent) == len(points) else f"{', '.join(map(str, absent))} shots"
        notes.append(f"{label}: {MISSING} at {where}")
    notes += [f"{label} at {s} shots: over {b.note.replace(' ds', '')} datasets" for s, b in points
              if b.value is not None and "ds" in b.note]
    return notes


def _share_curve_range(axes, drawn: Sequence[Bar]) -> None:
    """One y-range for every panel, with room at the bottom for the panels' notes."""
    if not drawn:
        return
    low = min(b.value - (b.std or 0.0) for b in drawn)
    high = max(b.value + (b.std or 0.0) for b in drawn)
    span = high - low
    for ax in axes:
        ax.set_ylim(max(0.0, low - 0.25 * span - 1.0), min(100.0, high + 0.08 * span + 1.0))


def _finish(fig, caption: str) -> None:
    """Caption at the bottom; the legend (about 1.5 inches) right of the panels."""
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    width, height = fig.get_size_inches()
    fig.tight_layout(rect=(0, 0.35 / height, 1 - 1.5 / width, 1 - 0.45 / height))


def render(fig) -> Dict[str, bytes]:
    """PNG and PDF bytes of a figure (written later, atomically, with the tables)."""
    out = {}
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=120)
        out[ext] = buffer.getvalue()
    plt.close(fig)
    return out
