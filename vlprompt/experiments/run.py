"""One run of a task, as CoOp's scripts run it: find its folder, skip it when finished, resume it
when unfinished, check what it needs first, then call train.py.

    python -m vlprompt.run base2new_train HiCroPL caltech101 1 [CONFIG OPTIONS...]
    python -m vlprompt.run base2new_test HiCroPL caltech101 1
    python -m vlprompt.run xd_train HiCroPL imagenet 1 / xd_test HiCroPL dtd 1
    python -m vlprompt.run few_shot HiCroPL caltech101 16 1
    python -m vlprompt.run base2new ZeroshotCLIP caltech101 / xd ZeroshotCLIP dtd   (evaluation-only methods)
    python -m vlprompt.run train EdgeCNN fer2013 1
    python -m vlprompt.run base2new_train HiCroPL path/to/my_dataset.yaml 1   (a dataset YAML of your own)

The environment gives what CoOp's scripts read from it: DATA (the datasets' folder, required;
not read for a dataset given as a YAML path, whose root is its DATASET.ROOT or else its folder),
OUTPUT (default `output`), CFG (a config name under configs/trainers/<method>/ or a .yaml path;
default: the method's config for the task), SOURCE (xd_test: the dataset trained on, default
imagenet), LOADEP (xd_test: the epoch to load, default the config's MAX_EPOCH), PYTHON and
VLPROMPT_DEVICE (cpu, cuda or cuda:N: where train.py runs; unset: the GPU when one is visible).
The scripts under scripts/<method>/ are one-line calls of this module.
"""
import glob
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import layout, record
from ..device import VARIABLE as DEVICE_VARIABLE, requested_device
from ..errors import UserError
from ..methods.registry import MethodSpec, get_method, method_for_scripts
from .results import finished

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(REPO, "train.py")
SHOTS = 16  # base-to-new and cross-dataset training use 16 shots, as in CoOp
# task -> (its positional arguments, the task family whose default config it uses)
TASKS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "base2new_train": (("DATASET", "SEED"), "base2new"),
    "base2new_test": (("DATASET", "SEED"), "base2new"),
    "xd_train": (("DATASET", "SEED"), "xd"),
    "xd_test": (("DATASET", "SEED"), "xd"),
    "few_shot": (("DATASET", "SHOTS", "SEED"), "fewshot"),
    "base2new": (("DATASET",), "base2new"),  # evaluation-only methods: base and new halves
    "xd": (("DATASET",), "xd"),  # evaluation-only methods: all classes of a target dataset
    "train": (("DATASET", "SEED"), "train"),  # plain supervised training (EdgeCNN)
}
EVAL_ONLY_TASKS = ("base2new", "xd")


class UsageError(UserError, ValueError):
    """A mistake on the command line or in the environment; the message says which and the fix."""


@dataclass
class Job:
    folder: str
    kind: str  # "train" | "test": what a finished run has logged
    args: List[str]  # train.py arguments (before the config options)
    needs: Optional[Tuple[str, str]] = None  # (folder of a finished training it needs, how to make it)


@dataclass
class Context:
    spec: MethodSpec
    task: str
    cfg_name: str  # as it appears in folder names
    config_file: str
    data: str
    output: str
    scripts_folder: str = ""  # set when called through scripts/<folder>/*.sh
    dataset_files: Dict[str, str] = field(default_factory=dict)  # folder name -> a dataset YAML given as a path

    def command(self, task: str, *args: str) -> str:
        """How a user runs `task`, in the form they used (a script or this module)."""
        if self.scripts_folder:
            return " ".join([f"bash scripts/{self.scripts_folder}/{task}.sh", *args])
        return " ".join(["python -m vlprompt.run", task, self.spec.name, *args])

    def dataset_config(self, dataset: str) -> str:
        if dataset in self.dataset_files:
            return self.dataset_files[dataset]
        path = os.path.join(REPO, "configs", "datasets", f"{dataset}.yaml")
        if not os.path.isfile(path):
            raise UsageError(f"unknown dataset {dataset!r}: no {path} (known: {', '.join(layout.known_datasets(REPO))})")
        return path

    def train_args(self, dataset: str, seed: str, *extra: str) -> List[str]:
        return ["--root", self.data, "--seed", seed, "--trainer", self.spec.name,
                "--dataset-config-file", self.dataset_config(dataset), "--config-file", self.config_file, *extra]


