"""Experiment tooling over train.py: where runs write (layout), one run of a task (run), many
(sweep), their results (results) and the comparison report (report, report_figures with cells and
names shared by both). `python -m vlprompt.run|sweep|report` still work (vlprompt/<name>/__main__.py)."""
