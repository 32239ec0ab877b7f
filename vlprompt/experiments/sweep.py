"""Run a benchmark grid (datasets x seeds x stages) on Slurm or on one machine, through submitit.

    python -m vlprompt.sweep --task base2new --trainer HiCroPL --datasets all --seeds 1 2 3 --executor slurm \\
        --partition gpu --time 240 --mem 32 --array-parallelism 16
    python -m vlprompt.sweep --task fewshot --trainer DCP --datasets dtd eurosat --shots 1 2 4 8 16 --gpus 0 1 2 3
    python -m vlprompt.sweep --task xd --trainer HiCroPL --dry-run

Each run is a call of `python -m vlprompt.run`, as the task scripts (scripts/<method>/<task>.sh) make, so
the sweep writes the same output folders, and scripts and sweeps can be mixed: finished runs are skipped,
unfinished ones resume, and tests wait for their training (new-class tests after base training,
cross-dataset tests after the ImageNet training). Executors are submitit's: Slurm job arrays (one
array per stage, the next stage depending on the previous array), or its local executor running
several runs at once, one GPU each or CPU processes. Trailing arguments after `--` are config
options passed to every run.
"""
import argparse
import os
import re
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import layout, record
from ..errors import UserError, report_user_errors
from ..methods.registry import get_method, methods
from .results import finished

class SweepError(UserError):
    """A mistake in the sweep's arguments or profile; the message names the value and the fix."""


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = ("base2new", "xd", "dg", "fewshot")