def resolve_config(spec: MethodSpec, family: str, dataset: str, cfg: str) -> Tuple[str, str]:
    """(name used in folders, file) of CFG, or of the method's default for the task family."""
    if not cfg:
        try:
            cfg = spec.config_for(family).format(dataset=dataset)
        except KeyError as err:
            raise UsageError(err.args[0]) from err
    if cfg.endswith((".yaml", ".yml")):
        if not os.path.isfile(cfg):
            raise UsageError(f"CFG={cfg}: no such file")
        return layout.config_name(cfg), os.path.abspath(cfg)
    path = os.path.join(REPO, "configs", "trainers", spec.name, f"{cfg}.yaml")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        known = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
        raise UsageError(f"CFG={cfg}: no {path} (configs of {spec.name}: {', '.join(known) or 'none'}); "
                         f"give a name from there or a path to a .yaml file")
    return cfg, path


def yaml_data_root(path: str) -> str:
    """The data root of a dataset given as a YAML path: its DATASET.ROOT if it sets one, else the
    file's folder (paths in the file, such as DATASET.IMAGE_FOLDER, read from where the file is,
    whatever DATA says)."""
    import yaml
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    root = str((config.get("DATASET") or {}).get("ROOT") or "")
    return os.path.join(os.path.dirname(path), os.path.expanduser(root))


def config_max_epoch(path: str) -> str:
    import yaml
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    epoch = (config.get("OPTIM") or {}).get("MAX_EPOCH")
    if epoch is None:
        raise UsageError(f"{path} sets no OPTIM.MAX_EPOCH: set LOADEP to the epoch xd_train trained")
    return str(epoch)


def plan(ctx: Context, args: Sequence[str], env) -> List[Job]:
    """The runs a task call consists of (two for an evaluation-only base-to-new call)."""
    out, name, cfg = ctx.output, ctx.spec.name, ctx.cfg_name
    task = ctx.task
    if task == "base2new_train":
        dataset, seed = args
        return [Job(layout.base2new(out, "train_base", dataset, name, cfg, int(seed)), "train",
                    ctx.train_args(dataset, seed, "DATASET.NUM_SHOTS", str(SHOTS), "DATASET.SUBSAMPLE_CLASSES", "base"))]
    if task == "base2new_test":
        dataset, seed = args
        model_dir = layout.base2new(out, "train_base", dataset, name, cfg, int(seed))
        return [Job(layout.base2new(out, "test_new", dataset, name, cfg, int(seed)), "test",
                    ctx.train_args(dataset, seed, "--model-dir", model_dir, "--eval-only", "DATASET.NUM_SHOTS",
                                   str(SHOTS), "DATASET.SUBSAMPLE_CLASSES", "new"),
                    needs=(model_dir, ctx.command("base2new_train", dataset, seed)))]
    if task == "xd_train":
        dataset, seed = args
        return [Job(layout.xd_train(out, dataset, name, cfg, int(seed)), "train",
                    ctx.train_args(dataset, seed, "DATASET.NUM_SHOTS", str(SHOTS)))]
    if task == "xd_test":
        dataset, seed = args
        source = layout.config_name(env.get("SOURCE") or "imagenet")  # a dataset YAML's runs: by its stem
        model_dir = layout.xd_train(out, source, name, cfg, int(seed))
        epoch = env.get("LOADEP") or config_max_epoch(ctx.config_file)
        return [Job(layout.xd_test(out, dataset, name, cfg, int(seed)), "test",
                    ctx.train_args(dataset, seed, "--model-dir", model_dir, "--load-epoch", epoch, "--eval-only"),
                    needs=(model_dir, ctx.command("xd_train", source, seed)))]
    if task == "few_shot":
        dataset, shots, seed = args
        return [Job(layout.few_shot(out, dataset, name, cfg, int(shots), int(seed)), "train",
                    ctx.train_args(dataset, seed, "DATASET.NUM_SHOTS", shots))]
    if task == "base2new":
        (dataset,) = args
        return [Job(layout.base2new(out, f"test_{half}", dataset, name, cfg, 1), "test",
                    ctx.train_args(dataset, "1", "--eval-only", "DATASET.SUBSAMPLE_CLASSES", half))
                for half in ("base", "new")]
    if task == "xd":
        (dataset,) = args
        return [Job(layout.eval_only(out, dataset, name, cfg), "test", ctx.train_args(dataset, "1", "--eval-only"))]
    dataset, seed = args  # train
    return [Job(layout.train(out, dataset, name, cfg, int(seed)), "train", ctx.train_args(dataset, seed))]


