"""Cells (one method on one dataset over seeds) and averages over datasets: what the report's
tables and figures show."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np


@dataclass
class Cell:
    """One method on one dataset (one side): the result of each seed found."""
    by_seed: Dict[int, float]
    expected: int

    @property
    def values(self) -> List[float]:
        return list(self.by_seed.values())

    @property
    def complete(self) -> bool:
        return len(self.by_seed) == self.expected

    @property
    def mean(self) -> Optional[float]:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> Optional[float]:
        """Population std over the seeds found, as CoOp's parse_test_res.py; None from one run."""
        return spread(self.values)

    @property
    def seeds_note(self) -> str:
        return "" if self.complete or not self.values else f"{len(self.values)}/{self.expected} seeds"

    def text(self) -> str:
        if not self.values:
            return "missing"
        return f"{self.mean:.2f}" + pm(self.std) + (f" (incomplete: {self.seeds_note})" if self.seeds_note else "")


@dataclass
class Average:
    """A mean over datasets, with the std over seeds of the per-seed average and its coverage."""
    mean: Optional[float]
    std: Optional[float]
    datasets: int
    of_datasets: int
    seeds: int  # (dataset, seed) results among the datasets it includes
    of_seeds: int

    @property
    def complete(self) -> bool:
        return self.datasets == self.of_datasets and self.seeds == self.of_seeds

    @property
    def coverage(self) -> str:
        return f"{self.datasets}/{self.of_datasets} datasets, {self.seeds}/{self.of_seeds} seeds"

    def text(self, mark: bool = True) -> str:
        """mark: say what an incomplete average covers (False where a column says it)."""
        if self.mean is None:
            return "missing"
        value = f"{self.mean:.2f}" + pm(self.std)
        return value + ("" if self.complete or not mark else f" (incomplete: {self.coverage})")


def spread(values: Sequence[float]) -> Optional[float]:
    """Std over seeds; None from a single run (no spread to show, not a spread of zero)."""
    return float(np.std(values)) if len(values) > 1 else None


def pm(std: Optional[float]) -> str:
    return "" if std is None else f" ± {std:.2f}"
