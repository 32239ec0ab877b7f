"""Results of Dassl runs read from their logs: the final accuracy of a run folder.

A training log counts from its "Finish training" line (Dassl's wording since 2022; CoOp's
parse_test_res.py waits for "Finished training", which is accepted too); a test log from its
"=> result" line. A resumed run leaves several log files: the newest with a result counts.
"""
import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..errors import UserError

TRAIN_END = re.compile(r"^Finish(ed)? training")
TEST_END = re.compile(r"^=> result")


class ResultsError(UserError, RuntimeError):
    """No usable result where one was expected; the message says where and why."""


def metric_regex(keyword: str):
    return re.compile(rf"^\* {re.escape(keyword)}: ([\.\deE+-]+)%")


def read_log(path: str, end_signal, keyword: str = "accuracy") -> Optional[float]:
    """The last `* keyword: X%` after the end signal in one log file, or None."""
    regex, seen_end, value = metric_regex(keyword), False, None
    with open(path, errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if end_signal.search(line):
                seen_end = True
            match = regex.search(line)
            if match and seen_end:
                value = float(match.group(1))
    return value


def is_test_only_log(path: str, keyword: str = "accuracy") -> bool:
    """A log of an --eval-only run: a result on the test set and no training epoch."""
    testing, tested = False, False
    with open(path, errors="replace") as handle:
        for line in handle:
            if line.startswith("epoch ["):
                return False
            testing = testing or line.startswith("Evaluate on the *test* set")
            tested = tested or (testing and metric_regex(keyword).search(line.strip()) is not None)
    return tested


@dataclass
class RunResult:
    folder: str
    value: Optional[float]
    log: Optional[str]
    problem: str = ""


def read_run(folder: str, end_signal, keyword: str = "accuracy") -> RunResult:
    logs = sorted(f for f in os.listdir(folder) if f.startswith("log.txt")) if os.path.isdir(folder) else []
    if not logs:
        return RunResult(folder, None, None, "no log.txt (the run never started?)")
    for name in reversed(logs):  # log.txt, then log.txt-<time> of later (resumed) runs
        value = read_log(os.path.join(folder, name), end_signal, keyword)
        if value is not None:
            return RunResult(folder, value, os.path.join(folder, name))
    last = os.path.join(folder, logs[-1])
    if end_signal is TRAIN_END and is_test_only_log(last, keyword):
        return RunResult(folder, None, last, "a test-only log (an --eval-only run), not a training run's: "
                                             "parse it with --test-log")
    return RunResult(folder, None, last,
                     f"no '* {keyword}' after '{end_signal.pattern.lstrip('^')}' (unfinished run?)")


def finished(folder: str, kind: str) -> bool:
    """Whether the run in `folder` logged its final result: a training ("train") or a test ("test")."""
    return read_run(folder, TRAIN_END if kind == "train" else TEST_END).value is not None


def ci95(values: List[float]) -> float:
    return 1.96 * float(np.std(values)) / math.sqrt(len(values))


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