def check_task(spec: MethodSpec, task: str) -> None:
    if task in EVAL_ONLY_TASKS and spec.trains:
        raise UsageError(f"{task} is for evaluation-only methods; {spec.name} trains: use {task}_train / {task}_test")
    family = TASKS[task][1]
    if family not in spec.default_configs or (not spec.trains and task not in EVAL_ONLY_TASKS):
        tasks = [t for t, (_, f) in TASKS.items() if f in spec.default_configs
                 and (t in EVAL_ONLY_TASKS) == (not spec.trains)]
        raise UsageError(f"{spec.name} has no task {task} (its tasks: {', '.join(tasks)})")


def parse(argv: Sequence[str], env) -> Tuple[Context, List[str], List[str]]:
    """(context, positional arguments, config options) from `TASK METHOD ARGS... [OPTIONS...]`
    or `TASK --scripts-folder FOLDER ARGS...` (the shims)."""
    argv = list(argv)
    if len(argv) < 2 or argv[0] not in TASKS:
        raise UsageError(f"usage: python -m vlprompt.run TASK METHOD ARGS... [CONFIG OPTIONS...], TASK one of "
                         f"{', '.join(TASKS)}")
    task = argv.pop(0)
    scripts_folder = ""
    try:
        if argv[0] == "--scripts-folder":
            scripts_folder = argv[1]
            spec, argv = method_for_scripts(scripts_folder), argv[2:]
        else:
            spec, argv = get_method(argv[0]), argv[1:]
    except (KeyError, IndexError) as err:
        raise UsageError(err.args[0] if isinstance(err, KeyError) else "--scripts-folder needs a folder name") from err
    names = TASKS[task][0]
    if len(argv) < len(names):
        usage = Context(spec, task, "", "", "", "", scripts_folder).command(task, *names)
        raise UsageError(f"usage: DATA=/path/to/datasets {usage} [CONFIG OPTIONS...]")
    positional, options = argv[:len(names)], argv[len(names):]
    for name, value in zip(names, positional):
        if name in ("SEED", "SHOTS") and not value.lstrip("-").isdigit():
            raise UsageError(f"{name} must be an integer, got {value!r}")
    check_task(spec, task)
    data = env.get("DATA", "")
    dataset_files = {}
    if positional[0].endswith((".yaml", ".yml")):  # your own dataset's YAML: runs are named by its stem
        if not os.path.isfile(positional[0]):
            raise UsageError(f"dataset config {positional[0]}: no such file")
        dataset_files[layout.config_name(positional[0])] = os.path.abspath(positional[0])
        positional[0] = layout.config_name(positional[0])
        data = yaml_data_root(dataset_files[positional[0]])
    if not data:
        raise UsageError("Set DATA to the folder that holds your datasets (CoOp's layout, see README: Datasets), "
                         "e.g.  export DATA=/data/coop_datasets")
    cfg_name, config_file = resolve_config(spec, TASKS[task][1], positional[0], env.get("CFG", ""))
    ctx = Context(spec, task, cfg_name, config_file, data, env.get("OUTPUT") or "output", scripts_folder, dataset_files)
    return ctx, positional, options


