"""The GPU check: what a maintainer with one GPU runs to see the toolkit work there, and work fast,
in minutes. Every check can fail.

On the chosen device, through train.py as users run it, on the toy world (ToyObjects: synthetic
images with a CLIP pretrained on them, vlprompt/toyworld/toy_clip.pt, so accuracy means something)
with the demo's configurations (configs/trainers/*/demo_toy.yaml) and loader workers (pinned
memory on a GPU):
  zero-shot  the toy CLIP's accuracy on the base classes, the bar the trained runs must clear;
  train      HiCroPL base-to-new training in fp32, fp16, bf16 (when the requested GPU has native
             bf16) and amp: PASS only when the loss falls (last epoch's mean below the first's)
             and the base accuracy after training is above zero-shot;
  speed      fp16/bf16/amp training time against fp32: a mixed precision slower than fp32 FAILs
             on a GPU (on the CPU it is only reported: there are no fast half-precision kernels);
  resume     a --deterministic amp run killed after its first epoch and rerun must end with
             the same weights, bit for bit, as an uninterrupted one (and the same accuracy);
  evaluate   new-class testing of the trained model, twice: same accuracy, frozen features reused;
  methods    one epoch of every other registered prompt method, and of EdgeCNN;
  benchmark  benchmarks/bench_hicropl.py at a small size, with a floor on a GPU: ours at least as
             fast as the release's way of computing, in training and in evaluation.
One line per check: PASS/FAIL/SKIP, the check, its figures. Exit status 1 if any check failed.

    bash benchmarks/gpu_check.sh                    # cuda (the current GPU), a few minutes
    bash benchmarks/gpu_check.sh --device cuda:1
    bash benchmarks/gpu_check.sh --device cpu --size smallest   # any machine (the test suite runs this)
    bash benchmarks/gpu_check.sh --only train --train-options OPTIM.LR 1e-9   # a run that cannot learn: FAIL
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOY_CLIP = os.path.join(REPO, "vlprompt", "toyworld", "toy_clip.pt")
MIXED = ("fp16", "bf16", "amp")
LOSS_FALL = 0.98  # the last epoch's mean loss must be below this fraction of the first's


@dataclass(frozen=True)
class Size:
    shots: int  # training images per base class (ToyObjects: 18 base classes)
    epochs: int
    workers: int  # DATALOADER.NUM_WORKERS
    bench: List[str]  # benchmarks/bench_hicropl.py flags


SIZES = {
    # the tiny benchmark's steps take milliseconds: medians of 5 after a warm-up, so that a busy
    # machine does not decide the floor
    "smallest": Size(4, 3, 1, ["--arch", "tiny", "--classes", "5", "10", "--steps", "5", "--steps-large", "5",
                               "--warmup-large", "1", "--test-images", "16", "--test-batch", "4", "--n-ctx", "4",
                               "--depth", "3",
                               "--cross-layer", "1", "--skip-memory"]),
    "small": Size(16, 5, 4, ["--arch", "ViT-B/16", "--dtype", "fp16", "--batch", "32", "--classes", "50", "500",
                             "--steps", "5", "--steps-large", "3", "--warmup-large", "1", "--test-images", "256"]),
}

KILL_AFTER_FIRST_EPOCH = """
import os, runpy, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import trainers.checkpointed_trainer as base
original = base.CheckpointedTrainer.after_epoch
def after_epoch(self):
    original(self)
    if self.epoch == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # as a preempted cluster job
base.CheckpointedTrainer.after_epoch = after_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Result:
    status: str  # PASS | FAIL | SKIP
    check: str
    figures: str

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.figures}"


@dataclass
class Training:
    """What a train.py run's output says."""
    epoch_losses: List[float]  # each epoch's mean loss (its last progress line's average)
    seconds: float  # training time, summed over the epochs (no start-up, no evaluation)
    accuracy: Optional[float]  # the last test accuracy
    device: str


