"""The GPU check: what a maintainer with one GPU runs to see the toolkit work there, in minutes.

On the chosen device, with the demo's configuration (synthetic CoOp-format data, a tiny random
CLIP), through train.py as users run it:
  train      base-to-new training in fp16, bf16 (when the GPU has native bf16) and amp;
  resume     a --deterministic amp run killed after its first epoch and rerun must end with
             the same weights, bit for bit, as an uninterrupted one (and the same accuracy);
  evaluate   new-class testing of the trained model, twice: same accuracy, frozen features reused;
  benchmark  benchmarks/bench_hicropl.py at a small size (its ratios, ours against the release's
             way of computing).
One line per check: PASS/FAIL/SKIP, the check, its figures. Exit status 1 if any check failed.

    bash benchmarks/gpu_check.sh                    # cuda (the current GPU), about 3 minutes
    bash benchmarks/gpu_check.sh --device cuda:1
    bash benchmarks/gpu_check.sh --device cpu --size smallest   # any machine (the test suite runs this)
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
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# size -> (classes, images per class for train/val/test, training epochs, benchmark flags)
SIZES = {
    "smallest": (6, (4, 2, 3), 1, ["--arch", "tiny", "--classes", "5", "10", "--steps", "1", "--steps-large", "1",
                                   "--test-images", "8", "--test-batch", "4", "--n-ctx", "4", "--depth", "3",
                                   "--cross-layer", "1", "--skip-memory"]),
    "small": (10, (8, 4, 6), 3, ["--arch", "ViT-B/16", "--dtype", "fp16", "--batch", "32", "--classes", "50", "500",
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


class Check:
    def __init__(self, args, work: str):
        self.args, self.work = args, work
        self.classes, self.per_split, self.epochs, self.bench_flags = SIZES[args.size]
        self.env = dict(os.environ, PYTHONWARNINGS="ignore")
        device = args.device
        if device.startswith("cuda:"):  # one GPU, as a run uses one
            self.env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        self.use_cuda = device.startswith("cuda")
        self.clip_file = os.path.join(work, "tiny_clip.pt")

    def prepare(self) -> None:
        from datasets.synthetic import write_dataset
        from vlprompt.clip.loading import save_random_clip
        write_dataset(os.path.join(self.work, "data"), "Caltech101", self.classes, self.per_split)
        save_random_clip(self.clip_file, "tiny")

    def command(self, out: str, prec: str, *flags: str, epochs: int = 0, subsample: str = "base") -> List[str]:
        """train.py FLAGS ... with the demo's configuration; FLAGS are train.py's own (--eval-only ...)."""
        return [sys.executable, os.path.join(REPO, "train.py"), "--root", os.path.join(self.work, "data"),
                "--seed", "1", "--trainer", "HiCroPL", "--output-dir", os.path.join(self.work, out),
                "--dataset-config-file", os.path.join(REPO, "configs/datasets/caltech101.yaml"),
                "--config-file", os.path.join(REPO, "configs/trainers/HiCroPL/demo_tiny_clip.yaml"),
                *flags,
                "USE_CUDA", str(self.use_cuda), "TRAINER.HICROPL.PREC", prec,
                "OPTIM.MAX_EPOCH", str(epochs or self.epochs), "DATASET.SUBSAMPLE_CLASSES", subsample,
                "MODEL.BACKBONE.PATH", self.clip_file, "MODEL.FEATURE_CACHE_DIR", os.path.join(self.work, "cache")]

    def run(self, cmd: List[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=self.env, timeout=1200)

    def device_seen(self, stdout: str) -> str:
        match = re.search(r"^Device: (.+)$", stdout, re.M)
        return match.group(1) if match else "?"

    def failed(self, check: str, proc: subprocess.CompletedProcess) -> Result:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        return Result("FAIL", check, f"exit {proc.returncode}: " + " | ".join(tail))

    # ---- the checks ----------------------------------------------------------------------------
    def train(self, prec: str) -> Result:
        check = f"train {prec}"
        if prec == "bf16" and self.use_cuda:
            import torch
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                return Result("SKIP", check, "this GPU has no native bf16")
        start = time.perf_counter()
        proc = self.run(self.command(f"train_{prec}", prec))
        if proc.returncode != 0:
            return self.failed(check, proc)
        losses = [float(x) for x in re.findall(r" loss ([\d.eE+-]+|nan|inf) \(", proc.stdout)]
        accuracy = accuracies(proc.stdout)
        finite = losses and all(abs(x) < float("inf") for x in losses)
        return Result("PASS" if finite and accuracy else "FAIL", check,
                      f"{self.epochs} epoch(s) in {time.perf_counter() - start:.1f} s on "
                      f"{self.device_seen(proc.stdout)}, last loss {losses[-1] if losses else 'none'}, "
                      f"base test accuracy {accuracy[-1] if accuracy else 'none'}%")

    def resume(self) -> Result:
        check = "kill after epoch 1 + resume (amp, --deterministic)"
        epochs = max(2, self.epochs)
        straight = self.run(self.command("straight", "amp", "--deterministic", epochs=epochs))
        if straight.returncode != 0:
            return self.failed(check, straight)
        cmd = self.command("resumed", "amp", "--deterministic", epochs=epochs)
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
            proc = self.run(self.command(f"test_new_{attempt}", "amp", "--eval-only", "--model-dir", model_dir,
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

    def benchmark(self) -> Result:
        check = "benchmark"
        device = "cuda" if self.args.device.startswith("cuda:") else self.args.device  # one GPU visible
        proc = self.run([sys.executable, os.path.join(REPO, "benchmarks/bench_hicropl.py"), "--device", device,
                         *self.bench_flags])
        summary = [line for line in proc.stdout.splitlines() if line.startswith("train_step_speedup=")]
        if proc.returncode != 0 or not summary:
            return self.failed(check, proc)
        return Result("PASS", check, summary[-1])


def accuracies(stdout: str) -> List[float]:
    return [float(a) for a in re.findall(r"\* accuracy: ([\d.]+)%", stdout)]


def same_weights(first: str, second: str, epoch: int) -> bool:
    import torch
    name = f"VLPromptLearner/model.pth.tar-{epoch}"
    a = torch.load(os.path.join(first, name), map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(os.path.join(second, name), map_location="cpu", weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: 3 epochs and a ViT-B/16-sized benchmark; smallest: 1 epoch, a tiny benchmark")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device!r}: use cuda, cuda:N or cpu")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print(f"FAIL {args.device}: torch {torch.__version__} sees no CUDA device "
                  f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
            return 2
    work = args.keep or tempfile.mkdtemp(prefix="gpu_check_")
    try:
        check = Check(args, work)
        check.prepare()
        print(f"gpu_check on {args.device}, size {args.size}, in {work}", flush=True)
        results: Dict[str, Result] = {}
        steps = [("train fp16", lambda: check.train("fp16")), ("train bf16", lambda: check.train("bf16")),
                 ("train amp", lambda: check.train("amp")), ("resume", check.resume),
                 ("evaluate", check.evaluate), ("benchmark", check.benchmark)]
        for key, step in steps:
            results[key] = step()
            print(results[key].line(), flush=True)
        print("== summary")
        for result in results.values():
            print(result.line())
        return 1 if any(r.status == "FAIL" for r in results.values()) else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