@dataclass(frozen=True)
class Run:
    key: str  # unique within the grid, e.g. "base2new_test/dtd/seed2"
    task: str  # a task of vlprompt.run
    args: Tuple[str, ...]
    outputs: Tuple[Tuple[str, str], ...]  # (run folder, "train" | "test") that must hold a result
    after: Tuple[str, ...] = ()  # keys of runs that must finish first
    trainer: str = ""

    def command(self, options: Sequence[str] = ()) -> List[str]:
        return [sys.executable, "-m", "vlprompt.run", self.task, self.trainer, *self.args, *options]

    def finished(self, options: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> bool:
        """Every output holds a result; with `env` (the runs' environment), also made with the train.py
        arguments this run would pass now (its record's request). A finished run asked with other
        arguments is left to vlprompt.run, which skips it if they resolve to the same config and
        refuses it, naming the keys, if not."""
        if not all(finished(folder, kind) for folder, kind in self.outputs):
            return False
        return env is None or self.same_request(options, env)

    def same_request(self, options: Sequence[str], env: Dict[str, str]) -> bool:
        from . import run as run_module
        try:
            ctx, positional, opts = run_module.parse([self.task, self.trainer, *self.args, *options],
                                                     {**os.environ, **env})
            jobs = run_module.plan(ctx, positional, {**os.environ, **env})
        except UserError:
            return True  # no DATA (a dry run) or the like: the logs decide, as before records
        for job in jobs:
            recorded = record.read(job.folder)
            if recorded is not None and recorded.get("request") != record.request(run_module.train_argv(job, opts)):
                return False
        return True


@dataclass
class Grid:
    task: str
    trainer: str
    cfg: str
    output: str
    datasets: List[str]
    seeds: List[int]
    shots: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    source: str = "imagenet"

    def run(self, key: str, task: str, args: Sequence, outputs, after: Sequence[str] = ()) -> Run:
        return Run(key, task, tuple(map(str, args)), tuple(outputs), tuple(after), self.trainer)

    def expand(self) -> List[Run]:
        if not get_method(self.trainer).trains:
            return self._evaluation_only()
        out, t, cfg = self.output, self.trainer, self.cfg
        runs: List[Run] = []
        if self.task == "base2new":
            for d in self.datasets:
                for s in self.seeds:
                    train = self.run(f"base2new_train/{d}/seed{s}", "base2new_train", (d, s),
                                     [(layout.base2new(out, "train_base", d, t, cfg, s), "train")])
                    runs += [train, self.run(f"base2new_test/{d}/seed{s}", "base2new_test", (d, s),
                                             [(layout.base2new(out, "test_new", d, t, cfg, s), "test")], [train.key])]
        elif self.task in ("xd", "dg"):
            for s in self.seeds:
                train = self.run(f"xd_train/{self.source}/seed{s}", "xd_train", (self.source, s),
                                 [(layout.xd_train(out, self.source, t, cfg, s), "train")])
                runs.append(train)
                runs += [self.run(f"xd_test/{d}/seed{s}", "xd_test", (d, s),
                                  [(layout.xd_test(out, d, t, cfg, s), "test")], [train.key]) for d in self.datasets]
        else:
            runs = [self.run(f"fewshot/{d}/{k}shots/seed{s}", "few_shot", (d, k, s),
                             [(layout.few_shot(out, d, t, cfg, k, s), "train")])
                    for d in self.datasets for k in self.shots for s in self.seeds]
        return runs

    def _evaluation_only(self) -> List[Run]:
        out, t, cfg = self.output, self.trainer, self.cfg
        if self.task == "base2new":
            return [self.run(f"{t}/{d}", "base2new", (d,), [(layout.base2new(out, f"test_{half}", d, t, cfg, 1), "test")
                                                             for half in ("base", "new")]) for d in self.datasets]
        if self.task in ("xd", "dg"):
            return [self.run(f"{t}/{d}", "xd", (d,), [(layout.eval_only(out, d, t, cfg), "test")]) for d in self.datasets]
        raise SweepError(f"{t} has no few-shot task: it trains nothing")


def datasets_and_source(task: str, names: List[str], source: Optional[str]) -> Tuple[List[str], str]:
    """--datasets all / toy expand to the task's datasets (and, unless --source is given, their
    source; else the papers' source); names must be datasets the runs know."""
    keyword_source, datasets = layout.expand_datasets(task, names)
    source = source or keyword_source or layout.keyword_datasets(task, "all")[0]
    known = layout.known_datasets(REPO)
    unknown = [d for d in datasets + ([source] if task in ("xd", "dg") else []) if d not in known]
    if unknown:
        raise SweepError(f"unknown dataset(s) {', '.join(unknown)}: no configs/datasets/<name>.yaml. Known: "
                         f"{', '.join(known)}; or --datasets {' / '.join(layout.DATASET_KEYWORDS)}")
    return datasets, source


def execute_runs(commands: List[List[str]], env: Dict[str, str], log_dir: Optional[str] = None) -> str:
    """The job (runs in the submitit worker): task script calls, all at once. A Slurm job that
    holds N GPUs runs N calls, one GPU each (a run uses one GPU, so none idles). Each run writes
    its output to its own file (`log_dir`, default a new temporary folder): read through pipes one
    after another, runs 2..N would stall as soon as their pipe filled. The files are copied to
    the job's own output once all have ended."""
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    if len(commands) > 1 and len(gpus) < len(commands):
        raise RuntimeError(f"{len(commands)} runs packed into a job that sees {len(gpus)} GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})")
    log_dir = log_dir or tempfile.mkdtemp(prefix="sweep-runs-")
    os.makedirs(log_dir, exist_ok=True)
    procs, logs = [], []
    for index, command in enumerate(commands):
        run_env = {**os.environ, **env, **({"CUDA_VISIBLE_DEVICES": gpus[index]} if len(commands) > 1 else {})}
        logs.append(os.path.join(log_dir, f"run{index}.log"))
        with open(logs[-1], "w") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(command, env=run_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    failures, outputs = [], []
    for command, proc, log in zip(commands, procs, logs):
        proc.wait()
        with open(log, errors="replace") as f:
            output = f.read()
        sys.stdout.write(f"== {' '.join(command)} (log {log})\n{output}")
        outputs.append(output[-500:])
        if proc.returncode != 0:
            failures.append(f"{' '.join(command)} exited with {proc.returncode}:\n{output[-2000:]}")
    if failures:
        raise RuntimeError("\n".join(failures))
    return "\n".join(outputs)


def job_env(grid: Grid, data: str, cfg: str) -> Dict[str, str]:
    """The variables the task scripts read; SOURCE only where a task trains on it (xd, dg)."""
    env = {"DATA": data, "OUTPUT": grid.output, "CFG": cfg, "PYTHONUNBUFFERED": "1"}
    if grid.task in ("xd", "dg"):
        env["SOURCE"] = grid.source
    if "PYTHON" in os.environ:
        env["PYTHON"] = os.environ["PYTHON"]
    return env


def stages(runs: Sequence[Run]) -> List[List[Run]]:
    """Runs grouped so that every run's prerequisites sit in an earlier group."""
    done, remaining, groups = set(), list(runs), []
    keys = {r.key for r in runs}
    while remaining:
        ready = [r for r in remaining if all(a in done or a not in keys for a in r.after)]
        if not ready:
            raise ValueError("circular dependencies in the grid")
        groups.append(ready)
        done.update(r.key for r in ready)
        remaining = [r for r in remaining if r.key not in done]
    return groups


# ---- executors ------------------------------------------------------------------------------
def run_local(runs: Sequence[Run], options, env, folder: str, slots: Sequence[Optional[int]],
              timeout_min: int, debug: bool = False) -> Dict[str, str]:
    """submitit's local executor, one run per slot (a GPU id, or None for a CPU process); a run
    starts once its prerequisites finished. Returns key -> "ok" | "failed: ..." | "blocked"."""
    import submitit
    status: Dict[str, str] = {}
    pending, running = list(runs), {}  # running: slot index -> (run, job)
    cpu_threads = max(1, (os.cpu_count() or 1) // len(slots))  # CPU runs share the cores
    while pending or running:
        for index, (run, job) in list(running.items()):
            if debug or job.done():
                try:
                    job.result()
                    status[run.key] = "ok"
                except Exception as err:  # the job's own error, shown in the summary
                    lines = str(err).strip().splitlines()
                    reason = next((line.strip() for line in lines if "exited with" in line), lines[-1].strip())
                    status[run.key] = f"failed: {reason[:300]} (logs: {folder})"
                del running[index]
        for run in [r for r in pending if any(status.get(a, "ok") != "ok" and a in status for a in r.after)]:
            status[run.key] = "blocked (a prerequisite failed)"
            pending.remove(run)
        for index, slot in enumerate(slots):
            ready = [r for r in pending if all(status.get(a) == "ok" or a not in {p.key for p in runs}
                                               for a in r.after)]
            if index in running or not ready:
                continue
            run = ready[0]
            pending.remove(run)
            executor = submitit.DebugExecutor(folder) if debug else submitit.LocalExecutor(folder)
            if not debug:
                executor.update_parameters(timeout_min=timeout_min, gpus_per_node=0 if slot is None else 1,
                                           visible_gpus=() if slot is None else (slot,))
            print(f"start {run.key}" + ("" if slot is None else f" on GPU {slot}"), flush=True)
            job_env = env if slot is not None else {"OMP_NUM_THREADS": str(cpu_threads), **env}
            running[index] = (run, executor.submit(execute_runs, [run.command(options)], job_env))
        if running and not debug:
            time.sleep(1.0)
    return status


SLURM_DEFAULTS = {"partition": None, "gpus_per_node": 1, "cpus_per_task": 8, "time": 240, "mem": "32GB",
                  "array_parallelism": 16, "job_name": "sweep"}
PER_RUN = ("cpus_per_task", "mem")  # given per run; a job packing N runs asks for N times as much


def packed(runs: Sequence[Run], per_job: int) -> List[List[Run]]:
    return [list(runs[i:i + per_job]) for i in range(0, len(runs), per_job)]


def job_resources(params: Dict, runs_per_job: int) -> Dict:
    settings = {k: v for k, v in params.items() if v is not None}
    settings["cpus_per_task"] = settings["cpus_per_task"] * runs_per_job
    number, unit = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(settings["mem"])).groups()
    settings["mem"] = f"{int(number) * runs_per_job}{unit}"
    return settings


def submit_slurm(runs: Sequence[Run], options, env, folder: str, params: Dict) -> List[str]:
    """One Slurm job array per stage; each array starts after the previous one succeeded. A run
    uses one GPU: with gpus_per_node N each job takes N GPUs and runs N runs of its stage at once."""
    import submitit
    per_job = max(1, int(params["gpus_per_node"] or 1))
    ids: List[str] = []
    for group in stages(runs):
        jobs_runs = packed(group, per_job)
        executor = submitit.SlurmExecutor(folder)
        settings = job_resources(params, per_job)
        if ids:
            settings["additional_parameters"] = {"dependency": f"afterok:{ids[-1]}"}
        executor.update_parameters(**settings)
        jobs = executor.map_array(execute_runs, [[r.command(options) for r in job] for job in jobs_runs],
                                  [env] * len(jobs_runs))
        ids.append(jobs[0].job_id.split("_")[0])
        print(f"submitted {len(group)} run(s) as Slurm array {ids[-1]} of {len(jobs_runs)} job(s), "
              f"{per_job} GPU(s) and up to {per_job} run(s) each" + (f", after {ids[-2]}" if len(ids) > 1 else ""))
    return ids


def slurm_params(args) -> Dict:
    params = dict(SLURM_DEFAULTS)
    if args.profile:
        import yaml
        with open(args.profile) as handle:
            profile = yaml.safe_load(handle) or {}
        unknown = set(profile) - set(SLURM_DEFAULTS)
        if unknown:
            raise SweepError(f"{args.profile}: unknown key(s) {sorted(unknown)}; known: {sorted(SLURM_DEFAULTS)}")
        params.update(profile)
    for key in SLURM_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value
    if str(params["mem"]).isdigit():  # a bare number means GB here (sbatch would read MB)
        params["mem"] = f"{params['mem']}GB"
    if not re.fullmatch(r"\d+\s*[A-Za-z]*", str(params["mem"])):
        raise SweepError(f"--mem / mem={params['mem']!r} is invalid: give a size such as 32GB")
    return params


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlprompt.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--trainer", required=True, choices=sorted(spec.name for spec in methods()
                                                                    if set(spec.default_configs) - {"train"}))
    parser.add_argument("--datasets", nargs="+", default=["all"],
                        help="names as in configs/datasets, 'all' (the papers' datasets for the task) or 'toy' "
                             "(the synthetic toy world's: datasets/toy_world.py)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="fewshot only")
    parser.add_argument("--cfg", help="config under configs/trainers/<trainer>/ or a .yaml path (default: the method's)")
    parser.add_argument("--source", help="xd/dg: the dataset trained on (default: imagenet; toy_objects "
                                         "with --datasets toy)")
    parser.add_argument("--data", default=os.environ.get("DATA"), help="dataset root (default: $DATA)")
    parser.add_argument("--output", default=os.environ.get("OUTPUT", "output"))
    parser.add_argument("--executor", choices=("local", "slurm", "debug"), default="local")
    parser.add_argument("--folder", default="sweep_logs", help="submitit's logs and job files")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands only")
    local = parser.add_argument_group("local executor")
    local.add_argument("--gpus", nargs="+", type=int, help="GPU ids: one run per GPU at a time")
    local.add_argument("--parallel", type=int, default=1, help="CPU runs at a time without --gpus")
    local.add_argument("--timeout", type=int, default=24 * 60, help="minutes per run")
    slurm = parser.add_argument_group("slurm executor (flags override --profile)")
    slurm.add_argument("--profile", help="YAML with any of: " + ", ".join(SLURM_DEFAULTS))
    slurm.add_argument("--partition")
    slurm.add_argument("--gpus-per-node", dest="gpus_per_node", type=int,
                       help="GPUs per job (default 1); a run uses one GPU, so a job runs this many runs at once")
    slurm.add_argument("--cpus-per-task", dest="cpus_per_task", type=int, help="CPUs per run")
    slurm.add_argument("--time", type=int, help="minutes")
    slurm.add_argument("--mem", help="memory per run, e.g. 32GB (a bare number is GB)")
    slurm.add_argument("--array-parallelism", dest="array_parallelism", type=int)
    parser.add_argument("options", nargs=argparse.REMAINDER, help="-- then config options for every run")
    args = parser.parse_args(argv)
    args.options = [o for o in args.options if o != "--"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = get_method(args.trainer)
    try:
        cfg = args.cfg or spec.config_for(args.task)
    except KeyError as err:
        raise SweepError(err.args[0])
    datasets, source = datasets_and_source(args.task, args.datasets, args.source)
    grid = Grid(args.task, args.trainer, layout.config_name(cfg), args.output, datasets, args.seeds, args.shots,
                source)
    runs = grid.expand()
    env = job_env(grid, args.data or "", args.cfg or cfg)
    todo = [r for r in runs if not r.finished(args.options, env)]
    print(f"{args.task} / {args.trainer} / {grid.cfg}: {len(runs)} runs, {len(runs) - len(todo)} finished "
          f"already, {len(todo)} to run")
    if args.dry_run:
        if not args.data:
            print("warning: DATA is not set (nor --data): the runs below would find no dataset", file=sys.stderr)
        exported = " ".join(f"{k}={v}" for k, v in env.items() if k != "PYTHONUNBUFFERED")
        for run in runs:
            state = "finished, skipped" if run not in todo else (f"after {', '.join(run.after)}" if run.after else "")
            print(f"{run.key}: {exported} {' '.join(run.command(args.options))}" + (f"   [{state}]" if state else ""))
        return 0
    if not todo:
        return 0
    if not args.data:
        raise SweepError("set --data or DATA to the folder that holds your datasets")
    os.makedirs(args.folder, exist_ok=True)
    if args.executor == "slurm":
        submit_slurm(todo, args.options, env, args.folder, slurm_params(args))
        return 0
    slots = args.gpus if args.gpus else [None] * max(1, args.parallel)
    status = run_local(todo, args.options, env, args.folder, slots, args.timeout, debug=args.executor == "debug")
    failed = {k: v for k, v in status.items() if v != "ok"}
    print(f"done: {len(status) - len(failed)} ok, {len(failed)} not" + "".join(f"\n  {k}: {v}" for k, v in failed.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main)())