def read_training(stdout: str) -> Training:
    epochs: Dict[int, float] = {}
    for line in stdout.splitlines():
        match = re.match(r"epoch \[(\d+)/\d+\] batch .*? loss \S+ \((\S+)\)", line)
        if match:
            epochs[int(match.group(1))] = float(match.group(2))
    seconds = sum(float(s) for s in re.findall(r"^time of epoch \d+/\d+: ([\d.]+) s", stdout, re.M))
    accuracy = accuracies(stdout)
    device = re.search(r"^Device: (.+)$", stdout, re.M)
    return Training([epochs[e] for e in sorted(epochs)], seconds, accuracy[-1] if accuracy else None,
                    device.group(1) if device else "?")


def learned(run: Training, zero_shot: Optional[float]) -> List[str]:
    """Why a training run did not learn (empty: it did)."""
    problems = []
    losses = run.epoch_losses
    if not losses or not all(abs(x) < float("inf") for x in losses):
        problems.append(f"losses not finite: {losses}")
    elif len(losses) < 2 or not losses[-1] < LOSS_FALL * losses[0]:
        problems.append(f"the loss did not fall (epoch means {', '.join(f'{x:.4f}' for x in losses)})")
    if run.accuracy is None:
        problems.append("no test accuracy")
    elif zero_shot is None or not run.accuracy > zero_shot:
        problems.append(f"base accuracy {run.accuracy}% is not above zero-shot {zero_shot}%")
    return problems


def benchmark_verdict(summary: str, on_cuda: bool = True) -> Result:
    """The benchmark's floor: ours at least as fast as the reference (every *speedup >= 1). On
    the CPU (the suite's tiny size: steps of milliseconds on a shared machine) it is reported,
    not enforced: there the timings are noise."""
    ratios = {k: float(v) for k, v in re.findall(r"(\w*speedup\w*)=([\d.]+)", summary)}
    slow = [f"{k}={v:.2f} < 1" for k, v in ratios.items() if v < 1.0]
    if not ratios:
        return Result("FAIL", "benchmark", f"no speed-up in its summary: {summary!r}")
    if slow and not on_cuda:
        return Result("PASS", "benchmark", f"{summary} (below the floor on the CPU: {', '.join(slow)}; "
                                           f"the floor is enforced on a GPU)")
    return Result("FAIL" if slow else "PASS", "benchmark",
                  summary + (f" (slower than the reference: {', '.join(slow)})" if slow else ""))


def speed_verdict(times: Dict[str, float], on_cuda: bool) -> Result:
    """Mixed precisions against fp32 (training seconds of the same run in each)."""
    if "fp32" not in times or not times["fp32"] > 0:
        return Result("FAIL", "speed vs fp32", "no fp32 time to compare with")
    ratios = {p: times["fp32"] / times[p] for p in MIXED if times.get(p)}
    slower = [p for p, r in ratios.items() if r < 1.0]
    figures = ", ".join(f"{p} {times[p]:.2f} s (x{r:.2f})" for p, r in ratios.items())
    figures = f"fp32 {times['fp32']:.2f} s, {figures}"
    if slower and on_cuda:
        return Result("FAIL", "speed vs fp32", f"{figures}: {', '.join(slower)} SLOWER than fp32")
    if slower:
        figures += f"; {', '.join(slower)} slower than fp32, expected on the CPU (not a failure there)"
    return Result("PASS", "speed vs fp32", figures)