def describe(folder: str) -> str:
    """What starting the run in `folder` will do."""
    if not os.path.isdir(folder):
        return f"Run this job and save the output to {folder}"
    saved = glob.glob(os.path.join(folder, "*", "resume.pth.tar")) + glob.glob(os.path.join(folder, "*", "checkpoint"))
    if saved:
        return f"Resuming the unfinished run in {folder}"
    return f"Starting over in {folder}: an earlier attempt finished no epoch"


def train_here(args: Sequence[str]) -> int:
    """train.py in this interpreter, which has imported torch and clip already (a second one
    spends seconds importing them again, per run); its exit status."""
    saved_argv = sys.argv
    sys.argv = [TRAIN_PY, *args]
    try:
        runpy.run_path(TRAIN_PY, run_name="__main__")
        return 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved_argv


def train_argv(job: Job, options: Sequence[str]) -> List[str]:
    """train.py's arguments for a job (its record's request, when it ran)."""
    return ["--output-dir", job.folder, *job.args, *options]


def resolved_config(argv: Sequence[str]) -> dict:
    """The resolved config of a train.py command line, as its run record holds it."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import train  # torch, Dassl: only when a finished run's request differs from this one
    return train.resolved_config(argv)


def finished_note(job: Job, argv: Sequence[str]) -> str:
    """Whether a finished run may be skipped: its record's options are these (then a note on the
    harmless ones that differ, if any), or a ChangedRun naming the keys that differ."""
    recorded = record.read(job.folder)
    if recorded is None:
        return f" (it has no {record.RECORD_FILE}: made before runs were recorded, its options are not compared)"
    if recorded.get("request") == record.request(argv):
        return ""
    changes = record.compare(recorded, resolved_config(argv))
    if changes.relevant:
        raise record.refusal(job.folder, changes, finished=True)
    return "" if not changes.harmless else "; " + changes.harmless_note()


def execute(job: Job, options: Sequence[str], python: str, here: bool = False) -> int:
    """Runs the job unless it is finished with the same options or waits for a training; `here`:
    in this process (only for the command's last job: train.py's logger takes over stdout).
    --restart among the options discards the run in the job's folder, finished or not."""
    restart = "--restart" in options
    options = [o for o in options if o != "--restart"]
    args = train_argv(job, options)
    if finished(job.folder, job.kind) and not restart:
        print(f"Results are available in {job.folder}, made with these options: skipping "
              f"(--restart to rerun){finished_note(job, args)}")
        return 0
    if job.needs and not finished(job.needs[0], "train"):
        print(f"No finished training in {job.needs[0]}: run {job.needs[1]} first", file=sys.stderr)
        return 1
    print(f"Discarding the run in {job.folder} and starting over (--restart)" if restart and record.has_run(job.folder)
          else describe(job.folder), flush=True)
    args = ["--restart", *args] if restart else args
    if here:
        return train_here(args)
    return subprocess.run([python, TRAIN_PY, *args]).returncode


def main(argv=None, env=None, last_job_here: bool = False) -> int:
    env = os.environ if env is None else env
    try:
        ctx, positional, options = parse(sys.argv[1:] if argv is None else argv, env)
        jobs = plan(ctx, positional, env)
        device = requested_device(env)
    except UserError as err:
        print(err, file=sys.stderr)
        return 2
    if device is not None:  # train.py reads it from its own environment
        os.environ[DEVICE_VARIABLE] = device
    python = env.get("PYTHON") or sys.executable
    for index, job in enumerate(jobs):
        here = last_job_here and index == len(jobs) - 1 and "PYTHON" not in env
        try:
            code = execute(job, options, python, here)
        except UserError as err:  # a finished run made with other options
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C reached train.py too, which said where it stopped
            return 130
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(last_job_here=True))