class Check:
    def __init__(self, args, work: str):
        self.args, self.work, self.size = args, work, SIZES[args.size]
        self.env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.on_cuda = args.device.startswith("cuda")
        if args.device.startswith("cuda:"):  # one GPU, as a run uses one
            self.env["CUDA_VISIBLE_DEVICES"] = args.device.split(":", 1)[1]
        self.env["VLPROMPT_DEVICE"] = "cuda" if self.on_cuda else "cpu"
        self.data = os.path.join(work, "data")
        self.zero_shot: Optional[float] = None
        self.times: Dict[str, float] = {}

    def prepare(self) -> None:
        from datasets.synthetic import write_dataset
        from datasets.toy_world import write_toy_dataset
        if not os.path.isdir(os.path.join(self.data, "toy_objects")):
            write_toy_dataset(self.data, "ToyObjects")
        write_dataset(self.data, "FER2013", 7, (2, 1, 1))  # EdgeCNN's

    def command(self, trainer: str, out: str, *flags: str, options=(), subsample: str = "base",
                epochs: int = 0) -> List[str]:
        """train.py for `trainer` on ToyObjects with its demo configuration and the toy CLIP."""
        config = os.path.join(REPO, "configs", "trainers", trainer, "demo_toy.yaml")
        fallback = []
        if not os.path.isfile(config):  # a method without a toy configuration: its base-to-new recipe, shrunk
            config, fallback = fallback_config(trainer)
        return [sys.executable, os.path.join(REPO, "train.py"), "--root", self.data, "--seed", "1",
                "--trainer", trainer, "--output-dir", os.path.join(self.work, out),
                "--dataset-config-file", os.path.join(REPO, "configs/datasets/toy_objects.yaml"),
                "--config-file", config, *flags,
                "MODEL.BACKBONE.PATH", TOY_CLIP, "MODEL.FEATURE_CACHE_DIR", os.path.join(self.work, "cache"),
                "DATASET.DESCRIPTIONS_DIR", os.path.join(self.data, "gpt_file"), "DATASET.SUBSAMPLE_CLASSES", subsample,
                "DATASET.NUM_SHOTS", str(self.size.shots), "OPTIM.MAX_EPOCH", str(epochs or self.size.epochs),
                "DATALOADER.NUM_WORKERS", str(self.size.workers), "TRAIN.PRINT_FREQ", "1000",
                *fallback, *options]

    def hicropl(self, out: str, prec: str, *flags: str, **kwargs) -> List[str]:
        return self.command("HiCroPL", out, *flags, options=["TRAINER.HICROPL.PREC", prec,
                                                              *self.args.train_options], **kwargs)

    def run(self, cmd: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=self.env, timeout=1800)

    def failed(self, check: str, proc: subprocess.CompletedProcess) -> Result:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        return Result("FAIL", check, f"exit {proc.returncode}: " + " | ".join(tail))

    # ---- the checks ----------------------------------------------------------------------------
    def zero_shot_accuracy(self) -> Result:
        check = "zero-shot base accuracy"
        proc = self.run(self.command("ZeroshotCLIP", "zero_shot", "--eval-only"))
        if proc.returncode != 0:
            return self.failed(check, proc)
        found = accuracies(proc.stdout)
        self.zero_shot = found[-1] if found else None
        return Result("PASS" if found else "FAIL", check, f"{self.zero_shot}% (the toy CLIP, prompt templates)")

    def bf16_on_requested_device(self) -> bool:
        """Asked of the requested GPU, in a process that sees only it (not GPU 0 of this one)."""
        probe = "import torch; print(torch.cuda.is_bf16_supported(including_emulation=False))"
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env)
        return proc.stdout.strip().endswith("True")

    def train(self, prec: str) -> Result:
        check = f"train {prec}"
        if prec == "bf16" and self.on_cuda and not self.bf16_on_requested_device():
            return Result("SKIP", check, f"{self.args.device} has no native bf16")
        proc = self.run(self.hicropl(f"train_{prec}", prec))
        if proc.returncode != 0:
            return self.failed(check, proc)
        run = read_training(proc.stdout)
        self.times[prec] = run.seconds
        problems = learned(run, self.zero_shot)
        return Result("FAIL" if problems else "PASS", check,
                      f"{len(run.epoch_losses)} epoch(s) of training in {run.seconds:.2f} s on {run.device} "
                      f"({self.size.workers} loader worker(s){', pinned memory' if self.on_cuda else ''}), "
                      f"mean loss {' -> '.join(f'{x:.4f}' for x in run.epoch_losses[:1] + run.epoch_losses[-1:])}, "
                      f"base accuracy {run.accuracy}% vs zero-shot {self.zero_shot}%"
                      + (f": {'; '.join(problems)}" if problems else ""))

    def speed(self) -> Result:
        return speed_verdict(self.times, self.on_cuda)

    def resume(self) -> Result:
        check = "kill after epoch 1 + resume (amp, --deterministic)"
        epochs = max(2, self.size.epochs)
        straight = self.run(self.hicropl("straight", "amp", "--deterministic", epochs=epochs))
        if straight.returncode != 0:
            return self.failed(check, straight)
        cmd = self.hicropl("resumed", "amp", "--deterministic", epochs=epochs)
        killed = self.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH] + cmd[1:])
        if killed.returncode != -9:
            return Result("FAIL", check, f"the run to kill exited with {killed.returncode} instead of SIGKILL")
        again = self.run(cmd)
        if again.returncode != 0:
            return self.failed(check, again)
        same = same_weights(os.path.join(self.work, "straight"), os.path.join(self.work, "resumed"), epochs)
        a, b = accuracies(straight.stdout)[-1:], accuracies(again.stdout)[-1:]
        ok = "after epoch 1" in again.stdout and same and a == b
        return Result("PASS" if ok else "FAIL", check,
                      f"weights after {epochs} epochs {'bitwise equal' if same else 'DIFFER'}, "
                      f"accuracy {a[0] if a else '?'}% vs {b[0] if b else '?'}%")

    def evaluate(self) -> Result:
        check = "evaluate new classes twice"
        model_dir = os.path.join(self.work, "straight")
        results = []
        for attempt in range(2):
            proc = self.run(self.hicropl(f"test_new_{attempt}", "amp", "--eval-only", "--model-dir", model_dir,
                                         subsample="new"))
            if proc.returncode != 0:
                return self.failed(check, proc)
            results.append((accuracies(proc.stdout), proc.stdout))
        (first, _), (second, stdout) = results
        reused = re.search(r"frozen image features: \d+ cached in", stdout) and " new, " not in stdout
        ok = first and first == second and reused
        return Result("PASS" if ok else "FAIL", check,
                      f"accuracy {first[-1] if first else '?'}% then {second[-1] if second else '?'}%, frozen "
                      f"image features {'reused' if reused else 'NOT reused'}")

    def methods(self) -> Result:
        """One epoch (fp32) of every registered method that trains but HiCroPL (above), and EdgeCNN."""
        from vlprompt.methods.registry import prompt_methods
        figures, failures = [], []
        for spec in prompt_methods():
            if not spec.trains or spec.name == "HiCroPL":
                continue
            proc = self.run(self.command(spec.name, f"method_{spec.name}", epochs=1))
            run = read_training(proc.stdout)
            ok = proc.returncode == 0 and run.epoch_losses and abs(run.epoch_losses[-1]) < float("inf") and \
                run.accuracy is not None
            figures.append(f"{spec.name} {run.accuracy}%" if ok else f"{spec.name} FAILED")
            if not ok:
                failures.append(self.failed(spec.name, proc).figures)
        proc = self.run(self.edgecnn_command())
        run = read_training(proc.stdout)
        ok = proc.returncode == 0 and run.epoch_losses and run.accuracy is not None
        figures.append(f"EdgeCNN {run.accuracy}%" if ok else "EdgeCNN FAILED")
        if not ok:
            failures.append(self.failed("EdgeCNN", proc).figures)
        return Result("FAIL" if failures else "PASS", "one epoch of every method",
                      ", ".join(figures) + (f" ({' || '.join(failures)})" if failures else ""))

    def edgecnn_command(self) -> List[str]:
        return [sys.executable, os.path.join(REPO, "train.py"), "--root", self.data, "--seed", "1",
                "--trainer", "EdgeCNN", "--output-dir", os.path.join(self.work, "method_EdgeCNN"),
                "--dataset-config-file", os.path.join(REPO, "configs/datasets/fer2013.yaml"),
                "--config-file", os.path.join(REPO, "configs/trainers/EdgeCNN/fer2013.yaml"),
                "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DATALOADER.TEST.BATCH_SIZE", "4",
                "DATALOADER.NUM_WORKERS", str(self.size.workers), "TRAIN.PRINT_FREQ", "1000"]

    def benchmark(self) -> Result:
        device = "cuda" if self.on_cuda else "cpu"  # the requested GPU is the only one visible
        proc = self.run([sys.executable, os.path.join(REPO, "benchmarks/bench_hicropl.py"), "--device", device,
                         *self.size.bench])
        summary = [line for line in proc.stdout.splitlines() if line.startswith("train_step_speedup=")]
        if proc.returncode != 0 or not summary:
            return self.failed("benchmark", proc)
        return benchmark_verdict(summary[-1], self.on_cuda)


def fallback_config(trainer: str):
    """A method without demo_toy.yaml: its base-to-new recipe at the toy CLIP's size (32 px,
    prompt depths of 2), fp32."""
    from vlprompt.methods.registry import get_method
    spec = get_method(trainer)
    config = os.path.join(REPO, "configs", "trainers", spec.name, spec.default_configs["base2new"] + ".yaml")
    layout = next(layout for name, layout in spec.trainer_names() if name == trainer)
    options = ["INPUT.SIZE", "(32, 32)", "DATALOADER.TRAIN_X.BATCH_SIZE", "16", f"TRAINER.{layout.path('prec')}", "fp32"]
    from dataclasses import fields
    for field in fields(spec.settings):
        if "depth" in field.name:
            options += [f"TRAINER.{layout.path(field.name)}", "2"]
    return config, options


def accuracies(stdout: str) -> List[float]:
    return [float(a) for a in re.findall(r"\* accuracy: ([\d.]+)%", stdout)]


def same_weights(first: str, second: str, epoch: int) -> bool:
    import torch
    name = f"VLPromptLearner/model.pth.tar-{epoch}"
    a = torch.load(os.path.join(first, name), map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(os.path.join(second, name), map_location="cpu", weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CHECKS = ("zero-shot", "train", "speed", "resume", "evaluate", "methods", "benchmark")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: 16 shots, 5 epochs and a ViT-B/16-sized benchmark; smallest: 4 shots, "
                             "3 epochs, a tiny benchmark")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only (train needs zero-shot: "
                                                                   "it is added)")
    parser.add_argument("--train-options", nargs="+", default=[], metavar="KEY VALUE",
                        help="config options added to the HiCroPL runs (e.g. OPTIM.LR 1e-9: a run that cannot learn)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32",) + MIXED, default=["fp32", *MIXED],
                        help="the precisions of the train check (speed compares the mixed ones with fp32)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device!r}: use cuda, cuda:N or cpu")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print(f"FAIL {args.device}: torch {torch.__version__} sees no CUDA device "
                  f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
            return 2
    chosen = set(args.only or CHECKS)
    if chosen & {"train", "speed"}:
        chosen |= {"zero-shot", "train"}
    if chosen & {"resume", "evaluate"}:
        chosen |= {"resume"}
    work = args.keep or tempfile.mkdtemp(prefix="gpu_check_")
    try:
        check = Check(args, work)
        check.prepare()
        print(f"gpu_check on {args.device}, size {args.size}, in {work}", flush=True)
        steps = [("zero-shot", check.zero_shot_accuracy)]
        steps += [("train", (lambda p: lambda: check.train(p))(p)) for p in args.precisions]
        steps += [("speed", check.speed), ("resume", check.resume), ("evaluate", check.evaluate),
                  ("methods", check.methods), ("benchmark", check.benchmark)]
        results: List[Result] = []
        for key, step in steps:
            if key in chosen:
                start = time.perf_counter()
                results.append(step())
                print(results[-1].line() + f"  [{time.perf_counter() - start:.0f} s]", flush=True)
        print("== summary")
        for result in results:
            print(result.line())
        return 1 if any(r.status == "FAIL" for r in results) else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
